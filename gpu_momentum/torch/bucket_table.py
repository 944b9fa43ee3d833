"""A bucket's update table (a row per parameter): written whole from the group values,
the gradients present and the first steps taken, or, when only group values changed, row
by row in place (a changed hyperparameter is a scalar write: a changed lr or momentum is
a fill of the group's rows in that column).

A CUDA tensor lr (a DeviceValue) is copied into the device table's rows on the device, on
the step's stream, and never read on the host; the host's row holds 1.0 in its place.
So the host does not check it: an lr the compute dtype cannot hold (1e39 on float32) or
a decoupled lr * weight_decay past its largest value becomes inf in the table, as in
torch's fused step, which does not check a tensor lr either."""

import numpy as np

from ..backends import device_table
from ..groups import UpdateTable, row_terms, table_terms
from ..hyperparams import check_row_fits, keeps_velocity, row_flags, table_row
from ..kernels.layout import CLASSIC, KEEP_VELOCITY, LR, MAXIMIZE, MOMENTUM, NESTEROV, \
    NO_GROUP, VELOCITY_INITIALIZED
from .group_values import DeviceValue
from .tensors import NUMPY_DTYPES, as_torch, write_lr_on_device

# What the host's table row holds in place of an lr the device writes (DeviceValue): with
# decoupled weight decay its decay column then uses the decay term, as the device's will.
LR_WRITTEN_ON_DEVICE = 1.0

CAPTURE_REFUSED = ("gpu_momentum.torch.SGD is being captured into a CUDA graph (step() "
                    "or zero_grad()), but {}: a replay would not do it. Nothing was "
                    "changed.")


class TableUpkeep:
    """Bucket's update table (a base class of Bucket, which holds the state it reads:
    `values` {group: values}, `group_rows`, `groups`, `present`, `velocity_initialized`,
    the ranges, the host and device tables, the prepared launch's update terms, and
    `reads_device_values`: whether its table is in a CUDA device's memory, where a CUDA
    tensor lr is copied)."""

    def check_values(self, changes):
        """Raises ValueError, before anything changes, unless this bucket's compute dtype
        holds the table rows of the changed groups' values ({group: values}, GroupValues)
        that have parameters here (a CUDA tensor lr, copied on the device, unchecked)."""
        largest = self.largest
        for group, values in changes.items():
            if group not in self.group_rows:
                continue
            lr, momentum, dampening, weight_decay, l1, decoupled = values[:6]
            if (type(lr) is float and not decoupled and abs(lr) <= largest
                    and abs(momentum) <= largest and abs(1 - dampening) <= largest
                    and abs(weight_decay) <= largest and abs(l1) <= largest):
                continue  # (what check_row_fits passes, decided without it: every step)
            try:
                check_row_fits(*self._host_values(values)[:6],
                               NUMPY_DTYPES[self.param_dtype])
            except ValueError as error:
                raise ValueError(f"param_groups[{group}]: {error}") from None

    def write_values(self, changes, style):
        """The changed groups' values ({group: values}, checked by check_values) written
        into the update table in place: each group's rows of scalars (a changed lr or
        momentum alone: a fill of those columns; flags, if nesterov or maximize changed)
        on the host, then the span of rows that changed copied into the backend's table
        on the step's stream, without waiting (and a CUDA tensor lr copied into its rows
        there; a change of that lr alone is that copy alone); a change of whether a
        group keeps its velocity (momentum 0 in torch style) rewrites the table instead.
        No array is made and the prepared launch stays, unless the new rows use a term
        of the update it was not prepared for (table_terms)."""
        table = self.host_table
        low = high = None
        flags_changed = device_lrs_changed = False
        for group, values in changes.items():
            spot = self.group_rows.get(group)
            if spot is None:
                continue
            old, self.values[group] = self.values.get(group), values
            if table is None or self.table_stale:
                continue
            if (type(values[0]) is DeviceValue and type(old[0]) is DeviceValue
                    and self.reads_device_values and values[1:] == old[1:]):
                device_lrs_changed = True  # the host's row stays: the device's lr alone
                continue
            if keeps_velocity(style, old[1]) != keeps_velocity(style, values[1]):
                self.table_stale = True
                continue
            rows, (start, stop) = spot
            columns = self.lr_momentum_columns.get(group)
            if (columns is not None and type(values[0]) is float
                    and values[2:] == old[2:] and not (values[5] and values[3] != 0)):
                # Only lr and momentum changed, and no other column depends on them: a
                # fill casts each as table_row does (to the nearest compute value).
                columns[0].fill(values[0])
                columns[1].fill(values[1])
            else:
                row = table_row(*self._host_values(values)[:6], self.compute_dtype)
                table.scalars[rows] = row
                if row_terms(row) not in self._launch_terms:
                    self._launch_made_with = ()  # prepared again at the next launch
                if values[6:] != old[6:]:
                    bits = row_flags(values[6], values[7], False, False)
                    table.group_flags[rows] = (table.group_flags[rows] & ~np.uint32(
                        NESTEROV | MAXIMIZE)) | np.uint32(bits)
                    flags_changed = True
            low = start if low is None or start < low else low
            high = stop if high is None or stop > high else high
        if (low is None and not device_lrs_changed) or self.table_stale:
            return
        if low is not None and self.device_table.scalars is not table.scalars:
            with self.arrays.context():  # (else the CPU's: one table)
                param = self.arrays.step_arrays()[0]
                self.backend.upload_into(self.device_table.scalars[low:high],
                                         table.scalars[low:high], param)
                if flags_changed:
                    self.backend.upload_into(self.device_table.group_flags[low:high],
                                             table.group_flags[low:high], param)
        if self.reads_device_values:
            self._write_device_lrs()

    def fill_columns(self, group):
        """(lr column, momentum column): views of the host table's columns of `group`'s
        rows, where the table is in host memory (the CPU's: no copy to the device) and
        they are a slice, so that a change of lr or momentum alone is a fill of them
        (GroupValues.changes); else None."""
        columns = self.lr_momentum_columns.get(group)
        if (columns is None or self.reads_device_values or self.device_table is None
                or self.device_table.scalars is not self.host_table.scalars):
            return None
        return columns

    def _host_values(self, values):
        """`values` as the host's table row takes them: a CUDA tensor lr (DeviceValue)
        as LR_WRITTEN_ON_DEVICE where the device table takes it (_write_device_lrs), else
        read (a bucket in host memory with a CUDA lr: that waits for the device)."""
        lr = values[0]
        if type(lr) is not DeviceValue:
            return values
        return (LR_WRITTEN_ON_DEVICE if self.reads_device_values else lr.tensor.item(),
                *values[1:])

    def _write_device_lrs(self):
        """Each CUDA tensor lr copied into its group's rows of the device table (the lr
        column, and with decoupled weight decay the decay column), on the step's stream:
        after every write of the table from the host, which holds 1.0 there."""
        device_lrs = [(group, values) for group, values in self.values.items()
                      if type(values[0]) is DeviceValue and group in self.group_rows]
        if not device_lrs:
            return
        scalars = self.device_table.scalars
        if self._torch_scalars is None or self._torch_scalars[0] is not scalars:
            self._torch_scalars = (scalars, as_torch(scalars, self.device))
        for group, values in device_lrs:
            decay = values[3] if values[5] and values[3] != 0 else None
            write_lr_on_device(self._torch_scalars[1], self.group_rows[group][0],
                               values[0].tensor, decay)

    def refresh(self, style, capturing=False):
        """The update table rewritten in place when the gradients present or the first
        steps taken changed since it was written, or a change of the group values needs
        it (refused while a CUDA graph is captured: a replay would not write it)."""
        if self.table_stale:
            if capturing:
                raise RuntimeError(CAPTURE_REFUSED.format(
                    "the update table must be written (call opt.prepare() after changing "
                    "a group's values, and take the first steps before capturing)"))
            with self.arrays.context():
                self._write_table(style, self.arrays.step_arrays()[0])

    def _write_table(self, style, param_array):
        """The update table from the group values, the gradients present and the first
        steps taken; rewritten in place in the backend's memory."""
        groups = sorted(self.group_rows)
        position = np.searchsorted(groups, self.groups)
        values = [self._host_values(self.values[group]) for group in groups]
        rows = np.array([table_row(*v[:6], self.compute_dtype) for v in values],
                        self.compute_dtype)[position]
        keeps = np.array([keeps_velocity(style, v[1]) for v in values], bool)
        flags = np.array([row_flags(v[6], v[7], keep, False)
                          for v, keep in zip(values, keeps)], np.uint32)[position]
        self.param_keeps = keeps[position]
        if self.counters is None:  # else the counters say which velocities exist
            flags |= np.where(self.velocity_initialized & ~self.param_keeps,
                              np.uint32(VELOCITY_INITIALIZED), np.uint32(0))
        present = np.fromiter(self.present, bool, len(self.present))
        # A row no range reads must not count as initialized after a skipping step.
        flags |= np.where(present, np.uint32(0), np.uint32(KEEP_VELOCITY))
        range_groups = np.full(len(self.range_ends), NO_GROUP, np.int32)
        range_groups[np.asarray(self.param_ranges, np.intp)[present]] = np.flatnonzero(
            present)
        table = UpdateTable(rows, flags, self.range_ends, range_groups,
                            CLASSIC if style == "classic" else 0)
        if self.device_table is None:
            self.device_table = device_table(self.backend, table, param_array)
        else:
            if not np.array_equal(range_groups, self.host_table.range_groups):
                self.backend.upload_into(self.device_table.range_groups, range_groups,
                                         param_array)
            self.device_table = device_table(self.backend, table, param_array,
                                             reuse=self.device_table)
        if self.host_table is None:
            self.host_table = table
            # Views of each group's lr and momentum columns where its rows are a slice
            # (the host table's arrays stay: later writes are in place).
            self.lr_momentum_columns = {
                group: (table.scalars[rows, LR], table.scalars[rows, MOMENTUM])
                for group, (rows, _) in self.group_rows.items() if type(rows) is slice}
        else:  # in place: on the CPU the host table's arrays are the table's
            for name in ("scalars", "group_flags", "range_groups"):
                getattr(self.host_table, name)[...] = getattr(table, name)
        self.table_stale = False
        self.velocities_uninitialized = not (self.velocity_initialized
                                             | self.param_keeps).all()
        if not table_terms(rows) <= self._launch_terms:
            self._launch_made_with = ()  # prepared again at the next launch
        if self.reads_device_values:
            self._write_device_lrs()


def largest_value(dtype):
    """The largest finite value of a compute dtype, as a float."""
    return float(np.finfo(dtype).max)

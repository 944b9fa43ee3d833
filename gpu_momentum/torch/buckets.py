"""The flat buffers of one (device, dtype): the parameters' values, gradients, momentum
buffers and precision buffers as segments of flat tensors, the kernels' update table (a
row per parameter, rewritten in place when a value changes), the step counters the
kernels keep in the buffers' memory, and the one launch that updates them all."""

import operator

import numpy as np
import torch

from ..arrays import compute_dtype
from ..backends import check_arrays
from ..flat import aligned
from ..groups import table_terms
from ..kernels.layout import GROUP_SLOTS, LAST_STEP_SKIPPED, SKIPPED_STEPS, STEP_COUNT
from ..precision import PRECISION_BUFFER_NAMES
from .bucket_table import CAPTURE_REFUSED, TableUpkeep, largest_value
from .grad_views import GradientViews, Reshaped
from .storage import local_of, own_storage
from .tensors import NUMPY_DTYPES, TORCH_DTYPES, ArraysFor, data_ptr, dense, segment



_grad_of = operator.attrgetter("grad")
NO_SCALING = {}  # (a step without GradScaler's tensors: never written)


class Bucket(TableUpkeep):
    """The parameters of one (device, dtype) in one flat buffer: flat param, gradient and
    velocity tensors whose segments are the parameters' data, gradient views and momentum
    buffers, the precision buffer of 16-bit parameters (kahan: the compensation, master:
    the float32 master copy; segments `state[p]["compensation"]` or `state[p]["master"]`
    once the parameter took a step), and the update table of its one launch (a row per
    parameter). The gradient views and their hooks are `grads`, a GradientViews."""

    # The gradient side: GradientViews(params, flat gradient, offsets, device).
    gradient_views = GradientViews

    def __init__(self, backend, device, dtype, params, groups, counted, check_nonfinite,
                 precision, likes=None):
        """`likes`: the tensors whose shapes and strides the segments take, one per
        parameter (default: the parameters themselves)."""
        likes = params if likes is None else likes
        self.backend, self.device, self.params = backend, device, params
        self.groups = np.array(groups, np.intp)  # the param group of each row
        # Each group's rows: a slice where they are consecutive (the usual case), else
        # their indices; and the span of rows a change of the group rewrites.
        self.group_rows = {}
        for group in sorted(set(groups)):
            rows = np.flatnonzero(self.groups == group)
            span = (int(rows[0]), int(rows[-1]) + 1)
            whole = len(rows) == span[1] - span[0]
            self.group_rows[group] = (slice(*span) if whole else rows, span)
        self.param_dtype = dtype
        real = NUMPY_DTYPES[dtype]
        self.compute_dtype = compute_dtype(real)
        self.largest = largest_value(self.compute_dtype)  # (what check_values allows)
        element = real.itemsize
        offsets, ends, end = [], [], 0
        for p in likes:
            offset = self.segment_start(end, element)
            end = offset + p.numel() * (2 if p.is_complex() else 1)
            offsets.append(offset)
            ends.append(end)
        total = aligned(end, element)
        self.data = torch.zeros(total, dtype=dtype, device=device)
        own_storage(self.data)
        grad = torch.zeros(total, dtype=dtype, device=device)
        velocity = self.new_velocity(total, offsets, likes)
        self.param_views = [segment(self.data, o, p) for o, p in zip(offsets, likes)]
        self.grads = self.gradient_views(params, grad, offsets, device)
        self.precision = precision
        self.buffer_name = PRECISION_BUFFER_NAMES.get(precision)  # None: no buffer
        tensors = (self.data, grad, *velocity)
        self.buffer = self.buffer_views = None
        if self.buffer_name is not None:
            self.buffer = torch.zeros(total, dtype=dtype if precision == "kahan" else
                                      torch.float32, device=device)
            self.buffer_views = [segment(self.buffer, o, p) for o, p in zip(offsets, likes)]
            tensors += (self.buffer,)
        self.buffered = np.zeros(len(params), bool)  # its buffer segment holds its state
        # Ranges: each parameter's elements (its row, or NO_GROUP while its grad is None),
        # then the padding after it (NO_GROUP: never read or written).
        range_ends, self.param_ranges = [], []
        for offset, end, following in zip(offsets, ends, offsets[1:] + [total]):
            self.param_ranges.append(len(range_ends))
            range_ends.append(end)
            if following > end:
                range_ends.append(following)
        if not range_ends or range_ends[-1] != total:
            range_ends.append(total)
        self.range_ends = np.array(range_ends, np.int64)
        self.present = [False] * len(params)
        self.velocity_initialized = np.zeros(len(params), bool)
        self.arrays = self.arrays_for(backend, device, tensors)
        with self.arrays.context():
            check_arrays(backend, *self.arrays.step_arrays()[:3], precision,
                         self._buffer_array(self.arrays.step_arrays()))
            self.counters = (backend.asarray(np.zeros(GROUP_SLOTS + len(params), np.int64))
                             if counted else None)
        self.check_nonfinite = check_nonfinite  # with counters: skip non-finite steps
        self.values = {}  # each group's values (GroupValues) as the table holds them
        self.table_stale = True
        self.host_table = None
        self.device_table = None
        self.lr_momentum_columns = {}  # {group: views of its rows' lr and momentum}
        # Whether the table is in a CUDA device's memory, where a CUDA tensor lr is copied
        # (bucket_table), and the torch view of its scalars that takes it.
        self.reads_device_values = device.type == "cuda"
        self._torch_scalars = None
        self.ptrs = None
        self._prepared_step = None  # the prepared step, and what it was prepared with
        self._launch_made_with, self._launch_context = (), None
        self._launch_terms = frozenset()

    # The backend's arrays of the flat tensors (tensors.ArraysFor).
    arrays_for = ArraysFor

    @staticmethod
    def segment_start(end, element):
        """Where a parameter's segment starts after the previous one's `end` (elements
        of `element` bytes): at the next 16-byte boundary, as FlatParams lays them out."""
        return aligned(end, element)

    def new_velocity(self, total, offsets, likes):
        """The flat velocity tensors over `total` elements (here one, of the compute
        dtype), with `velocity_views`, each parameter's momentum buffer, a segment of it
        at its offset shaped like its `likes` tensor."""
        self.velocity = torch.zeros(total, dtype=TORCH_DTYPES[self.compute_dtype],
                                    device=self.device)
        self.velocity_views = [segment(self.velocity, o, p) for o, p in zip(offsets, likes)]
        return (self.velocity,)

    def velocity_state(self, index):
        """{state key: view}: what parameter `index`'s state holds of its velocity once it
        exists (here its momentum buffer)."""
        return {"momentum_buffer": self.velocity_views[index]}

    # -- packing: check, fill, commit --

    def check_state(self, state):
        """Raises before anything changes if a momentum buffer, compensation or master
        copy in `state` cannot be this bucket's parameter's (or belongs to another
        precision than this bucket's)."""
        for index, p in enumerate(self.params):
            entry = state.get(p) or {}
            for name in PRECISION_BUFFER_NAMES.values():
                if name in entry and name != self.buffer_name:
                    raise ValueError(f"Invalid state_dict value: a parameter's state holds "
                                     f"{name!r}, which precision {self.precision!r} of "
                                     f"{self.param_dtype} parameters does not keep")
            _check_state_tensor("momentum_buffer", entry.get("momentum_buffer"), p,
                               self.velocity_views[index])
            if self.buffer_name is not None:
                _check_state_tensor(self.buffer_name, entry.get(self.buffer_name), p,
                                   self.buffer_views[index])

    def _state_pairs(self, state, index):
        """[(state key, tensor in `state` or None, its view in the buffers)] of parameter
        `index`: the momentum buffer, and the precision buffer if any."""
        entry = state.get(self.params[index]) or {}
        pairs = [("momentum_buffer", entry.get("momentum_buffer"),
                  self.velocity_views[index])]
        if self.buffer_name is not None:
            pairs.append((self.buffer_name, entry.get(self.buffer_name),
                          self.buffer_views[index]))
        return pairs

    def fill(self, state):
        """Copies the parameters' values, gradients, momentum buffers and precision
        buffers into the new buffers (nothing the user sees changes)."""
        for index, p in enumerate(self.params):
            self.param_views[index].copy_(p.detach())
            grad = p.grad
            if grad is not None and grad.shape == p.shape:
                self.grads.views[index].copy_(dense(grad))
            for _, tensor, view in self._state_pairs(state, index):
                if tensor is not None:
                    view.copy_(dense(tensor))

    def commit(self, state, old_views, step_count):
        """Points the parameters, their gradients, momentum buffers and precision buffers
        at the buffers. `old_views`: {id(gradient view of the previous buffers): whether
        cleared}, from GradientViews.cleared_by_view(); `step_count`: the optimizer's
        steps taken (stochastic rounding's key)."""
        for index, p in enumerate(self.params):
            p.data = self.param_views[index]
            self._point_state(state, index)
        self.ptrs = list(map(data_ptr, self.params))
        self._write_counters(step_count, 0)
        self.grads.commit(old_views)

    def _point_state(self, state, index):
        """The state tensors of parameter `index` become their views (fill() or
        adopt_state() copied their values); which exist says what is initialized."""
        pairs = self._state_pairs(state, index)
        for key, tensor, view in pairs:
            if tensor is not None:
                state[self.params[index]][key] = view
        self.velocity_initialized[index] = pairs[0][1] is not None
        self.buffered[index] = len(pairs) > 1 and pairs[1][1] is not None

    def in_place(self):
        return list(map(data_ptr, self.params)) == self.ptrs

    def adopt_state(self, state):
        """After load_state_dict: the loaded momentum buffers and precision buffers
        (checked by check_state) become views of the flat buffers; parameters without one
        start afresh."""
        self._take_state(state)
        self._write_counters(0, 0)

    def sync_state(self, state):
        """After `state` was edited (checked by check_state; counters settled): a tensor
        assigned there is copied into its flat buffer, whose view then stands in `state`
        again; a parameter whose momentum buffer (or precision buffer) is gone takes its
        next step as a first step, as in torch."""
        self._take_state(state)
        self._write_counters(*self.base)

    def _take_state(self, state):
        for index in range(len(self.params)):
            for _, tensor, view in self._state_pairs(state, index):
                if tensor is not None and tensor is not view:
                    view.copy_(dense(tensor))
            self._point_state(state, index)
        self.table_stale = True

    # -- a step --

    def prepare(self):
        """Which parameters have a gradient this step (not None, and not cleared unless a
        gradient came in outside the view), and the gradients that are not views of the
        flat buffer, or views the user moved off it [(index, gradient)], checked."""
        grads = list(map(_grad_of, self.params))
        views, cleared = self.grads.views, self.grads.cleared
        if all(map(operator.is_, grads, views)) and self.grads.attached():
            if not any(cleared):  # the common step: every parameter has a gradient
                if not all(self.present):
                    self.present = [True] * len(grads)
                    self.table_stale = True
                return []
            present = list(map(operator.not_, cleared))
            if present != self.present:
                self.present = present
                self.table_stale = True
            return []
        # A view moved off its segment (p.grad.data = g) holds a gradient like any other.
        moved = self.grads.detached()
        present = [grad is not None and (grad is not view or off or not was_cleared)
                   for grad, view, off, was_cleared in zip(grads, views, moved, cleared)]
        if present != self.present:
            self.present = present
            self.table_stale = True
        foreign = []
        for index, (grad, view) in enumerate(zip(grads, views)):
            if grad is None or (grad is view and not moved[index]):
                continue
            p = self.params[index]
            if p.shape != self.grads.slots[index].shape:
                raise Reshaped  # p.data = p.data.view(...): same memory, a new shape
            if grad.shape != p.shape or grad.device != p.device or grad.dtype != p.dtype:
                raise RuntimeError(f"a parameter's .grad ({grad.dtype}, shape "
                                   f"{tuple(grad.shape)}, on {grad.device}) does not match "
                                   f"the parameter ({p.dtype}, shape {tuple(p.shape)}, on "
                                   f"{p.device})")
            foreign.append((index, grad))
        return foreign

    def launch(self, style, inv_grad_scale, state, capturing=False,
               grad_scale=None, found_inf=None, seed=0, step_count=0):
        """The fused update of every parameter with a gradient, one launch; then the
        momentum buffers of first steps enter `state`. Returns whether the step was
        skipped (known on the host: without counters, or with counters in host memory).
        grad_scale and found_inf: GradScaler's 0-d CUDA tensors, read by the kernels.
        seed and step_count (the steps taken before this one; counters hold their own)
        key stochastic rounding."""
        self.refresh(style, capturing)
        self._set_up_buffers(state, capturing)
        scaling = NO_SCALING if grad_scale is None and found_inf is None else {
            name: value if value.device == self.device else
            value.to(self.device, non_blocking=True)
            for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf))
            if value is not None}
        with self.arrays.context():
            arrays = self.arrays.step_arrays()
            self._launcher(arrays, seed)(arrays[1], inv_grad_scale, None,
                                         scaling.get("grad_scale"),
                                         scaling.get("found_inf"), step_count)
        if not self.velocities_uninitialized:  # every velocity this table can create exists
            return bool(self.counters is not None and self.device.type == "cpu"
                        and self.counters[LAST_STEP_SKIPPED])
        first = np.fromiter(self.present, bool, len(self.present)) & ~self.velocity_initialized
        first &= ~self.param_keeps
        if self.counters is not None and self.device.type == "cpu":
            if self.counters[LAST_STEP_SKIPPED]:
                return True
        elif self.counters is not None:
            self.pending |= first  # settle() checks them against the device's counters
        if first.any():
            for index in np.flatnonzero(first):
                state[self.params[index]].update(self.velocity_state(index))
            self.velocity_initialized |= first
            self.table_stale = True
        return False

    def _launcher(self, arrays, seed):
        """The backend's step prepared once (Backend.step_function) and kept while the
        table, the arrays, the counters, the seed and the stream it was prepared with
        stay the same, and the table's rows use only terms it was prepared for
        (write_values and _write_table forget it otherwise)."""
        made_with = (self.device_table, *arrays, self.counters)
        context = (seed, self.arrays.stream())
        if (context != self._launch_context or len(made_with) != len(self._launch_made_with)
                or not all(map(operator.is_, made_with, self._launch_made_with))):
            self._prepared_step = self.backend.step_function(
                arrays[0], arrays[2], self.device_table, self.counters,
                self.check_nonfinite, precision=self.precision,
                precision_buffer=self._buffer_array(arrays), seed=seed)
            self._launch_made_with, self._launch_context = made_with, context
            self._launch_terms = table_terms(self.host_table.scalars)
        return self._prepared_step

    def _buffer_array(self, arrays):
        """The precision buffer among the backend's `arrays`, or None."""
        return arrays[3] if self.buffer is not None else None

    def _set_up_buffers(self, state, capturing):
        """Each parameter taking its first step gets its precision buffer segment, in
        `state` from now on: kahan a zero compensation, master its current values widened
        (so values loaded into the parameters before their first step are kept)."""
        if self.buffer is None:
            return
        new = np.fromiter(self.present, bool, len(self.present)) & ~self.buffered
        if not new.any():
            return
        if capturing:
            raise RuntimeError(CAPTURE_REFUSED.format(
                f"a parameter's first step must set up its {self.buffer_name} (take the "
                f"first steps before capturing)"))
        for index in np.flatnonzero(new):
            view = self.buffer_views[index]
            if self.precision == "master":
                local_of(view).copy_(self.param_views[index])  # (a DTensor's shard)
            else:
                view.zero_()
            state[self.params[index]][self.buffer_name] = view
        self.buffered |= new

    # -- counters of buffers that skip non-finite steps --

    def _write_counters(self, taken, skipped):
        """Counters in the buffer's memory (if any) holding `taken` and `skipped` steps
        (the base settle() counts from: STEP_COUNT keys stochastic rounding, so it keeps
        counting the optimizer's steps) and which velocities exist."""
        self.pending = np.zeros(len(self.params), bool)
        self.base = (taken, skipped)
        if self.counters is None:
            return
        counters = np.zeros(GROUP_SLOTS + len(self.params), np.int64)
        counters[[STEP_COUNT, SKIPPED_STEPS]] = taken, skipped
        counters[GROUP_SLOTS:] = self.velocity_initialized
        with self.arrays.context():
            self.backend.assign(self.counters, counters)

    def settle(self, state):
        """(taken, skipped, last skipped) since the last settle, from the counters (waits
        for the device); momentum buffers of first steps the device skipped leave
        `state`."""
        with self.arrays.context():
            counters = self.backend.to_numpy(self.counters).copy()
        initialized = counters[GROUP_SLOTS:] != 0
        for index in np.flatnonzero(self.pending & ~initialized):
            entry = state.get(self.params[index])  # (unless the user removed it since)
            views = self.velocity_state(index)
            if entry is not None and all(entry.get(key) is view
                                         for key, view in views.items()):
                for key in views:
                    del entry[key]
                if not entry:
                    del state[self.params[index]]
        if (self.velocity_initialized != initialized).any():
            self.table_stale = True
        self.velocity_initialized = initialized
        self.pending = np.zeros(len(self.params), bool)
        taken, skipped = int(counters[STEP_COUNT]), int(counters[SKIPPED_STEPS])
        base, self.base = self.base, (taken, skipped)
        return taken - base[0], skipped - base[1], bool(counters[LAST_STEP_SKIPPED])

    def count_from(self, taken):
        """The optimizer's step count is `taken` (a state was loaded): the counters'
        STEP_COUNT, which keys stochastic rounding on the device, continues from it."""
        self._write_counters(taken, 0)


def _check_state_tensor(name, tensor, p, view):
    """Raises unless `tensor` (state[p][name]: None, its view, or a loaded tensor) can be
    parameter p's `name`: a tensor of p's shape, complex where p is."""
    if tensor is None or tensor is view:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Invalid {name} value: a {type(tensor).__name__} for a parameter "
                        f"of shape {tuple(p.shape)} (a tensor)")
    if tensor.shape != p.shape:
        raise ValueError(f"Invalid {name} value: shape {tuple(tensor.shape)} for a "
                         f"parameter of shape {tuple(p.shape)}")
    if tensor.is_complex() != p.is_complex():
        raise TypeError(f"Invalid {name} value: dtype {tensor.dtype} for a parameter of "
                        f"dtype {p.dtype}")


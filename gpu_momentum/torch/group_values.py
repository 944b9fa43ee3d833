"""The param groups' values as the update tables hold them, and the look at each step that
tells which groups changed since (a scheduler sets every group's lr at every step): it
compares the objects the group dicts hold, as cheaply as torch's own read of them, and
reads and converts only the values of groups whose objects differ.

A 1-element CUDA tensor lr (torch's fused and capturable steps take one) is never read on
the host: its value stands in a group's values as a DeviceValue, which the buckets on its
device copy into their tables' rows on the device (bucket_table)."""

import math
import numbers
import operator

import torch

from ..hyperparams import shown

# What a group's table row and flags are made of, in the order of a group's values:
# (lr, momentum, dampening, weight_decay, l1, decoupled_weight_decay, nesterov, maximize).
KEYS = ("lr", "momentum", "dampening", "weight_decay", "l1", "decoupled_weight_decay",
        "nesterov", "maximize")
# l1 and decoupled_weight_decay are in a group only when given (SGD's EXTRA_GROUP_DEFAULTS).
ABSENT = {"l1": 0.0, "decoupled_weight_decay": False}
NO_CHANGES = {}
# The types of group values that are no tensor (the common case, told apart at C speed).
PLAIN = frozenset((float, int, bool, type(None)))


class DeviceValue:
    """A group value held as a 1-element CUDA tensor, as it is at `version` (its
    _version): equal to another DeviceValue of the same tensor at the same version only,
    so that comparing group values never reads a tensor on the host."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor):
        self.tensor, self.version = tensor, tensor._version

    def __eq__(self, other):
        return (type(other) is DeviceValue and other.tensor is self.tensor
                and other.version == self.version)

    __hash__ = None

    def __repr__(self):
        return f"DeviceValue({self.tensor!r}, version={self.version})"


def read_on_device(tensor):
    """Whether a 1-element tensor group value is read where it lives, never on the host:
    a CUDA tensor (reading it on the host would wait for the device)."""
    return tensor.device.type == "cuda"


class GroupValues:
    """The values of each param group as the update tables last took them, for the
    tables of `buckets` (Bucket, TableUpkeep) in `style`."""

    def __init__(self, buckets=(), style="torch"):
        self._seen = []  # per group: the objects its dict held for KEYS
        self._tensors = []  # per group: ((tensor, its _version), ...) of those that are
        self.values = []  # per group: its values (floats, then bools), as accepted
        self._read = {}  # {group: the objects changes() read its values from}
        self._buckets, self._torch_style = buckets, style == "torch"
        self._fills = None  # per group: what _fill_targets says, once every table exists

    def changes(self, param_groups, capturing=False):
        """{group index: its values} of the groups whose values differ from the accepted
        ones (every group the first time, or when groups were added); NO_CHANGES when none
        did. A tensor value changed in place (a scheduler's `fill_`) counts by its
        version; its value is read then (on the host: .item(), which on CUDA would wait
        for the device, so a CUDA tensor lr is kept as a DeviceValue instead). Raises
        TypeError for a value that is not a number, a bool or a 1-element tensor.

        What a scheduler changes at every step, a float lr or momentum alone, is taken
        here (unless `capturing`) and left out of the changes where every table of the
        group is in host memory: checked as check_values checks it, then filled into the
        group's rows of the tables and their values (a scalar write), once every group
        is looked at and none changed otherwise (then they are changes as any other, so
        that a refusal of one changes nothing)."""
        seen, tensors = self._seen, self._tensors
        fills = None if capturing else self._fills or self._fill_targets()
        if len(param_groups) != len(seen):
            self._read = {index: tuple(map(group.get, KEYS))
                          for index, group in enumerate(param_groups)}
            return {index: read_values(objects, index)
                    for index, objects in self._read.items()}
        changes, filled = NO_CHANGES, None
        for index, group in enumerate(param_groups):
            objects = tuple(map(group.get, KEYS))
            before = seen[index]
            if all(map(operator.is_, objects, before)) and not (
                    tensors[index] and _moved(tensors[index])):
                continue
            old = self.values[index]
            lr, momentum = objects[0], objects[1]
            if (type(lr) is float and type(momentum) is float and not tensors[index]
                    and objects[2] is before[2] and objects[3] is before[3]
                    and objects[4] is before[4] and objects[5] is before[5]
                    and objects[6] is before[6] and objects[7] is before[7]):
                values = (lr, momentum, *old[2:])  # what a scheduler changes: no reading
                fill = fills and fills[index]
                if (fill and abs(lr) <= fill[0] and abs(momentum) <= fill[0]
                        and not (self._torch_style and (momentum == 0) != (old[1] == 0))
                        and not (old[5] and old[3] != 0)):
                    # Neither a change of whether the group keeps its velocity nor of a
                    # decoupled decay (1 - lr * weight_decay): the two columns alone.
                    if filled is None:
                        filled = []
                    filled.append((index, objects, values, fill[1]))
                    continue
            else:
                values = read_values(objects, index)
            if values != old or _signs_differ(values, old):
                if changes is NO_CHANGES:
                    changes, self._read = {}, {}
                changes[index] = values
                self._read[index] = objects
            else:  # the same values in other objects: nothing to write
                self._remember(index, objects, values)
        if filled is None:
            return changes
        if changes:  # taken with the others, or refused with them
            for index, objects, values, _ in filled:
                changes[index], self._read[index] = values, objects
            return changes
        for index, objects, values, columns in filled:
            lr, momentum = values[0], values[1]
            for lr_column, momentum_column, bucket_values in columns:
                lr_column.fill(lr)
                momentum_column.fill(momentum)
                bucket_values[index] = values
            seen[index], self.values[index] = objects, values
        return NO_CHANGES

    def _fill_targets(self):
        """Per group, (the largest value its compute dtypes hold, ((lr column, momentum
        column, the table's values) of each table with its rows)) where every such table
        takes a changed lr or momentum by a fill alone (TableUpkeep.fill_columns), else
        None; None until every table exists (then kept: the tables stay in place)."""
        buckets = self._buckets
        if not buckets or any(bucket.host_table is None for bucket in buckets):
            return None
        fills = []
        for group in range(len(self._seen)):
            holding = [bucket for bucket in buckets if group in bucket.group_rows]
            columns = [bucket.fill_columns(group) for bucket in holding]
            fills.append(None if not holding or None in columns else (
                min(bucket.largest for bucket in holding),
                tuple((*pair, bucket.values) for pair, bucket in zip(columns, holding))))
        self._fills = fills
        return fills

    def accept(self, param_groups, changes):
        """The values of `changes` (from `changes`, checked) are the tables' from now on."""
        if len(param_groups) != len(self._seen):
            self._seen = [None] * len(param_groups)
            self._tensors = [()] * len(param_groups)
            self.values = [None] * len(param_groups)
        read = self._read
        for index, values in changes.items():
            objects = read.get(index)
            if objects is None:
                objects = tuple(map(param_groups[index].get, KEYS))
            self._remember(index, objects, values)

    def _remember(self, index, objects, values):
        self._seen[index] = objects
        self._tensors[index] = () if PLAIN.issuperset(map(type, objects)) else tuple(
            (tensor, tensor._version) for tensor in objects
            if isinstance(tensor, torch.Tensor))
        self.values[index] = values


def _moved(tensors):
    return any(tensor._version != version for tensor, version in tensors)


def _signs_differ(values, old):
    """Whether a zero lr or momentum changed sign (0.0 == -0.0, but the table's zeros
    differ)."""
    return any(a == 0 and math.copysign(1.0, a) != math.copysign(1.0, b)
               for a, b in zip(values[:2], old[:2]))


def read_values(objects, index):
    """A group's values from the objects its dict holds for KEYS (None: absent): the
    five numbers as floats (a float, what schedulers set, as it is; a CUDA tensor lr as a
    DeviceValue), then the three flags as bools."""
    lr, momentum, dampening, weight_decay, l1, decoupled, nesterov, maximize = objects
    return (lr if type(lr) is float else _number("lr", lr, index),
            momentum if type(momentum) is float else _number("momentum", momentum, index),
            dampening if type(dampening) is float else
            _number("dampening", dampening, index),
            weight_decay if type(weight_decay) is float else
            _number("weight_decay", weight_decay, index),
            l1 if type(l1) is float else ABSENT["l1"] if l1 is None else
            _number("l1", l1, index),
            bool(decoupled), bool(nesterov), bool(maximize))


def _number(name, value, index):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name} value: a tensor of {value.numel()} elements "
                             f"(param_groups[{index}][{name!r}] must be a number or a "
                             f"1-element tensor)")
        if name == "lr" and read_on_device(value):
            return DeviceValue(value)
        return value.item()
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an integer past the largest float
            raise ValueError(f"Invalid {name} value: {shown(value)} (param_groups[{index}]"
                             f"[{name!r}] must be at most the largest float64)") from None
    raise TypeError(f"Invalid {name} value: {value!r} (param_groups[{index}][{name!r}] "
                    f"must be a number or a 1-element tensor)")

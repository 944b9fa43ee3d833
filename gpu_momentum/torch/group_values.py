"""The param groups' values as the update tables hold them, and the look at each step that
tells which groups changed since (a scheduler sets every group's lr at every step): it
compares the objects the group dicts hold, as cheaply as torch's own read of them, and
reads and converts only the values of groups whose objects differ."""

import math
import numbers
import operator

import torch

from ..hyperparams import shown

# What a group's table row and flags are made of, in the order of a group's values:
# (lr, momentum, dampening, weight_decay, l1, decoupled_weight_decay, nesterov, maximize).
KEYS = ("lr", "momentum", "dampening", "weight_decay", "l1", "decoupled_weight_decay",
        "nesterov", "maximize")
NUMBERS = 5  # the first five are numbers, the rest flags
# l1 and decoupled_weight_decay are in a group only when given (SGD's EXTRA_GROUP_DEFAULTS).
ABSENT = {"l1": 0.0, "decoupled_weight_decay": False}
NO_CHANGES = {}


class GroupValues:
    """The values of each param group as the update tables last took them."""

    def __init__(self):
        self._seen = []  # per group: the objects its dict held for KEYS
        self._tensors = []  # per group: ((tensor, its _version), ...) of those that are
        self.values = []  # per group: its values (floats, then bools), as accepted

    def changes(self, param_groups):
        """{group index: its values} of the groups whose values differ from the accepted
        ones (every group the first time, or when groups were added); NO_CHANGES when none
        did. A tensor value changed in place (a scheduler's `fill_`) counts by its
        version; its value is read then (on CUDA that waits for the device). Raises
        TypeError for a value that is not a number, a bool or a 1-element tensor."""
        seen, tensors = self._seen, self._tensors
        if len(param_groups) != len(seen):
            return {index: read_values(tuple(map(group.get, KEYS)), index)
                    for index, group in enumerate(param_groups)}
        changes = NO_CHANGES
        for index, group in enumerate(param_groups):
            objects = tuple(map(group.get, KEYS))
            if all(map(operator.is_, objects, seen[index])) and not (
                    tensors[index] and _moved(tensors[index])):
                continue
            values = read_values(objects, index)
            if values != self.values[index] or _signs_differ(values, self.values[index]):
                if changes is NO_CHANGES:
                    changes = {}
                changes[index] = values
            else:  # the same values in other objects: nothing to write
                self._remember(index, objects, values)
        return changes

    def accept(self, param_groups, changes):
        """The values of `changes` (from `changes`, checked) are the tables' from now on."""
        if len(param_groups) != len(self._seen):
            self._seen = [None] * len(param_groups)
            self._tensors = [()] * len(param_groups)
            self.values = [None] * len(param_groups)
        for index, values in changes.items():
            self._remember(index, tuple(map(param_groups[index].get, KEYS)), values)

    def _remember(self, index, objects, values):
        self._seen[index] = objects
        self._tensors[index] = tuple((tensor, tensor._version) for tensor in objects
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
    """A group's values from the objects its dict holds for KEYS (None: absent)."""
    values = []
    for name, value in zip(KEYS, objects):
        if value is None and name in ABSENT:
            value = ABSENT[name]
        if len(values) >= NUMBERS:
            values.append(bool(value))
        else:  # a float (what schedulers set) needs no conversion
            values.append(value if type(value) is float else _number(name, value, index))
    return tuple(values)


def _number(name, value, index):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name} value: a tensor of {value.numel()} elements "
                             f"(param_groups[{index}][{name!r}] must be a number or a "
                             f"1-element tensor)")
        return value.item()
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an integer past the largest float
            raise ValueError(f"Invalid {name} value: {shown(value)} (param_groups[{index}]"
                             f"[{name!r}] must be at most the largest float64)") from None
    raise TypeError(f"Invalid {name} value: {value!r} (param_groups[{index}][{name!r}] "
                    f"must be a number or a 1-element tensor)")

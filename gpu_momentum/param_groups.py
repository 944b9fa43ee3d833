"""The parameter groups of a MomentumSGD, as `torch.optim` has them: `ParamGroup` (one
group's settable options) and `ParamGroups` (the fixed sequence of them)."""

import collections.abc

from .groups import GROUP_OPTIONS


class ParamGroup(collections.abc.MutableMapping):
    """One parameter group of a MomentumSGD, as in `torch.optim`: `group["lr"] = 0.01`
    changes it for the next step (validated on assignment; no recompile). "params" (the
    segments it covers) is fixed; its keys are "params" and GROUP_OPTIONS, none of which
    can be added or removed. Every change (`[key] =`, `update`, `|=`, `setdefault`) is
    validated as a whole before it applies: all of its keys or none."""

    def __init__(self, params, options, set_options):
        """params: the segments the group covers, as given; options(): the group's
        Hyperparameters now; set_options(**changes): validates the changes together and
        applies them all, or raises having applied none (its optimizer's own rules)."""
        # As given, but NumPy integers and strings as Python ones (state dicts and
        # checkpoints hold plain JSON values).
        self._options, self._set_options = options, set_options
        self._params = tuple(str(p) if isinstance(p, str) else int(p) for p in params)

    def __getitem__(self, key):
        if key == "params":
            return list(self._params)
        if key not in GROUP_OPTIONS:
            raise KeyError(key)
        return getattr(self._options(), key)

    def __setitem__(self, key, value):
        if key in GROUP_OPTIONS:  # a scheduler's path: one option, no dict checked
            self._set_options(**{key: value})
        else:
            self.update({key: value})

    def update(self, other=(), /, **options):
        """Sets every given option at once, validated together: all of them or none.
        "params" may be given only as it is."""
        changes = dict(other, **options)
        for key, value in changes.items():
            if key == "params" and isinstance(value, (list, tuple)) and \
                    list(value) == list(self._params):
                continue
            if key not in GROUP_OPTIONS:
                raise KeyError(f"{key!r} cannot be set on a parameter group (settable: "
                               f"{GROUP_OPTIONS})")
        changes.pop("params", None)
        if changes:
            self._set_options(**changes)

    def __ior__(self, other):
        self.update(other)
        return self

    def __or__(self, other):
        if not isinstance(other, collections.abc.Mapping):
            return NotImplemented
        return dict(self) | dict(other)  # a new dict, as dict | dict gives

    def __ror__(self, other):
        if not isinstance(other, collections.abc.Mapping):
            return NotImplemented
        return dict(other) | dict(self)

    def setdefault(self, key, default=None):
        if key not in self:
            raise KeyError(f"{key!r} cannot be added to a parameter group (its keys: "
                           f"{tuple(self)})")
        return self[key]

    def __delitem__(self, key):
        raise TypeError(f"options of a parameter group cannot be removed (tried {key!r})")

    def popitem(self):
        raise TypeError("options of a parameter group cannot be removed")

    def clear(self):
        raise TypeError("options of a parameter group cannot be removed")

    def __iter__(self):
        return iter(("params", *GROUP_OPTIONS))

    def __len__(self):
        return 1 + len(GROUP_OPTIONS)

    def __repr__(self):
        return repr(dict(self))


class ParamGroups(collections.abc.Sequence):
    """`MomentumSGD.param_groups`: one ParamGroup per group given to the constructor, in
    order. The groups are fixed at construction (MomentumSGD has no add_param_group):
    every mutator of a list raises TypeError; each group's options stay settable."""

    FIXED = ("param_groups is fixed at construction (MomentumSGD has no "
             "add_param_group): pass every group to MomentumSGD(..., groups=[...])")

    def __init__(self, groups):
        self._groups = tuple(groups)

    def __getitem__(self, index):
        return self._groups[index]

    def __len__(self):
        return len(self._groups)

    def __eq__(self, other):
        if isinstance(other, (ParamGroups, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return repr(list(self._groups))

    def __setitem__(self, index, value):
        # `param_groups[i] |= {...}` updates the group in place, then stores it back: that
        # store of the very same group must not raise after the change.
        try:
            same = not isinstance(index, slice) and value is self._groups[index]
        except (IndexError, TypeError):
            same = False
        if not same:
            raise TypeError(self.FIXED)

    def _fixed(self, *args, **kwargs):
        raise TypeError(self.FIXED)

    __delitem__ = __iadd__ = __imul__ = _fixed
    append = extend = insert = pop = remove = clear = reverse = sort = _fixed

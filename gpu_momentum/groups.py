"""Parameter groups: per-segment hyperparameters, resolved into what one launch needs.

A group names segments of a FlatParams (by index, or by the names given to
`FlatParams.from_arrays(..., names=...)`) and overrides any of GROUP_OPTIONS; segments no
group names form group 0, which takes the optimizer's own hyperparameters. style and
maximize (and decoupled_weight_decay) stay the optimizer's (the style is one per launch).

The kernels see the result as contiguous ranges of the flat buffer: range r covers
[range_ends[r - 1], range_ends[r]) (from 0 for r = 0) and is updated with the
hyperparameters of group range_groups[r]. A segment's elements are one range; the padding
after it (up to the next segment's 16-byte boundary) is a range of its own owned by
NO_GROUP (kernels.layout), which no kernel reads or writes: whatever is written into the
gradient's padding, the padding of the parameters and the velocity keeps its bits.
Neighbouring ranges of one owner share one range, so a model whose groups are a few
contiguous blocks of layers costs the kernels a few ranges plus the padding between them.
"""

import dataclasses
import numbers

import numpy as np

from .hyperparams import shown
from .kernels.layout import DECAY, GROUP_COLUMNS, L1, NO_GROUP

GROUP_OPTIONS = ("lr", "momentum", "dampening", "weight_decay", "l1", "nesterov")


@dataclasses.dataclass(frozen=True)
class UpdateTable:
    """What one launch reads besides the arrays (layout in kernels.layout): host NumPy
    arrays from `update_table`, or the same in a backend's memory
    (`gpu_momentum.backends.contract.device_table`). The kernels take `arrays()` in this
    order."""

    scalars: object  # [groups, GROUP_COLUMNS] of the compute dtype
    group_flags: object  # uint32[groups]
    range_ends: object  # int64[ranges], increasing, the last is the element count
    range_groups: object  # int32[ranges]: a group, or NO_GROUP (left alone)
    launch_flags: int  # CLASSIC; backends add READ_COUNTERS

    @property
    def group_count(self):
        return len(self.group_flags)

    def arrays(self):
        """(scalars, group_flags, range_ends, range_groups): the kernels' table arguments."""
        return tuple(getattr(self, name) for name in ARRAY_FIELDS)


ARRAY_FIELDS = ("scalars", "group_flags", "range_ends", "range_groups")
# What changes when a hyperparameter or a group's velocity_initialized does: a reused
# device table gets these rewritten in place; the ranges are fixed for an optimizer.
GROUP_FIELDS = ("scalars", "group_flags")


def row_terms(row):
    """The optional terms of the update a table row (kernels.layout.GroupRow) uses: (an
    l1 term, a decoupled decay), as (l1 != 0, decay != 1). A backend may prepare a step
    for the terms its table's rows use alone (the CPU backend compiles a loop for each),
    so a row rewritten in place that uses others needs the step prepared again
    (Backend.step_function)."""
    return bool(row[L1] != 0), bool(row[DECAY] != 1)


def table_terms(scalars):
    """The set of row_terms of the rows of a scalar table."""
    return frozenset(zip((scalars[:, L1] != 0).tolist(), (scalars[:, DECAY] != 1).tolist()))


def update_table(hypers, velocity_initialized, compute_dtype, range_ends=None,
                 range_groups=None, size=None):
    """The UpdateTable of groups with Hyperparameters `hypers` (the style is the first's) and per-group `velocity_initialized` flags, over the ranges of a GroupPlan,
    or over one range of `size` elements for a single group."""
    if range_ends is None:
        range_ends, range_groups = np.array([size], np.int64), np.zeros(1, np.int32)
    scalars = np.array([h.group_row(compute_dtype) for h in hypers],
                       np.dtype(compute_dtype)).reshape(len(hypers), GROUP_COLUMNS)
    flags = np.array([h.group_flags(initialized)
                      for h, initialized in zip(hypers, velocity_initialized)], np.uint32)
    return UpdateTable(scalars, flags, range_ends, range_groups, hypers[0].launch_flags())


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    hypers: tuple  # Hyperparameters of each group; [0] is the optimizer's own
    segment_groups: tuple  # the group of each segment
    range_ends: np.ndarray  # int64[R], increasing, range_ends[-1] == buffer size
    range_groups: np.ndarray  # int32[R]: a group, or NO_GROUP for padding

    def window(self, start, stop):
        """This plan over elements [start, stop) of the buffer alone, numbered from 0 (a
        shard, gpu_momentum.distributed): ranges cut at the window's edges, those left
        empty dropped (one empty range stays for an empty window). Every group keeps its
        row and counters, whatever the window holds of it."""
        ends = np.clip(self.range_ends, start, stop) - start
        kept = np.flatnonzero(np.diff(ends, prepend=0) > 0)
        kept = kept if kept.size else np.zeros(1, np.int64)
        return dataclasses.replace(self, range_ends=ends[kept].astype(np.int64),
                                   range_groups=self.range_groups[kept])


def resolve_groups(groups, defaults, offsets, sizes, total, names=None, *,
                   param_dtype=None):
    """The GroupPlan of `groups` (a list of dicts, or None for one group) over segments of
    `sizes` elements starting at `offsets` of a `total`-element buffer; `defaults` is a
    Hyperparameters. Elements outside every segment (padding) belong to NO_GROUP.

    Raises ValueError or TypeError naming the group and the option before anything is
    built: unknown options, segments that do not exist, segments in two groups, values
    Hyperparameters rejects and, given `param_dtype`, values the update's compute dtype
    cannot hold (Hyperparameters.check_dtype).
    """
    _check_segments(offsets, sizes, total)
    if param_dtype is not None:
        defaults.check_dtype(param_dtype)
    groups = [] if groups is None else groups
    if isinstance(groups, (dict, str, bytes)) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups must be a list of dicts, got {type(groups).__name__}")
    segment_groups = [0] * len(offsets)
    owner = {}
    hypers = [defaults]
    for number, group in enumerate(groups):
        where = f"groups[{number}]"
        if not isinstance(group, dict):
            raise TypeError(f"{where} must be a dict, got {type(group).__name__}")
        unknown = sorted(set(group) - {"params", *GROUP_OPTIONS}, key=str)
        if unknown:
            raise ValueError(f"{where} has unknown option {unknown[0]!r} (a group takes "
                             f"'params' and any of {GROUP_OPTIONS})")
        for segment in _segments(where, group.get("params"), len(offsets), names):
            if segment in owner:
                other = "it twice" if owner[segment] == number else \
                    f"groups[{owner[segment]}] too"
                raise ValueError(f"Invalid params value in {where}: segment "
                                 f"{_describe(segment, names)} is named by {other}; a "
                                 f"segment belongs to one group")
            owner[segment] = number
            segment_groups[segment] = number + 1
        overrides = {k: v for k, v in group.items() if k != "params"}
        try:
            hyper = defaults.replace(**overrides)
            hypers.append(hyper if param_dtype is None else hyper.check_dtype(param_dtype))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None

    range_ends, range_groups = _ranges(segment_groups, offsets, sizes, total)
    return GroupPlan(tuple(hypers), tuple(segment_groups), range_ends, range_groups)


def _check_segments(offsets, sizes, total):
    """Segments in order, each inside the buffer and ending before the next begins."""
    ends = [int(o) + int(n) for o, n in zip(offsets, sizes)]
    starts = [*(int(o) for o in offsets[1:]), int(total)]
    if (len(offsets) != len(sizes) or any(int(o) < 0 for o in offsets)
            or any(int(n) < 0 for n in sizes) or any(e > s for e, s in zip(ends, starts))):
        raise ValueError(f"segments at offsets {list(offsets)} of sizes {list(sizes)} do "
                         f"not fit one after the other in {total} elements")


def _ranges(segment_groups, offsets, sizes, total):
    """(range_ends, range_groups): each segment's elements with its group, the gaps
    between segments with NO_GROUP; empty ranges dropped, neighbours of one owner merged.
    A buffer with no elements is one empty range of group 0 (a table has a range)."""
    pieces = []  # (end, owner), one after the other from element 0
    for group, offset, size in zip(segment_groups, offsets, sizes):
        pieces += [(int(offset), NO_GROUP), (int(offset) + int(size), group)]
    pieces.append((int(total), NO_GROUP))
    ends, owners = [], []
    for end, owner in pieces:
        if ends and end == ends[-1] or not ends and end == 0:
            continue  # empty
        if owners and owners[-1] == owner:
            ends[-1] = end
        else:
            ends.append(end)
            owners.append(owner)
    if not ends:
        ends, owners = [int(total)], [0]
    return np.array(ends, np.int64), np.array(owners, np.int32)


def _segments(where, params, count, names):
    """The segment indices a group's "params" names."""
    if params is None:
        raise ValueError(f"{where} has no 'params' (the segments it applies to)")
    if isinstance(params, (str, bytes, numbers.Integral)) or not isinstance(
            params, (list, tuple)):
        raise TypeError(f"Invalid params value in {where}: {params!r} (params must be a "
                        f"list of segment indices or names)")
    if not params:
        raise ValueError(f"Invalid params value in {where}: [] (a group names at least "
                         f"one segment)")
    segments = []
    for item in params:
        if isinstance(item, str):
            if names is None or item not in names:
                known = "the FlatParams has no names" if names is None else \
                    f"names are {names}"
                raise ValueError(f"Invalid params value in {where}: no segment is named "
                                 f"{item!r} ({known})")
            segments.append(names.index(item))
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            if not 0 <= item < count:
                raise ValueError(f"Invalid params value in {where}: segment "
                                 f"{shown(int(item))} does not exist (the FlatParams has "
                                 f"{count} segments)")
            segments.append(int(item))
        else:
            raise TypeError(f"Invalid params value in {where}: {item!r} (a segment index "
                            f"or name)")
    return segments


def _describe(segment, names):
    return f"{segment} ({names[segment]!r})" if names is not None else str(segment)


def check_table(table, n, compute_dtype):
    """What every kernel assumes of a host UpdateTable over `n` elements computed in
    `compute_dtype`: raises ValueError or TypeError before it reaches a device."""
    scalars = table.scalars
    if scalars.dtype != compute_dtype:
        raise TypeError(f"the update table's scalars are {scalars.dtype}, but the kernel "
                        f"computes in {compute_dtype}: build the table with "
                        f"update_table(..., compute_dtype={compute_dtype.name})")
    groups, ranges = len(table.group_flags), len(table.range_ends)
    expected = {"scalars": (scalars.shape, (groups, GROUP_COLUMNS)),
                "range_groups": (table.range_groups.shape, (ranges,))}
    for name, (shape, want) in expected.items():
        if tuple(shape) != want:
            raise ValueError(f"the update table's {name} has shape {tuple(shape)}, "
                             f"expected {want}")
    dtypes = {"group_flags": np.uint32, "range_ends": np.int64, "range_groups": np.int32}
    for name, dtype in dtypes.items():
        if getattr(table, name).dtype != dtype:
            raise TypeError(f"the update table's {name} is {getattr(table, name).dtype}, "
                            f"expected {np.dtype(dtype)}")
    if ranges == 0 or groups == 0:
        raise ValueError("the update table has no ranges or no groups; one group over one "
                         "range is the least")
    ends, owners = table.range_ends, table.range_groups
    if ends[-1] != n or (np.diff(ends) < 0).any() or ends[0] < 0:
        raise ValueError(f"the update table's ranges must increase and end at the "
                         f"element count {n}, got range_ends {ends.tolist()}")
    if ((owners < NO_GROUP) | (owners >= groups)).any():
        raise ValueError(f"the update table's range_groups name groups outside "
                         f"0..{groups - 1} (or {NO_GROUP}, no group): {owners.tolist()}")

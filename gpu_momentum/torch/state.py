"""`opt.state` as torch has it, with its edits noticed for free: torch's defaultdict(dict),
whose entries are dicts too, both counting every change made to them in one shared
counter. A step compares that counter with the value it last saw (one integer
comparison) and only after a change looks at the entries (Bucket.sync_state), so that
clearing the state, deleting an entry and assigning a momentum buffer take effect at the
next step as they do in torch.optim.SGD.

Pickled and deep-copied, both are torch's plain types (a defaultdict of dicts): the
optimizer's __setstate__ tracks them again."""

from collections import defaultdict

__all__ = ["OptimizerState", "StateEntry", "tracked", "edits_of", "plain", "take_edits"]


def _counted(method):
    """`method` of dict, counting one edit before it runs (an edit that then raises, such
    as deleting a missing key, only costs the next step a needless look)."""
    base = getattr(dict, method)

    def edit(self, *args, **kwargs):
        self._edits[0] += 1
        return base(self, *args, **kwargs)

    edit.__name__ = method
    edit.__doc__ = base.__doc__
    return edit


_EDITS = ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault",
          "update")


class StateEntry(dict):
    """One parameter's `opt.state[p]`: a dict whose edits count in its optimizer's
    state's counter."""

    __slots__ = ("_edits",)

    def __init__(self, edits, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._edits = edits

    def __reduce__(self):
        return dict, (dict(self),)


class OptimizerState(defaultdict):
    """`opt.state`: torch's defaultdict(dict) whose new entries are StateEntry dicts, and
    which counts every edit of itself and of its entries in one counter (a one-element
    list the entries share, read by edits_of; creating an empty entry by reading it is no
    edit)."""

    def __init__(self):
        super().__init__(dict)
        self._edits = [0]

    def __missing__(self, key):
        entry = StateEntry(self._edits)
        dict.__setitem__(self, key, entry)
        return entry

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())

    def adopt(self, key, entry):
        """Makes the plain dict `entry` at `key` a StateEntry (with the same items), without
        counting an edit; returns it."""
        entry = StateEntry(self._edits, entry)
        dict.__setitem__(self, key, entry)
        return entry


for _name in _EDITS:
    setattr(StateEntry, _name, _counted(_name))
    setattr(OptimizerState, _name, _counted(_name))


def tracked(state):
    """`state` (a mapping of parameters to dicts, such as torch's defaultdict(dict)) as an
    OptimizerState: the same keys, each dict entry a StateEntry with the same items."""
    result = OptimizerState()
    for key, entry in state.items():
        if isinstance(entry, dict):
            result.adopt(key, entry)
        else:
            dict.__setitem__(result, key, entry)
    return result


def edits_of(state):
    """The edit count of an OptimizerState, or None for any other mapping (one that
    replaced `opt.state`: every step must look at it)."""
    return state._edits[0] if type(state) is OptimizerState else None


def plain(state):
    """{key: entry} with each StateEntry as a plain dict (what a state dict holds, so
    that torch.load(weights_only=True) reads it)."""
    return {key: dict(entry) if isinstance(entry, StateEntry) else entry
            for key, entry in state.items()}


def take_edits(state, buckets):
    """After `state` (opt.state) was edited or replaced: every entry is checked against the
    buckets' parameters (Bucket.check_state: nothing changes on a failure), then each
    bucket takes it as torch.optim.SGD's next step would (Bucket.sync_state; the buckets'
    counters settled by the caller). Returns the state to keep: `state`, or, for a mapping
    that replaced it, a tracked copy; entries assigned as plain dicts become StateEntry
    dicts with the same items."""
    for bucket in buckets:
        bucket.check_state(state)
    if edits_of(state) is None:
        state = tracked(state)
    else:
        for key, entry in list(state.items()):
            if type(entry) is dict:
                state.adopt(key, entry)
    for bucket in buckets:
        bucket.sync_state(state)
    return state

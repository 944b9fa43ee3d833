"""The format of MomentumSGD's state dict: its keys (of every state version,
gpu_momentum.state_format), and the checks of its
plain values and arrays that need no optimizer's internals (MomentumSGD.load_state_dict
runs them before it checks the rest against its groups and counters)."""

import collections
import numbers

import numpy as np

from .arrays import describe, type_name
from .hyperparams import Hyperparameters
from .precision import check_same_precision, check_seed
from .state_format import STATE_VERSION, momentum_sgd_keys, state_version

COUNT_LIMIT = 2**63 - 1  # the counters are int64

# What a state dict's plain values say, checked: its format version, seed (0 before
# state version 4) and the optimizer's own hyperparameters (the groups' defaults).
StateHeader = collections.namedtuple("StateHeader", "version seed defaults")


def count(name, value):
    """`value` as an int, after checking it is a counter's value: an integer in [0,
    COUNT_LIMIT]; ValueError naming `name` otherwise."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or not 0 <= value <= COUNT_LIMIT):
        raise ValueError(f"Invalid {name} value: {value!r} ({name} must be an integer "
                         f"in [0, {COUNT_LIMIT}])")
    return int(value)


def state_dict_keys(precision="nearest", version=STATE_VERSION):
    """The keys of a state dict of state `version` saved with `precision`
    (state_format.momentum_sgd_keys)."""
    return momentum_sgd_keys(precision, version)


def read_header(state, precision, velocity_dtype, style):
    """The StateHeader of `state` (its version: the state version its "format" stands
    for, state_format.state_version), after checking that it is a dict of a format this
    version reads, with its keys, of an optimizer with this `precision`, `velocity_dtype`
    and `style`, with valid hyperparameters and a list of groups."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type_name(state)}")
    version = state_version("MomentumSGD", state.get("format"))
    check_same_precision(state.get("precision", "nearest") if version >= 4 else "nearest",
                         precision)
    expected = set(momentum_sgd_keys(precision, version))
    if set(state) != expected:
        raise ValueError(f"state has keys {sorted(state)}, expected {sorted(expected)}")
    if version >= 4:
        saved_velocity_dtype = state["velocity_dtype"]
        if saved_velocity_dtype != velocity_dtype.name:
            raise ValueError(f"Invalid velocity_dtype value: {saved_velocity_dtype!r} "
                             f"(this optimizer keeps a {velocity_dtype.name} velocity)")
    seed = check_seed(state["seed"]) if version >= 4 else 0
    defaults = Hyperparameters(
        **{k: state[k] for k in Hyperparameters.__dataclass_fields__})
    if defaults.style != style:
        raise ValueError(f"Invalid style value: {defaults.style!r} (this optimizer uses "
                         f"style {style!r}; velocities of the two styles differ)")
    if not isinstance(state["groups"], list):
        raise TypeError(f"Invalid groups value: {state['groups']!r} (a list of dicts)")
    return StateHeader(version, seed, defaults)


def like(backend, name, array, target_name, target):
    """`array` in `backend`'s memory, checked to have the shape and dtype of `target`
    (an optimizer's `target_name`), which must be writable."""
    describe(name, array)
    if describe(target_name, target).readonly:
        raise ValueError(f"this optimizer's {target_name} array is read-only; loading "
                         f"writes it in place (nothing was changed)")
    array = backend.asarray(array)
    have, want = describe(name, array), describe(target_name, target)
    if (have.shape, have.dtype) != (want.shape, want.dtype):
        raise ValueError(f"{name} has shape {have.shape} and dtype {have.dtype}; "
                         f"this optimizer needs shape {want.shape}, dtype {want.dtype}")
    return array

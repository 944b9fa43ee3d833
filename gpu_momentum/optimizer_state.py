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
from .kernels.layout import FLOAT8_VELOCITY
from .precision import float8_state_shapes
from .reference import dequantize_velocity, quantize_velocity
from .state_format import (FLOAT8_VELOCITY_KEYS, STATE_VERSION, momentum_sgd_keys,
                           state_version)

COUNT_LIMIT = 2**63 - 1  # the counters are int64

# What a state dict's plain values say, checked: its format version, seed (0 before
# state version 4) and the optimizer's own hyperparameters (the groups' defaults).
# velocity_dtype: the name of the saved velocity's dtype (None before version 4: the
# optimizer's own).
StateHeader = collections.namedtuple("StateHeader",
                                     "version seed defaults velocity_dtype")


def count(name, value):
    """`value` as an int, after checking it is a counter's value: an integer in [0,
    COUNT_LIMIT]; ValueError naming `name` otherwise."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or not 0 <= value <= COUNT_LIMIT):
        raise ValueError(f"Invalid {name} value: {value!r} ({name} must be an integer "
                         f"in [0, {COUNT_LIMIT}])")
    return int(value)


def state_dict_keys(precision="nearest", version=STATE_VERSION, velocity_dtype=None):
    """The keys of a state dict of state `version` saved with `precision` and a velocity
    of `velocity_dtype` (state_format.momentum_sgd_keys)."""
    return momentum_sgd_keys(precision, version, velocity_dtype)


def loads_velocity(saved, velocity_dtype):
    """Whether a saved velocity of dtype name `saved` loads into a velocity of
    `velocity_dtype`: the same dtype, or an FP8 one into float32 (dequantized) and the
    other way round (quantized)."""
    names = {saved, velocity_dtype.name}
    return saved == velocity_dtype.name or names == {FLOAT8_VELOCITY, "float32"}


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
    saved_velocity_dtype = state.get("velocity_dtype") if version >= 4 else None
    if version >= 4 and not (isinstance(saved_velocity_dtype, str)
                             and loads_velocity(saved_velocity_dtype, velocity_dtype)):
        raise ValueError(f"Invalid velocity_dtype value: {saved_velocity_dtype!r} "
                         f"(this optimizer keeps a {velocity_dtype.name} velocity; a "
                         f"float32 and an FP8 velocity load into each other)")
    expected = set(momentum_sgd_keys(precision, version, saved_velocity_dtype))
    if set(state) != expected:
        raise ValueError(f"state has keys {sorted(state)}, expected {sorted(expected)}")
    seed = check_seed(state["seed"]) if version >= 4 else 0
    defaults = Hyperparameters(
        **{k: state[k] for k in Hyperparameters.__dataclass_fields__})
    if defaults.style != style:
        raise ValueError(f"Invalid style value: {defaults.style!r} (this optimizer uses "
                         f"style {style!r}; velocities of the two styles differ)")
    if not isinstance(state["groups"], list):
        raise TypeError(f"Invalid groups value: {state['groups']!r} (a list of dicts)")
    return StateHeader(version, seed, defaults, saved_velocity_dtype)


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


def host_array(backend, name, array, shape, dtype):
    """`array` (in host or `backend`'s memory) as a host NumPy array, after checking it
    has `shape` and `dtype`; ValueError naming `name` otherwise."""
    have = describe(name, array)
    if (have.shape, have.dtype) != (tuple(shape), np.dtype(dtype)):
        raise ValueError(f"{name} has shape {have.shape} and dtype {have.dtype}; "
                         f"this optimizer needs shape {tuple(shape)}, dtype "
                         f"{np.dtype(dtype)}")
    return np.asarray(backend.to_numpy(backend.asarray(array)))


def saved_float8_velocity(backend, state, elements):
    """(codes, scales) of a state's FP8 velocity over `elements` elements as host NumPy
    arrays, checked: codes uint8[elements], scales float32[ceil(elements / 256)], every
    scale finite and >= 0; ValueError naming the key otherwise."""
    codes_key, scales_key = FLOAT8_VELOCITY_KEYS
    codes_shape, scales_shape = float8_state_shapes(elements)
    codes = host_array(backend, f'state["{codes_key}"]', state[codes_key], codes_shape,
                       np.uint8)
    scales = host_array(backend, f'state["{scales_key}"]', state[scales_key],
                        scales_shape, np.float32)
    bad = ~(np.isfinite(scales) & (scales >= 0))
    if bad.any():
        block = int(np.flatnonzero(bad)[0])
        raise ValueError(f'Invalid state["{scales_key}"] value: {scales[block]!r} at '
                         f"block {block} (scales are finite and >= 0)")
    return codes, scales


def converted_velocity(backend, state, saved_velocity_dtype, float8, shape):
    """A saved velocity converted across formats, as a host NumPy array: an FP8 state's
    dequantized (reference.dequantize_velocity) to float32 of `shape` when `float8` (the
    loading optimizer's) is False; a float32 state's quantized
    (reference.quantize_velocity, nearest) to (codes, scales) when it is True. None when no conversion is needed."""
    saved_float8 = saved_velocity_dtype == FLOAT8_VELOCITY
    elements = int(np.prod(shape))
    if saved_float8 and not float8:
        return dequantize_velocity(*saved_float8_velocity(backend, state,
                                                          elements)).reshape(shape)
    if float8 and not saved_float8:
        velocity = host_array(backend, 'state["velocity"]', state["velocity"], shape,
                              np.float32)
        return quantize_velocity(velocity.reshape(-1))
    return None

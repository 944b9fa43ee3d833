"""The checkpoint format: what a file holds, and the schema its metadata must fit.

A checkpoint (see gpu_momentum.checkpoint for the whole format) holds the arrays of
`expected_contents(optimizer)` and UTF-8 JSON metadata, which `parse_meta` parses and
`check_meta` checks against the schema of its version (gpu_momentum.state_format) before
anything uses it. Every use of the optimizer itself is in `expected_contents`,
`host_state` and `restore`.
"""

import hashlib
import json
import math
import reprlib
from typing import NamedTuple

import numpy as np

from ..arrays import describe
from ..backends import backend_named
from ..groups import GROUP_OPTIONS
from ..kernels.layout import PRECISION_NAMES
from ..precision import (PRECISION_BUFFER_NAMES, Precision, float8_state_shapes,
                         precision_buffer_dtype)
from ..state_format import (STATE_VERSION, VERSIONS, checkpoint_arrays,
                            checkpoint_meta_keys, momentum_sgd_keys)

FORMAT_NAME = "gpu-momentum checkpoint"
META_LIMIT = 1 << 20  # plus 4x this optimizer's layout in JSON (names may repeat in groups)


# The optimizer as checkpoints see it: every use of a MomentumSGD is in these three.

def expected_contents(optimizer):
    """What a checkpoint of `optimizer` holds, found without copying any array."""
    flat = optimizer.flat
    layout = None if flat is None else {"shapes": [list(s) for s in flat.shapes],
                                        "offsets": list(flat.offsets), "names": flat.names}
    param = describe("param", optimizer.param)
    segments = 1 if flat is None else len(flat.shapes)
    precision = Precision(param.dtype, optimizer.precision, optimizer.velocity_dtype)
    # Every array a checkpoint of this layout may hold, with its shape and dtype: the
    # buffers of the other precisions too, so that their sizes are bounded as well.
    # The velocity as a float32 array or as FP8 codes and scales: either loads (converted
    # when it is not the optimizer's own format).
    velocity_dtype = np.float32 if precision.float8 else precision.velocity_dtype
    codes_shape, scales_shape = float8_state_shapes(math.prod(param.shape))
    arrays = {"param": (param.shape, param.dtype),
              "velocity": (param.shape, velocity_dtype),
              "velocity_codes": (codes_shape, np.dtype(np.uint8)),
              "velocity_scales": (scales_shape, np.dtype(np.float32))}
    for mode, name in PRECISION_BUFFER_NAMES.items():
        arrays[name] = (param.shape, precision_buffer_dtype(param.dtype, mode))
    return Expected(json.loads(json.dumps(layout)), segments, arrays,
                    optimizer.precision)


def host_state(optimizer):
    """(arrays, state): `arrays` the param, velocity (an FP8 one's codes and scales) and
    precision buffer as host NumPy arrays, by member name (on the cpu backend param is the
    live buffer, not a copy), `state` the state_dict() without its arrays."""
    state = optimizer.state_dict()
    to_numpy = backend_named(optimizer.backend).to_numpy
    arrays = {"param": to_numpy(optimizer.param)}
    for name in checkpoint_arrays(STATE_VERSION, optimizer.precision,
                                  optimizer.velocity_dtype)[1:]:
        arrays[name] = to_numpy(state.pop(name))
    return arrays, state


def restore(optimizer, state, arrays):
    """Restores a state_dict()-like `state` and its `arrays` (host arrays by member name:
    param, velocity, the precision buffer), all or nothing; ValueError or TypeError when
    they do not fit."""
    state = {**state, **{name: a for name, a in arrays.items() if name != "param"}}
    optimizer.load_state_dict(state, params=arrays["param"])


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not fit the optimizer."""


class Expected(NamedTuple):
    layout: object  # as it reads back from JSON
    segments: int
    arrays: dict  # member name -> (shape, dtype) of what this layout may hold
    precision: str

    @property
    def meta_limit(self):
        return META_LIMIT + 4 * len(json.dumps(self.layout))

    def stored(self, name):
        """(shape, dtype in the file) of array member `name`."""
        shape, dtype = self.arrays[name]
        return shape, stored_dtype(dtype)


def stored_dtype(dtype):
    """The dtype an array of `dtype` has in the file: bfloat16 as its bits, uint16."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 4, 8, 8
_REPR.maxstring = _REPR.maxother = 80


def brief(value):
    """A repr of an untrusted value for messages, bounded in length and depth."""
    return _REPR.repr(value)


def short(text):
    return text if len(text) <= 80 else f"{text[:76]}..."


def array_sha256(array):
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.sha256(data).hexdigest()


# The metadata.

def parse_meta(meta, path):
    """The metadata's JSON, parsed without NaN, infinities or repeated keys."""
    def constant(name):
        raise ValueError(f"{name} is not a number a checkpoint holds")

    def pairs(items):
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"an object repeats a key: {brief(keys)}")
        return dict(items)

    try:
        text = meta.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: its metadata is not "
                              f"UTF-8 ({error})") from None
    try:
        return json.loads(text, parse_constant=constant, object_pairs_hook=pairs)
    except RecursionError:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: its metadata nests too "
                              f"deeply") from None
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: its metadata is not "
                              f"valid JSON ({error})") from None


class _Invalid(Exception):
    """A metadata value that does not fit the schema (a message, without the path)."""


def check_meta(meta, digested, path, expected):
    """Checks the metadata against the schema of its version, before anything uses it,
    and returns the version; `digested`: the file holds meta_sha256 (versions 3 and 4)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path!s} is not a gpu-momentum checkpoint")
    said = meta.get("version")
    if type(said) is not int or said not in VERSIONS:
        raise CheckpointError(f"checkpoint {path!s} has format version {brief(said)}; "
                              f"this version of gpu-momentum reads versions "
                              f"{', '.join(map(str, VERSIONS))}")
    if digested != (said >= 3):
        held = "3 or 4" if digested else "2"
        raise CheckpointError(f"checkpoint {path!s} says format version {said} but holds "
                              f"the members of version {held} (corrupted)")
    try:
        _keys("the metadata", meta, checkpoint_meta_keys(said))
        _check_state(meta["state"], expected.segments, said)
        arrays = checkpoint_arrays(said, saved_precision(meta["state"], said),
                                   saved_velocity_dtype(meta["state"], said))
        sha256 = meta["sha256"]
        _keys("sha256", sha256, arrays)
        for name, digest in sha256.items():
            if not (type(digest) is str and len(digest) == 64
                    and set(digest) <= set("0123456789abcdef")):
                raise _Invalid(f"Invalid sha256[{name!r}] value: {brief(digest)} (64 "
                               f"lowercase hex digits)")
        if said >= 4:
            _keys("dtypes", meta["dtypes"], arrays)
            for name, dtype in meta["dtypes"].items():
                _text(f"dtypes[{name!r}]", dtype)
    except _Invalid as error:
        raise CheckpointError(f"checkpoint {path!s} has invalid metadata: "
                              f"{error}") from None
    if not _same(meta["layout"], expected.layout):
        raise CheckpointError(f"checkpoint {path!s} has layout {brief(meta['layout'])}, "
                              f"this optimizer has {brief(expected.layout)}")
    return said


def _keys(where, value, keys):
    if type(value) is not dict:
        raise _Invalid(f"{where} must be an object, got {brief(value)}")
    missing = [key for key in keys if key not in value]
    unknown = [key for key in value if key not in keys]
    if missing or unknown:
        wrong = [f"{kind} {brief(keys)}" for kind, keys in (("missing", missing),
                                                              ("unknown", unknown)) if keys]
        raise _Invalid(f"{where} has keys {brief(sorted(value))}: {', '.join(wrong)}")


def _real(name, value):
    # Beyond 2**53 an int is no longer exact as a float; 10**400 is no float at all.
    if not ((type(value) is float and math.isfinite(value))
            or (type(value) is int and abs(value) <= 2**53)):
        raise _Invalid(f"Invalid {name} value: {brief(value)} (a finite number)")


def _flag(name, value):
    if type(value) is not bool:
        raise _Invalid(f"Invalid {name} value: {brief(value)} (true or false)")


def _count(name, value):
    if not (type(value) is int and 0 <= value < 2**63):  # the counters are int64
        raise _Invalid(f"Invalid {name} value: {brief(value)} (an integer in [0, 2**63))")


def _small_int(name, value):
    if not (type(value) is int and abs(value) < 2**31):
        raise _Invalid(f"Invalid {name} value: {brief(value)} (an integer)")


def _text(name, value):
    if not (type(value) is str and len(value) <= 64):
        raise _Invalid(f"Invalid {name} value: {brief(value)} (a short string)")


def _precision(name, value):
    if not (type(value) is str and value in PRECISION_NAMES):
        raise _Invalid(f"Invalid {name} value: {brief(value)} (one of {PRECISION_NAMES})")


def _seed(name, value):
    if not (type(value) is int and 0 <= value < 2**64):
        raise _Invalid(f"Invalid {name} value: {brief(value)} (an integer in [0, 2**64))")


# The checks of each value of a checkpoint's state (the state_dict() without its arrays).
STATE_CHECKS = {"format": _small_int, "lr": _real, "momentum": _real, "dampening": _real,
                "weight_decay": _real, "nesterov": _flag, "maximize": _flag, "style": _text,
                "l1": _real, "decoupled_weight_decay": _flag, "groups": None,
                "step_count": _count, "velocity_initialized": None, "skipped_steps": _count,
                "precision": _precision, "velocity_dtype": _text, "seed": _seed}


def _check_state(state, segments, version):
    """Types, ranges and lengths of the state of a checkpoint of `version`; its values are
    the optimizer's to judge."""
    schema = {key: STATE_CHECKS[key] for key in momentum_sgd_keys("nearest", version)
              if key != "velocity"}
    _keys("state", state, schema)
    for key, check in schema.items():
        if check is not None:
            check(key, state[key])
    groups = state["groups"]
    if type(groups) is not list or len(groups) > segments:
        raise _Invalid(f"Invalid groups value: {brief(groups)} (a list of at most "
                       f"{segments} groups, one segment each at least)")
    for number, group in enumerate(groups):
        where = f"groups[{number}]"
        if type(group) is not dict or "params" not in group:
            raise _Invalid(f"{where} must be an object with 'params', got {brief(group)}")
        for key, value in group.items():
            if key == "params":
                if not (type(value) is list and 1 <= len(value) <= segments and all(
                        type(item) is str or (type(item) is int and 0 <= item < segments)
                        for item in value)):
                    raise _Invalid(f"Invalid params value in {where}: {brief(value)} (a "
                                   f"list of 1 to {segments} segment names or indices in "
                                   f"[0, {segments}))")
            elif key in GROUP_OPTIONS:
                STATE_CHECKS[key](f"{key} in {where}", value)
            else:
                raise _Invalid(f"{where} has unknown option {brief(key)}")
    flags = state["velocity_initialized"]
    if not (type(flags) is list and len(flags) == 1 + len(groups)
            and all(type(flag) is bool for flag in flags)):
        raise _Invalid(f"Invalid velocity_initialized value: {brief(flags)} (a list of "
                       f"{1 + len(groups)} bools: the optimizer's, then each group's)")


def _same(a, b):
    """Whether JSON values `a` and `b` are equal, types included (1 is not 1.0 or true)."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return a == b


def saved_velocity_dtype(state, version):
    """The velocity dtype's name a checkpoint's checked `state` of `version` was saved
    with (None before version 4: the optimizer's own)."""
    return state["velocity_dtype"] if version >= 4 else None


def saved_precision(state, version):
    """The precision a checkpoint's checked `state` of `version` was saved with (before
    version 4: "nearest", the only one there was)."""
    return state["precision"] if version >= 4 else "nearest"

"""The saved state of every optimizer, under one version number.

Three containers hold an optimizer's state: `MomentumSGD.state_dict()` (which
`ShardedMomentumSGD` gives and takes too), the library's extras in
`gpu_momentum.torch.SGD.state_dict()` (under STATE_KEY), and the checkpoint files of
`gpu_momentum.checkpoint`. Each says which state version it holds, and there is one
version number for all three, STATE_VERSION; every version in VERSIONS still loads:

- 2: parameter groups, l1, decoupled weight decay, segment names;
- 3: checkpoint files carry `meta_sha256`, the digest of their metadata (the state dicts
  are those of version 2);
- 4: the 16-bit settings: `precision`, `velocity_dtype` (MomentumSGD) and `seed`, the
  precision buffer (`compensation` or `master`), and in checkpoint files the `dtypes` of
  their arrays. A state whose velocity_dtype is float8_e4m3fn holds the FP8 velocity's
  two arrays, FLOAT8_VELOCITY_KEYS (E4M3 codes uint8[n], scales float32[ceil(n / 256)]),
  in place of `velocity` (no earlier reader saw such a state: they refused FP8 ones).
  A torch.SGD state with an FP8 velocity: its extras add TORCH_FLOAT8_EXTRAS_KEYS, the
  velocity's name and each parameter's codes and scales (its momentum buffers are decoded,
  as torch.optim.SGD loads them).

Before the three shared this number, the state dicts counted their own versions: a
MomentumSGD state says "format" 2 (version 2) or 3 (version 4), a torch.SGD state's
extras "format" 1 (version 2) or 2 (version 4). Those numbers still load, as LEGACY_FORMATS
maps them; checkpoint files always used these version numbers.

This module holds the layouts (which keys and arrays each version has); the checks of
their values belong to the containers' readers.
"""

import numbers

import numpy as np

from .hyperparams import Hyperparameters
from .precision import PRECISION_BUFFER_NAMES, is_float8

STATE_VERSION = 4
VERSIONS = (2, 3, 4)  # what loads
# The numbers the state dicts wrote before they shared STATE_VERSION, and the version each
# is (the checkpoint files numbered theirs this way from the start).
LEGACY_FORMATS = {"MomentumSGD": {2: 2, 3: 4}, "torch.SGD": {1: 2, 2: 4}}
# The state the 16-bit settings added in version 4.
PRECISION_KEYS = ("precision", "velocity_dtype", "seed")
# What holds an FP8 velocity (velocity_dtype float8_e4m3fn) in place of "velocity".
FLOAT8_VELOCITY_KEYS = ("velocity_codes", "velocity_scales")

# gpu_momentum.torch.SGD: the library's extras in a state_dict, under one top-level key
# that torch.optim.SGD's load_state_dict ignores (it reads "state" and "param_groups").
STATE_KEY = "gpu_momentum"
# What the extras add for an FP8 velocity (version 4): "float8_e4m3fn", then {parameter
# index: its E4M3 codes (uint8, the parameter's shape)} and {parameter index: its block
# scales (float32[ceil(numel / 256)])}.
TORCH_FLOAT8_EXTRAS_KEYS = ("velocity_dtype", "momentum_codes", "momentum_scales")

# Checkpoint files: the members of each version, each an .npy array; version 4 adds at
# most one of PRECISION_BUFFER_MEMBERS, and holds FLOAT8_VELOCITY_KEYS in place of
# velocity for an FP8 velocity (FLOAT8_CHECKPOINT_MEMBERS).
CHECKPOINT_MEMBERS = {2: ("param", "velocity", "meta"),
                      3: ("param", "velocity", "meta", "meta_sha256"),
                      4: ("param", "velocity", "meta", "meta_sha256")}
FLOAT8_CHECKPOINT_MEMBERS = ("param", *FLOAT8_VELOCITY_KEYS, "meta", "meta_sha256")
PRECISION_BUFFER_MEMBERS = tuple(PRECISION_BUFFER_NAMES.values())


def state_version(container, number, name="format"):
    """The state version that `number`, the "format" a state dict of `container`
    ("MomentumSGD", "torch.SGD") says, stands for: STATE_VERSION itself, or what
    LEGACY_FORMATS maps one of the container's earlier numbers to. ValueError naming
    `name` for any other value (bools and non-integers included)."""
    legacy = LEGACY_FORMATS[container]
    readable = sorted({*legacy, STATE_VERSION})
    if (isinstance(number, (bool, np.bool_)) or not isinstance(number, numbers.Integral)
            or int(number) not in readable):
        raise ValueError(f"Invalid {name} value: {number!r} (this version reads formats "
                         f"{', '.join(map(str, readable[:-1]))} and {readable[-1]})")
    number = int(number)
    return legacy.get(number, number)


def velocity_keys(velocity_dtype=None, version=STATE_VERSION):
    """The keys that hold a velocity of `velocity_dtype` (a dtype or its name; None: not
    an FP8 one) in a state of `version`: FLOAT8_VELOCITY_KEYS for float8_e4m3fn (version
    4), ("velocity",) otherwise."""
    if version >= 4 and velocity_dtype is not None and is_float8(velocity_dtype):
        return FLOAT8_VELOCITY_KEYS
    return ("velocity",)


def momentum_sgd_keys(precision="nearest", version=STATE_VERSION, velocity_dtype=None):
    """The keys of a MomentumSGD state dict of `version` saved with `precision` and a
    velocity of `velocity_dtype` (velocity_keys)."""
    keys = ("format", *Hyperparameters.__dataclass_fields__, "groups", "step_count",
            "velocity_initialized", "skipped_steps")
    if version < 4:
        return (*keys, "velocity")
    buffer = PRECISION_BUFFER_NAMES.get(precision)
    return (*keys[:-4], *PRECISION_KEYS, *keys[-4:], *velocity_keys(velocity_dtype),
            *((buffer,) if buffer else ()))


def torch_extras_keys(version=STATE_VERSION, velocity_dtype=None):
    """The keys of the library's extras (under STATE_KEY) in a torch.SGD state dict of
    `version` with a velocity of `velocity_dtype` (its name, or None for the default):
    TORCH_FLOAT8_EXTRAS_KEYS added for float8_e4m3fn (version 4)."""
    keys = ("format", "style", "step_count", "skipped_steps")
    if version < 4:
        return keys
    float8 = isinstance(velocity_dtype, str) and is_float8(velocity_dtype)
    return (*keys, "precision", "seed", *(TORCH_FLOAT8_EXTRAS_KEYS if float8 else ()))


def checkpoint_meta_keys(version):
    """The keys of a checkpoint file's metadata of `version`."""
    keys = ("format", "version", "state", "layout", "sha256")
    return keys if version < 4 else (*keys, "dtypes")


def checkpoint_arrays(version, precision, velocity_dtype=None):
    """The array members of a checkpoint file of `version` saved with `precision` and a
    velocity of `velocity_dtype` (velocity_keys)."""
    buffer = PRECISION_BUFFER_NAMES.get(precision) if version >= 4 else None
    return ("param", *velocity_keys(velocity_dtype, version),
            *((buffer,) if buffer else ()))

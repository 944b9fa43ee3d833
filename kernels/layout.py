"""What every kernel reads besides the arrays, by name: the per-group scalar table's
columns, the flag bits and the step counters' slots.

This is the single source of the launch ABI. The Numba kernels import these names; the
CUDA C kernel receives them as `#define`s generated from here (kernels/cuda_source.py):
GM_COLUMN_<name>, GM_GROUP_COLUMNS, GM_FLAG_<name>, GM_COUNTER_<name> and
GM_PRECISION_<name>.

One launch updates the whole flat buffer, whatever the number of parameter groups, and
reads (see gpu_momentum.groups.UpdateTable):
- `scalars[group, column]`, one row per group in the compute dtype (float32 for float16
  and float32 parameters, float64 for float64), with the COLUMNS below, and per-group flag
  bits `group_flags[group]`;
- contiguous ranges of the buffer: range r is [range_ends[r - 1], range_ends[r]) (from 0
  for r = 0) and belongs to group range_groups[r], or to NO_GROUP;
- launch-wide flag bits (`launch_flags`), 1 / loss scale (`inv_grad_scale`) and, with
  READ_COUNTERS, the step counters;
- for 16-bit parameters (bfloat16, float16: stored 16-bit, computed in float32), the
  PRECISION of the launch (which compiled kernel runs), its `precision_buffer` (KAHAN: the
  compensation, in the parameter dtype; MASTER: the float32 master copy of the
  parameters; none otherwise), and the `seed` and `step_count` that key STOCHASTIC
  rounding's random bits (kernels.elementwise.random_bits): with READ_COUNTERS the step
  count is counters[STEP_COUNT], read by the kernel, else the launch's `step_count`.
"""

from typing import NamedTuple


class GroupRow(NamedTuple):
    """One group's row of the scalar table, in column order."""

    lr: object
    momentum: object
    grad_coeff: object  # 1 - dampening (torch style; classic ignores it)
    weight_decay: object  # coupled: weight_decay * p is added to the gradient
    l1: object
    decay: object  # decoupled: p *= decay before the update; exactly 1 without it


COLUMNS = {name.upper(): column for column, name in enumerate(GroupRow._fields)}
LR, MOMENTUM, GRAD_COEFF, WEIGHT_DECAY, L1, DECAY = COLUMNS.values()
GROUP_COLUMNS = len(COLUMNS)

# The owner of a range no group updates, such as the padding between FlatParams segments:
# its elements are neither read nor written (not by the update, not by the non-finite
# gradient check), so whatever a user writes into the gradient's padding, the padding of
# the parameters and of the velocity keeps its bits.
NO_GROUP = -1

# Flag bits, one namespace. Launch-wide: CLASSIC (style), READ_COUNTERS (the
# skip and each group's velocity_initialized come from the step counters in memory, not
# from the table). Per group: MAXIMIZE, NESTEROV, VELOCITY_INITIALIZED (the group's velocity exists:
# a step reads it; its first step does not) and KEEP_VELOCITY (torch style with momentum
# 0: the velocity is neither read nor written, as PyTorch leaves its momentum buffer).
# LEAVE_ALONE is no table's: the CUDA C kernel's range cursor sets it for a NO_GROUP range,
# whose elements it then neither reads nor writes.
FLAGS = {
    "CLASSIC": 1,
    "MAXIMIZE": 2,
    "READ_COUNTERS": 4,
    "NESTEROV": 8,
    "VELOCITY_INITIALIZED": 16,
    "KEEP_VELOCITY": 32,
    "LEAVE_ALONE": 64,
}
(CLASSIC, MAXIMIZE, READ_COUNTERS, NESTEROV, VELOCITY_INITIALIZED, KEEP_VELOCITY,
 LEAVE_ALONE) = FLAGS.values()

# Slots of the step counters, int64[GROUP_SLOTS + groups], kept in the backend's memory
# when the optimizer skips steps with non-finite gradients (the kernels count there, so no
# step waits for the host). Slot GROUP_SLOTS + k is group k's velocity_initialized.
COUNTERS = {
    "STEP_COUNT": 0,
    "SKIPPED_STEPS": 1,
    "LAST_STEP_SKIPPED": 2,
    "GROUP_SLOTS": 3,
}
STEP_COUNT, SKIPPED_STEPS, LAST_STEP_SKIPPED, GROUP_SLOTS = COUNTERS.values()

# How 16-bit parameters (and a 16-bit velocity) are rounded after the float32 update,
# one compiled kernel each. float32 and float64 parameters have NEAREST only.
# NEAREST: round to nearest even; STOCHASTIC: stochastic rounding with the counter-based
# hash of (seed, step count, element index); KAHAN: a compensation buffer in the parameter
# dtype carries each step's rounding error into the next; MASTER: a float32 master copy is
# updated and the parameters are its rounding.
PRECISIONS = {"NEAREST": 0, "STOCHASTIC": 1, "KAHAN": 2, "MASTER": 3}
NEAREST, STOCHASTIC, KAHAN, MASTER = PRECISIONS.values()
PRECISION_NAMES = tuple(name.lower() for name in PRECISIONS)  # as users spell them

# An 8-bit velocity: FP8 E4M3 codes (float8_e4m3fn: no inf, largest 448, NaN 0x7f/0xff),
# one byte per element of the flat buffer, and one float32 scale per block of
# FLOAT8_BLOCK consecutive elements (block b is elements [b * FLOAT8_BLOCK, (b + 1) *
# FLOAT8_BLOCK) of the buffer, the last one partial). The format itself is defined in
# gpu_momentum.reference (quantize_velocity, float8_velocity_step); FLOAT8_VELOCITY is the
# velocity_dtype that asks for it, its one spelling.
FLOAT8_VELOCITY = "float8_e4m3fn"
FLOAT8_BLOCK = 256
FLOAT8_MAX = 448.0  # the largest finite E4M3 value: a block's absmax maps to it
FLOAT8_NAN = 0x7F  # the one NaN code a kernel writes (a non-finite velocity)


def float8_scale_count(elements):
    """The number of float32 scales of an FP8 velocity over `elements` elements."""
    return -(-int(elements) // FLOAT8_BLOCK)


def compute_dtype_name(param_dtype_name):
    """The dtype (its name) the update computes in for parameters of `param_dtype_name`
    (bfloat16, float16, float32, float64): float64 for float64, else float32. The table's
    scalars and 1 / loss scale are in it; 16-bit values are widened to it and rounded back
    once per step."""
    return "float64" if param_dtype_name == "float64" else "float32"

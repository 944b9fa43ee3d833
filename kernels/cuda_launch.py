"""Launching the CUDA C kernel (kernels/momentum.cu) without CuPy: the grid, the scalar
arguments, and the launches of one step.

The cupy backend (gpu_momentum.backends.cupy) launches through these, and so does the
host-built kernel of the tests (tests/host_kernel.py), so both launch alike; every
backend's step (gpu_momentum.backends.runner.StepRunner) queues its launches in the order
`step_launches` gives.
"""

import dataclasses

import numpy as np

from .cuda_source import BLOCK_SIZE, vector_width
from .layout import FLOAT8_BLOCK, GROUP_SLOTS, READ_COUNTERS, compute_dtype_name


def step_launches(elements, read_counters, agree=False, check_nonfinite=True):
    """The launches of one step, in order, on one stream, by name:

    - "clear": counters[LAST_STEP_SKIPPED] = 0;
    - "find_nonfinite": sets it where a scaled gradient element is NaN or inf;
    - "agree" (with `agree`): the processes of a sharded step combine it (a collective on
      the same stream), so that all of them skip or none;
    - "update": the fused update (with READ_COUNTERS: nothing when it is set, and each
      group's velocity_initialized from the counters);
    - "finish": one block counts the step as taken or skipped and marks the groups'
      velocities as initialized.

    Without counters a step is the update alone; nothing is launched over no elements
    but the counting. A counted step with check_nonfinite=False (a capturable optimizer
    that does not skip non-finite gradients) has no "find_nonfinite".
    """
    if not read_counters:
        return ("update",) if elements else ()
    agreeing = ("agree",) if agree else ()
    if not elements:
        return ("clear", *agreeing, "finish")
    checking = ("find_nonfinite",) if check_nonfinite else ()
    return ("clear", *checking, *agreeing, "update", "finish")


def grid_size(n, dtype, max_blocks):
    """Blocks to launch: one thread per 128-bit vector, at most `max_blocks` (one full
    wave of resident blocks; the grid-stride loop covers the rest). 0 for an empty update."""
    vectors = -(-n // vector_width(dtype))
    return min(max_blocks, -(-vectors // BLOCK_SIZE))


def float8_grid_size(n, max_blocks):
    """Blocks to launch for the FP8-velocity update: one warp per block of FLOAT8_BLOCK
    elements, at most `max_blocks` (the grid-stride loop over blocks covers the rest). 0
    for an empty update."""
    warps = -(-n // FLOAT8_BLOCK)
    return min(max_blocks, -(-warps // (BLOCK_SIZE // 32)))


def finish_block(group_count):
    """finish_step's one block: a thread per group, in whole warps, at most BLOCK_SIZE."""
    return min(BLOCK_SIZE, -(-max(group_count, 1) // 32) * 32)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Launch geometry and the scalar arguments of the kernels."""

    grid: int  # 0: nothing to launch
    block: int
    n: np.int64
    inv_grad_scale: np.generic  # in the compute dtype
    launch_flags: np.uint32  # the table's, with READ_COUNTERS when the counters decide
    group_count: np.int32  # for finish_step
    range_count: np.int32
    finish_block: int  # finish_step's threads
    seed: np.uint64  # stochastic rounding's key, with the step count
    step_count: np.int64  # read without READ_COUNTERS


def launch_plan(dtype, n, table, inv_grad_scale, max_blocks, read_counters=False, seed=0,
                step_count=0):
    """The arguments of one step's launches over `n` elements of `dtype` params with
    `table` (an UpdateTable that `gpu_momentum.groups.check_table` accepted, host or
    device arrays). Scalars are numpy scalars of the types the kernel takes."""
    dtype = np.dtype(dtype)
    compute = np.dtype(compute_dtype_name(dtype.name))
    flags = int(table.launch_flags) | (READ_COUNTERS if read_counters else 0)
    return LaunchPlan(grid_size(n, dtype, max_blocks), BLOCK_SIZE, np.int64(n),
                      compute.type(inv_grad_scale), np.uint32(flags),
                      np.int32(table.group_count), np.int32(len(table.range_ends)),
                      finish_block(table.group_count), np.uint64(seed),
                      np.int64(step_count))


def check_counters(counters, group_count):
    """The counters hold the GM_COUNTER_* slots and one slot per group."""
    need = GROUP_SLOTS + group_count
    if np.dtype(counters.dtype) != np.int64 or counters.shape != (need,):
        raise ValueError(f"counters must be int64[{need}] (the step counters and one "
                         f"slot per group), got {np.dtype(counters.dtype)}"
                         f"{list(counters.shape)}")

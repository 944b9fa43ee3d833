"""Launching the CUDA C kernel (kernels/momentum.cu) with CuPy.

The module is compiled once per device (memoized RawModule) and each dtype's launch limit
is worked out once per device. A step checks the arrays, then queues one kernel on CuPy's
current stream for every parameter group (four operations when it skips non-finite
gradients): no synchronisation and no device allocation.

`launch_plan` is the launch without CuPy (checks, grid size, flags and scalars over an
update table): the tests run the host-compiled kernel through it, so both paths launch
alike.
"""

import dataclasses
import functools

import numpy as np

from . import elementwise
from .cuda_source import (BLOCK_SIZE, ENTRY_POINTS, FINISH_EXPRESSION, GROUP_COLUMNS,
                          module_options, module_source, name_expressions, vector_width)
from .elementwise import LAST_STEP_SKIPPED, VELOCITY_INITIALIZED

ARRAY_NAMES = ("param", "grad", "velocity")


def grid_size(n, dtype, max_blocks):
    """Blocks to launch: one thread per 128-bit vector, at most `max_blocks` (one full
    wave of resident blocks; the grid-stride loop covers the rest). 0 for an empty update."""
    vectors = -(-n // vector_width(dtype))
    return min(max_blocks, -(-vectors // BLOCK_SIZE))


def finish_block(group_count):
    """finish_step's one block: a thread per group, in whole warps, at most BLOCK_SIZE."""
    return min(BLOCK_SIZE, -(-max(group_count, 1) // 32) * 32)


def check_element_alignment(name, address, itemsize):
    """The kernel reads whole elements: an address off the element size faults on a GPU."""
    if address % itemsize:
        raise ValueError(f"{name} starts at address {address:#x}, which is not a multiple "
                         f"of its {itemsize}-byte element size; the CUDA kernel needs "
                         f"element-aligned arrays (make an aligned copy)")


def check_table(table, n, compute_dtype):
    """What the kernel assumes of an UpdateTable (host or device arrays). Shapes and dtypes
    only: checking values would read device memory, which waits for the device, so the
    range values are checked where the table is in host memory."""
    scalars = table.scalars
    if np.dtype(scalars.dtype) != compute_dtype:
        raise TypeError(f"the update table's scalars are {np.dtype(scalars.dtype)}, but "
                        f"the kernel computes in {compute_dtype}: build the table with "
                        f"update_table(..., compute_dtype={compute_dtype.name})")
    groups, ranges = len(table.group_flags), len(table.range_ends)
    expected = {"scalars": (scalars.shape, (groups, GROUP_COLUMNS)),
                "range_groups": (tuple(table.range_groups.shape), (ranges,))}
    for name, (shape, want) in expected.items():
        if tuple(shape) != want:
            raise ValueError(f"the update table's {name} has shape {tuple(shape)}, "
                             f"expected {want}")
    dtypes = {"group_flags": np.uint32, "range_ends": np.int64, "range_groups": np.int32}
    for name, dtype in dtypes.items():
        if np.dtype(getattr(table, name).dtype) != dtype:
            raise TypeError(f"the update table's {name} is "
                            f"{np.dtype(getattr(table, name).dtype)}, expected "
                            f"{np.dtype(dtype)}")
    if ranges == 0 or groups == 0:
        raise ValueError("the update table has no ranges or no groups; one group over one "
                         "range is the least")
    if isinstance(table.range_ends, np.ndarray):
        ends, owners = table.range_ends, table.range_groups
        if ends[-1] != n or (np.diff(ends) < 0).any() or ends[0] < 0:
            raise ValueError(f"the update table's ranges must increase and end at the "
                             f"element count {n}, got range_ends {ends.tolist()}")
        if ((owners < 0) | (owners >= groups)).any():
            raise ValueError(f"the update table's range_groups name groups outside "
                             f"0..{groups - 1}: {owners.tolist()}")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Launch geometry and the scalar arguments of the kernels, after every check."""

    grid: int  # 0: nothing to launch
    block: int
    n: np.int64
    inv_grad_scale: np.generic  # in the compute dtype
    launch_flags: np.uint32  # the table's, with COUNTERS when the counters decide
    group_count: np.int32  # for finish_step
    range_count: np.int32
    finish_block: int  # finish_step's threads


def launch_plan(dtype, n, addresses, table, inv_grad_scale, max_blocks, counters=False):
    """Checks and arguments of one launch over arrays of `n` elements at `addresses`
    (param, grad, velocity) with `table` (a gpu_momentum.groups.UpdateTable, host or
    device arrays); raises before anything is queued. Scalars are numpy scalars of the
    types the kernel takes; counters=True: the skip and each group's first step come from
    the counters in device memory."""
    dtype = np.dtype(dtype)
    compute = ENTRY_POINTS[dtype].compute_dtype
    velocity_itemsize = 4 if dtype.itemsize < 4 else dtype.itemsize
    for name, address, itemsize in zip(ARRAY_NAMES, addresses,
                                       (dtype.itemsize, dtype.itemsize, velocity_itemsize)):
        check_element_alignment(name, address, itemsize)
    check_table(table, n, compute)
    flags = int(table.launch_flags) | (elementwise.COUNTERS if counters else 0)
    return LaunchPlan(grid_size(n, dtype, max_blocks), BLOCK_SIZE, np.int64(n),
                      compute.type(inv_grad_scale), np.uint32(flags),
                      np.int32(table.group_count), np.int32(len(table.range_ends)),
                      finish_block(table.group_count))


def check_counters(counters, group_count):
    """The counters hold the GM_COUNTER_* slots and one velocity slot per group."""
    need = VELOCITY_INITIALIZED + group_count
    if np.dtype(counters.dtype) != np.int64 or counters.shape != (need,):
        raise ValueError(f"counters must be int64[{need}] (the step counters and one "
                         f"slot per group), got {np.dtype(counters.dtype)}"
                         f"{list(counters.shape)}")


@functools.cache
def _module(device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=module_source(), options=module_options(),
                              name_expressions=name_expressions())


@functools.cache
def _kernels(device_id, dtype):
    """(update, non-finite check, finish_step, max_blocks) of `dtype` on a device."""
    import cupy

    entry = ENTRY_POINTS[dtype]
    with cupy.cuda.Device(device_id):
        module = _module(device_id)
        update = module.get_function(entry.name_expression)
        check = module.get_function(entry.check_expression)
        finish = module.get_function(FINISH_EXPRESSION)
        sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        per_sm = min(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernel.kernel.ptr, BLOCK_SIZE, 0) for kernel in (update, check))
    return update, check, finish, sms * per_sm


def _on_current_device(named_arrays):
    import cupy

    current = cupy.cuda.runtime.getDevice()
    for name, array in named_arrays:
        if array.device.id != current:
            raise ValueError(f"{name} is on GPU {array.device.id} but the current device is "
                             f"GPU {current}; step under `with cupy.cuda.Device("
                             f"{array.device.id}):` or move the arrays to GPU {current}")
    return current


def momentum_step_cupy(param, grad, velocity, table, inv_grad_scale, counters=None):
    """Queues the fused update of CUDA arrays (any `__cuda_array_interface__` object, taken
    by cupy.asarray without a copy) on the current stream, every group of `table` (an
    UpdateTable of CuPy arrays on the current device, scalars in the compute dtype) in one
    launch; arrays are already checked by gpu_momentum._arrays.check_update.

    counters None: one launch, first steps from the table's FRESH_VELOCITY flags. Else a
    CuPy int64[VELOCITY_INITIALIZED + groups] (slots as in kernels.elementwise): a step
    whose scaled gradient holds a NaN or inf changes nothing but the counters, which also
    give each group's first step and count taken and skipped steps. Four operations
    queued on the current stream, no waiting."""
    import cupy

    arrays = [cupy.asarray(a) for a in (param, grad, velocity)]
    tables = [("table.scalars", table.scalars), ("table.group_flags", table.group_flags),
              ("table.range_ends", table.range_ends),
              ("table.range_groups", table.range_groups)]
    named = [*zip(ARRAY_NAMES, arrays), *tables]
    if counters is not None:
        check_counters(counters, table.group_count)
        named.append(("counters", counters))
    update, check, finish, max_blocks = _kernels(_on_current_device(named), arrays[0].dtype)
    plan = launch_plan(arrays[0].dtype, arrays[0].size, [a.data.ptr for a in arrays], table,
                       inv_grad_scale, max_blocks, counters is not None)
    table_args = (table.scalars, table.group_flags, table.range_ends, table.range_groups,
                  plan.range_count)
    if counters is None:
        if plan.grid:
            update((plan.grid,), (plan.block,), (*arrays, plan.n, *table_args,
                                                 plan.inv_grad_scale, plan.launch_flags,
                                                 np.uint64(0)))
        return
    counters[LAST_STEP_SKIPPED:LAST_STEP_SKIPPED + 1].fill(0)
    if plan.grid:
        check((plan.grid,), (plan.block,), (arrays[1], plan.n, plan.inv_grad_scale,
                                            counters))
        update((plan.grid,), (plan.block,), (*arrays, plan.n, *table_args,
                                             plan.inv_grad_scale, plan.launch_flags,
                                             counters))
    finish((1,), (plan.finish_block,), (counters, table.group_flags, plan.group_count))

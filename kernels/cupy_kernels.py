"""Launching the CUDA C kernel (kernels/momentum.cu) with CuPy.

The module is compiled once per device (memoized RawModule) and each dtype's launch limit
is worked out once per device. A step checks the arrays, then queues one kernel on CuPy's
current stream (four operations when it skips non-finite gradients): no synchronisation
and no device allocation.

`launch_plan` is the launch without CuPy (flags, scalars, grid size, alignment checks):
the tests run the host-compiled kernel through it, so both paths launch alike.
"""

import dataclasses
import functools

import numpy as np

from .cuda_source import (BLOCK_SIZE, COUNTERS, ENTRY_POINTS, FINISH_EXPRESSION, FLAGS,
                          module_options, module_source, name_expressions, vector_width)

ARRAY_NAMES = ("param", "grad", "velocity")


def kernel_flags(hyper, fresh_velocity, counters=False):
    """The kernel's `flags` argument for these hyperparameters (see FLAGS)."""
    keep_velocity = not hyper.initializes_velocity  # torch style with momentum 0
    bits = {
        "CLASSIC": hyper.style == "classic",
        "NESTEROV": hyper.nesterov,
        "MAXIMIZE": hyper.maximize,
        "WEIGHT_DECAY": hyper.weight_decay != 0,
        "FRESH_VELOCITY": fresh_velocity and not keep_velocity,
        "KEEP_VELOCITY": keep_velocity,
        "COUNTERS": counters,
    }
    return sum(FLAGS[name] for name, on in bits.items() if on)


def grid_size(n, dtype, max_blocks):
    """Blocks to launch: one thread per 128-bit vector, at most `max_blocks` (one full
    wave of resident blocks; the grid-stride loop covers the rest). 0 for an empty update."""
    vectors = -(-n // vector_width(dtype))
    return min(max_blocks, -(-vectors // BLOCK_SIZE))


def check_element_alignment(name, address, itemsize):
    """The kernel reads whole elements: an address off the element size faults on a GPU."""
    if address % itemsize:
        raise ValueError(f"{name} starts at address {address:#x}, which is not a multiple "
                         f"of its {itemsize}-byte element size; the CUDA kernel needs "
                         f"element-aligned arrays (make an aligned copy)")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Launch geometry and the scalar arguments of momentum_step, after every check."""

    grid: int  # 0: nothing to launch
    block: int
    n: np.int64
    scalars: tuple  # lr, momentum, grad_coeff, weight_decay, inv_grad_scale, flags
    initializes_velocity: np.uint32  # for finish_step


def launch_plan(dtype, n, addresses, hyper, fresh_velocity, inv_grad_scale, max_blocks,
                counters=False):
    """Checks and arguments of one launch over arrays of `n` elements at `addresses`
    (param, grad, velocity); raises before anything is queued. Scalars are numpy scalars
    of the compute dtype, as the kernel takes them; counters=True: the first-step flag
    and the skip come from the counters in device memory."""
    dtype = np.dtype(dtype)
    velocity_itemsize = 4 if dtype.itemsize < 4 else dtype.itemsize
    for name, address, itemsize in zip(ARRAY_NAMES, addresses,
                                       (dtype.itemsize, dtype.itemsize, velocity_itemsize)):
        check_element_alignment(name, address, itemsize)
    scalars = hyper.kernel_scalars(ENTRY_POINTS[dtype].compute_dtype, inv_grad_scale)
    flags = np.uint32(kernel_flags(hyper, fresh_velocity, counters))
    return LaunchPlan(grid_size(n, dtype, max_blocks), BLOCK_SIZE, np.int64(n),
                      (*scalars, flags), np.uint32(hyper.initializes_velocity))


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


def _prepare(param, grad, velocity, hyper, fresh_velocity, inv_grad_scale, counters=None):
    import cupy

    arrays = [cupy.asarray(a) for a in (param, grad, velocity)]
    named = list(zip(ARRAY_NAMES, arrays))
    if counters is not None:
        named.append(("counters", counters))
    kernels = _kernels(_on_current_device(named), arrays[0].dtype)
    plan = launch_plan(arrays[0].dtype, arrays[0].size, [a.data.ptr for a in arrays], hyper,
                       fresh_velocity, inv_grad_scale, kernels[-1], counters is not None)
    return arrays, kernels, plan


def momentum_step_cupy(param, grad, velocity, hyper, fresh_velocity, inv_grad_scale):
    """Queues the fused update of CUDA arrays (any `__cuda_array_interface__` object, taken
    by cupy.asarray without a copy) on the current stream; arrays are on the current
    device and already checked by gpu_momentum._arrays.check_update."""
    arrays, (update, *_), plan = _prepare(param, grad, velocity, hyper, fresh_velocity,
                                          inv_grad_scale)
    if plan.grid:
        null_counters = np.uint64(0)
        update((plan.grid,), (plan.block,), (*arrays, plan.n, *plan.scalars, null_counters))


def momentum_step_skipping_nonfinite_cupy(param, grad, velocity, hyper, inv_grad_scale,
                                          counters):
    """As momentum_step_cupy, unless the scaled gradient holds a NaN or inf; `counters`
    (a CuPy int64[4], slots as in kernels.elementwise) decide the first step and count
    taken and skipped steps. Four operations queued on the current stream, no waiting."""
    arrays, (update, check, finish, _), plan = _prepare(
        param, grad, velocity, hyper, False, inv_grad_scale, counters)
    last = COUNTERS["LAST_STEP_SKIPPED"]
    counters[last:last + 1].fill(0)
    if plan.grid:
        check((plan.grid,), (plan.block,), (arrays[1], plan.n, plan.scalars[4], counters))
        update((plan.grid,), (plan.block,), (*arrays, plan.n, *plan.scalars, counters))
    finish((1,), (1,), (counters, plan.initializes_velocity))

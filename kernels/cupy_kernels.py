"""Launching the CUDA C kernel (kernels/momentum.cu) with CuPy.

The module is compiled once per device (memoized RawModule) and each entry point's launch
limit is worked out once per device. A step checks the arrays, then queues one kernel on
CuPy's current stream: no synchronisation and no device allocation.

`launch_plan` is the launch without CuPy (flags, scalars, grid size, alignment checks):
the tests run the host-compiled kernel through it, so both paths launch alike.
"""

import dataclasses
import functools

import numpy as np

from .cuda_source import (BLOCK_SIZE, ENTRY_POINTS, FLAGS, module_options, module_source,
                          name_expressions, vector_width)

ARRAY_NAMES = ("param", "grad", "velocity")


def kernel_flags(hyper, fresh_velocity):
    """The kernel's `flags` argument for these hyperparameters (see FLAGS)."""
    keep_velocity = hyper.style == "torch" and hyper.momentum == 0
    bits = {
        "CLASSIC": hyper.style == "classic",
        "NESTEROV": hyper.nesterov,
        "MAXIMIZE": hyper.maximize,
        "WEIGHT_DECAY": hyper.weight_decay != 0,
        "FRESH_VELOCITY": fresh_velocity and not keep_velocity,
        "KEEP_VELOCITY": keep_velocity,
    }
    return sum(FLAGS[name] for name, on in bits.items() if on)


def scalar_arguments(dtype, hyper, fresh_velocity):
    """lr, momentum, grad_coeff, weight_decay in the compute dtype, then flags (uint32).

    grad_coeff = 1 - dampening is computed in the compute dtype, as the reference does.
    """
    scalar = ENTRY_POINTS[np.dtype(dtype)].compute_dtype.type
    return (scalar(hyper.lr), scalar(hyper.momentum), scalar(1) - scalar(hyper.dampening),
            scalar(hyper.weight_decay), np.uint32(kernel_flags(hyper, fresh_velocity)))


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
    grid: int  # 0: nothing to launch
    block: int
    n: np.int64
    scalars: tuple


def launch_plan(dtype, n, addresses, hyper, fresh_velocity, max_blocks):
    """Checks and arguments of one launch over arrays of `n` elements at `addresses`
    (param, grad, velocity); raises before anything is queued."""
    dtype = np.dtype(dtype)
    velocity_itemsize = 4 if dtype.itemsize < 4 else dtype.itemsize
    for name, address, itemsize in zip(ARRAY_NAMES, addresses,
                                       (dtype.itemsize, dtype.itemsize, velocity_itemsize)):
        check_element_alignment(name, address, itemsize)
    return LaunchPlan(grid_size(n, dtype, max_blocks), BLOCK_SIZE, np.int64(n),
                      scalar_arguments(dtype, hyper, fresh_velocity))


@functools.cache
def _module(device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=module_source(), options=module_options(),
                              name_expressions=name_expressions())


@functools.cache
def _kernel(device_id, dtype):
    import cupy

    with cupy.cuda.Device(device_id):
        kernel = _module(device_id).get_function(ENTRY_POINTS[dtype].name_expression)
        sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernel.kernel.ptr, BLOCK_SIZE, 0)
    return kernel, sms * per_sm


def _on_current_device(arrays):
    import cupy

    current = cupy.cuda.runtime.getDevice()
    for name, array in zip(ARRAY_NAMES, arrays):
        if array.device.id != current:
            raise ValueError(f"{name} is on GPU {array.device.id} but the current device is "
                             f"GPU {current}; step under `with cupy.cuda.Device("
                             f"{array.device.id}):` or move the arrays to GPU {current}")
    return current


def momentum_step_cupy(param, grad, velocity, hyper, fresh_velocity):
    """Queues the fused update of CUDA arrays (any `__cuda_array_interface__` object, taken
    by cupy.asarray without a copy) on the current stream; arrays are on the current
    device and already checked by gpu_momentum._arrays.check_update."""
    import cupy

    arrays = [cupy.asarray(a) for a in (param, grad, velocity)]
    device = _on_current_device(arrays)
    dtype = arrays[0].dtype
    kernel, max_blocks = _kernel(device, dtype)
    plan = launch_plan(dtype, arrays[0].size, [a.data.ptr for a in arrays], hyper,
                       fresh_velocity, max_blocks)
    if plan.grid:
        kernel((plan.grid,), (plan.block,), (*arrays, plan.n, *plan.scalars))

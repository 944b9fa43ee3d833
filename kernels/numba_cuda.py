"""Numba CUDA kernels: the fused update as one grid-stride pass over the flat buffers.

momentum_step_kernel's arguments, in order (layout in kernels.layout):
  param, grad   1-D contiguous float16/float32/float64 device arrays (param updated in place)
  velocity      1-D contiguous device array of the compute dtype (float32 for float16
                params, else the param dtype), updated in place
  scalars, group_flags, range_ends, range_groups
                the four arrays of a gpu_momentum.groups.UpdateTable, in device memory
                (scalars of the compute dtype)
  inv_grad_scale  1 / loss scale, of the compute dtype
  grad_scale    empty, or one element of the compute dtype: the loss scale in device
                memory; each thread then multiplies by 1 / grad_scale[0], worked out in the
                compute dtype, and inv_grad_scale is not read
  launch_flags  CLASSIC, and READ_COUNTERS when `counters` decide
  counters      the step counters (int64); read only with READ_COUNTERS (else empty)
Elements of a NO_GROUP range (FlatParams padding) are neither read nor written, by the
update or by find_nonfinite_kernel (grad, velocity, range_ends, range_groups,
inv_grad_scale, grad_scale, counters). clear_skip_kernel(counters, found_inf) starts a
counted step: LAST_STEP_SKIPPED = found_inf[0] != 0 (GradScaler's verdict), or 0 for an
empty found_inf.
Hyperparameters are data, not compile-time constants: a schedule changing lr or momentum
reuses the compiled kernel. One kernel is compiled per dtype combination. The launches
of a step are kernels.cuda_launch.step_launches' (gpu_momentum.backends.numba_cuda).
"""

import functools
from importlib.metadata import version

import numpy as np
from numba import cuda, types
from numba.core import config

from .elementwise import (count_step, group_hyperparameters, mark_velocities_initialized,
                          momentum_update, scaled_gradient_is_finite, seek_range)
from .layout import CLASSIC, LAST_STEP_SKIPPED, NO_GROUP, READ_COUNTERS

PARAM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# The CPU kernels compile the same Python functions with numba.njit. Here they become CUDA
# device functions with inline="always": Numba inlines their IR into the kernel, so the
# kernel compiles as one unit for whichever compute capability is asked for, and
# `cuda.compile_ptx(..., cc=(9, 0))` works on a machine without a GPU. A device function
# compiled on its own (inline="never") is built for the current device, which needs one.
_inline = cuda.jit(device=True, inline="always")
momentum_update_cuda = _inline(momentum_update)
seek_range_cuda = _inline(seek_range)
group_hyperparameters_cuda = _inline(group_hyperparameters)
scaled_gradient_is_finite_cuda = _inline(scaled_gradient_is_finite)
count_step_cuda = _inline(count_step)
mark_velocities_initialized_cuda = _inline(mark_velocities_initialized)

THREADS_PER_BLOCK = 256
# The CUDA simulator runs each thread of a block as a Python thread, one block after the
# other: two small blocks keep it quick and still stride across blocks for any size.
SIMULATOR_THREADS_PER_BLOCK = 32
SIMULATOR_BLOCKS = 2
FINISH_THREADS = 32  # finish_step_kernel's one block, striding over the groups


@cuda.jit(device=True, inline="always")
def _update_all(param, grad, velocity, scalars, group_flags, range_ends, range_groups,
                inv_grad_scale, launch_flags, counters):
    # float16 is widened to float32 before any arithmetic (Numba's fp16 arithmetic calls
    # out to library functions) and rounded to nearest once, on the store.
    compute = velocity.dtype.type
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    # Each thread's indices only grow: it looks its range up only when an index passes
    # the current range's end (seek_range); a NO_GROUP range's elements are left alone.
    r, end, k = -1, 0, NO_GROUP
    # Group 0's values until the first lookup (never the table at NO_GROUP).
    (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
     initialized) = \
        group_hyperparameters_cuda(scalars, group_flags, counters, 0, read_counters)
    # param.size is 64-bit, so i is too: buffers past 2**31 elements index correctly.
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        if i >= end:
            r = seek_range_cuda(range_ends, i, r)
            end = range_ends[r]
            k = range_groups[r]
            if k != NO_GROUP:
                (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
     initialized) = \
                    group_hyperparameters_cuda(scalars, group_flags, counters, k,
                                               read_counters)
        if k != NO_GROUP:
            param[i], velocity[i] = momentum_update_cuda(
                compute(param[i]), compute(grad[i]), velocity[i], lr, momentum, grad_coeff,
                weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                initialized)


@cuda.jit(device=True, inline="always")
def _inverse(inv_grad_scale, grad_scale):
    """1 / the loss scale: from grad_scale[0] in device memory, else inv_grad_scale."""
    if grad_scale.size != 0:
        return grad_scale.dtype.type(1) / grad_scale[0]
    return inv_grad_scale


@cuda.jit(cache=True)
def momentum_step_kernel(param, grad, velocity, scalars, group_flags, range_ends,
                         range_groups, inv_grad_scale, grad_scale, launch_flags, counters):
    if launch_flags & READ_COUNTERS == 0 or counters[LAST_STEP_SKIPPED] == 0:
        _update_all(param, grad, velocity, scalars, group_flags, range_ends, range_groups,
                    _inverse(inv_grad_scale, grad_scale), launch_flags, counters)


# Skipping steps with a non-finite gradient: the other three launches of
# kernels.cuda_launch.step_launches.
@cuda.jit(cache=True)
def clear_skip_kernel(counters, found_inf):
    if cuda.grid(1) == 0:
        counters[LAST_STEP_SKIPPED] = 1 if found_inf.size != 0 and found_inf[0] != 0 else 0


@cuda.jit(cache=True)
def convert_scale_kernel(out, scale):
    """out[0] = scale[0] in out's dtype: a loss scale in device memory of another dtype
    than the compute dtype, converted on the stream before the kernels read it."""
    if cuda.grid(1) == 0:
        out[0] = scale[0]


@cuda.jit(cache=True)
def find_nonfinite_kernel(grad, velocity, range_ends, range_groups, inv_grad_scale,
                          grad_scale, counters):
    # Checked as the update computes it: widened to the velocity's (compute) dtype first;
    # only where a group updates (NO_GROUP ranges are neither read nor written).
    compute = velocity.dtype.type
    inv_grad_scale = _inverse(inv_grad_scale, grad_scale)
    r, end, k = -1, 0, NO_GROUP
    for i in range(cuda.grid(1), grad.size, cuda.gridsize(1)):
        if i >= end:
            r = seek_range_cuda(range_ends, i, r)
            end = range_ends[r]
            k = range_groups[r]
        if k != NO_GROUP and not scaled_gradient_is_finite_cuda(compute(grad[i]),
                                                                inv_grad_scale):
            # Every writer stores the same 1: the race between threads is harmless.
            counters[LAST_STEP_SKIPPED] = 1


@cuda.jit(cache=True)
def finish_step_kernel(counters, group_flags):
    """One block: counts the step as taken or skipped; a taken step initializes the
    velocity of every group that writes it. Nothing here writes LAST_STEP_SKIPPED, so the
    threads read it without a race."""
    thread = cuda.grid(1)
    taken = counters[LAST_STEP_SKIPPED] == 0
    if thread == 0:
        count_step_cuda(counters)
    if taken:
        mark_velocities_initialized_cuda(counters, group_flags, thread, cuda.gridsize(1))


def _no_op():
    pass


def compiler_problem():
    """None when numba-cuda compiles kernels here, else why it cannot.

    Seen on a GPU machine: numba-cuda 0.30.4 with numpy 2.5, which dropped `np.row_stack`
    that numba-cuda still names; every compile failed. Checked once, with a kernel that
    does nothing, so such a machine lists numba-cuda as unavailable, with this reason,
    instead of failing at the first step. The CUDA simulator compiles nothing: it passes.
    """
    if config.ENABLE_CUDASIM:
        return None
    try:
        cuda.compile_ptx(_no_op, (), cc=(8, 0))
    except Exception as error:  # whatever breaks inside Numba
        return (f"numba-cuda {version('numba-cuda')} cannot compile kernels with numpy "
                f"{np.__version__} ({type(error).__name__}: {error})")
    return None


@functools.cache
def _launch_limits(device_id):
    """(threads per block, blocks that fill the device): more blocks would only queue."""
    device = cuda.get_current_device()
    blocks_per_sm = threads_per_multiprocessor(device) // THREADS_PER_BLOCK
    return THREADS_PER_BLOCK, device.MULTIPROCESSOR_COUNT * blocks_per_sm


def threads_per_multiprocessor(device):
    """The device's resident-thread limit per multiprocessor."""
    # numba-cuda names device attributes after its driver binding: the ctypes one spells
    # it MULTI_PROCESSOR, cuda-bindings (numba-cuda 0.30 on a GPU) MULTIPROCESSOR.
    for name in ("MAX_THREADS_PER_MULTIPROCESSOR", "MAX_THREADS_PER_MULTI_PROCESSOR"):
        try:
            return getattr(device, name)
        except AttributeError:
            continue
    raise AttributeError(f"{device} reports no resident-thread limit per multiprocessor")


def launch_config(size):
    """(blocks, threads) for `size` elements on the current device; blocks >= 1."""
    if config.ENABLE_CUDASIM:
        threads, most_blocks = SIMULATOR_THREADS_PER_BLOCK, SIMULATOR_BLOCKS
    else:
        threads, most_blocks = _launch_limits(cuda.get_current_device().id)
    return max(1, min(most_blocks, -(-size // threads))), threads


def kernel_signatures(param_dtype):
    """{name: (kernel, argument types)} of every kernel for 1-D contiguous params of
    `param_dtype`."""
    from numba.np.numpy_support import from_dtype

    param_dtype = np.dtype(param_dtype)
    compute = from_dtype(np.dtype(np.float64) if param_dtype.itemsize == 8 else
                         np.dtype(np.float32))
    param = types.Array(from_dtype(param_dtype), 1, "C")
    velocity = types.Array(compute, 1, "C")
    counters = types.Array(types.int64, 1, "C")
    group_flags = types.Array(types.uint32, 1, "C")
    table = (types.Array(compute, 2, "C"), group_flags, counters,
             types.Array(types.int32, 1, "C"))
    return {
        "momentum_step": (momentum_step_kernel, (param, param, velocity, *table, compute,
                                                 velocity, types.int64, counters)),
        "find_nonfinite": (find_nonfinite_kernel, (param, velocity, table[2], table[3],
                                                    compute, velocity, counters)),
        "finish_step": (finish_step_kernel, (counters, group_flags)),
    }


def compile_ptx(param_dtype, cc):
    """{kernel name: PTX} for `param_dtype` params at compute capability `cc`, e.g. (9, 0).

    Needs the numba-cuda compiler (NVVM), not a GPU, and not the simulator.
    """
    return {name: cuda.compile_ptx(kernel.py_func, signature, cc=cc)[0]
            for name, (kernel, signature) in kernel_signatures(param_dtype).items()}

"""Numba CUDA kernel: the fused update as one grid-stride pass over the flat buffers.

Kernel arguments, in order:
  param, grad   1-D contiguous float16/float32/float64 device arrays (param updated in place)
  velocity      1-D contiguous device array of the compute dtype (float32 for float16
                params, else the param dtype), updated in place
  lr, momentum, grad_coeff, weight_decay
                scalars of the compute dtype (grad_coeff = 1 - dampening)
  classic, nesterov, maximize, fresh_velocity
                booleans; see `kernels.elementwise.momentum_update`
Hyperparameters are arguments, not compile-time constants: a schedule changing lr or
momentum reuses the compiled kernel. One kernel is compiled per dtype combination.
"""

import functools

import numpy as np
from numba import cuda, types
from numba.core import config
from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

from .elementwise import momentum_update

PARAM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# The CPU kernel compiles the same Python function with numba.njit. Here it becomes a CUDA
# device function with inline="always": Numba inlines its IR into the kernel, so the kernel
# compiles as one unit for whichever compute capability is asked for, and
# `cuda.compile_ptx(..., cc=(9, 0))` works on a machine without a GPU. A device function
# compiled on its own (inline="never") is built for the current device, which needs one.
momentum_update_cuda = cuda.jit(device=True, inline="always")(momentum_update)

THREADS_PER_BLOCK = 256
# The CUDA simulator runs each thread of a block as a Python thread, one block after the
# other: two small blocks keep it quick and still stride across blocks for any size.
SIMULATOR_THREADS_PER_BLOCK = 32
SIMULATOR_BLOCKS = 2


@cuda.jit(cache=True)
def momentum_step_kernel(param, grad, velocity, lr, momentum, grad_coeff, weight_decay,
                         classic, nesterov, maximize, fresh_velocity):
    # float16 is widened to float32 before any arithmetic (Numba's fp16 arithmetic calls
    # out to library functions) and rounded to nearest once, on the store.
    compute = velocity.dtype.type
    # param.size is 64-bit, so i is too: buffers past 2**31 elements index correctly.
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        param[i], velocity[i] = momentum_update_cuda(
            compute(param[i]), compute(grad[i]), velocity[i], lr, momentum, grad_coeff,
            weight_decay, classic, nesterov, maximize, fresh_velocity)


@functools.cache
def _launch_limits(device_id):
    """(threads per block, blocks that fill the device): more blocks would only queue."""
    device = cuda.get_current_device()
    blocks_per_sm = device.MAX_THREADS_PER_MULTI_PROCESSOR // THREADS_PER_BLOCK
    return THREADS_PER_BLOCK, device.MULTIPROCESSOR_COUNT * blocks_per_sm


def launch_config(size):
    """(blocks, threads) for `size` elements on the current device; blocks >= 1."""
    if config.ENABLE_CUDASIM:
        threads, most_blocks = SIMULATOR_THREADS_PER_BLOCK, SIMULATOR_BLOCKS
    else:
        threads, most_blocks = _launch_limits(cuda.get_current_device().id)
    return max(1, min(most_blocks, -(-size // threads))), threads


def _numba_array(array):
    """A Numba device array (a zero-copy view of a `__cuda_array_interface__` array).

    `sync=False`: the view records the stream the array was exported on (CuPy's or
    PyTorch's current stream) instead of waiting for it; the update is queued there.
    """
    return array if is_cuda_ndarray(array) else cuda.as_cuda_array(array, sync=False)


def _flat(array):
    return array if array.ndim == 1 else array.reshape(array.size)


def momentum_step_numba_cuda(param, grad, velocity, lr, momentum, dampening, weight_decay,
                             classic, nesterov, maximize, fresh_velocity):
    """Queues the update on param's stream and returns without waiting for it.

    The arrays are Numba device arrays or `__cuda_array_interface__` arrays, already
    checked by `gpu_momentum._arrays.check_update`. param's stream is the one its exporter
    named, or the one a Numba array is bound to (by default Numba's default stream), so
    the update runs after the work queued there that produced the gradient. The
    hyperparameters (Python floats) are cast to the compute dtype, the velocity's, and
    grad_coeff = 1 - dampening is formed in it, as the CPU backend does.
    """
    param, grad, velocity = _numba_array(param), _numba_array(grad), _numba_array(velocity)
    if param.size == 0:
        return
    scalar = velocity.dtype.type
    blocks, threads = launch_config(param.size)
    momentum_step_kernel[blocks, threads, param.stream](
        _flat(param), _flat(grad), _flat(velocity), scalar(lr), scalar(momentum),
        scalar(1) - scalar(dampening), scalar(weight_decay), classic, nesterov, maximize,
        fresh_velocity)


def kernel_signature(param_dtype):
    """The kernel's argument types for 1-D contiguous params of `param_dtype`."""
    from numba.np.numpy_support import from_dtype

    param_dtype = np.dtype(param_dtype)
    compute = from_dtype(np.dtype(np.float64) if param_dtype.itemsize == 8 else
                         np.dtype(np.float32))
    param = types.Array(from_dtype(param_dtype), 1, "C")
    velocity = types.Array(compute, 1, "C")
    return (param, param, velocity, *[compute] * 4, *[types.boolean] * 4)


def compile_ptx(param_dtype, cc):
    """PTX of the kernel for `param_dtype` params at compute capability `cc`, e.g. (9, 0).

    Needs the numba-cuda compiler (NVVM), not a GPU, and not the simulator.
    """
    ptx, _ = cuda.compile_ptx(momentum_step_kernel.py_func, kernel_signature(param_dtype),
                              cc=cc)
    return ptx

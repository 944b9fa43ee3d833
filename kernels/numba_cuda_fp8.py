"""Numba CUDA kernels with an FP8 velocity: one warp per block of FLOAT8_BLOCK elements.

`float8_update_kernel(param_format, precision)` is the update of one kind (compiled on
first use); its arguments are those of kernels.numba_cuda's update_kernel with the
velocity as two arrays (layout in kernels.layout, format in gpu_momentum.reference):

  param, grad, codes, scales, precision_buffer, scalars, group_flags, range_ends,
  range_groups, inv_grad_scale, grad_scale, launch_flags, counters, seed, step_count

codes: uint8[n], the E4M3 codes; scales: float32[ceil(n / FLOAT8_BLOCK)]. The
non-finite check and the step's other launches are kernels.numba_cuda's (check_kernel,
clear_skip_kernel, finish_step_kernel), in kernels.cuda_launch.step_launches' order.

Each warp of a thread block takes one block of the buffer per round (rounds stride over
the grid, the same number for every thread of a thread block); lane l updates elements
begin + 32 j + l (j < 8, coalesced) and keeps their new velocities in registers. The
block's absmax, and whether any of its groups writes the velocity, meet in shared memory
(atomic max, then one __syncthreads per round: three slot sets in turn, each cleared two
rounds before its next use, so no second barrier is needed); then the lane writes its
codes and lane 0 the scale. The results equal the CPU kernels' (kernels.cpu_float8) and
momentum.cu's momentum_step_fp8 bit for bit (which reduces with warp shuffles: Numba's
CUDA simulator has none, but has barriers and shared memory).
"""

import functools

import numpy as np
from numba import cuda, float32, uint32
from numba.core import config

from .elementwise import specialized
from .float8 import LARGEST, float8_functions, float8_update, velocity_random_bits
from .layout import (CLASSIC, FLOAT8_BLOCK, LAST_STEP_SKIPPED, NO_GROUP, PRECISION_NAMES,
                     READ_COUNTERS, STEP_COUNT, STOCHASTIC)
from .numba_cuda import (FORMAT_NAMES, STORAGE, THREADS_PER_BLOCK,
                         group_hyperparameters_cuda, step_key_cuda, seek_range_cuda)

_inline = cuda.jit(device=True, inline="always")  # see kernels.numba_cuda
FLOAT8 = float8_functions(STORAGE, _inline)
to_code_cuda, from_code_cuda = FLOAT8.to_code, FLOAT8.from_code
magnitude_bits_cuda = FLOAT8.magnitude_bits
r16_cuda = velocity_random_bits(STORAGE, _inline, key_per_element=True)
f32_from_bits_cuda = STORAGE.f32_from_bits
WARP = 32
PER_LANE = FLOAT8_BLOCK // WARP
MOST_WARPS = THREADS_PER_BLOCK // WARP  # shared slots per set: launches use at most this
SLOT_SETS = 3


@cuda.jit(device=True, inline="always")
def _inverse(inv_grad_scale, grad_scale):
    """1 / the loss scale: from grad_scale[0] in device memory, else inv_grad_scale."""
    if grad_scale.size != 0:
        return grad_scale.dtype.type(1) / grad_scale[0]
    return inv_grad_scale


# A lane's eight new velocities live in a tuple, written and read through a chain of
# selects on j: a local array indexed in a loop LLVM does not unroll (the element update
# is long) would sit in local memory.
assert PER_LANE == 8, "_put and the tuples below hold eight values"


@cuda.jit(device=True, inline="always")
def _put(values, j, x):
    """`values` with element j replaced by x."""
    return (x if j == 0 else values[0], x if j == 1 else values[1],
            x if j == 2 else values[2], x if j == 3 else values[3],
            x if j == 4 else values[4], x if j == 5 else values[5],
            x if j == 6 else values[6], x if j == 7 else values[7])


@cuda.jit(device=True, inline="always")
def _get(values, j):
    """Element j of `values`, by selects."""
    x = values[0]
    for m in range(1, PER_LANE):
        if j == m:
            x = values[m]
    return x


def _update(param, grad, codes, scales, precision_buffer, scalars, group_flags, range_ends,
            range_groups, inv_grad_scale, grad_scale, launch_flags, counters, seed,
            step_count):
    if launch_flags & READ_COUNTERS != 0 and counters[LAST_STEP_SKIPPED] != 0:
        return  # a non-finite gradient: the step changes nothing (every thread alike)
    inv_grad_scale = _inverse(inv_grad_scale, grad_scale)
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    key = step_key_cuda(seed, counters[STEP_COUNT] if read_counters else step_count)
    absmax = cuda.shared.array((SLOT_SETS, MOST_WARPS), np.uint32)
    writers = cuda.shared.array((SLOT_SETS, MOST_WARPS), np.uint32)
    thread = cuda.threadIdx.x
    warp, lane = thread // WARP, thread % WARP
    warps_per_block = cuda.blockDim.x // WARP
    if thread < SLOT_SETS * MOST_WARPS:
        absmax[thread // MOST_WARPS, thread % MOST_WARPS] = uint32(0)
        writers[thread // MOST_WARPS, thread % MOST_WARPS] = uint32(0)
    cuda.syncthreads()
    zero = float32(0)
    r, end, k = -1, 0, NO_GROUP
    (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
     initialized) = \
        group_hyperparameters_cuda(scalars, group_flags, counters, 0, read_counters)
    n = param.size
    rounds_from = cuda.blockIdx.x * warps_per_block
    rounds = 0
    for first_block in range(rounds_from, scales.size, cuda.gridDim.x * warps_per_block):
        now, later = rounds % SLOT_SETS, (rounds + 1) % SLOT_SETS
        rounds += 1
        block = first_block + warp
        writes = False
        magnitude = uint32(0)
        values = (zero, zero, zero, zero, zero, zero, zero, zero)
        if block < scales.size:
            begin = block * FLOAT8_BLOCK
            old_scale = scales[block]
            for j in range(PER_LANE):
                i = begin + j * WARP + lane
                v = zero
                if i < n:
                    if i >= end:
                        r = seek_range_cuda(range_ends, i, r)
                        end = range_ends[r]
                        k = range_groups[r]
                        if k != NO_GROUP:
                            (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov,
                             maximize, initialized) = group_hyperparameters_cuda(
                                scalars, group_flags, counters, k, read_counters)
                    if k != NO_GROUP:
                        old = float32(0)
                        if initialized or (not classic and momentum == 0):  # or kept
                            old = from_code_cuda(codes[i]) * old_scale
                        v = update(  # noqa: F821
                            param, grad, precision_buffer, i, old, key, lr, momentum,
                            grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                            nesterov, maximize, initialized)
                        writes = writes or classic or momentum != 0
                values = _put(values, j, v)
                magnitude = max(magnitude, magnitude_bits_cuda(v))
            cuda.atomic.max(absmax, (now, warp), magnitude)
            if writes:
                cuda.atomic.max(writers, (now, warp), uint32(1))
        if lane == 0:  # the set of two rounds ago: every thread has read it
            absmax[later, warp] = uint32(0)
            writers[later, warp] = uint32(0)
        cuda.syncthreads()
        if block < scales.size and writers[now, warp] != 0:
            scale = f32_from_bits_cuda(absmax[now, warp]) / LARGEST
            begin = block * FLOAT8_BLOCK
            for j in range(PER_LANE):
                i = begin + j * WARP + lane
                if i < n:
                    r16 = r16_cuda(key, i) if stochastic else uint32(0)  # noqa: F821
                    codes[i] = to_code_cuda(_get(values, j), scale, r16,
                                            stochastic)  # noqa: F821
            if lane == 0:
                scales[block] = scale


@functools.cache
def float8_update_kernel(param_format, precision):
    """The FP8-velocity update kernel of params stored as `param_format` (NATIVE float32,
    BFLOAT16, FLOAT16) and `precision` (kernels.layout.PRECISIONS); launch it with whole
    warps per block (`float8_launch_config`)."""
    suffix = f"{FORMAT_NAMES[param_format]}_float8_{PRECISION_NAMES[precision]}"
    update = float8_update(STORAGE, _inline, param_format, precision, key_per_element=True)
    return cuda.jit(cache=True)(specialized(_update, f"momentum_step_{suffix}",
                                            update=update,
                                            stochastic=precision == STOCHASTIC))


def float8_launch_config(size, most_blocks):
    """(blocks, threads) for `size` elements: THREADS_PER_BLOCK threads (whole warps; in
    the CUDA simulator one warp), a warp per block of the buffer, at most `most_blocks`
    thread blocks; blocks >= 1."""
    threads = WARP if config.ENABLE_CUDASIM else THREADS_PER_BLOCK
    warps = -(-size // FLOAT8_BLOCK)
    return max(1, min(most_blocks, -(-warps // (threads // WARP)))), threads


# Every FP8 kind the kernels compile, by dtype name: (param dtype, precision). float32
# params round nothing but, with "stochastic", the codes.
FLOAT8_KINDS = (("float32", "nearest"), ("float32", "stochastic"),
                *((param, precision) for param in ("bfloat16", "float16")
                  for precision in PRECISION_NAMES))


def float8_kernel_signature(param_dtype, precision="nearest"):
    """(kernel, argument types) of the FP8-velocity update of one kind (dtype names)."""
    from numba import types

    from .elementwise import storage_format
    from .layout import PRECISIONS

    sixteen_bit = param_dtype in ("bfloat16", "float16")
    param = types.Array(types.uint16 if sixteen_bit else types.float32, 1, "C")
    buffer = param if precision == "kahan" else types.Array(types.float32, 1, "C")
    counters = types.Array(types.int64, 1, "C")
    table = (types.Array(types.float32, 2, "C"), types.Array(types.uint32, 1, "C"),
             counters, types.Array(types.int32, 1, "C"))
    kernel = float8_update_kernel(storage_format(param_dtype),
                                  PRECISIONS[precision.upper()])
    return kernel, (param, param, types.Array(types.uint8, 1, "C"),
                    types.Array(types.float32, 1, "C"), buffer, *table, types.float32,
                    types.Array(types.float32, 1, "C"), types.uint32, counters,
                    types.uint64, types.int64)


def compile_float8_ptx(param_dtype, cc, precision="nearest"):
    """The PTX of one FP8 kind's update at compute capability `cc`, e.g. (9, 0). Needs the
    numba-cuda compiler (NVVM), not a GPU, and not the simulator."""
    kernel, signature = float8_kernel_signature(param_dtype, precision)
    return cuda.compile_ptx(kernel.py_func, signature, cc=cc)[0]

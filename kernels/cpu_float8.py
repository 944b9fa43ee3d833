"""CPU kernels with an FP8 velocity: the fused update as one parallel Numba loop over
whole blocks of FLOAT8_BLOCK elements.

`float8_kernels(param_format, precision, parallel)` compiles (on first use) the three
kernels of one kind of update, with the arguments of kernels.cpu's kernels except that
the velocity is two arrays:

    param, grad             1-D contiguous: float32, or the uint16 bits of
                            bfloat16/float16 (kernels.elementwise.storage_format)
    codes                   uint8[n]: the velocity's E4M3 codes, updated in place
    scales                  float32[ceil(n / FLOAT8_BLOCK)]: one per block, in place
    precision_buffer, scalars, group_flags, range_ends, range_groups, inv_grad_scale,
    launch_flags, counters, seed, step_count
                            as kernels.cpu's

`step`, and the halves of a step that skips non-finite gradients, `find_nonfinite` (the
check of kernels.cpu, which reads only the gradient) and `update_unless_skipped`, all
with these arguments.
Each task takes CHUNK elements (whole blocks); a block's new velocities wait in a
FLOAT8_BLOCK-element scratch array (the cache, not memory) until its absmax is known.
"""

import functools

import numba
import numpy as np

from .cpu import (CHUNK, FORMAT_NAMES, SERIAL_BELOW, STORAGE, count_step_cpu,
                  group_hyperparameters_cpu, kernels as wide_kernels,
                  mark_velocities_initialized_cpu, seek_range_cpu)
from .elementwise import NATIVE, specialized
from .float8 import LARGEST, float8_functions, float8_update, velocity_random_bits
from .layout import (CLASSIC, FLOAT8_BLOCK, LAST_STEP_SKIPPED, NEAREST, NO_GROUP,
                     PRECISION_NAMES, READ_COUNTERS, STEP_COUNT, STOCHASTIC)

assert CHUNK % FLOAT8_BLOCK == 0, "a task holds whole blocks"

_inline = numba.njit(inline="always", cache=True)
FLOAT8 = float8_functions(STORAGE, _inline)
to_code_cpu, from_code_cpu = FLOAT8.to_code, FLOAT8.from_code
magnitude_bits_cpu = FLOAT8.magnitude_bits
step_key_cpu, block_key_cpu = STORAGE.step_key, STORAGE.block_key
r16_cpu = velocity_random_bits(STORAGE, _inline, key_per_element=False)
f32_from_bits_cpu = STORAGE.f32_from_bits


# Templates (kernels.elementwise.specialized): `update`, `stochastic`, `block_of`,
# `chunk_of` and `step` name one kind's compiled functions and constants.

def _update_piece(param, grad, codes, old_scale, precision_buffer, values, begin, start,
                  end, key_of_block, lr, momentum, grad_coeff, weight_decay, l1, decay,
                  inv_grad_scale, classic, nesterov, maximize, velocity_initialized):
    """Elements [start, end) of the block from `begin`: updated, new velocities into
    values[i - begin]."""
    for i in range(start, end):
        old = numba.float32(0)
        if velocity_initialized or (not classic and momentum == 0):  # exists, or kept
            old = from_code_cpu(codes[i]) * old_scale
        values[i - begin] = update(  # noqa: F821
            param, grad, precision_buffer, i, old, key_of_block, lr, momentum, grad_coeff,
            weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
            velocity_initialized)


def _block(b, param, grad, codes, scales, precision_buffer, scalars, group_flags,
           range_ends, range_groups, inv_grad_scale, classic, read_counters, counters,
           key_of_block, values, r):
    """Block b: each range piece with its group's values (padding: velocity 0), then the
    block's scale and codes, unless no group in it writes the velocity. Returns the range
    of its last element, where the next block's walk starts."""
    begin = b * FLOAT8_BLOCK
    stop = min(param.size, begin + FLOAT8_BLOCK)
    old_scale = scales[b]
    writes = False
    start = begin
    while start < stop:
        if r < 0 or start >= range_ends[r]:  # past range r (seek_range's premise)
            r = seek_range_cpu(range_ends, start, r)
        end = min(stop, range_ends[r])
        k = range_groups[r]
        if k == NO_GROUP:
            for i in range(start, end):
                values[i - begin] = numba.float32(0)
        else:
            (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
             initialized) = group_hyperparameters_cpu(scalars, group_flags, counters, k,
                                                      read_counters)
            update_piece(param, grad, codes, old_scale, precision_buffer,  # noqa: F821
                         values, begin, start, end, key_of_block, lr, momentum, grad_coeff,
                         weight_decay, l1, decay, inv_grad_scale, classic, nesterov,
                         maximize, initialized)
            writes = writes or classic or momentum != 0
        start = end
    if writes:
        absmax = np.uint32(0)
        for j in range(stop - begin):
            absmax = max(absmax, magnitude_bits_cpu(values[j]))
        scale = f32_from_bits_cpu(absmax) / LARGEST
        for i in range(begin, stop):
            r16 = r16_cpu(key_of_block, i) if stochastic else np.uint32(0)  # noqa: F821
            codes[i] = to_code_cpu(values[i - begin], scale, r16,
                                   stochastic)  # noqa: F821
        scales[b] = scale
    return r


def _chunk(chunk, param, grad, codes, scales, precision_buffer, scalars, group_flags,
           range_ends, range_groups, inv_grad_scale, launch_flags, counters, key):
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    first = chunk * (CHUNK // FLOAT8_BLOCK)
    last = min(scales.size, first + CHUNK // FLOAT8_BLOCK)
    key_of_block = block_key_cpu(key, numba.uint64(chunk * CHUNK))
    values = np.empty(FLOAT8_BLOCK, np.float32)
    r = -1
    for b in range(first, last):
        r = block_of(b, param, grad, codes, scales, precision_buffer,  # noqa: F821
                     scalars, group_flags, range_ends, range_groups, inv_grad_scale,
                     classic, read_counters, counters, key_of_block, values, r)


def _step(param, grad, codes, scales, precision_buffer, scalars, group_flags, range_ends,
          range_groups, inv_grad_scale, launch_flags, counters, seed, step_count):
    """In place; scalars in float32."""
    if launch_flags & READ_COUNTERS != 0:
        step_count = counters[STEP_COUNT]
    key = step_key_cpu(seed, step_count)
    for chunk in numba.prange((param.size + CHUNK - 1) // CHUNK):
        chunk_of(chunk, param, grad, codes, scales, precision_buffer,  # noqa: F821
                 scalars, group_flags, range_ends, range_groups, inv_grad_scale,
                 launch_flags, counters, key)


def _update_unless_skipped(param, grad, codes, scales, precision_buffer, scalars,
                           group_flags, range_ends, range_groups, inv_grad_scale,
                           launch_flags, counters, seed, step_count):
    """As kernels.cpu's: a step whose counters[LAST_STEP_SKIPPED] is set changes nothing
    but the counters."""
    if counters[LAST_STEP_SKIPPED] == 0:
        step(param, grad, codes, scales, precision_buffer, scalars,  # noqa: F821
             group_flags, range_ends, range_groups, inv_grad_scale, launch_flags,
             counters, seed, step_count)
        mark_velocities_initialized_cpu(counters, group_flags, 0, 1)
    count_step_cpu(counters)


def _find_nonfinite(param, grad, codes, scales, precision_buffer, scalars, group_flags,
                    range_ends, range_groups, inv_grad_scale, launch_flags, counters, seed,
                    step_count):
    """kernels.cpu's check (which reads the gradient alone) with this module's
    arguments."""
    check(param, grad, codes, precision_buffer, scalars, group_flags,  # noqa: F821
          range_ends, range_groups, inv_grad_scale, launch_flags, counters, seed,
          step_count)


@functools.cache
def float8_kernels(param_format=NATIVE, precision=NEAREST, parallel=True):
    """(step, find_nonfinite, update_unless_skipped) for params stored as `param_format`
    (NATIVE float32, BFLOAT16, FLOAT16) with an FP8 velocity and `precision`
    (kernels.layout.PRECISIONS), compiled on first use; arguments in the module
    docstring. find_nonfinite calls kernels.cpu's, with codes as its velocity (which it
    does not read)."""
    suffix = (f"{FORMAT_NAMES[param_format]}_float8_{PRECISION_NAMES[precision]}"
              + ("" if parallel else "_serial"))
    update = float8_update(STORAGE, _inline, param_format, precision)
    update_piece = _inline(specialized(_update_piece, f"_update_piece_{suffix}",
                                       update=update))
    block_of = _inline(specialized(_block, f"_block_{suffix}", update_piece=update_piece,
                                   stochastic=precision == STOCHASTIC))
    chunk_of = _inline(specialized(_chunk, f"_chunk_{suffix}", block_of=block_of))
    step = numba.njit(parallel=parallel, cache=True)(
        specialized(_step, f"momentum_step_{suffix}", chunk_of=chunk_of))
    update_unless_skipped = numba.njit(cache=True)(specialized(
        _update_unless_skipped, f"update_unless_skipped_{suffix}", step=step))
    find_nonfinite = numba.njit(cache=True)(specialized(
        _find_nonfinite, f"find_nonfinite_{suffix}",
        check=wide_kernels(param_format, NATIVE, NEAREST, parallel=parallel)[1]))
    return step, find_nonfinite, update_unless_skipped


def float8_kernels_for(size, param_format=NATIVE, precision=NEAREST):
    """`float8_kernels` of that kind for `size` elements: serial below SERIAL_BELOW."""
    return float8_kernels(param_format, precision, parallel=size >= SERIAL_BELOW)

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
Each task takes CHUNK elements (whole blocks), one range piece at a time in one loop
compiled for its group's l1 and decay terms (kernels.cpu's PIECES, so that LLVM
vectorizes it): the update and the block's absmax in one pass, the new velocities waiting
in a FLOAT8_BLOCK-element scratch array (the cache, not memory) until the block's last
element is done; then its codes and scale.
"""

import functools

import numba
import numpy as np

from .cpu import (ALL_PIECES, CHUNK, FORMAT_NAMES, PIECES, SERIAL_BELOW, STORAGE,
                  count_step_cpu, group_hyperparameters_cpu, kernels as wide_kernels,
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


# Templates (kernels.elementwise.specialized): `update`, `stochastic`, `finish_block`,
# `plain`, `with_l1`, `with_decay`, `with_both` (the pieces, as kernels.cpu's PIECES),
# `chunk_of` and `step` name one kind's compiled functions and constants.

BLOCK = np.uint64(FLOAT8_BLOCK)  # unsigned, as the indices it meets


def _finish_block(codes, scales, values, begin, stop, absmax, writes, key_of_block):
    """The block [begin, stop) is updated, its new velocities in values[:stop - begin]
    and their largest finite magnitude in absmax: its scale and codes, unless no group in
    it writes the velocity."""
    if writes:
        scale = f32_from_bits_cpu(absmax) / LARGEST
        for i in range(begin, stop):
            r16 = r16_cpu(key_of_block, i) if stochastic else np.uint32(0)  # noqa: F821
            codes[i] = to_code_cpu(values[i - begin], scale, r16,
                                   stochastic)  # noqa: F821
        scales[begin // BLOCK] = scale


def _update_piece(param, grad, codes, scales, precision_buffer, values, start, end,
                  padding, absmax, writes, key_of_block, lr, momentum, grad_coeff,
                  weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                  velocity_initialized):
    """Elements [start, end) of one range (unsigned indices: no wraparound checks, so
    LLVM vectorizes the loops), updated with its group's values, or with `padding` left
    alone as velocity 0. A block's new velocities wait in `values` until its last
    element is updated, then _finish_block writes its codes. (absmax, writes): those of
    the block holding `start` so far (it may have begun in an earlier range); returns
    those of the block holding end - 1 where it goes on past `end`, else (0, False).
    The old codes are decoded wherever they are read or not (branch-free): update ignores
    them where the velocity does not exist yet."""
    n = np.uint64(param.size)
    reads = velocity_initialized or (not classic and momentum == 0)  # exists, or kept
    group_writes = not padding and (classic or momentum != 0)
    zero = numba.float32(0)
    lo = start
    while lo < end:
        begin = lo - lo % BLOCK
        stop = min(n, begin + BLOCK)
        hi = min(end, stop)
        if padding:
            for i in range(lo, hi):
                values[i - begin] = zero
        else:
            old_scale = scales[begin // BLOCK]
            largest = np.uint32(0)
            for i in range(lo, hi):
                old = from_code_cpu(codes[i]) * old_scale
                v = update(  # noqa: F821
                    param, grad, precision_buffer, i, old if reads else zero,
                    key_of_block, lr, momentum, grad_coeff, weight_decay, l1, decay,
                    inv_grad_scale, classic, nesterov, maximize, velocity_initialized)
                values[i - begin] = v
                largest = max(largest, magnitude_bits_cpu(v))
            absmax = max(absmax, largest)
            writes = writes or group_writes
        if hi == stop:
            finish_block(codes, scales, values, begin, stop, absmax,  # noqa: F821
                         writes, key_of_block)
            absmax, writes = np.uint32(0), False
        lo = hi
    return absmax, writes


def _chunk(chunk, param, grad, codes, scales, precision_buffer, scalars, group_flags,
           range_ends, range_groups, inv_grad_scale, launch_flags, counters, key):
    """Task `chunk`'s elements (whole blocks), one range piece at a time."""
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    start = chunk * CHUNK
    stop = min(param.size, start + CHUNK)
    key_of_block = block_key_cpu(key, numba.uint64(start))
    values = np.empty(FLOAT8_BLOCK, np.float32)
    absmax, writes = np.uint32(0), False
    r = seek_range_cpu(range_ends, start, -1)
    while start < stop:
        end = min(stop, range_ends[r])
        k = range_groups[r]
        padding = k == NO_GROUP
        (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
         initialized) = group_hyperparameters_cpu(scalars, group_flags, counters,
                                                  0 if padding else k, read_counters)
        piece = (param, grad, codes, scales, precision_buffer, values, numba.uint64(start),
                 numba.uint64(end), padding, absmax, writes, key_of_block, lr, momentum,
                 grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic, nesterov,
                 maximize, initialized)
        if l1 == 0 and decay == 1:
            absmax, writes = plain(*piece)  # noqa: F821
        elif decay == 1:
            absmax, writes = with_l1(*piece)  # noqa: F821
        elif l1 == 0:
            absmax, writes = with_decay(*piece)  # noqa: F821
        else:
            absmax, writes = with_both(*piece)  # noqa: F821
        start = end
        r += 1


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
def _piece(param_format, precision, piece):
    """The loop over one range's elements [start, end) of PIECES[piece]'s terms."""
    terms, l1_term, decay_term = PIECES[piece]
    suffix = f"{FORMAT_NAMES[param_format]}_float8_{PRECISION_NAMES[precision]}"
    update = float8_update(STORAGE, _inline, param_format, precision, l1_term, decay_term)
    finish_block = _inline(specialized(_finish_block, f"_finish_block_{suffix}",
                                       stochastic=precision == STOCHASTIC))
    return numba.njit(cache=True)(specialized(
        _update_piece, f"_update_{terms}_{suffix}", update=update,
        finish_block=finish_block))


@functools.cache
def float8_kernels(param_format=NATIVE, precision=NEAREST, parallel=True,
                   pieces=ALL_PIECES):
    """(step, find_nonfinite, update_unless_skipped) for params stored as `param_format`
    (NATIVE float32, BFLOAT16, FLOAT16) with an FP8 velocity and `precision`
    (kernels.layout.PRECISIONS), with the piece loops `pieces` says (kernels.cpu's
    pieces_needed of the table it will run), compiled on first use; arguments in the
    module docstring. find_nonfinite calls kernels.cpu's, with codes as its velocity
    (which it does not read)."""
    suffix = (f"{FORMAT_NAMES[param_format]}_float8_{PRECISION_NAMES[precision]}_"
              + "".join(str(int(p)) for p in pieces) + ("" if parallel else "_serial"))
    compiled = {PIECES[k][0]: _piece(param_format, precision, k)
                for k in range(len(PIECES)) if pieces[k]}
    # the pieces no group uses are never called (padding runs in any): any stands in
    stand_in = next(iter(compiled.values()))
    compiled = {name: compiled.get(name, stand_in) for name, _, _ in PIECES}
    chunk_of = _inline(specialized(_chunk, f"_chunk_{suffix}", **compiled))
    step = numba.njit(parallel=parallel, cache=True)(
        specialized(_step, f"momentum_step_{suffix}", chunk_of=chunk_of))
    update_unless_skipped = numba.njit(cache=True)(specialized(
        _update_unless_skipped, f"update_unless_skipped_{suffix}", step=step))
    find_nonfinite = numba.njit(cache=True)(specialized(
        _find_nonfinite, f"find_nonfinite_{suffix}",
        check=wide_kernels(param_format, NATIVE, NEAREST, parallel=parallel)[1]))
    return step, find_nonfinite, update_unless_skipped


def float8_kernels_for(size, param_format=NATIVE, precision=NEAREST, pieces=ALL_PIECES):
    """`float8_kernels` of that kind for `size` elements: serial below SERIAL_BELOW."""
    return float8_kernels(param_format, precision, parallel=size >= SERIAL_BELOW,
                          pieces=pieces)

"""CPU kernels: the fused update as one parallel Numba loop over the flat buffers.

`kernels(param_format, velocity_format, precision, pieces, parallel)` compiles (on first
use) the three kernels of one kind of update: `step`, and the two halves of a step that
skips non-finite gradients, `find_nonfinite` and `update_unless_skipped`; `kernels_for`
picks the serial compilation for small buffers (SERIAL_BELOW). Their arguments are those
of every kernel (layout in kernels.layout):

    param, grad, velocity   1-D contiguous arrays: float32/float64, or the uint16 bits of
                            bfloat16/float16 (kernels.elementwise.storage_format)
    precision_buffer        KAHAN: the compensation (param's storage); MASTER: the
                            float32 master copy; else an empty array, not read
    scalars, group_flags, range_ends, range_groups
                            the four arrays of a `gpu_momentum.groups.UpdateTable`
    inv_grad_scale          1 / loss scale, in the compute dtype
    launch_flags            CLASSIC; READ_COUNTERS when the counters decide
    counters                the step counters (an empty array unless READ_COUNTERS)
    seed, step_count        uint64, int64: the key of STOCHASTIC rounding's random bits
                            (with READ_COUNTERS the step count is counters[STEP_COUNT])
"""

import functools

import numba
import numpy as np

from .elementwise import (ALWAYS, BFLOAT16, FLOAT16, NATIVE, NEVER, count_step,
                          group_hyperparameters, mark_velocities_initialized,
                          scaled_gradient_is_finite, seek_range, specialized,
                          storage_functions, storage_update)
from .layout import (CLASSIC, DECAY, L1, LAST_STEP_SKIPPED, NEAREST, NO_GROUP,
                     PRECISION_NAMES, READ_COUNTERS, STEP_COUNT)

_inline = numba.njit(inline="always", cache=True)
seek_range_cpu = _inline(seek_range)
group_hyperparameters_cpu = _inline(group_hyperparameters)
count_step_cpu = _inline(count_step)
mark_velocities_initialized_cpu = _inline(mark_velocities_initialized)
scaled_gradient_is_finite_cpu = _inline(scaled_gradient_is_finite)
STORAGE = storage_functions(_inline)  # conversions and hash, compiled for the CPU
step_key_cpu, block_key_cpu = STORAGE.step_key, STORAGE.block_key
FORMAT_NAMES = {NATIVE: "native", BFLOAT16: "bfloat16", FLOAT16: "float16"}

# Elements per parallel task: each task finds its first range by binary search, then runs
# one loop per range piece with its group's values (none over a NO_GROUP range). A chunk
# never crosses a multiple of 2**32, so its stochastic rounding has one block key.
CHUNK = 1 << 16


# The kernels of each kind are copies of the templates below (elementwise.specialized)
# whose globals name that kind's compiled functions: `update` (a piece's element update),
# `plain`, `with_l1`, `with_decay`, `with_both` (the pieces), `load_grad`, `chunk_of`,
# `count_nonfinite` and `step`.

def _update_piece(param, grad, velocity, precision_buffer, start, end, key_of_block, lr,
                  momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                  nesterov, maximize, velocity_initialized):
    for i in range(start, end):
        update(param, grad, velocity, precision_buffer, i, key_of_block, lr,  # noqa: F821
               momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
               nesterov, maximize, velocity_initialized)


def _count_nonfinite(grad, start, end, inv_grad_scale):
    """Elements of grad[start:end] whose scaled value (in the compute dtype) is NaN or
    inf."""
    count = 0
    for i in range(start, end):
        if not scaled_gradient_is_finite_cpu(load_grad(grad[i]),  # noqa: F821
                                             inv_grad_scale):
            count += 1
    return count


def _chunk(chunk, param, grad, velocity, precision_buffer, scalars, group_flags, range_ends,
           range_groups, inv_grad_scale, launch_flags, counters, key, check_only):
    """Task `chunk`'s elements, one range piece at a time with its group's values, leaving
    NO_GROUP ranges alone: updated, or with check_only counted where the scaled gradient is
    not finite (the count is returned)."""
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    start = chunk * CHUNK
    stop = min(param.size, start + CHUNK)
    key_of_block = block_key_cpu(key, numba.uint64(start))
    r = seek_range_cpu(range_ends, start, -1)
    nonfinite = 0
    while start < stop:
        end = min(stop, range_ends[r])
        k = range_groups[r]
        if k == NO_GROUP:
            pass
        elif check_only:
            nonfinite += count_nonfinite(grad, numba.uint64(start),  # noqa: F821
                                         numba.uint64(end), inv_grad_scale)
        else:
            (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
             initialized) = group_hyperparameters_cpu(scalars, group_flags, counters, k,
                                                      read_counters)
            piece = (param, grad, velocity, precision_buffer, numba.uint64(start),
                     numba.uint64(end), key_of_block, lr, momentum, grad_coeff,
                     weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                     initialized)
            if l1 == 0 and decay == 1:
                plain(*piece)  # noqa: F821
            elif decay == 1:
                with_l1(*piece)  # noqa: F821
            elif l1 == 0:
                with_decay(*piece)  # noqa: F821
            else:
                with_both(*piece)  # noqa: F821
        start = end
        r += 1
    return nonfinite


def _step(param, grad, velocity, precision_buffer, scalars, group_flags, range_ends,
          range_groups, inv_grad_scale, launch_flags, counters, seed, step_count):
    """In place; scalars in the compute dtype."""
    if launch_flags & READ_COUNTERS != 0:
        step_count = counters[STEP_COUNT]
    key = step_key_cpu(seed, step_count)
    for chunk in numba.prange((param.size + CHUNK - 1) // CHUNK):
        chunk_of(chunk, param, grad, velocity, precision_buffer, scalars,  # noqa: F821
                 group_flags, range_ends, range_groups, inv_grad_scale, launch_flags,
                 counters, key, False)


def _find_nonfinite(param, grad, velocity, precision_buffer, scalars, group_flags,
                    range_ends, range_groups, inv_grad_scale, launch_flags, counters, seed,
                    step_count):
    """The first half of a step that skips non-finite gradients (the GPU kernels' clear
    and find_nonfinite): counters[LAST_STEP_SKIPPED] says whether a scaled gradient
    element of a range some group updates is NaN or inf."""
    nonfinite = 0
    for chunk in numba.prange((param.size + CHUNK - 1) // CHUNK):
        nonfinite += chunk_of(chunk, param, grad, velocity,  # noqa: F821
                              precision_buffer, scalars, group_flags, range_ends,
                              range_groups, inv_grad_scale, launch_flags, counters,
                              np.uint32(0), True)
    counters[LAST_STEP_SKIPPED] = 1 if nonfinite else 0


def _update_unless_skipped(param, grad, velocity, precision_buffer, scalars, group_flags,
                           range_ends, range_groups, inv_grad_scale, launch_flags,
                           counters, seed, step_count):
    """The second half (the GPU kernels' update and finish; launch_flags has
    READ_COUNTERS): a step whose counters[LAST_STEP_SKIPPED] is set changes nothing but
    the counters; first steps and the step count come from the counters, so a skipped
    first step leaves the next one first, and a skipped step takes no random key."""
    if counters[LAST_STEP_SKIPPED] == 0:
        step(param, grad, velocity, precision_buffer, scalars, group_flags,  # noqa: F821
             range_ends, range_groups, inv_grad_scale, launch_flags, counters, seed,
             step_count)
        mark_velocities_initialized_cpu(counters, group_flags, 0, 1)
    count_step_cpu(counters)


# The piece loops by the terms their groups compile (kernels.elementwise): l1 == 0 and
# decay == 1 ("plain"), l1 only, decay only, both. Each is compiled on its own with the
# group's values as arguments, so that LLVM unswitches its loop on them and vectorizes
# each version (a loop with two more loop-invariant branches, l1 != 0 and decay != 1, is
# more than LLVM unswitches: it then stays scalar, 25-35% slower on 2 cores); unsigned
# indices, so that Numba drops its negative-index wraparound.
PIECES = (("plain", NEVER, NEVER), ("with_l1", ALWAYS, NEVER), ("with_decay", NEVER, ALWAYS),
          ("with_both", ALWAYS, ALWAYS))
ALL_PIECES = (True,) * len(PIECES)


def pieces_needed(scalars):
    """Which of PIECES the groups of a scalar table (its L1 and DECAY columns) use: a
    kernel compiles only those (each takes seconds to compile)."""
    l1, decay = scalars[:, L1] != 0, scalars[:, DECAY] != 1
    return (bool((~l1 & ~decay).any()), bool((l1 & ~decay).any()),
            bool((~l1 & decay).any()), bool((l1 & decay).any()))


def _suffix(param_format, velocity_format, precision):
    return (f"{FORMAT_NAMES[param_format]}_{FORMAT_NAMES[velocity_format]}_"
            f"{PRECISION_NAMES[precision]}")


@functools.cache
def _piece(param_format, velocity_format, precision, piece):
    """The loop over elements [start, end) of one group of PIECES[piece]'s terms."""
    terms, l1_term, decay_term = PIECES[piece]
    update = storage_update(STORAGE, _inline, param_format, velocity_format, precision,
                            l1_term=l1_term, decay_term=decay_term)
    name = f"_update_{terms}_{_suffix(param_format, velocity_format, precision)}"
    return numba.njit(cache=True)(specialized(_update_piece, name, update=update))


@functools.cache
def kernels(param_format=NATIVE, velocity_format=NATIVE, precision=NEAREST,
            pieces=ALL_PIECES, parallel=True):
    """(step, find_nonfinite, update_unless_skipped) for params stored as `param_format`, a
    velocity stored as `velocity_format` and `precision` (kernels.layout.PRECISIONS), with
    the piece loops `pieces` says (pieces_needed of the table it will run), compiled on
    first use; arguments in the module docstring. parallel: the chunks spread over Numba's
    thread pool, else run one after the other on the calling thread, the same body either
    way (prange is range without parallel=True). A step that skips non-finite gradients is
    find_nonfinite then update_unless_skipped (launch_flags with READ_COUNTERS)."""
    kind = (param_format, velocity_format, precision)
    suffix = (_suffix(*kind) + "_" + "".join(str(int(p)) for p in pieces)
              + ("" if parallel else "_serial"))
    compiled = {PIECES[k][0]: _piece(*kind, k) for k in range(len(PIECES)) if pieces[k]}
    # the pieces no group uses are never called: any compiled one stands in
    stand_in = next(iter(compiled.values()))
    compiled = {name: compiled.get(name, stand_in) for name, _, _ in PIECES}
    count_nonfinite = numba.njit(cache=True)(specialized(
        _count_nonfinite, f"_count_nonfinite_{_suffix(*kind)}",
        load_grad=STORAGE.load[param_format]))
    chunk_of = _inline(specialized(_chunk, f"_chunk_{suffix}",
                                   count_nonfinite=count_nonfinite, **compiled))
    jit = numba.njit(parallel=parallel, cache=True)
    step = jit(specialized(_step, f"momentum_step_{suffix}", chunk_of=chunk_of))
    find_nonfinite = jit(specialized(_find_nonfinite, f"find_nonfinite_{suffix}",
                                     chunk_of=chunk_of))
    update_unless_skipped = numba.njit(cache=True)(specialized(
        _update_unless_skipped, f"update_unless_skipped_{suffix}", step=step))
    return step, find_nonfinite, update_unless_skipped


# Below SERIAL_BELOW elements waking the thread pool costs more than a second core saves
# (measured on 2 cores: README "Per-step overhead"); one CHUNK is one task anyway.
SERIAL_BELOW = 2 * CHUNK


def kernels_for(size, param_format=NATIVE, velocity_format=NATIVE, precision=NEAREST,
                pieces=ALL_PIECES):
    """`kernels` of that kind for `size` elements: serial below SERIAL_BELOW, else
    parallel."""
    return kernels(param_format, velocity_format, precision, pieces,
                   parallel=size >= SERIAL_BELOW)

"""CPU kernels: the fused update as one parallel Numba loop over the flat buffers.

Arguments are those of every kernel (layout in kernels.layout): the arrays, the four
arrays of a `gpu_momentum.groups.UpdateTable` (scalars, group_flags, range_ends,
range_groups), inv_grad_scale, the launch flags and the step counters (an empty array
unless READ_COUNTERS).
"""

import numba

from .elementwise import (ALWAYS, NEVER, count_step, element_update,
                          group_hyperparameters, mark_velocities_initialized,
                          scaled_gradient_is_finite, seek_range)
from .layout import CLASSIC, LAST_STEP_SKIPPED, NO_GROUP, READ_COUNTERS

_inline = numba.njit(inline="always", cache=True)
seek_range_cpu = _inline(seek_range)
group_hyperparameters_cpu = _inline(group_hyperparameters)
scaled_gradient_is_finite_cpu = _inline(scaled_gradient_is_finite)
count_step_cpu = _inline(count_step)
mark_velocities_initialized_cpu = _inline(mark_velocities_initialized)

# Elements per parallel task: each task finds its first range by binary search, then runs
# one loop per range piece with its group's values (none over a NO_GROUP range).
CHUNK = 1 << 16


def _piece_loop(l1_term, decay_term, name):
    """A function updating elements [start, end) of one group with
    kernels.elementwise.momentum_update, its l1 and decay terms compiled as l1_term and
    decay_term say (NEVER or ALWAYS): a loop with two more loop-invariant branches (l1 != 0,
    decay != 1) is more than LLVM unswitches, and it then stays scalar (25-35% slower on 2
    cores). Each is compiled on its own with the group's values as arguments, so that LLVM
    unswitches its loop on them and vectorizes each version; unsigned indices, so that
    Numba drops its negative-index wraparound. `name` keeps Numba's on-disk cache entries
    of the four apart."""
    update = _inline(element_update(l1_term, decay_term))

    def update_piece(param, grad, velocity, start, end, lr, momentum, grad_coeff,
                     weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                     velocity_initialized):
        for i in range(start, end):
            param[i], velocity[i] = update(
                param[i], grad[i], velocity[i], lr, momentum, grad_coeff, weight_decay, l1,
                decay, inv_grad_scale, classic, nesterov, maximize, velocity_initialized)

    update_piece.__name__ = update_piece.__qualname__ = name
    return numba.njit(cache=True)(update_piece)


# Per range, the element update without the terms its group leaves out (l1 == 0,
# decay == 1): bitwise the reference's there, and vectorized.
_update_plain = _piece_loop(NEVER, NEVER, "_update_plain")
_update_l1 = _piece_loop(ALWAYS, NEVER, "_update_l1")
_update_decay = _piece_loop(NEVER, ALWAYS, "_update_decay")
_update_l1_decay = _piece_loop(ALWAYS, ALWAYS, "_update_l1_decay")


@numba.njit(cache=True)
def _count_nonfinite(grad, start, end, inv_grad_scale):
    """Elements of grad[start:end] whose scaled value is NaN or inf."""
    count = 0
    for i in range(start, end):
        if not scaled_gradient_is_finite_cpu(grad[i], inv_grad_scale):
            count += 1
    return count


@_inline
def _chunk(chunk, param, grad, velocity, scalars, group_flags, range_ends, range_groups,
           inv_grad_scale, launch_flags, counters, check_only):
    """Task `chunk`'s elements, one range piece at a time with its group's values, leaving
    NO_GROUP ranges alone: updated, or with check_only counted where the scaled gradient
    is not finite (the count is returned)."""
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    start = chunk * CHUNK
    stop = min(param.size, start + CHUNK)
    r = seek_range_cpu(range_ends, start, -1)
    nonfinite = 0
    while start < stop:
        end = min(stop, range_ends[r])
        k = range_groups[r]
        if k == NO_GROUP:
            pass
        elif check_only:
            nonfinite += _count_nonfinite(grad, numba.uint64(start), numba.uint64(end),
                                          inv_grad_scale)
        else:
            (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
             initialized) = \
                group_hyperparameters_cpu(scalars, group_flags, counters, k, read_counters)
            piece = (param, grad, velocity, numba.uint64(start), numba.uint64(end), lr,
                     momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                     nesterov, maximize, initialized)
            if l1 == 0 and decay == 1:
                _update_plain(*piece)
            elif decay == 1:
                _update_l1(*piece)
            elif l1 == 0:
                _update_decay(*piece)
            else:
                _update_l1_decay(*piece)
        start = end
        r += 1
    return nonfinite


def _named(function, name, jit):
    """`function` compiled by `jit` under `name`: Numba's on-disk cache keys entries on the
    function's name, so two compilations of one body need two names."""
    function.__name__ = function.__qualname__ = name
    return jit(function)


def _kernels(parallel):
    """(momentum_step, find_nonfinite, update_unless_skipped): the kernels, their chunks
    spread over Numba's thread pool (parallel) or run one after the other on the calling
    thread, the same body either way (prange is range without parallel=True)."""
    jit = numba.njit(parallel=parallel, cache=True)
    suffix = "" if parallel else "_serial"

    def momentum_step(param, grad, velocity, scalars, group_flags, range_ends, range_groups,
                      inv_grad_scale, launch_flags, counters):
        """In place over 1-D contiguous float32/float64 arrays; scalars in the arrays'
        dtype."""
        for chunk in numba.prange((param.size + CHUNK - 1) // CHUNK):
            _chunk(chunk, param, grad, velocity, scalars, group_flags, range_ends,
                   range_groups, inv_grad_scale, launch_flags, counters, False)

    step = _named(momentum_step, f"momentum_step{suffix}_cpu", jit)

    def find_nonfinite(param, grad, velocity, scalars, group_flags, range_ends,
                       range_groups, inv_grad_scale, launch_flags, counters):
        """The first half of a step that skips non-finite gradients (the GPU kernels'
        clear and find_nonfinite): counters[LAST_STEP_SKIPPED] says whether a scaled
        gradient element of a range some group updates is NaN or inf."""
        nonfinite = 0
        for chunk in numba.prange((param.size + CHUNK - 1) // CHUNK):
            nonfinite += _chunk(chunk, param, grad, velocity, scalars, group_flags,
                                range_ends, range_groups, inv_grad_scale, launch_flags,
                                counters, True)
        counters[LAST_STEP_SKIPPED] = 1 if nonfinite else 0

    def update_unless_skipped(param, grad, velocity, scalars, group_flags, range_ends,
                              range_groups, inv_grad_scale, launch_flags, counters):
        """The second half (the GPU kernels' update and finish; launch_flags has
        READ_COUNTERS): a step whose counters[LAST_STEP_SKIPPED] is set changes nothing
        but the counters; first steps come from the counters, so a skipped first step
        leaves the next one first."""
        if counters[LAST_STEP_SKIPPED] == 0:
            step(param, grad, velocity, scalars, group_flags, range_ends, range_groups,
                 inv_grad_scale, launch_flags, counters)
            mark_velocities_initialized_cpu(counters, group_flags, 0, 1)
        count_step_cpu(counters)

    return (step, _named(find_nonfinite, f"find_nonfinite{suffix}_cpu", jit),
            _named(update_unless_skipped, f"update_unless_skipped{suffix}_cpu",
                   numba.njit(cache=True)))


# Below SERIAL_BELOW elements waking the thread pool costs more than a second core saves
# (measured on 2 cores: README "Per-step overhead"); one CHUNK is one task anyway.
SERIAL_BELOW = 2 * CHUNK
momentum_step_cpu, find_nonfinite_cpu, update_unless_skipped_cpu = _kernels(parallel=True)
(momentum_step_serial_cpu, find_nonfinite_serial_cpu,
 update_unless_skipped_serial_cpu) = _kernels(parallel=False)


def kernels_for(size):
    """(momentum_step, find_nonfinite, update_unless_skipped) for `size` elements: serial
    below SERIAL_BELOW, else parallel."""
    if size < SERIAL_BELOW:
        return momentum_step_serial_cpu, find_nonfinite_serial_cpu, \
            update_unless_skipped_serial_cpu
    return momentum_step_cpu, find_nonfinite_cpu, update_unless_skipped_cpu

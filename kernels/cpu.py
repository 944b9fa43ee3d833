"""CPU fallback: the fused update as one parallel Numba loop over the flat buffers.

Arguments are those of every kernel (layout in kernels.elementwise): the arrays, the
group table and ranges of a `gpu_momentum.groups.UpdateTable`, inv_grad_scale, the
launch flags and the step counters.
"""

import math

import numba

from .elementwise import (CLASSIC, COUNTERS, DECAY, FRESH_VELOCITY, GRAD_COEFF, L1,
                          LAST_STEP_SKIPPED, LR, MAXIMIZE, MOMENTUM, NESTEROV,
                          SKIPPED_STEPS, STEP_COUNT, VELOCITY_INITIALIZED, WEIGHT_DECAY,
                          KEEP_VELOCITY, find_range_cpu, momentum_update_cpu_decay,
                          momentum_update_cpu_l1, momentum_update_cpu_l1_decay,
                          momentum_update_cpu_plain)

# Elements per parallel task: each task finds its first range by binary search, then runs
# one loop per range piece (_update_piece) with its group's values.
CHUNK = 1 << 16


def _piece_loop(update, name):
    """A function updating elements [start, end) of one group with the element function
    `update`. Each is compiled on its own with the group's values as arguments, so that
    LLVM unswitches its loop on them and vectorizes each version; unsigned indices, so
    that Numba drops its negative-index wraparound. `name` keeps Numba's on-disk cache
    entries of the four apart."""

    def update_piece(param, grad, velocity, start, end, lr, momentum, grad_coeff,
                     weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                     fresh):
        for i in range(start, end):
            param[i], velocity[i] = update(
                param[i], grad[i], velocity[i], lr, momentum, grad_coeff, weight_decay, l1,
                decay, inv_grad_scale, classic, nesterov, maximize, fresh)

    update_piece.__name__ = update_piece.__qualname__ = name
    return numba.njit(cache=True)(update_piece)


# Per range, the element function without the terms its group leaves out (l1 == 0,
# decay == 1): bitwise kernels.elementwise.momentum_update there, and vectorized.
_update_plain = _piece_loop(momentum_update_cpu_plain, "_update_plain")
_update_l1 = _piece_loop(momentum_update_cpu_l1, "_update_l1")
_update_decay = _piece_loop(momentum_update_cpu_decay, "_update_decay")
_update_l1_decay = _piece_loop(momentum_update_cpu_l1_decay, "_update_l1_decay")


@numba.njit(parallel=True, cache=True)
def momentum_step_cpu(param, grad, velocity, scalars, group_flags, range_ends,
                      range_groups, inv_grad_scale, launch_flags, counters):
    """In place over 1-D contiguous float32/float64 arrays; scalars in the arrays' dtype.
    With COUNTERS in launch_flags a group's first step is read from `counters`, else from
    its FRESH_VELOCITY flag."""
    classic = launch_flags & CLASSIC != 0
    maximize = launch_flags & MAXIMIZE != 0
    counted = launch_flags & COUNTERS != 0
    n = param.size
    for chunk in numba.prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        r = find_range_cpu(range_ends, start)
        while start < stop:
            end = min(stop, range_ends[r])
            k = range_groups[r]
            lr, momentum, grad_coeff = scalars[k, LR], scalars[k, MOMENTUM], \
                scalars[k, GRAD_COEFF]
            weight_decay, l1, decay = scalars[k, WEIGHT_DECAY], scalars[k, L1], \
                scalars[k, DECAY]
            nesterov = group_flags[k] & NESTEROV != 0
            if counted:
                fresh = counters[VELOCITY_INITIALIZED + k] == 0
            else:
                fresh = group_flags[k] & FRESH_VELOCITY != 0
            piece = (param, grad, velocity, numba.uint64(start), numba.uint64(end), lr,
                     momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                     nesterov, maximize, fresh)
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


@numba.njit(parallel=True, cache=True)
def momentum_step_skipping_nonfinite_cpu(param, grad, velocity, scalars, group_flags,
                                         range_ends, range_groups, inv_grad_scale,
                                         launch_flags, counters):
    """As momentum_step_cpu, unless a scaled gradient element is NaN or inf: then nothing
    but the skip counters changes. First steps come from `counters`, so a skipped first
    step leaves the next one first."""
    nonfinite = 0
    for i in numba.prange(grad.size):
        if not math.isfinite(grad[i] * inv_grad_scale):
            nonfinite += 1
    if nonfinite:
        counters[SKIPPED_STEPS] += 1
        counters[LAST_STEP_SKIPPED] = 1
        return
    momentum_step_cpu(param, grad, velocity, scalars, group_flags, range_ends,
                      range_groups, inv_grad_scale, launch_flags | COUNTERS, counters)
    counters[STEP_COUNT] += 1
    counters[LAST_STEP_SKIPPED] = 0
    for k in range(group_flags.size):
        if group_flags[k] & KEEP_VELOCITY == 0:
            counters[VELOCITY_INITIALIZED + k] = 1

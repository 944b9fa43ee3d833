"""CPU fallback: the fused update as one parallel Numba loop over the flat buffers."""

import math

import numba

from .elementwise import (LAST_STEP_SKIPPED, SKIPPED_STEPS, STEP_COUNT,
                          VELOCITY_INITIALIZED, momentum_update_cpu)


@numba.njit(parallel=True, cache=True)
def momentum_step_cpu(param, grad, velocity, lr, momentum, grad_coeff, weight_decay,
                      inv_grad_scale, classic, nesterov, maximize, fresh_velocity):
    """In place over 1-D contiguous float32/float64 arrays; scalars in the arrays' dtype."""
    for i in numba.prange(param.size):
        param[i], velocity[i] = momentum_update_cpu(
            param[i], grad[i], velocity[i], lr, momentum, grad_coeff, weight_decay,
            inv_grad_scale, classic, nesterov, maximize, fresh_velocity)


@numba.njit(parallel=True, cache=True)
def momentum_step_skipping_nonfinite_cpu(param, grad, velocity, lr, momentum, grad_coeff,
                                         weight_decay, inv_grad_scale, classic, nesterov,
                                         maximize, initializes_velocity, counters):
    """As momentum_step_cpu, unless a scaled gradient element is NaN or inf: then nothing
    but the skip counters changes. The first-step flag comes from `counters`, so a skipped
    first step leaves the next one first."""
    nonfinite = 0
    for i in numba.prange(grad.size):
        if not math.isfinite(grad[i] * inv_grad_scale):
            nonfinite += 1
    if nonfinite:
        counters[SKIPPED_STEPS] += 1
        counters[LAST_STEP_SKIPPED] = 1
        return
    momentum_step_cpu(param, grad, velocity, lr, momentum, grad_coeff, weight_decay,
                      inv_grad_scale, classic, nesterov, maximize,
                      counters[VELOCITY_INITIALIZED] == 0)
    counters[STEP_COUNT] += 1
    counters[LAST_STEP_SKIPPED] = 0
    if initializes_velocity:
        counters[VELOCITY_INITIALIZED] = 1

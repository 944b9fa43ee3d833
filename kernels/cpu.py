"""CPU fallback: the fused update as one parallel Numba loop over the flat buffers."""

import numba

from .elementwise import momentum_update_cpu


@numba.njit(parallel=True, cache=True)
def momentum_step_cpu(param, grad, velocity, lr, momentum, grad_coeff, weight_decay,
                      classic, nesterov, maximize, fresh_velocity):
    """In place over 1-D contiguous float32/float64 arrays; scalars in the arrays' dtype."""
    for i in numba.prange(param.size):
        param[i], velocity[i] = momentum_update_cpu(
            param[i], grad[i], velocity[i], lr, momentum, grad_coeff, weight_decay,
            classic, nesterov, maximize, fresh_velocity)

"""The per-element momentum update: the one place the maths is compiled from.

`momentum_update` is plain Python so that every Numba target compiles the same body:
the CPU kernel (`kernels.cpu`) and the CUDA kernel (`kernels.numba_cuda`) both call it, so
the two cannot drift apart. The CUDA C kernel (`kernels/momentum.cu`) follows the same
operation order, and `gpu_momentum.reference` is the float64 specification all of them are
tested against.

All scalars must already have the compute dtype (float32 for float32 and float16
parameters, float64 for float64): a float64 literal here would silently promote float32
arithmetic.
"""

import numba


# Step counters, an int64[4] array in the backend's memory when the optimizer skips steps
# with non-finite gradients: the kernels keep them there, so no step waits for the host.
STEP_COUNT, VELOCITY_INITIALIZED, SKIPPED_STEPS, LAST_STEP_SKIPPED = range(4)


def momentum_update(p, g, v, lr, momentum, grad_coeff, weight_decay, inv_grad_scale,
                    classic, nesterov, maximize, fresh_velocity):
    """Returns (new_param, new_velocity) for one element.

    inv_grad_scale is 1 / loss scale (exactly 1 without loss scaling).
    grad_coeff is (1 - dampening) for the torch style; classic ignores it.
    fresh_velocity: the velocity does not exist yet and is not read.
    Torch style with momentum 0 leaves the velocity as it is, as PyTorch leaves its
    momentum buffer, so a schedule that later raises momentum resumes from it.
    """
    g = g * inv_grad_scale
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    if classic:
        if fresh_velocity:
            v = -lr * g
        else:
            v = momentum * v - lr * g
        if nesterov:
            p = p + (momentum * v - lr * g)
        else:
            p = p + v
    elif momentum == 0:
        p = p - lr * g
    else:
        if fresh_velocity:
            v = g
        else:
            v = momentum * v + grad_coeff * g
        if nesterov:
            p = p - lr * (g + momentum * v)
        else:
            p = p - lr * v
    return p, v


momentum_update_cpu = numba.njit(inline="always", cache=True)(momentum_update)

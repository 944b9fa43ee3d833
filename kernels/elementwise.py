"""The per-element momentum update and the per-group protocol every Numba kernel shares.

These are plain Python functions so that every Numba target compiles the same body: the
CPU kernels (`kernels.cpu`) compile them with `numba.njit(inline="always")`, the CUDA
kernels (`kernels.numba_cuda`) with `cuda.jit(device=True, inline="always")`, so the two
cannot drift apart. The CUDA C kernel (`kernels/momentum.cu`) follows the same operation
order, and `gpu_momentum.reference` is the float64 specification all of them are tested
against. The launch layout (columns, flags, counter slots) is `kernels.layout`.

All scalars must already have the compute dtype (float32 for float32 and float16
parameters, float64 for float64): a float64 literal here would silently promote float32
arithmetic.
"""

import math

from .layout import (DECAY, GRAD_COEFF, GROUP_SLOTS, KEEP_VELOCITY, L1, LAST_STEP_SKIPPED,
                     LR, MAXIMIZE, MOMENTUM, NESTEROV, SKIPPED_STEPS, STEP_COUNT,
                     VELOCITY_INITIALIZED, WEIGHT_DECAY)

# How an element update compiles the l1 and decoupled-decay terms: NEVER (left out), ALWAYS
# (applied whatever the value: only for l1 != 0, decay != 1) or CHECKED (as written in the
# reference: applied when l1 != 0, decay != 1). The CPU loop uses the first two (see
# kernels.cpu); every other kernel computes CHECKED.
NEVER, ALWAYS, CHECKED = range(3)


def element_update(l1_term=CHECKED, decay_term=CHECKED):
    """momentum_update with its l1 and decay terms compiled as NEVER, ALWAYS or CHECKED
    say."""

    def momentum_update(p, g, v, lr, momentum, grad_coeff, weight_decay, l1, decay,
                        inv_grad_scale, classic, nesterov, maximize, velocity_initialized):
        """Returns (new_param, new_velocity) for one element.

        inv_grad_scale is 1 / loss scale (exactly 1 without loss scaling).
        grad_coeff is (1 - dampening) for the torch style; classic ignores it.
        l1 * sign(p) is added as branches, so a zero p leaves g bitwise as it is.
        decay is 1 - lr * weight_decay with decoupled weight decay, else exactly 1.
        velocity_initialized False: the velocity does not exist yet and is not read (the
        first step). Torch style with momentum 0 leaves the velocity as it is, as PyTorch
        leaves its momentum buffer, so a schedule that later raises momentum resumes from
        it.
        """
        g = g * inv_grad_scale
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if l1_term == ALWAYS or (l1_term == CHECKED and l1 != 0):
            if p > 0:
                g = g + l1
            elif p < 0:
                g = g - l1
        if decay_term == ALWAYS or (decay_term == CHECKED and decay != 1):
            p = p * decay
        if classic:
            if velocity_initialized:
                v = momentum * v - lr * g
            else:
                v = -lr * g
            if nesterov:
                p = p + (momentum * v - lr * g)
            else:
                p = p + v
        elif momentum == 0:
            p = p - lr * g
        else:
            if velocity_initialized:
                v = momentum * v + grad_coeff * g
            else:
                v = g
            if nesterov:
                p = p - lr * (g + momentum * v)
            else:
                p = p - lr * v
        return p, v

    return momentum_update


momentum_update = element_update()


def seek_range(range_ends, i, r):
    """The range holding element i (the first r with i < range_ends[r]) for a walk whose
    indices only grow and whose last range was r (-1 before the first): the next range
    when it holds i (one load), else a binary search, which finds i from anywhere."""
    if r + 1 < range_ends.size and i < range_ends[r + 1]:
        return r + 1
    low, high = 0, range_ends.size - 1
    while low < high:
        middle = (low + high) // 2
        if i < range_ends[middle]:
            high = middle
        else:
            low = middle + 1
    return low


def group_hyperparameters(scalars, group_flags, counters, k, read_counters):
    """Group k's (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
    velocity_initialized), read from its row of the table. With read_counters the step
    counters, not the table's flags, say whether its velocity exists: a skipped first step
    leaves the next one first."""
    if read_counters:
        velocity_initialized = counters[GROUP_SLOTS + k] != 0
    else:
        velocity_initialized = group_flags[k] & VELOCITY_INITIALIZED != 0
    return (scalars[k, LR], scalars[k, MOMENTUM], scalars[k, GRAD_COEFF],
            scalars[k, WEIGHT_DECAY], scalars[k, L1], scalars[k, DECAY],
            group_flags[k] & NESTEROV != 0, group_flags[k] & MAXIMIZE != 0,
            velocity_initialized)


def scaled_gradient_is_finite(g, inv_grad_scale):
    """Whether g * inv_grad_scale, as the update computes it, is neither NaN nor inf."""
    return math.isfinite(g * inv_grad_scale)


def count_step(counters):
    """Counts the step as taken or skipped, as LAST_STEP_SKIPPED says."""
    if counters[LAST_STEP_SKIPPED] != 0:
        counters[SKIPPED_STEPS] += 1
    else:
        counters[STEP_COUNT] += 1


def mark_velocities_initialized(counters, group_flags, first, stride):
    """After a taken step, groups first, first + stride, ... have a velocity, unless they
    leave it alone (KEEP_VELOCITY)."""
    for k in range(first, group_flags.size, stride):
        if group_flags[k] & KEEP_VELOCITY == 0:
            counters[GROUP_SLOTS + k] = 1

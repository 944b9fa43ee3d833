"""The per-element momentum update and the launch layout every kernel shares.

`momentum_update` is plain Python so that every Numba target compiles the same body:
the CPU kernel (`kernels.cpu`) and the CUDA kernel (`kernels.numba_cuda`) both call it, so
the two cannot drift apart. The CUDA C kernel (`kernels/momentum.cu`) follows the same
operation order, and `gpu_momentum.reference` is the float64 specification all of them are
tested against.

All scalars must already have the compute dtype (float32 for float32 and float16
parameters, float64 for float64): a float64 literal here would silently promote float32
arithmetic.

One launch updates the whole flat buffer, whatever the number of parameter groups. It
reads (see `gpu_momentum.groups.UpdateTable`):
- a per-group table of scalars, `scalars[group, column]` in the compute dtype, with the
  columns below, and per-group flag bits `group_flags[group]`;
- contiguous ranges of the buffer: range r is [range_ends[r - 1], range_ends[r]) (from 0
  for r = 0) and belongs to group range_groups[r]; `find_range` finds an element's range;
- launch-wide flag bits (`launch_flags`) and 1 / loss scale (`inv_grad_scale`).
"""

import numba

# Step counters, int64[VELOCITY_INITIALIZED + groups], in the backend's memory when the
# optimizer skips steps with non-finite gradients: the kernels keep them there, so no step
# waits for the host. Slot VELOCITY_INITIALIZED + k says whether group k's velocity exists.
STEP_COUNT, SKIPPED_STEPS, LAST_STEP_SKIPPED, VELOCITY_INITIALIZED = range(4)

# Columns of the per-group scalar table. WEIGHT_DECAY is the coupled term (weight_decay * p
# added to the gradient); DECAY is the decoupled one (p *= DECAY before the update, exactly
# 1 without decoupled weight decay). GRAD_COEFF is 1 - dampening.
LR, MOMENTUM, GRAD_COEFF, WEIGHT_DECAY, L1, DECAY = range(6)
GROUP_COLUMNS = 6

# Flag bits, one namespace: CLASSIC, MAXIMIZE and COUNTERS are launch-wide, the others per
# group. COUNTERS: the skip and the first-step flags come from the counters in memory.
# FRESH_VELOCITY: the group's velocity does not exist yet (not read). KEEP_VELOCITY: torch
# style with momentum 0, the velocity is neither read nor written.
FLAGS = {
    "CLASSIC": 1,
    "MAXIMIZE": 2,
    "COUNTERS": 4,
    "NESTEROV": 8,
    "FRESH_VELOCITY": 16,
    "KEEP_VELOCITY": 32,
}
CLASSIC, MAXIMIZE, COUNTERS, NESTEROV, FRESH_VELOCITY, KEEP_VELOCITY = FLAGS.values()


def _element_update(regularized):
    """momentum_update, with the l1 and decoupled-decay terms compiled in or (for the CPU
    loop's common case, regularized=False) out. A constant, not a branch on l1 and decay:
    LLVM's unswitching gives up on so many loop-invariant branches, and the loop then
    stays scalar (about 15% slower on 2 cores)."""

    def momentum_update(p, g, v, lr, momentum, grad_coeff, weight_decay, l1, decay,
                        inv_grad_scale, classic, nesterov, maximize, fresh_velocity):
        """Returns (new_param, new_velocity) for one element.

        inv_grad_scale is 1 / loss scale (exactly 1 without loss scaling).
        grad_coeff is (1 - dampening) for the torch style; classic ignores it.
        l1 * sign(p) is added as branches, so a zero p leaves g bitwise as it is.
        decay is 1 - lr * weight_decay with decoupled weight decay, else exactly 1.
        fresh_velocity: the velocity does not exist yet and is not read.
        Torch style with momentum 0 leaves the velocity as it is, as PyTorch leaves its
        momentum buffer, so a schedule that later raises momentum resumes from it.
        """
        g = g * inv_grad_scale
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if regularized and l1 != 0:
            if p > 0:
                g = g + l1
            elif p < 0:
                g = g - l1
        if regularized and decay != 1:
            p = p * decay
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

    return momentum_update


momentum_update = _element_update(regularized=True)


def find_range(range_ends, i):
    """The range holding element i: the first r with i < range_ends[r] (binary search)."""
    low, high = 0, range_ends.size - 1
    while low < high:
        middle = (low + high) // 2
        if i < range_ends[middle]:
            high = middle
        else:
            low = middle + 1
    return low


momentum_update_cpu = numba.njit(inline="always", cache=True)(momentum_update)
# Only for l1 == 0 and decay == 1, where it computes bitwise what momentum_update does.
momentum_update_unregularized_cpu = numba.njit(inline="always", cache=True)(
    _element_update(regularized=False))
find_range_cpu = numba.njit(inline="always", cache=True)(find_range)

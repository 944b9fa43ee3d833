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


# How an element update compiles the l1 and decoupled-decay terms: NEVER (left out), ALWAYS
# (applied whatever the value: only for l1 != 0, decay != 1) or CHECKED (as written in the
# reference: applied when l1 != 0, decay != 1).
NEVER, ALWAYS, CHECKED = range(3)


def _element_update(l1_term=CHECKED, decay_term=CHECKED):
    """momentum_update with its l1 and decay terms compiled as NEVER, ALWAYS or CHECKED
    say. The CPU loop picks, per range, the variant that computes bitwise what the
    CHECKED one does for the group's values: a loop with two more loop-invariant branches
    is more than LLVM unswitches, and it then stays scalar (25-35% slower on 2 cores)."""

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
        if l1_term == ALWAYS or (l1_term == CHECKED and l1 != 0):
            if p > 0:
                g = g + l1
            elif p < 0:
                g = g - l1
        if decay_term == ALWAYS or (decay_term == CHECKED and decay != 1):
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


momentum_update = _element_update()


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


# The CPU element updates for ranges without l1 and decay, with l1 (!= 0), with decay
# (!= 1) and with both: each bitwise momentum_update there, without its branches on them.
(momentum_update_cpu_plain, momentum_update_cpu_l1, momentum_update_cpu_decay,
 momentum_update_cpu_l1_decay) = (
    numba.njit(inline="always", cache=True)(_element_update(l1_term, decay_term))
    for l1_term, decay_term in ((NEVER, NEVER), (ALWAYS, NEVER), (NEVER, ALWAYS),
                                (ALWAYS, ALWAYS)))
find_range_cpu = numba.njit(inline="always", cache=True)(find_range)

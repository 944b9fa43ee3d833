"""The per-element momentum update and the per-group protocol every Numba kernel shares.

These are plain Python functions so that every Numba target compiles the same body: the
CPU kernels (`kernels.cpu`) compile them with `numba.njit(inline="always")`, the CUDA
kernels (`kernels.numba_cuda`) with `cuda.jit(device=True, inline="always")`, so the two
cannot drift apart. The CUDA C kernel (`kernels/momentum.cu`) follows the same operation
order, and `gpu_momentum.reference` is the float64 specification all of them are tested
against. The launch layout (columns, flags, counter slots) is `kernels.layout`.

All scalars must already have the compute dtype (float32 for 16-bit and float32
parameters, float64 for float64): a float64 literal here would silently promote float32
arithmetic.

16-bit parameters (bfloat16, float16) and a 16-bit velocity are stored as their bits
(uint16 views: Numba has no bfloat16, and no float16 on the CPU) and converted with the
integer operations of `storage_functions`, exactly as ml_dtypes (bfloat16) and NumPy's
astype (float16) convert, NaN bit patterns included; `storage_update` is one element's
update for such storage and a precision mode (kernels.layout.PRECISIONS).
"""

import math
import types as python_types

import numpy as np

from .layout import (DECAY, GRAD_COEFF, GROUP_SLOTS, KAHAN, KEEP_VELOCITY, L1,
                     LAST_STEP_SKIPPED, LR, MASTER, MAXIMIZE, MOMENTUM, NEAREST, NESTEROV,
                     SKIPPED_STEPS, STEP_COUNT, STOCHASTIC, VELOCITY_INITIALIZED,
                     WEIGHT_DECAY)

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
        # A shift, as kernels/momentum.cu: `//` on signed integers compiles to a floor
        # division's sign corrections, six instructions per step of the search.
        middle = (low + high) >> 1
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



def specialized(function, name, **names):
    """A copy of `function`, called `name`, whose globals also hold `names` (the compiled
    functions and constants of one kind of kernel). Kernels made this way, rather than as
    closures, are cached on disk by Numba like module functions: its cache keys a closure
    on its cells' pickles, which differ in every process for compiled functions. `name`
    tells the cache entries of the kinds apart."""
    copy = python_types.FunctionType(function.__code__, {**function.__globals__, **names},
                                     name, function.__defaults__)
    copy.__qualname__ = name
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    return copy


# ---- 16-bit storage ----
#
# How an array holds its elements: NATIVE (float32, float64: the array's own values) or
# the bits of a 16-bit format (uint16 views).
NATIVE, BFLOAT16, FLOAT16 = range(3)


def storage_format(dtype):
    """NATIVE, BFLOAT16 or FLOAT16 for an array of `dtype` (a NumPy dtype or its name)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return {"bfloat16": BFLOAT16, "float16": FLOAT16}.get(name, NATIVE)


# Numba types uint32 op uint32 as a 64-bit integer: every result below is wrapped in
# uint32(...) and every constant is a np.uint32, so that LLVM narrows the arithmetic to
# 32-bit lanes (vectorized on the CPU, 32-bit instructions in the PTX).
U1, U3, U13, U15, U16 = (np.uint32(n) for n in (1, 3, 13, 15, 16))
ABS = np.uint32(0x7FFFFFFF)  # float32 bits without the sign
F32_INF = np.uint32(0x7F800000)
SIGN16 = np.uint32(0x8000)
LOW16 = np.uint32(0xFFFF)
BF16_ROUND = np.uint32(0x7FFF)  # round-to-nearest-even bias below the kept bits
BF16_QUIET_NAN = np.uint32(0x7FC0)
BF16_MAX = np.uint32(0x7F7F0000)  # |x| from here on rounds to nearest, also stochastically
F16_INF = np.uint32(0x7C00)
F16_MAX = np.uint32(0x477FE000)  # 65504 in float32 bits: the largest float16
F16_OVERFLOW = np.uint32(0x477FF000)  # 65520: rounds to inf
F16_NORMAL = np.uint32(0x38800000)  # 2**-14, the smallest normal float16
F16_REBIAS = np.uint32(0x38000000)  # (127 - 15) << 23
F16_ROUND = np.uint32(0x0FFF)
F32_MANTISSA = np.uint32(0x7FFFFF)
HALF, HALF_BITS = np.float32(0.5), np.uint32(0x3F000000)
QUIET_NAN = np.float32(np.nan)  # bits 0x7fc00000
TWO_24, TWO_16 = np.float32(2.0**24), np.float32(2.0**16)
MIX1, MIX2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
GOLDEN = np.uint32(0x9E3779B9)  # 2**32 / golden ratio: a Weyl step, and the seed's salt


def _bit_casts(simulated):
    """(f32_from_bits, bits_from_f32): one LLVM bitcast, accepted by the CPU and the CUDA
    target alike (a call to NumPy's scalar view would compile, on CUDA, to a device
    function of its own, built for the current device); the CUDA simulator runs this
    module as Python, where NumPy's view is the bitcast."""
    if simulated:
        return (lambda u: np.uint32(u).view(np.float32),
                lambda x: np.float32(x).view(np.uint32))
    from numba import types
    from numba.core.extending import intrinsic

    @intrinsic
    def f32_from_bits(typingctx, u):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen

    @intrinsic
    def bits_from_f32(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))
        return types.uint32(types.float32), codegen

    return f32_from_bits, bits_from_f32


class StorageFunctions:
    """The conversions, stochastic rounding and hash as one target compiles them (see
    `storage_functions`): attributes are that target's device functions."""


def storage_functions(jit, simulated=False):
    """The 16-bit conversions, stochastic rounding and the counter-based hash, each wrapped
    by `jit` (numba.njit(inline="always") for the CPU, cuda.jit(device=True,
    inline="always") for CUDA), calling one another as that target's functions.
    `simulated`: for the CUDA simulator, which runs them as Python."""
    from numba import float32, uint16, uint32  # here: importing the package needs no Numba

    f32_from_bits, bits_from_f32 = _bit_casts(simulated)

    @jit
    def bf16_to_f32(h):
        """bfloat16 bits -> float32: a shift, exact (NaN payloads kept)."""
        return f32_from_bits(uint32(uint32(h) << U16))

    @jit
    def f32_to_bf16_rn(x):
        """float32 -> bfloat16 bits as ml_dtypes casts: round to nearest even (the carry
        overflows |x| >= bf16 max + half an ulp to inf; subnormals round like normals);
        NaN -> sign | 0x7fc0 (a quiet NaN without payload)."""
        u = bits_from_f32(x)
        r = uint32(uint32(u + BF16_ROUND + uint32(uint32(u >> U16) & U1)) >> U16)
        if uint32(u & ABS) > F32_INF:
            r = uint32(uint32(uint32(u >> U16) & SIGN16) | BF16_QUIET_NAN)
        return uint16(r)

    @jit
    def f32_to_bf16_sr(x, r16):
        """float32 -> bfloat16 bits, stochastically: r16 (16 random bits, < 2**16) added
        below the kept bits, then truncated: x rounds away from zero with probability
        (dropped bits) / 2**16, so the expected result is x. From bf16 max on (and inf,
        NaN) it rounds to nearest, so it overflows exactly where round to nearest does
        and never carries a NaN into the sign bit."""
        u = bits_from_f32(x)
        if uint32(u & ABS) >= BF16_MAX:
            return f32_to_bf16_rn(x)
        return uint16(uint32(uint32(u + uint32(r16)) >> U16))

    @jit
    def f16_to_f32(h):
        """float16 bits -> float32 as NumPy's astype: exact; a NaN keeps its payload
        (shifted up 13 bits, not quieted)."""
        h = uint32(h)
        sign = uint32(uint32(h & SIGN16) << U16)
        magnitude = uint32(h & np.uint32(0x7FFF))
        if magnitude >= F16_INF:
            bits = uint32(uint32(magnitude | np.uint32(0x3FC00)) << U13)
        elif magnitude >= np.uint32(0x0400):
            bits = uint32(uint32(magnitude + np.uint32(0x1C000)) << U13)
        else:  # subnormal or zero: magnitude * 2**-24, exact in float32
            bits = bits_from_f32(float32(magnitude) * float32(5.9604644775390625e-08))
        return f32_from_bits(uint32(bits | sign))

    @jit
    def f32_to_f16_rn(x):
        """float32 -> float16 bits as NumPy's astype: round to nearest even, |x| >= 65520
        to inf, gradual underflow; NaN -> sign | 0x7c00 | (mantissa >> 13), 0x7c01 where
        that would be inf (payload truncated, not quieted)."""
        u = bits_from_f32(x)
        sign = uint32(uint32(u >> U16) & SIGN16)
        a = uint32(u & ABS)
        if a > F32_INF:
            r = uint32(F16_INF | uint32(uint32(a & F32_MANTISSA) >> U13))
            if r == F16_INF:
                r = uint32(F16_INF | U1)
        elif a >= F16_OVERFLOW:
            r = F16_INF
        elif a >= F16_NORMAL:
            r = uint32(uint32(a - F16_REBIAS + F16_ROUND + uint32(uint32(a >> U13) & U1))
                       >> U13)
        else:  # subnormal or zero: |x| + 0.5 rounds to a multiple of 2**-24, the
            # float16 subnormal's step, as float32 addition rounds: to nearest even
            r = uint32(bits_from_f32(f32_from_bits(a) + HALF) - HALF_BITS)
        return uint16(uint32(r | sign))

    @jit
    def f32_to_f16_sr(x, r16):
        """float32 -> float16 bits, stochastically with 16 random bits r16: normal results
        drop 13 bits and round away from zero with probability (dropped bits) / 2**13,
        using the top 13 of r16 (exactly unbiased); subnormal results compare the top 16
        dropped bits with r16 (biased by less than 2**-16 of an ulp). From the largest
        float16 on (and inf, NaN) it rounds to nearest, as f32_to_bf16_sr does. A float32
        subnormal (or zero) gives 0, also where its arithmetic flushes it to zero."""
        u = bits_from_f32(x)
        a = uint32(u & ABS)
        if a >= F16_MAX:
            return f32_to_f16_rn(x)
        sign = uint32(uint32(u >> U16) & SIGN16)
        r16 = uint32(r16)
        if a >= F16_NORMAL:
            r = uint32(uint32(a - F16_REBIAS + uint32(r16 >> U3)) >> U13)
        else:  # a subnormal result: in units of 2**-24, |x| is q + fraction, all exact
            y = f32_from_bits(a) * TWO_24
            q = uint32(y)
            dropped = uint32((y - float32(q)) * TWO_16)  # the fraction's top 16 bits
            r = uint32(q + uint32(uint32(dropped + r16) >> U16))
        return uint16(uint32(r | sign))

    @jit
    def mix32(x):
        """lowbias32 (C. Wellons): a bijection of 32-bit words, 2 multiplies, 3
        xor-shifts."""
        x = uint32(x ^ uint32(x >> U16))
        x = uint32(x * MIX1)
        x = uint32(x ^ uint32(x >> U15))
        x = uint32(x * MIX2)
        return uint32(x ^ uint32(x >> U16))

    @jit
    def step_key(seed, step_count):
        """The 32-bit key of one step's random bits, from the 64-bit seed and the count of
        steps taken before it: for one seed, distinct step counts below 2**32 give
        distinct keys."""
        k = mix32(uint32(uint32(seed & 0xFFFFFFFF) ^ GOLDEN))
        k = mix32(uint32(k ^ uint32(seed >> 32)))
        k = mix32(uint32(k ^ uint32(step_count & 0xFFFFFFFF)))
        return mix32(uint32(k ^ uint32(step_count >> 32)))

    @jit
    def block_key(key, i):
        """The key of element i's block of 2**32 elements (the same for a whole CPU chunk:
        none crosses a multiple of 2**32)."""
        return mix32(uint32(key ^ uint32(i >> 32)))

    @jit
    def element_bits(key_of_block, i):
        """32 random bits of element i: the high 16 round a 16-bit parameter, the low 16 a
        16-bit velocity. The odd multiplier spreads neighbouring indices before the mix
        (mix32(i ^ key) alone leaves elements i and i + 4096 correlated); for one key, a
        bijection of the low 32 bits of i."""
        return mix32(uint32(uint32(uint32(i & 0xFFFFFFFF) * GOLDEN) + key_of_block))

    # Per storage format: the load (to the compute dtype) and the two roundings, each
    # (x, r16) -> the stored value; NATIVE arrays hold the compute dtype itself.
    @jit
    def same(x):
        return x

    @jit
    def unrounded(x, r16):
        return x

    @jit
    def bf16_nearest(x, r16):
        return f32_to_bf16_rn(x)

    @jit
    def f16_nearest(x, r16):
        return f32_to_f16_rn(x)

    functions = StorageFunctions()
    functions.load = {NATIVE: same, BFLOAT16: bf16_to_f32, FLOAT16: f16_to_f32}
    functions.round_nearest = {NATIVE: unrounded, BFLOAT16: bf16_nearest,
                               FLOAT16: f16_nearest}
    functions.round_stochastic = {NATIVE: unrounded, BFLOAT16: f32_to_bf16_sr,
                                  FLOAT16: f32_to_f16_sr}
    functions.__dict__.update(
        f32_from_bits=f32_from_bits, bits_from_f32=bits_from_f32, bf16_to_f32=bf16_to_f32,
        f32_to_bf16_rn=f32_to_bf16_rn, f32_to_bf16_sr=f32_to_bf16_sr,
        f16_to_f32=f16_to_f32, f32_to_f16_rn=f32_to_f16_rn, f32_to_f16_sr=f32_to_f16_sr,
        mix32=mix32, step_key=step_key, block_key=block_key, element_bits=element_bits)
    return functions


def storage_step(functions, jit, param_format, velocity_format, precision,
                 l1_term=CHECKED, decay_term=CHECKED, key_per_element=False):
    """One element's update on values, compiled by `jit` with `functions` (its target's
    storage_functions), for params stored as `param_format`, a velocity stored as
    `velocity_format` and a precision mode (kernels.layout.PRECISIONS):

        step_values(p, g, stored_velocity, i, key_of_block, lr, momentum, grad_coeff,
                    weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                    velocity_initialized) -> (stored_param, stored_velocity, stored_buffer)

    p is the param in the compute dtype as the precision mode reads it (`load_param_value`
    of storage_update: the master copy, param + compensation, or the widened param), g the
    widened gradient; the results are what element i stores (stored_buffer: the
    compensation (KAHAN) or the master copy (MASTER), else p, not stored). The kernels
    that move several elements per memory instruction (kernels.numba_cuda) call this on
    each element of a word; storage_update on one element of the arrays."""
    from numba import float32, uint32

    update = jit(element_update(l1_term, decay_term))
    stochastic, kahan, master = (precision == STOCHASTIC, precision == KAHAN,
                                 precision == MASTER)
    roundings = functions.round_stochastic if stochastic else functions.round_nearest
    load_param, load_velocity = functions.load[param_format], functions.load[velocity_format]
    round_param, round_velocity = roundings[param_format], roundings[velocity_format]
    round_param_nearest = functions.round_nearest[param_format]
    element_bits, block_key = functions.element_bits, functions.block_key
    sixteen_bit_param, sixteen_bit_velocity = (param_format != NATIVE,
                                               velocity_format != NATIVE)
    if not (sixteen_bit_param or sixteen_bit_velocity or stochastic or kahan or master):
        def step_wide_values(p, g, stored_velocity, i, key_of_block, lr, momentum,
                             grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                             nesterov, maximize, velocity_initialized):
            p, v = update(p, g, stored_velocity, lr, momentum, grad_coeff, weight_decay,
                          l1, decay, inv_grad_scale, classic, nesterov, maximize,
                          velocity_initialized)
            return p, v, p

        return jit(step_wide_values)

    def step_values(p, g, stored_velocity, i, key_of_block, lr, momentum, grad_coeff,
                    weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                    velocity_initialized):
        p, v = update(p, g, load_velocity(stored_velocity), lr, momentum, grad_coeff,
                      weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
                      velocity_initialized)
        if not stochastic:
            bits = U1
        elif key_per_element:
            bits = element_bits(block_key(key_of_block, i), i)
        else:
            bits = element_bits(key_of_block, i)
        if sixteen_bit_param and p != p:
            p = QUIET_NAN  # which NaN the arithmetic made is the hardware's (and compiler's)
        rounded = round_param(p, uint32(bits >> U16))
        if kahan:
            error = p - load_param(rounded)
            finite_error = error if error - error == float32(0) else float32(0)
            buffer = round_param_nearest(finite_error, U1)
        else:
            buffer = p
        if sixteen_bit_velocity and not classic and momentum == 0:
            velocity = stored_velocity
        else:
            if sixteen_bit_velocity and v != v:
                v = QUIET_NAN
            velocity = round_velocity(v, uint32(bits & LOW16))
        return rounded, velocity, buffer

    return jit(step_values)


def storage_update(functions, jit, param_format, velocity_format, precision,
                   l1_term=CHECKED, decay_term=CHECKED, key_per_element=False):
    """One element's update, compiled by `jit` with `functions` (its target's
    storage_functions), for params stored as `param_format`, a velocity stored as
    `velocity_format` and a precision mode (kernels.layout.PRECISIONS):

        update_element(param, grad, velocity, precision_buffer, i, key_of_block, lr,
                       momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale,
                       classic, nesterov, maximize, velocity_initialized)

    updates element i in place. Loaded values are widened to the compute dtype and
    updated by momentum_update, then stored:
    - NEAREST: param rounded to nearest even;
    - STOCHASTIC: param rounded stochastically with the high 16 of element_bits(
      key_of_block, i) (key_of_block: block_key(step_key(seed, step_count), i), or with
      key_per_element the launch key itself, whose block key is then found here), a
      16-bit velocity with the low 16;
    - KAHAN: updated from param + compensation (precision_buffer, the param's format);
      param rounded to nearest, the compensation to the rounding's error (exact in
      float32; 0 where the result is not finite, which would poison the next step);
    - MASTER: updated from the float32 master copy (precision_buffer), which keeps the
      result; param its rounding to nearest.
    A 16-bit velocity is rounded as the param is (to nearest except STOCHASTIC), and left
    alone, bits and all, where torch style with momentum 0 leaves it (a NaN's payload
    would not survive a rounding). A NaN result is stored as the quiet NaN (float32 bits
    0x7fc00000 rounded: bfloat16 0x7fc0, float16 0x7e00): which NaN float32 arithmetic
    makes is up to the hardware (x86 passes an operand's on, NVIDIA GPUs make their own)
    and the compiler (it may flip a NaN's sign). The update itself is storage_step's."""
    update = jit(element_update(l1_term, decay_term))
    kahan, master = precision == KAHAN, precision == MASTER
    load_param = functions.load[param_format]
    if not (param_format != NATIVE or velocity_format != NATIVE or precision != NEAREST):
        # Stored as computed: nothing to widen, round or keep. Written out, since the
        # CUDA simulator runs every call and conversion below as Python, per element.
        def update_wide_element(param, grad, velocity, precision_buffer, i, key_of_block,
                                lr, momentum, grad_coeff, weight_decay, l1, decay,
                                inv_grad_scale, classic, nesterov, maximize,
                                velocity_initialized):
            param[i], velocity[i] = update(
                param[i], grad[i], velocity[i], lr, momentum, grad_coeff, weight_decay, l1,
                decay, inv_grad_scale, classic, nesterov, maximize, velocity_initialized)

        return jit(update_wide_element)

    step_values = storage_step(functions, jit, param_format, velocity_format, precision,
                               l1_term, decay_term, key_per_element)

    def update_element(param, grad, velocity, precision_buffer, i, key_of_block, lr,
                       momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale,
                       classic, nesterov, maximize, velocity_initialized):
        if master:
            p = precision_buffer[i]
        elif kahan:
            p = load_param(param[i]) + load_param(precision_buffer[i])
        else:
            p = load_param(param[i])
        param[i], velocity[i], buffer = step_values(
            p, load_param(grad[i]), velocity[i], i, key_of_block, lr, momentum, grad_coeff,
            weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
            velocity_initialized)
        if kahan or master:
            precision_buffer[i] = buffer

    return jit(update_element)

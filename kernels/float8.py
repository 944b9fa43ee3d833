"""The FP8 E4M3 velocity in the Numba kernels: conversions and the per-element update.

Plain Python functions compiled by whichever target calls `float8_functions` and
`float8_update` (the CPU kernels of kernels.cpu_float8 with numba.njit, the CUDA kernels
of kernels.numba_cuda_fp8 with cuda.jit(device=True)), bit operation for bit operation
those of gpu_momentum.reference (float32_to_e4m3, e4m3_to_float32, quantize_velocity),
which defines the format, and of momentum.cu's momentum_step_fp8.

A launch over an FP8 velocity reads and writes `codes` (uint8[n], E4M3 codes) and
`scales` (float32[ceil(n / FLOAT8_BLOCK)]) instead of a velocity array. Each block of
FLOAT8_BLOCK elements is updated as a whole: every element's new velocity is computed in
float32 (kept by the thread or warp that owns the block), the block's largest finite
|v| gives its new scale, and only then are the codes written: one pass over memory.
"""

import numpy as np

from .elementwise import CHECKED, KAHAN, MASTER, NATIVE, QUIET_NAN, STOCHASTIC, U1, U16, \
    element_update
from .layout import FLOAT8_MAX, FLOAT8_NAN

E4M3_LARGEST = np.uint32(0x43E00000)  # 448 in float32 bits: finite values saturate here
E4M3_NORMAL = np.uint32(0x3C800000)  # 2**-6, the smallest normal E4M3
E4M3_REBIAS = np.uint32(0x3C000000)  # (127 - 7) << 23
E4M3_ROUND = np.uint32(0x7FFFF)  # round-to-nearest-even bias below the kept bits
SUBNORMAL_ROUNDER = np.float32(16384.0)  # its float32 ulp is 2**-9, E4M3's subnormal step
SUBNORMAL_ROUNDER_BITS = np.uint32(0x46800000)
TWO_9, TWO_MINUS_9 = np.float32(512.0), np.float32(2.0**-9)
TWO_16 = np.float32(65536.0)
U4, U20, U24 = np.uint32(4), np.uint32(20), np.uint32(24)
ABS = np.uint32(0x7FFFFFFF)
F32_INF = np.uint32(0x7F800000)
SIGN8 = np.uint32(0x80)
MAGNITUDE8 = np.uint32(0x7F)
NAN_CODE = np.uint8(FLOAT8_NAN)
LARGEST = np.float32(FLOAT8_MAX)
LOW16 = np.uint32(0xFFFF)


class Float8Functions:
    """The E4M3 conversions as one target compiles them (see `float8_functions`)."""


def float8_functions(functions, jit):
    """The E4M3 conversions wrapped by `jit`, calling `functions` (that target's
    kernels.elementwise.storage_functions) for bit casts:
    - to_code(v, scale, r16, stochastic): v / scale as an E4M3 code (uint8), as
      reference.quantize_velocity makes it: NaN and inf give 0x7f, scale 0 gives 0;
    - from_code(code): the code's value in float32, exactly;
    - magnitude_bits(v): |v|'s float32 bits where v is finite, else 0 (an unsigned max
      over these is the largest finite |v|: the block's absmax)."""
    from numba import float32, uint8, uint32

    f32_from_bits, bits_from_f32 = functions.f32_from_bits, functions.bits_from_f32

    @jit
    def to_code(v, scale, r16, stochastic):
        u = bits_from_f32(v)
        if uint32(u & ABS) >= F32_INF:
            return NAN_CODE
        x = v / scale if scale > float32(0) else float32(0)
        u = bits_from_f32(x)
        sign = uint32(uint32(u >> U24) & SIGN8)
        a = uint32(u & ABS)
        if a > E4M3_LARGEST:
            a = E4M3_LARGEST
        if a >= E4M3_NORMAL:
            if stochastic:
                m = uint32(uint32(a - E4M3_REBIAS + uint32(uint32(r16) << U4)) >> U20)
            else:
                m = uint32(uint32(a - E4M3_REBIAS + E4M3_ROUND
                                  + uint32(uint32(a >> U20) & U1)) >> U20)
        elif stochastic:  # in units of 2**-9, |x| is whole + fraction, all exact
            y = f32_from_bits(a) * TWO_9
            whole = uint32(y)
            dropped = uint32((y - float32(whole)) * TWO_16)  # the fraction's top 16 bits
            m = uint32(whole + uint32(uint32(dropped + uint32(r16)) >> U16))
        else:  # |x| + 16384 rounds |x| to a multiple of 2**-9, to nearest even
            m = uint32(bits_from_f32(f32_from_bits(a) + SUBNORMAL_ROUNDER)
                       - SUBNORMAL_ROUNDER_BITS)
        return uint8(uint32(m | sign))

    @jit
    def from_code(code):
        c = uint32(code)
        magnitude = uint32(c & MAGNITUDE8)
        sign = uint32(uint32(c & SIGN8) << U24)
        if magnitude == MAGNITUDE8:
            bits = bits_from_f32(QUIET_NAN)
        elif magnitude >= np.uint32(8):
            bits = uint32(uint32(magnitude << U20) + E4M3_REBIAS)
        else:
            bits = bits_from_f32(float32(magnitude) * TWO_MINUS_9)
        return f32_from_bits(uint32(bits | sign))

    @jit
    def magnitude_bits(v):
        a = uint32(bits_from_f32(v) & ABS)
        return a if a < F32_INF else uint32(0)

    converted = Float8Functions()
    converted.to_code, converted.from_code = to_code, from_code
    converted.magnitude_bits = magnitude_bits
    return converted


def float8_step(functions, jit, param_format, precision, l1_term=CHECKED,
                decay_term=CHECKED, key_per_element=False):
    """One element's update on values with an FP8 velocity, compiled by `jit` with
    `functions` (its target's storage_functions), for params stored as `param_format` and
    a precision mode (kernels.layout.PRECISIONS):

        step_values(p, g, old_velocity, i, key, lr, momentum, grad_coeff, weight_decay,
                    l1, decay, inv_grad_scale, classic, nesterov, maximize,
                    velocity_initialized) -> (stored_param, new_velocity, stored_buffer)

    p is the param in float32 as the precision mode reads it (the master copy, param +
    compensation, or the widened param), g the widened gradient, old_velocity the
    dequantized stored velocity (0 where it is not read). stored_param is p's new value
    rounded to the param's format, stored_buffer the compensation (KAHAN) or master copy
    (MASTER) to store (else p, not stored), new_velocity the new velocity in float32,
    unrounded: the block quantizes it. Torch style with momentum 0 returns old_velocity.
    STOCHASTIC rounds a 16-bit param with the high 16 of element i's random bits (key: its
    block key, or with key_per_element the launch key). The kernels that move several
    elements per memory instruction (kernels.numba_cuda_fp8) call this on each element of
    a word; float8_update on one element of the arrays."""
    from numba import float32, uint32

    update = jit(element_update(l1_term, decay_term))
    stochastic, kahan = precision == STOCHASTIC, precision == KAHAN
    rounding = functions.round_stochastic if stochastic else functions.round_nearest
    load_param, round_param = functions.load[param_format], rounding[param_format]
    round_param_nearest = functions.round_nearest[param_format]
    element_bits, block_key = functions.element_bits, functions.block_key
    sixteen_bit_param = param_format != NATIVE

    def step_values(p, g, old_velocity, i, key, lr, momentum, grad_coeff, weight_decay, l1,
                    decay, inv_grad_scale, classic, nesterov, maximize,
                    velocity_initialized):
        p, v = update(p, g, old_velocity, lr, momentum, grad_coeff, weight_decay, l1,
                      decay, inv_grad_scale, classic, nesterov, maximize,
                      velocity_initialized)
        if not (stochastic and sixteen_bit_param):
            bits = U1
        elif key_per_element:
            bits = element_bits(block_key(key, i), i)
        else:
            bits = element_bits(key, i)
        if sixteen_bit_param and p != p:
            p = QUIET_NAN  # which NaN the arithmetic made is the hardware's
        rounded = round_param(p, uint32(bits >> U16))
        if kahan:
            error = p - load_param(rounded)
            buffer = round_param_nearest(error if error - error == float32(0) else
                                         float32(0), U1)
        else:
            buffer = p
        return rounded, v, buffer

    return jit(step_values)


def float8_update(functions, jit, param_format, precision, l1_term=CHECKED,
                  decay_term=CHECKED, key_per_element=False, step_jit=None):
    """One element's update with an FP8 velocity, compiled by `jit` with `functions` (its
    target's storage_functions), for params stored as `param_format` and a precision mode
    (kernels.layout.PRECISIONS):

        new_velocity = update_element(param, grad, precision_buffer, i, old_velocity,
                                      key, lr, momentum, grad_coeff, weight_decay, l1,
                                      decay, inv_grad_scale, classic, nesterov, maximize,
                                      velocity_initialized)

    updates param[i] (and the precision buffer) in place exactly as
    kernels.elementwise.storage_update does, from `old_velocity` (the dequantized stored
    one; the caller passes 0 where it is not read), and returns the new velocity in
    float32, unrounded: the block quantizes it. The update is float8_step's (compiled by
    `step_jit`, default `jit`)."""
    kahan, master = precision == KAHAN, precision == MASTER
    load_param = functions.load[param_format]
    step_values = float8_step(functions, step_jit or jit, param_format, precision, l1_term,
                              decay_term, key_per_element)

    def update_element(param, grad, precision_buffer, i, old_velocity, key, lr, momentum,
                       grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                       nesterov, maximize, velocity_initialized):
        if master:
            p = precision_buffer[i]
        elif kahan:
            p = load_param(param[i]) + load_param(precision_buffer[i])
        else:
            p = load_param(param[i])
        param[i], v, buffer = step_values(
            p, load_param(grad[i]), old_velocity, i, key, lr, momentum, grad_coeff,
            weight_decay, l1, decay, inv_grad_scale, classic, nesterov, maximize,
            velocity_initialized)
        if kahan or master:
            precision_buffer[i] = buffer
        return v

    return jit(update_element)


def velocity_random_bits(functions, jit, key_per_element):
    """r16(key, i): the low 16 of element i's random bits, which round its velocity code
    stochastically (key: its block key, or with key_per_element the launch key)."""
    from numba import uint32

    element_bits, block_key = functions.element_bits, functions.block_key

    def r16(key, i):
        if key_per_element:
            return uint32(element_bits(block_key(key, i), i) & LOW16)
        return uint32(element_bits(key, i) & LOW16)

    return jit(r16)

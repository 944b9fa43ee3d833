"""The specification: a plain NumPy implementation of both update styles.

Every backend is tested against `reference_step` in float64. With `dtype=np.float32` it
computes in float32 with the kernels' operation order, which the host-compiled CUDA C
kernel must match bit for bit. `low_precision_step` specifies 16-bit parameters and
`float8_velocity_step` the 8-bit (FP8 E4M3, a float32 scale per block) velocity, whose
format is described above `float32_to_e4m3`.
"""

import numpy as np

from .kernels.layout import FLOAT8_BLOCK, FLOAT8_MAX, float8_scale_count


def reference_step(param, grad, velocity, *, lr, momentum=0.9, dampening=0.0,
                   weight_decay=0.0, nesterov=False, maximize=False, style="classic",
                   first_step=False, grad_scale=1.0, l1=0.0, decoupled_weight_decay=False,
                   dtype=np.float64):
    """Returns (new_param, new_velocity) as new arrays of `dtype`; inputs are not modified.

    g = grad * (1 / grad_scale);  g' = (-g if maximize else g) + weight_decay * p
                                        + l1 * sign(p)       (sign(0) = 0)
    decoupled_weight_decay: g' has no weight_decay * p term; instead
        p = p * (1 - lr * weight_decay) before the momentum update (SGDW, as AdamW).
    classic: v = mu*v - lr*g';  p = p + v           (nesterov: p = p + mu*v - lr*g')
    torch:   v = mu*v + (1 - dampening)*g';  p = p - lr*v   (nesterov: p - lr*(g' + mu*v))
    On the first step the old velocity is not read: classic starts from v = 0, torch sets
    v = g' (PyTorch skips dampening there). Torch style with momentum 0 is p = p - lr*g'
    and leaves v as it is, as PyTorch leaves its momentum buffer.
    """
    scalar = np.dtype(dtype).type
    p = np.array(param, dtype=dtype).reshape(-1)
    g = np.array(grad, dtype=dtype).reshape(-1)
    v = np.array(velocity, dtype=dtype).reshape(-1)
    lr, mu, wd, l1_ = scalar(lr), scalar(momentum), scalar(weight_decay), scalar(l1)
    grad_coeff = scalar(1) - scalar(dampening)

    g = g * scalar(1.0 / grad_scale)
    if maximize:
        g = -g
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g + wd * p
    if l1 != 0:  # branches, not l1 * sign(p): g stays bitwise g (even -0.0) where p == 0
        g = np.where(p > 0, g + l1_, np.where(p < 0, g - l1_, g))
    if weight_decay != 0 and decoupled_weight_decay:
        p = p * (scalar(1) - lr * wd)
    if style == "classic":
        v = -lr * g if first_step else mu * v - lr * g
        p = p + (mu * v - lr * g) if nesterov else p + v
    elif style == "torch" and momentum == 0:
        p = p - lr * g
    elif style == "torch":
        v = g.copy() if first_step else mu * v + grad_coeff * g
        p = p - lr * (g + mu * v) if nesterov else p - lr * v
    else:
        raise ValueError(f"Invalid style value: {style!r}")
    return p, v


# ---- 16-bit parameters: float32 compute, 16-bit storage, four precision modes ----

_U32 = np.uint32
PRECISIONS = ("nearest", "stochastic", "kahan", "master")


def _mix32(x):
    """lowbias32 (C. Wellons): a bijection of uint32 words."""
    x = np.asarray(x, _U32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U32(16))
        x = x * _U32(0x7FEB352D)
        x = x ^ (x >> _U32(15))
        x = x * _U32(0x846CA68B)
        return x ^ (x >> _U32(16))


def step_key(seed, step_count):
    """The 32-bit key of one step's random bits: the 64-bit seed and the count of steps
    taken before this one, each as two 32-bit halves, mixed in turn (the seed's low half
    salted with 0x9E3779B9)."""
    seed, step_count = int(seed) % 2**64, int(step_count) % 2**64
    key = _mix32(_U32(seed & 0xFFFFFFFF) ^ _U32(0x9E3779B9))
    key = _mix32(key ^ _U32(seed >> 32))
    key = _mix32(key ^ _U32(step_count & 0xFFFFFFFF))
    return _mix32(key ^ _U32(step_count >> 32))


def random_bits(seed, step_count, index):
    """32 random bits per element index (flat position in the buffer):
    mix32(lo(i) * 0x9E3779B9 + mix32(step_key ^ hi(i))) mod 2**32, lo and hi the 32-bit
    halves of i. The high 16 round a 16-bit parameter stochastically, the low 16 a 16-bit
    velocity."""
    index = np.asarray(index, np.int64).astype(np.uint64)
    low = (index & np.uint64(0xFFFFFFFF)).astype(_U32)
    key_of_block = _mix32(step_key(seed, step_count) ^ (index >> np.uint64(32)).astype(_U32))
    with np.errstate(over="ignore"):
        return _mix32(low * _U32(0x9E3779B9) + key_of_block)


def _bits(x):
    return np.ascontiguousarray(x, np.float32).view(_U32)


def round_nearest(x, dtype):
    """float32 `x` rounded to nearest even in `dtype` (bfloat16: as ml_dtypes casts;
    float16: as NumPy casts; float32: x itself)."""
    with np.errstate(over="ignore", invalid="ignore"):  # to inf, and NaN: the cast's rule
        return np.asarray(x, np.float32).astype(dtype)


def round_stochastic(x, dtype, r16):
    """float32 `x` rounded stochastically to `dtype` with 16 random bits per element
    (r16 < 2**16): the result is the nearer or the farther neighbour of x, the farther one
    with probability |x - nearer| / ulp, so that its expectation is x.

    bfloat16: (bits(x) + r16) >> 16 on the float32 bits: exact, the dropped 16 bits
    against all 16 random ones. float16 (13 bits dropped when the result is normal): the
    top 13 random bits against the dropped bits, exact too; a subnormal result (|x| <
    2**-14) compares the top 16 dropped bits with r16, off by less than 2**-16 ulp.
    At and beyond the largest finite value of `dtype` (bfloat16 0x7f7f, 3.39e38;
    float16 65504), and for inf and NaN, it rounds to nearest: it overflows exactly where
    round to nearest does and never makes a NaN or inf of anything else."""
    dtype = np.dtype(dtype)
    x = np.asarray(x, np.float32)
    u, r16 = _bits(x), np.asarray(r16, _U32)
    a = u & _U32(0x7FFFFFFF)
    nearest = round_nearest(x, dtype).view(np.uint16)
    with np.errstate(over="ignore"):
        if dtype.name == "bfloat16":
            rounded = ((u + r16) >> _U32(16)).astype(np.uint16)
            largest = _U32(0x7F7F0000)
        else:
            sign = (u >> _U32(16)) & _U32(0x8000)
            normal = (a - _U32(0x38000000) + (r16 >> _U32(3))) >> _U32(13)
            exponent = (a >> _U32(23)).astype(np.int64)
            significand = ((a & _U32(0x7FFFFF)) | _U32(0x800000)).astype(np.uint64)
            # bits below 2**-24 are dropped: `shift` (14 or more) of them for a subnormal
            shift = np.clip(126 - exponent, 0, 63).astype(np.uint64)
            kept = significand >> shift
            dropped = significand - (kept << shift)
            top = np.where(shift >= 16, dropped >> np.clip(shift - 16, 0, 63),
                           dropped << np.clip(16 - shift, 0, 63))  # their top 16
            subnormal = kept + ((top + r16) >> np.uint64(16))
            magnitude = np.where(a >= _U32(0x38800000), normal, subnormal.astype(_U32))
            rounded = (magnitude | sign).astype(np.uint16)
            largest = _U32(0x477FE000)
    return np.where(a >= largest, nearest, rounded).view(dtype)


def low_precision_step(param, grad, velocity, *, precision="nearest", compensation=None,
                       master=None, seed=0, step_count=0, first_step=False, **hyper):
    """One update of 16-bit parameters (bfloat16 or float16), as the kernels do it:
    returns (new_param, new_velocity, new_compensation or new_master or None), new arrays
    in the dtypes they came in; inputs are not modified.

    Every value is widened to float32 (exactly) and the update computed by
    `reference_step(..., dtype=np.float32)` from p, which is
    - nearest, stochastic: the parameter;
    - kahan: the parameter plus its compensation (an array of the param dtype);
    - master: the float32 master copy.
    A NaN result is first made the quiet NaN (float32 0x7fc00000): which NaN float32
    arithmetic makes is the hardware's and compiler's choice (sign and payload), so 16-bit
    results store one NaN, 0x7fc0 (bfloat16) or 0x7e00 (float16), whatever ran the update.
    The new parameter is that result rounded to nearest (`round_nearest`) or, with
    stochastic, stochastically (`round_stochastic`) with the high 16 bits of
    `random_bits(seed, step_count, i)` for element i (step_count: the steps taken before
    this one). kahan's new compensation is the rounding's error, result - new param
    (exact in float32), rounded to nearest (0 where it is not finite: an overflowed or NaN
    parameter keeps no compensation); master's new master copy is the result itself.
    A 16-bit velocity (of the param dtype) is rounded like the parameter (stochastic: the
    low 16 random bits), except where the update leaves it alone (torch style, momentum
    0), which keeps its bits.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are inputs too
        return _low_precision_step(param, grad, velocity, precision, compensation, master,
                                   seed, step_count, first_step, hyper)


def _low_precision_step(param, grad, velocity, precision, compensation, master, seed,
                        step_count, first_step, hyper):
    dtype = np.dtype(param.dtype)
    wide = lambda a: np.asarray(a).reshape(-1).astype(np.float32)
    p = {"master": lambda: wide(master), "kahan": lambda: wide(param) + wide(compensation)}
    p = p.get(precision, lambda: wide(param))()
    new_p, new_v = reference_step(p, wide(grad), wide(velocity), first_step=first_step,
                                  dtype=np.float32, **hyper)
    quiet = lambda x: np.where(np.isnan(x), np.float32(np.nan), x)  # bits 0x7fc00000
    new_p = quiet(new_p)
    if np.dtype(velocity.dtype).itemsize == 2:
        new_v = quiet(new_v)
    if precision == "stochastic":
        bits = random_bits(seed, step_count, np.arange(new_p.size))
        param_out = round_stochastic(new_p, dtype, bits >> _U32(16))
    else:
        bits = None
        param_out = round_nearest(new_p, dtype)
    extra = None
    if precision == "kahan":
        error = new_p - param_out.astype(np.float32)
        extra = round_nearest(np.where(np.isfinite(error), error, np.float32(0)), dtype)
    elif precision == "master":
        extra = new_p
    velocity_dtype = np.dtype(velocity.dtype)
    if velocity_dtype == np.float32:
        velocity_out = new_v
    elif hyper.get("style") == "torch" and hyper.get("momentum", 0.9) == 0:
        velocity_out = np.array(velocity).reshape(-1)  # left alone, NaN payloads too
    elif bits is not None:
        velocity_out = round_stochastic(new_v, velocity_dtype, bits & _U32(0xFFFF))
    else:
        velocity_out = round_nearest(new_v, velocity_dtype)
    return param_out, velocity_out, extra


# ---- An 8-bit velocity: FP8 E4M3 codes with one float32 scale per block ----
#
# The format (velocity_dtype "float8_e4m3fn", kernels.layout.FLOAT8_VELOCITY):
# - codes: uint8[n], one float8_e4m3fn code per element of the flat buffer (no inf,
#   largest 448, NaN 0x7f / 0xff; a kernel writes 0x7f only);
# - scales: float32[ceil(n / B)], B = FLOAT8_BLOCK = 256: block b holds elements
#   [b * B, (b + 1) * B) of the flat buffer, the last one partial. The velocity of
#   element i is e4m3_to_float32(codes[i]) * scales[i // B].
# State: 1 + 4 / B = 1.016 bytes per element (a float32 velocity: 4). Traffic per
# element and step: param, grad and param again, plus a code read and written and
# 8 / B bytes of scales: 14.03 for float32 params (20 with a float32 velocity), 8.03 for
# 16-bit ones (14). B = 256 is the block the side simulation trained with (same
# accuracy as float32 on every seed); a smaller block costs more scale bytes (B = 32:
# 14.25 bytes per element) and a larger one a longer reduction and coarser scales.
# Blocks are of the flat buffer, not of segments or groups: a block may hold several
# segments, the padding between them and several parameter groups. Every element is
# updated with its own group's hyperparameters; a padding element (no group) counts as a
# velocity of 0, its code becomes 0, and its param is neither read nor written. A group
# that leaves its velocity alone (torch style, momentum 0) keeps its value, requantized
# with its block's new scale where another group in the block writes; a block nobody
# writes keeps its bits.
# The kernels compute every element's new velocity in float32 and hold the block's in
# registers (a warp per block on the GPU: 8 per lane; a 256-element scratch array per
# CPU task) until the block's absmax is known (a warp reduction: shuffles in CUDA C,
# shared memory and one barrier in Numba CUDA), then write codes and scale: one pass.

def float32_to_e4m3(x, r16=None):
    """float32 `x` as float8_e4m3fn codes (uint8): round to nearest even, or with `r16`
    (16 random bits per element, < 2**16) stochastically, in integer operations on the
    float32 bits (no FP8 instructions are needed, none exist on sm_80).

    Finite values saturate: |x| is first clamped to 448, the largest E4M3 value, so a
    finite input never becomes NaN (E4M3 has no inf). NaN and +-inf give the NaN code
    0x7f. Otherwise the sign is kept (-0.0 is 0x80), and
    - normal results (|x| >= 2**-6): the float32 exponent rebiased (- 120) and 20
      mantissa bits dropped, rounded to nearest even, or stochastically: r16 << 4 added
      below the kept bits, then truncated (rounds away from zero with probability
      floor(dropped / 16) / 2**16, biased by less than 2**-16 of an ulp);
    - subnormal results (multiples of 2**-9): |x| + 16384 rounds |x| to a multiple of
      2**-9 as float32 addition rounds (to nearest even), or stochastically: the top 16
      bits of the fraction |x| * 512 - floor(|x| * 512) against r16.
    Round to nearest equals ml_dtypes' cast of the clamped value, bit for bit."""
    x = np.asarray(x, np.float32)
    u = _bits(x)
    a = u & _U32(0x7FFFFFFF)
    sign = (u >> _U32(24)) & _U32(0x80)
    clamped = np.minimum(a, _U32(0x43E00000))  # 448
    with np.errstate(over="ignore"):
        if r16 is None:
            normal = (clamped - _U32(0x3C000000) + _U32(0x7FFFF)
                      + ((clamped >> _U32(20)) & _U32(1))) >> _U32(20)
            subnormal = _bits(clamped.view(np.float32) + np.float32(16384)) - _U32(
                0x46800000)
        else:
            r16 = np.asarray(r16, _U32)
            normal = (clamped - _U32(0x3C000000) + (r16 << _U32(4))) >> _U32(20)
            y = clamped.view(np.float32) * np.float32(512)
            whole = y.astype(_U32)
            dropped = ((y - whole.astype(np.float32)) * np.float32(65536)).astype(_U32)
            subnormal = whole + ((dropped + r16) >> _U32(16))
    magnitude = np.where(clamped >= _U32(0x3C800000), normal, subnormal)
    codes = np.where(a >= _U32(0x7F800000), _U32(0x7F), magnitude | sign)
    return codes.astype(np.uint8)


def e4m3_to_float32(codes):
    """float8_e4m3fn codes (uint8) as float32, exactly (as ml_dtypes casts): normal codes
    by rebiasing the exponent in the bits, subnormal ones as m * 2**-9; 0x7f and 0xff
    give the quiet NaN (float32 0x7fc00000, with the code's sign)."""
    c = np.asarray(codes, np.uint8).astype(_U32)
    magnitude = c & _U32(0x7F)
    sign = (c & _U32(0x80)) << _U32(24)
    normal = ((magnitude << _U32(20)) + _U32(0x3C000000)).view(np.float32)
    subnormal = magnitude.astype(np.float32) * np.float32(2.0**-9)
    value = np.where(magnitude >= _U32(8), normal, subnormal)
    value = np.where(magnitude == _U32(0x7F), np.float32(np.nan), value)
    return (_bits(value) | sign).view(np.float32)


def _blocks(a, fill):
    """`a` (1-D) padded with `fill` to whole FLOAT8_BLOCKs, as [blocks, FLOAT8_BLOCK]."""
    blocks = float8_scale_count(a.size)
    padded = np.full(blocks * FLOAT8_BLOCK, fill, a.dtype)
    padded[:a.size] = a
    return padded.reshape(blocks, FLOAT8_BLOCK)


def quantize_velocity(values, r16=None):
    """float32 velocities -> (codes uint8[n], scales float32[ceil(n / FLOAT8_BLOCK)]).

    Per block: absmax = the largest finite |v| (NaN and inf left out), scale = absmax /
    448 in float32, code = float32_to_e4m3(v / scale) (the division in float32; with r16,
    stochastic). A block whose scale is 0 (all zeros, or an absmax so small that absmax /
    448 underflows) has codes 0: it stays exactly zero and no division by 0 happens. A
    non-finite v gets the NaN code 0x7f. Since |v / scale| <= 448 * (1 + 2**-23) and
    float32_to_e4m3 saturates, a finite v never gives a NaN."""
    v = np.asarray(values, np.float32).reshape(-1)
    magnitude = _bits(v) & _U32(0x7FFFFFFF)
    finite = np.where(magnitude < _U32(0x7F800000), magnitude, _U32(0))
    absmax = _blocks(finite, _U32(0)).max(axis=1, initial=_U32(0)).view(np.float32)
    scales = absmax / np.float32(FLOAT8_MAX)
    per_element = np.repeat(scales, FLOAT8_BLOCK)[:v.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.where(per_element > 0, v / np.where(per_element > 0, per_element,
                                                           np.float32(1)), np.float32(0))
    quotient = np.where(magnitude < _U32(0x7F800000), quotient, v)  # NaN, inf -> 0x7f
    return float32_to_e4m3(quotient, r16), scales


def dequantize_velocity(codes, scales):
    """(codes, scales) -> float32 velocities: e4m3_to_float32(code) * its block's scale,
    rounded in float32 (exact unless the product leaves float32's normal range)."""
    codes = np.asarray(codes, np.uint8).reshape(-1)
    per_element = np.repeat(np.asarray(scales, np.float32), FLOAT8_BLOCK)[:codes.size]
    return e4m3_to_float32(codes) * per_element


def float8_velocity_step(param, grad, codes, scales, groups=None, *, precision="nearest",
                         compensation=None, master=None, seed=0, step_count=0,
                         first_step=False, **hyper):
    """One update with an FP8 velocity (codes, scales as quantize_velocity makes them), as
    the kernels do it: returns (new_param, new_codes, new_scales, new compensation or new
    master or None), new arrays; inputs are not modified.

    groups: [(start, end, options)], the elements [start, end) updated with `options`
    (keyword arguments of reference_step plus first_step); elements in no group are the
    padding, left alone (param and buffer neither read nor written). Default: one group
    over everything with `hyper` and `first_step`.

    Each element's old velocity is its dequantized value (0 on its group's first step,
    when it is not read, unless the group leaves its velocity alone), updated in float32 as `reference_step` (float32 params) or
    `low_precision_step` (16-bit params, `precision` and its buffer) with its group's
    options. Then each block of FLOAT8_BLOCK elements is quantized as a whole by
    quantize_velocity, padding elements counting as 0 (their codes become 0), with
    precision="stochastic" from the low 16 bits of random_bits(seed, step_count, i) (the
    high 16 round a 16-bit parameter). A velocity a group leaves alone (torch style,
    momentum 0) keeps its dequantized value, first step or not (a zeroed state reads 0),
    requantized with its block; a block in which no group writes the velocity (all of it
    left alone or padding) keeps its codes and scale, bits and all. The state starts
    zeroed (codes 0, scales 0): a velocity that was never written reads as 0.
    """
    n = np.asarray(param).size
    if groups is None:
        groups = [(0, n, {**hyper, "first_step": first_step})]
    param_out = np.array(param).reshape(-1)
    buffer = compensation if precision == "kahan" else master
    buffer_out = None if buffer is None else np.array(buffer).reshape(-1)
    old = dequantize_velocity(codes, scales)
    values = np.zeros(n, np.float32)
    writes = np.zeros(n, bool)
    sixteen_bit = np.dtype(param_out.dtype).itemsize == 2
    for start, end, options in groups:
        options = dict(options)
        first = options.pop("first_step", False)
        keeps = options.get("style") == "torch" and options.get("momentum", 0.9) == 0
        velocity = np.zeros(n, np.float32) if first and not keeps else old
        with np.errstate(over="ignore", invalid="ignore"):
            if sixteen_bit:
                new_p, new_v, extra = low_precision_step(
                    param, grad, velocity, precision=precision, compensation=compensation,
                    master=master, seed=seed, step_count=step_count, first_step=first,
                    **options)
            else:
                new_p, new_v = reference_step(param, grad, velocity, first_step=first,
                                              dtype=np.float32, **options)
                extra = None
        param_out[start:end] = new_p[start:end]
        if extra is not None:
            buffer_out[start:end] = extra[start:end]
        values[start:end] = new_v[start:end]
        writes[start:end] = not keeps
    r16 = None
    if precision == "stochastic":
        r16 = random_bits(seed, step_count, np.arange(n)) & _U32(0xFFFF)
    new_codes, new_scales = quantize_velocity(values, r16)
    written = _blocks(writes, False).any(axis=1)
    new_codes = np.where(np.repeat(written, FLOAT8_BLOCK)[:n], new_codes,
                         np.asarray(codes, np.uint8).reshape(-1))
    new_scales = np.where(written, new_scales, np.asarray(scales, np.float32))
    return param_out, new_codes, new_scales, buffer_out

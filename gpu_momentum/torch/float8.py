"""An FP8 velocity in `SGD(..., velocity_dtype=torch.float8_e4m3fn)`: the Bucket that keeps
it, and its parameters' state as `opt.state` shows it.

The format is gpu_momentum.reference's (quantize_velocity, float8_velocity_step): E4M3
codes, one per element, and one float32 scale per FLOAT8_BLOCK elements of the flat
buffer. Here every parameter's segment starts on a block boundary, so each parameter owns
whole blocks (the padding after it reads 0) and its velocity is its own: a parameter
whose `.grad` is None keeps its codes and scales bit for bit, and its codes and scales
alone decode it. `opt.state[p]` holds them as views of the flat arrays:

- "momentum_codes": uint8, the parameter's shape (and strides);
- "momentum_scales": float32[ceil(p.numel() / FLOAT8_BLOCK)], per block of the
  parameter's elements in memory order.

A "momentum_buffer" assigned there (a float tensor of the parameter's shape, as
torch.optim.SGD holds) is quantized into the velocity at the next step (rounded to
nearest) and leaves the state; deleting the codes (or clearing the entry) makes the next
step a first step, as deleting a momentum buffer (or setting it to None) does in
torch; so does setting "momentum_buffer" to None. `SGD.momentum_buffer(p)`
decodes one parameter's velocity."""

import numpy as np
import torch

from ..kernels.layout import FLOAT8_BLOCK, FLOAT8_VELOCITY, float8_scale_count
from ..float8_velocity import Float8Velocity
from ..precision import Precision, float8_precisions, named_dtype
from ..reference import dequantize_velocity, quantize_velocity
from .buckets import Bucket
from .tensors import NUMPY_DTYPES, ArraysFor, dense, segment

__all__ = ["CODES_KEY", "SCALES_KEY", "Float8Bucket", "torch_velocity_dtype",
           "check_float8_packing", "quantized", "dequantized", "check_codes_and_scales"]

CODES_KEY, SCALES_KEY = "momentum_codes", "momentum_scales"


def torch_velocity_dtype(value):
    """SGD's `velocity_dtype`, checked as MomentumSGD checks it (precision.Precision):
    None for the default velocity (None, torch.float32, "float32", numpy.float32), or
    FLOAT8_VELOCITY for the FP8 one (torch.float8_e4m3fn, "float8_e4m3fn",
    ml_dtypes.float8_e4m3fn). An unknown name is a ValueError naming it; a known name
    whose package (ml_dtypes) is missing a TypeError; any other dtype a ValueError."""
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if name is None:
        return None
    try:
        dtype = Precision(np.dtype(np.float32), "nearest", name).velocity_dtype
    except ValueError as error:
        try:
            dtype = named_dtype("velocity_dtype", name)
        except TypeError:
            raise error from None  # an unknown name: MomentumSGD's message
        raise ValueError(f"Invalid velocity_dtype value: {dtype.name!r} (the velocity is "
                         f"float32 (None, the default) or {FLOAT8_VELOCITY!r})") from None
    return FLOAT8_VELOCITY if dtype.name == FLOAT8_VELOCITY else None


def check_float8_packing(key, params, precision):
    """Raises before anything changes unless the parameters `params` of one buffer,
    `key` = (backend name, device, dtype, in a wrapper's storage), can have an FP8
    velocity; returns the precision mode their bucket runs: `precision` where the FP8
    kernels have it for their dtype, else "nearest"."""
    _, _, dtype, theirs = key
    if theirs:
        raise ValueError(f"Invalid velocity_dtype value: {FLOAT8_VELOCITY!r} (parameters "
                         f"in storage a wrapper owns, such as FSDP's or "
                         f"ZeroRedundancyOptimizer's, are updated with a float32 velocity "
                         f"only)")
    if any(p.is_complex() for p in params):
        raise ValueError(f"Invalid velocity_dtype value: {FLOAT8_VELOCITY!r} (complex "
                         f"parameters cannot have an FP8 velocity)")
    numpy_dtype = NUMPY_DTYPES[dtype]
    mode = precision if precision in float8_precisions(numpy_dtype) else "nearest"
    Precision(numpy_dtype, mode, FLOAT8_VELOCITY)  # float64: a ValueError naming it
    return mode


def quantized(values, like):
    """(codes, scales) of float `values` (a tensor of like's shape) quantized as
    reference.quantize_velocity does (rounded to nearest) over like's memory order (the
    order of its segment in a flat buffer): codes uint8 shaped and strided as `like`,
    scales float32[ceil(numel / FLOAT8_BLOCK)]; host tensors."""
    flat = torch.zeros(like.numel(), dtype=torch.float32)
    segment(flat, 0, like).copy_(dense(values).detach())
    codes, scales = quantize_velocity(flat.numpy())
    return segment(torch.from_numpy(codes), 0, like), torch.from_numpy(scales)


def dequantized(codes, scales, like):
    """A float32 host tensor of like's shape and strides: `codes` (uint8, like's shape)
    times their block's scale from `scales`, blocks counted over like's memory order
    (reference.dequantize_velocity)."""
    flat = torch.zeros(like.numel(), dtype=torch.uint8)
    segment(flat, 0, like).copy_(codes.detach())
    values = dequantize_velocity(flat.numpy(), scales.detach().cpu().numpy())
    return segment(torch.from_numpy(values), 0, like)


def _memory_order(tensor):
    """Each element's position in memory among the tensor's elements (logical order), or
    None when its elements are not dense in memory."""
    extent = 1 + sum((s - 1) * t for s, t in zip(tensor.shape, tensor.stride()))
    if tensor.numel() == 0 or extent != tensor.numel() or min(tensor.stride(),
                                                               default=1) < 0:
        return None
    return torch.arange(tensor.numel()).as_strided(tensor.shape, tensor.stride())


def same_memory_order(a, b):
    """Whether tensors `a` and `b` of one shape lay out their elements in one order (so
    that blocks of either's memory hold the same elements)."""
    if a.numel() <= 1:
        return True
    order_a, order_b = _memory_order(a), _memory_order(b)
    return order_a is not None and order_b is not None and torch.equal(order_a, order_b)


def check_codes_and_scales(codes, scales, p, like, where):
    """Raises unless `codes` and `scales` (tensors, or None for neither) can be parameter
    p's FP8 velocity laid out as `like` (its codes view): codes uint8 of p's shape in
    like's memory order, scales float32[blocks], finite and >= 0. `where`: how the
    messages name the place they come from, e.g. 'state[p]'."""
    if codes is None and scales is None:
        return
    if codes is None or scales is None:
        missing = CODES_KEY if codes is None else SCALES_KEY
        raise ValueError(f"Invalid {where} value: it holds one of {CODES_KEY!r} and "
                         f"{SCALES_KEY!r} without {missing!r} (an FP8 velocity is both)")
    blocks = float8_scale_count(p.numel())
    for key, tensor, dtype, shape in ((CODES_KEY, codes, torch.uint8, p.shape),
                                      (SCALES_KEY, scales, torch.float32, (blocks,))):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Invalid {key} value in {where}: a {type(tensor).__name__} "
                            f"(a {dtype} tensor of shape {tuple(shape)})")
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"Invalid {key} value in {where}: {tensor.dtype} of shape "
                             f"{tuple(tensor.shape)} for a parameter of shape "
                             f"{tuple(p.shape)} (a {dtype} tensor of shape "
                             f"{tuple(shape)})")
    if not same_memory_order(codes, like):
        raise ValueError(f"Invalid {CODES_KEY} value in {where}: strides "
                         f"{codes.stride()} order its elements otherwise than the "
                         f"parameter's {like.stride()} (the scales are per block of "
                         f"memory)")
    bad = ~(torch.isfinite(scales) & (scales >= 0))
    if bool(bad.any()):
        block = int(torch.nonzero(bad.flatten())[0])
        raise ValueError(f"Invalid {SCALES_KEY} value in {where}: "
                         f"{float(scales.flatten()[block])!r} at block {block} (scales "
                         f"are finite and >= 0)")


class Float8ArraysFor(ArraysFor):
    """The backend's arrays of a Float8Bucket's flat tensors (param, grad, codes, scales
    and maybe a precision buffer), with codes and scales as one Float8Velocity: (param,
    grad, velocity[, precision buffer]), as Bucket's launches take them."""

    def __init__(self, backend, device, tensors):
        super().__init__(backend, device, tensors)
        if self.fixed is not None:
            self.fixed = _grouped(self.fixed)

    def step_arrays(self):
        if self.fixed is not None:
            return self.fixed
        return _grouped(super().step_arrays())


def _grouped(arrays):
    return (arrays[0], arrays[1], Float8Velocity(arrays[2], arrays[3]), *arrays[4:])


class Float8Bucket(Bucket):
    """A Bucket whose velocity is an FP8 one: flat `codes` (uint8) and `scales` (float32,
    one per FLOAT8_BLOCK elements), each parameter's segment starting on a block
    boundary; the state as the module's docstring says."""

    arrays_for = Float8ArraysFor

    @staticmethod
    def segment_start(end, element):
        return float8_scale_count(end) * FLOAT8_BLOCK

    def new_velocity(self, total, offsets, likes):
        self.codes = torch.zeros(total, dtype=torch.uint8, device=self.device)
        self.scales = torch.zeros(float8_scale_count(total), dtype=torch.float32,
                                  device=self.device)
        self.codes_views = [segment(self.codes, o, p) for o, p in zip(offsets, likes)]
        self.scales_views = [self.scales[o // FLOAT8_BLOCK:
                                         float8_scale_count(o + p.numel())]
                             for o, p in zip(offsets, likes)]
        # No float momentum buffer exists: one in the state is a tensor to quantize.
        self.velocity_views = [None] * len(offsets)
        return self.codes, self.scales

    def velocity_state(self, index):
        return {CODES_KEY: self.codes_views[index], SCALES_KEY: self.scales_views[index]}

    def check_state(self, state):
        """Bucket.check_state (a momentum buffer: of the parameter's shape, real), and a
        momentum buffer is a floating-point tensor; codes and scales come together and fit
        (check_codes_and_scales)."""
        super().check_state(state)
        for index, p in enumerate(self.params):
            entry = state.get(p) or {}
            buffer = entry.get("momentum_buffer")
            if buffer is not None and not buffer.is_floating_point():
                raise TypeError(f"Invalid momentum_buffer value: dtype {buffer.dtype} (a "
                                f"floating-point tensor, quantized into the FP8 velocity)")
            codes, scales = entry.get(CODES_KEY), entry.get(SCALES_KEY)
            if codes is self.codes_views[index] and scales is self.scales_views[index]:
                continue
            check_codes_and_scales(codes, scales, p, self.codes_views[index],
                                   "a parameter's state")

    def _state_pairs(self, state, index):
        """The precision buffer's pair alone (the velocity is taken by _take_velocity)."""
        if self.buffer_name is None:
            return []
        entry = state.get(self.params[index]) or {}
        return [(self.buffer_name, entry.get(self.buffer_name), self.buffer_views[index])]

    def fill(self, state):
        super().fill(state)
        for index in range(len(self.params)):
            self._take_velocity(state, index)

    def _take_velocity(self, state, index):
        """Parameter `index`'s velocity from `state` into the flat codes and scales: a
        momentum buffer quantized (it wins over codes beside it: it was assigned later),
        else codes and scales copied unless they are the views."""
        entry = state.get(self.params[index]) or {}
        buffer = entry.get("momentum_buffer")
        codes, scales = entry.get(CODES_KEY), entry.get(SCALES_KEY)
        if buffer is not None:
            codes, scales = quantized(buffer.cpu(), self.codes_views[index])
        if codes is not None and codes is not self.codes_views[index]:
            self.codes_views[index].copy_(codes)
        if scales is not None and scales is not self.scales_views[index]:
            self.scales_views[index].copy_(scales)

    def _point_state(self, state, index):
        p = self.params[index]
        entry = state.get(p)
        if entry is not None and "momentum_buffer" in entry and \
                entry["momentum_buffer"] is None:  # a momentum buffer set to None: reset
            for key in ("momentum_buffer", CODES_KEY, SCALES_KEY):
                entry.pop(key, None)
        initialized = entry is not None and (entry.get("momentum_buffer") is not None
                                             or entry.get(CODES_KEY) is not None)
        pairs = self._state_pairs(state, index)
        for key, tensor, view in pairs:
            if tensor is not None:
                state[p][key] = view
        if initialized:
            entry.pop("momentum_buffer", None)
            entry.update(self.velocity_state(index))
        self.velocity_initialized[index] = initialized
        self.buffered[index] = bool(pairs) and pairs[0][1] is not None

    def _take_state(self, state):
        for index in range(len(self.params)):
            for _, tensor, view in self._state_pairs(state, index):
                if tensor is not None and tensor is not view:
                    view.copy_(dense(tensor))
            self._take_velocity(state, index)
            self._point_state(state, index)
        self.table_stale = True

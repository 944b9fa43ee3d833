"""SGD's FP8 velocity in its state dict, and the part of SGD's public surface that reads
it (`velocity_dtype`, `momentum_buffer(p)`).

`state_dict()` of an SGD with an FP8 velocity holds torch.optim.SGD's state: each
`state[i]["momentum_buffer"]` decoded (float32, the parameter's shape; torch.optim.SGD's
load_state_dict casts it to the parameter's dtype). Its extras (under STATE_KEY) also
name the velocity (`"velocity_dtype": "float8_e4m3fn"`) and hold the codes and scales
themselves, `"momentum_codes"` and `"momentum_scales"`, {parameter index: tensor} as
`opt.state` holds them (gpu_momentum.torch.float8), from which an SGD with an FP8
velocity resumes bit for bit. Any other state (torch.optim.SGD's, a float32 velocity's)
loads into it quantized, rounded to nearest; and an FP8 state loads into an SGD with a
float32 velocity decoded (its momentum buffers)."""

import itertools

import torch

from ..kernels.layout import FLOAT8_VELOCITY
from ..state_format import STATE_KEY, TORCH_FLOAT8_EXTRAS_KEYS
from .float8 import (CODES_KEY, SCALES_KEY, check_codes_and_scales, dequantized, quantized,
                     same_memory_order)

__all__ = ["Float8Surface", "export_float8", "check_float8_extras", "exact_velocities",
           "adopt_velocities"]


class Float8Surface:
    """SGD's methods about its velocity's format (a base class of SGD)."""

    @property
    def velocity_dtype(self):
        """torch.float8_e4m3fn for an FP8 velocity; None for the default one (float32,
        float64 for float64 parameters)."""
        return torch.float8_e4m3fn if self.velocity_dtype_name else None

    @property
    def velocity_dtype_name(self):
        """"float8_e4m3fn" for an FP8 velocity, else None."""
        return self.__dict__.get("_velocity_dtype")

    @torch._disable_dynamo
    def momentum_buffer(self, p):
        """Parameter p's momentum buffer as torch.optim.SGD would hold it: a new tensor
        (float32 for float32 and 16-bit parameters) of p's shape on its device, or None
        before its first step. An FP8 velocity is decoded (e4m3 value of each code times
        its block's scale, reference.dequantize_velocity); any other one copied."""
        self._settle()
        entry = self.state.get(p) or {}
        buffer = entry.get("momentum_buffer")  # (also one assigned, not yet quantized)
        if buffer is not None:
            return buffer.detach().clone()
        codes, scales = entry.get(CODES_KEY), entry.get(SCALES_KEY)
        if codes is None or scales is None:
            return None
        return dequantized(codes.cpu(), scales.cpu(), codes).to(codes.device)


def export_float8(state_dict, extras):
    """torch's state dict of an SGD with an FP8 velocity (its plain "state" entries,
    changed in place) as the module's docstring says: each entry's codes and scales
    leave it for `extras`, and its momentum_buffer is their decoding."""
    codes_by_id, scales_by_id = {}, {}
    for key, entry in state_dict["state"].items():
        codes, scales = entry.pop(CODES_KEY, None), entry.pop(SCALES_KEY, None)
        if codes is None or scales is None or "momentum_buffer" in entry:
            continue  # (a momentum buffer assigned since the last step stands as it is)
        entry["momentum_buffer"] = dequantized(codes.cpu(), scales.cpu(), codes).to(
            codes.device)
        codes_by_id[key], scales_by_id[key] = codes.detach().clone(), \
            scales.detach().clone()
    extras.update(zip(TORCH_FLOAT8_EXTRAS_KEYS,
                      (FLOAT8_VELOCITY, codes_by_id, scales_by_id)))


def check_float8_extras(extras):
    """Raises unless the FP8 keys of a state's extras, where it has them, are well formed:
    velocity_dtype "float8_e4m3fn", codes and scales dicts with the same keys."""
    if "velocity_dtype" not in extras:
        return
    if extras["velocity_dtype"] != FLOAT8_VELOCITY:
        raise ValueError(f"Invalid {STATE_KEY} velocity_dtype value: "
                         f"{extras['velocity_dtype']!r} (a state's extras name "
                         f"{FLOAT8_VELOCITY!r} alone)")
    codes, scales = extras.get(CODES_KEY), extras.get(SCALES_KEY)
    if not (isinstance(codes, dict) and isinstance(scales, dict)) or set(codes) != set(
            scales):
        raise ValueError(f"Invalid {STATE_KEY} {CODES_KEY} and {SCALES_KEY} values: "
                         f"dicts with the same keys (the parameters' indices)")


def exact_velocities(state_dict, extras, param_groups):
    """{parameter: (codes, scales)} that an SGD with an FP8 velocity and these param
    groups takes from `state_dict` (checked; its extras `extras` or None), on each
    parameter's device: a saved FP8 velocity's codes and scales where the parameter's
    memory order is the saved one's (bit for bit), else the saved momentum buffer
    quantized from its own values (torch's load_state_dict would first cast it to a
    16-bit parameter's dtype). Parameters whose saved entry is no tensor of their shape
    are left out (the optimizer's checks refuse them after torch's load)."""
    saved = state_dict.get("state")
    groups = state_dict.get("param_groups")
    if not isinstance(saved, dict) or not isinstance(groups, list):
        return {}
    codes_by_id = {} if extras is None else extras.get(CODES_KEY, {})
    scales_by_id = {} if extras is None else extras.get(SCALES_KEY, {})
    ids = itertools.chain.from_iterable(
        g.get("params", []) for g in groups if isinstance(g, dict))
    params = itertools.chain.from_iterable(g["params"] for g in param_groups)
    velocities = {}
    for saved_id, p in zip(ids, params):
        entry = saved.get(saved_id)
        if not isinstance(entry, dict) or p.is_complex():
            continue
        codes, scales = codes_by_id.get(saved_id), scales_by_id.get(saved_id)
        buffer = entry.get("momentum_buffer")
        if codes is not None and (not isinstance(codes, torch.Tensor) or
                                  codes.shape != p.shape or same_memory_order(codes, p)):
            check_codes_and_scales(codes, scales, p, p,
                                   f"{STATE_KEY}'s entry {saved_id!r}")
        elif isinstance(buffer, torch.Tensor) and buffer.shape == p.shape and \
                buffer.is_floating_point():
            codes, scales = quantized(buffer.cpu(), p)
        else:
            continue
        velocities[p] = (codes.to(p.device, copy=True), scales.to(p.device, copy=True))
    return velocities


def adopt_velocities(state, velocities, buckets):
    """After torch's load_state_dict (which cannot fail from here on): each parameter's
    state takes its codes and scales from `velocities` (exact_velocities) in place of
    the momentum buffer torch cast, and the buckets (if packed) take them in."""
    for p, (codes, scales) in velocities.items():
        entry = state[p]
        entry.pop("momentum_buffer", None)
        entry[CODES_KEY], entry[SCALES_KEY] = codes, scales
    for bucket in buckets:
        bucket.adopt_state(state)

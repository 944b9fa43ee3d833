"""Packing: which parameters go into which flat buffer (a Bucket per backend, device and
dtype), which stay out, and the Layout that holds one packing and checks cheaply that it
still holds the param groups' parameters."""

import operator

import torch

from ..backends import (REGISTRY, BackendUnavailableError, backend_named,
                        backends_for_device, unavailable_reason)
from ..precision import BFLOAT16_EXTRA
from .buckets import Bucket
from .float8 import Float8Bucket, check_float8_packing
from .foreign import ForeignBucket
from .grad_views import zero_in_place
from .storage import local_of, lives_elsewhere
from .tensors import NUMPY_DTYPES, TORCH_DTYPES, data_ptr, real_dtype


def pack(param_groups, state, old, *, backend_choice, skip_nonfinite, precision,
         counted_on_device, step_count, velocity_dtype=None):
    """A new Layout of `param_groups`, holding the parameters' current values, gradients
    and the momentum and precision buffers in `state`; everything is checked and copied
    into new buffers before any parameter is re-pointed, so a failure changes nothing.
    `old`: the Layout it replaces (its hooks are removed), or None; `step_count`: the
    optimizer's steps taken; the others: the optimizer's options (`backend_choice`: its
    `backend` argument; `counted_on_device`: whether the kernels count the steps;
    `velocity_dtype`: None, or float8_e4m3fn for FP8 velocities, float8.Float8Bucket)."""
    order, group_of = [], {}
    for index, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) not in group_of:  # a duplicate is updated once
                group_of[id(p)] = index
                order.append(p)
    packed, kept_out = {}, []
    was_packed = set() if old is None else {
        id(p) for bucket in old.buckets for p in bucket.params}
    for number, p in enumerate(order):
        backend = _backend_for(number, p, backend_choice)
        if backend is None:
            kept_out.append(p)
        else:
            key = (backend.name, p.device, real_dtype(p.dtype),
                   lives_elsewhere(p, moved=id(p) in was_packed))
            packed.setdefault(key, []).append(p)
    if skip_nonfinite and len(packed) > 1:
        where = ", ".join(f"{device} {dtype}" + (" in a wrapper's storage" if theirs else "")
                          for _, device, dtype, theirs in packed)
        raise ValueError(f"Invalid skip_nonfinite value: True (a step is skipped "
                         f"for all parameters or none, decided in one buffer's "
                         f"memory; these parameters need several: {where})")
    sixteen_bit = {dtype: dtype.itemsize == 2 for _, _, dtype, _ in packed}
    modes = {key: precision if sixteen_bit[key[2]] else "nearest" for key in packed}
    if velocity_dtype is not None:
        modes = {key: check_float8_packing(key, params, precision)
                 for key, params in packed.items()}
    if precision != "nearest" and packed and all(mode == "nearest"
                                                 for mode in modes.values()):
        dtypes = ", ".join(sorted({str(dtype) for dtype in sixteen_bit}))
        raise ValueError(f"Invalid precision value: {precision!r} (the parameters "
                         f"are {dtypes}, computed in their own precision: only "
                         f"'nearest' applies to them; the other modes are for "
                         f"bfloat16 and float16 parameters)")
    _check_disjoint([p for ps in packed.values() for p in ps], order)
    old_views = {} if old is None else {
        key: cleared for bucket in old.buckets
        for key, cleared in bucket.grads.cleared_by_view().items()}
    kind = Bucket if velocity_dtype is None else Float8Bucket
    buckets = [(ForeignBucket if theirs else kind)(
                   REGISTRY[name], device, dtype, params, [group_of[id(p)] for p in params],
                   counted_on_device, skip_nonfinite, modes[name, device, dtype, theirs])
               for (name, device, dtype, theirs), params in packed.items()]
    for bucket in buckets:
        bucket.check_state(state)
    for bucket in buckets:
        bucket.fill(state)
    for bucket in buckets:
        bucket.commit(state, old_views, step_count)
    if old is not None:
        for bucket in old.buckets:
            bucket.grads.unwatch()
    return Layout(param_groups, buckets, kept_out, counted_on_device)


def _backend_for(number, p, choice):
    """The backend that updates parameter `number`, `p`, given the optimizer's `backend`
    argument `choice`, or None for a tensor kept out of the buffers (integer, sparse, on
    a device no backend serves, or of a dtype its backend lacks while it needs no
    update); a trainable parameter no backend can update raises."""
    if p.layout != torch.strided or not (p.is_floating_point() or p.is_complex()):
        return None
    names = backends_for_device(p.device.type)
    if not names:
        return None  # meta tensors (model.to_empty() follows), other accelerators
    if choice == "auto":
        reasons = [f"{name}: {unavailable_reason(name)}" for name in names]
        usable = [name for name in names if unavailable_reason(name) is None]
        if not usable:
            if not p.requires_grad:
                return None
            raise BackendUnavailableError(
                f"no backend can update parameter {number} ({p.device} tensor) on "
                f"this machine: {'; '.join(reasons)}")
        backend = REGISTRY[usable[0]]
    elif choice in names:
        backend = backend_named(choice)
    elif not p.requires_grad:
        return None
    else:
        raise TypeError(f"Invalid backend value: {choice!r} cannot update parameter "
                        f"{number}, a {p.device.type} tensor (backends for "
                        f"{p.device.type} tensors: {names})")
    real = real_dtype(p.dtype)
    dtype = NUMPY_DTYPES.get(real)
    updated = [d for d in TORCH_DTYPES if d.name in backend.dtypes]
    if dtype is None or dtype not in updated:
        if not p.requires_grad:
            return None
        supported = ", ".join(str(TORCH_DTYPES[d]) for d in updated)
        missing = (f"; torch.bfloat16 needs ml_dtypes: {BFLOAT16_EXTRA}"
                   if real == torch.bfloat16 and dtype is None else "")
        raise TypeError(f"parameter {number} has dtype {p.dtype}, which backend "
                        f"{backend.name!r} does not update on {p.device.type} "
                        f"(it updates {supported}, and their complex types{missing})")
    return backend


class Layout:
    """The buffers of one packing: which parameters they hold, and the cheap checks that
    they still hold them."""

    def __init__(self, param_groups, buckets, kept_out, counted_on_device):
        self.param_lists = [list(group["params"]) for group in param_groups]
        self.buckets = buckets
        # Whether this packing moved parameters into the optimizer's own buffers (not
        # only storage a wrapper owns, left where it is).
        self.moved = any(bucket.params and not isinstance(bucket, ForeignBucket)
                         for bucket in buckets)
        self.kept_out = kept_out
        self.kept_out_ptrs = [data_ptr(p) for p in kept_out]
        self.counted_on_device = counted_on_device and bool(buckets)
        self.on_cuda = any(bucket.device.type == "cuda" for bucket in buckets)

    def holds(self, param_groups):
        """Whether the groups hold the packed parameters, each still in its buffer."""
        if len(param_groups) != len(self.param_lists):
            return False
        for group, packed in zip(param_groups, self.param_lists):
            current = group["params"]
            if len(current) != len(packed) or not all(map(operator.is_, current, packed)):
                return False
        if self.kept_out and list(map(data_ptr, self.kept_out)) != self.kept_out_ptrs:
            return False  # e.g. meta parameters given storage by model.to_empty()
        for bucket in self.buckets:
            if not bucket.in_place():
                return False
        return True

    def zero_grad(self, set_to_none, adopt, capturing=False):
        """Each bucket's GradientViews.zero_grad (Reshaped: nothing kept out was
        touched yet); then the tensors kept out get torch's zero_grad."""
        for bucket in self.buckets:
            bucket.grads.zero_grad(set_to_none, adopt, capturing)
        for p in self.kept_out:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    zero_in_place(p.grad)

    def check_kept_out(self, param_groups):
        """Raises UnupdatableGradientError if a tensor kept out of the buffers has a
        gradient: with torch.optim.SGD(fused=True)'s message where its group asks for
        fused=True (a meta parameter, say), else naming what can be updated."""
        for p in self.kept_out:
            if p.grad is not None:
                if any(group.get("fused") and any(q is p for q in group["params"])
                       for group in param_groups):
                    devices = sorted({b.device_type for b in REGISTRY.values()})
                    raise UnupdatableGradientError(
                        f"`fused=True` requires all the params to be floating point "
                        f"Tensors of supported devices: {devices} but {p.dtype} and "
                        f"{p.device.type}")
                raise UnupdatableGradientError(
                    f"a {p.dtype} {p.layout} tensor on {p.device} has a gradient, but "
                    f"gpu_momentum.torch.SGD cannot update it (it updates strided "
                    f"bfloat16, float16, float32, float64 and complex tensors)")


class UnupdatableGradientError(TypeError, RuntimeError):
    """A gradient at `step()` on a tensor no backend updates: a TypeError, as for any
    tensor of the wrong kind, and a RuntimeError, what torch.optim.SGD(fused=True) raises
    for a parameter its fused kernel cannot take."""


def _check_disjoint(params, order):
    """Two parameters sharing memory cannot be packed apart: ValueError naming them."""
    spans = []
    for p in params:
        local = local_of(p)  # (a DTensor's data_ptr() is 0: its shard's is not)
        if local.numel():
            extent = 1 + sum((s - 1) * t for s, t in zip(local.shape, local.stride()))
            start = data_ptr(local)
            spans.append((start, start + extent * local.element_size(), p))
    spans.sort(key=operator.itemgetter(0))
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            numbers = sorted(i for i, p in enumerate(order) if p is first or p is second)
            raise ValueError(f"Invalid params value: parameters {numbers[0]} and "
                             f"{numbers[1]} share memory; gpu_momentum.torch.SGD moves "
                             f"each parameter into its own segment of a flat buffer "
                             f"(tie shared weights by using one Parameter)")

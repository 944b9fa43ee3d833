"""`SGD`, a drop-in torch.optim.SGD: its signature, checks and methods, over the flat
buffers of a Layout (see the package's docstring for how a step travels)."""

import numpy as np
import torch
from torch.optim.optimizer import Optimizer

from ..backends import backend_named
from ..hyperparams import STYLES
from ..precision import check_precision_name, check_seed
from .bucket_table import CAPTURE_REFUSED
from .differentiable import step_param_groups
from .float8 import torch_velocity_dtype
from .float8_state import Float8Surface
from .grad_views import Reshaped
from .group_values import GroupValues
from .layout import pack
from .state import edits_of, take_edits, tracked
from .state_dict import EXTRA_GROUP_DEFAULTS, SavedState
from .tensors import to_float

__all__ = ["SGD", "UnsupportedOptionError"]


# The library's options that differentiable=True (torch's update, through torch
# operations) has no part of: they must keep these values.
FUSED_ONLY_DEFAULTS = {**EXTRA_GROUP_DEFAULTS, "skip_nonfinite": False,
                       "capturable": False, "precision": "nearest", "style": "torch",
                       "velocity_dtype": None}


class UnsupportedOptionError(ValueError, NotImplementedError):
    """A combination of options this optimizer does not support: one of the library's
    own options (l1, decoupled_weight_decay, skip_nonfinite, capturable, precision,
    style, velocity_dtype) with differentiable=True, which computes torch.optim.SGD's
    update alone. A ValueError, as every invalid value here, and a NotImplementedError (a
    RuntimeError, what torch raises for options its fused SGD lacks)."""


class SGD(Float8Surface, SavedState, Optimizer):
    r"""Stochastic gradient descent with momentum, as torch.optim.SGD, in one fused pass
    over flat buffers (see the package's docstring for how).

    With g the gradient (divided by GradScaler's scale when GradScaler hands it over),
    the default style="torch" computes, per parameter, exactly torch.optim.SGD's update::

        g = -g if maximize else g
        g = g + weight_decay * p + l1 * sign(p)       (sign(0) = 0; l1 is this library's)
        b = g                              on the parameter's first step with momentum != 0
        b = momentum * b + (1 - dampening) * g        afterwards
        g = g + momentum * b if nesterov else b       (with momentum != 0)
        p = p - lr * g

    With decoupled_weight_decay=True the weight_decay term leaves g and
    p = p * (1 - lr * weight_decay) runs first (SGDW). With momentum 0 no buffer is read,
    written or created, as in torch. style="classic" keeps the velocity that carries the
    learning rate: v = momentum * v - lr * g (v = -lr * g on the first step), then
    p = p + v (nesterov: p = p + momentum * v - lr * g); its momentum_buffer is that v.

    First step: per parameter, as torch creates its momentum buffer: the first `step()` at
    which the parameter has a gradient and its group has momentum != 0 (any momentum in
    classic style) sets the buffer from the gradient and never reads the old one.

    A parameter whose `.grad` is None at `step()` is left alone: neither it nor its
    momentum buffer moves, and no buffer is created. So is one that received no gradient
    since `zero_grad()` (set_to_none=True): its `.grad` is then a zero view of the flat
    gradient buffer, not None.

    Arguments are torch.optim.SGD's, in its order and with its defaults and checks (same
    exception types and messages: momentum >= 1, negative dampening and any group value
    are accepted, as torch accepts them), plus this library's:
    - l1: L1 penalty, l1 * sign(p) added to the gradient (per group);
    - decoupled_weight_decay: SGDW (per group);
    - skip_nonfinite: a step whose gradient holds a NaN or inf changes no parameter and
      no buffer, decided in the backend's memory without waiting for the device (all
      parameters must then share one device and dtype);
    - capturable: `step()` can be captured in a CUDA graph (`torch.cuda.graph`): the
      step counters live in each buffer's memory, counted by the kernels, so a replay
      counts (and skips, with skip_nonfinite) as an eager step does. Take a few steps
      before capturing (they create the momentum buffers); after changing a group's
      values between replays, call `prepare()` (it rewrites the update tables in place,
      outside the graph). A step inside a capture that would need host work raises;
    - precision: how bfloat16 and float16 parameters are stored back after their
      float32 update, as MomentumSGD's precision: "nearest" (default), "stochastic"
      (keyed by `seed`, an integer in [0, 2**64), and the step count), "kahan" (a
      compensation of the parameter's dtype, `state[p]["compensation"]`) or "master" (a
      float32 master copy, `state[p]["master"]`, taken at the parameter's first step).
      One per optimizer; float32 and float64 parameters beside 16-bit ones are computed
      in their own precision, and a mode other than "nearest" without any 16-bit
      parameter is a ValueError;
    - style: "torch" (default) or "classic" (one per optimizer);
    - velocity_dtype: None (default; torch.float32 and "float32" say the same) or
      torch.float8_e4m3fn ("float8_e4m3fn", ml_dtypes.float8_e4m3fn): an 8-bit velocity,
      E4M3 codes with one float32 scale per 256 elements (MomentumSGD's format, see
      docs/precision.md), each parameter owning whole blocks. For float32 and 16-bit
      parameters (float32 ones have precision "nearest" and "stochastic", which rounds
      the codes); float64 and complex ones, and storage a wrapper owns, refuse it.
      `opt.state[p]` then holds "momentum_codes" and "momentum_scales" (views of the
      velocity) instead of "momentum_buffer"; `momentum_buffer(p)` decodes it, and an
      assigned "momentum_buffer" is quantized into it (gpu_momentum.torch.float8);
      `state_dict()` holds each momentum_buffer decoded, as torch.optim.SGD loads it;
    - backend: "auto" (the first available backend for each tensor's device type), "cpu",
      "cupy", "numba-cuda" or another registered backend's name
      (gpu_momentum.backends.register_backend).
    foreach and fused are accepted and ignored (the update is always one fused pass).

    differentiable=True is a path of its own, not the fused kernel: nothing is packed;
    `step()` is torch.optim.SGD(differentiable=True)'s, through torch operations under
    autograd (gpu_momentum.torch.differentiable), as meta-learning needs, and
    `zero_grad()` is torch's. The library's options above (but backend and seed, unused
    there) raise UnsupportedOptionError with it.

    `p.grad` and `opt.state` are torch's (see the package's docstring): `step()` never
    replaces a gradient object, notices `p.grad.data = g` and `p.grad.set_(g)`, and
    takes edits of `opt.state` as torch's next step would.

    Parameters in bfloat16 (with ml_dtypes installed), float16, float32 or float64 (and
    their complex types) are updated on every device; 16-bit ones are computed in float32,
    with a float32 momentum buffer (kept float32 through load_state_dict, which in torch
    casts it to the parameter's dtype). A trainable parameter of another dtype is refused
    with a TypeError at construction; integer tensors, and frozen ones of those dtypes,
    stay out of the buffers (a gradient on one at `step()` is an error).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, l1=0.0, decoupled_weight_decay=False,
                 skip_nonfinite=False, capturable=False, precision="nearest", seed=0,
                 style="torch", backend="auto", foreach=None, fused=None,
                 differentiable=False, velocity_dtype=None):
        # torch.optim.SGD's checks, in its order and with its messages, before params are
        # looked at (torch's own error inputs pass params=None with a bad lr or momentum).
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        seed = _check_library_options(l1, decoupled_weight_decay, skip_nonfinite,
                                      capturable, style, precision, seed, backend)
        velocity_dtype = torch_velocity_dtype(velocity_dtype)
        if differentiable:
            _refuse_fused_only_options(l1=l1, decoupled_weight_decay=decoupled_weight_decay,
                                       skip_nonfinite=skip_nonfinite, capturable=capturable,
                                       precision=precision, style=style,
                                       velocity_dtype=velocity_dtype)
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov,
                    "maximize": maximize, "foreach": foreach,
                    "differentiable": differentiable, "fused": fused}
        for name, value in (("l1", l1), ("decoupled_weight_decay", decoupled_weight_decay)):
            if value != EXTRA_GROUP_DEFAULTS[name]:
                defaults[name] = type(EXTRA_GROUP_DEFAULTS[name])(value)
        self._style = style
        self._precision, self._seed = precision, seed
        self._velocity_dtype = velocity_dtype
        self._backend_choice = backend
        self._skip_nonfinite = bool(skip_nonfinite)
        self._capturable = bool(capturable)
        self._counts = [0, 0]  # steps taken, steps skipped (beyond the buffers' counters)
        self._last_step_skipped = False
        self._layout = None  # add_param_group packs only once the optimizer exists
        super().__init__(params, defaults)
        self.state = tracked(self.state)
        if differentiable:
            self._step_supports_amp_scaling = False  # GradScaler unscales, as for torch's
        else:
            self._layout = self._pack(None)
        self._state_seen = edits_of(self.state)

    # ---- the public surface torch.optim.SGD does not have -----------------------------

    @property
    def style(self):
        return self._style

    @property
    def skip_nonfinite(self):
        return self._skip_nonfinite

    @property
    def precision(self):
        """How bfloat16 and float16 parameters are stored back: "nearest", "stochastic",
        "kahan" or "master" (float32 and float64 ones: computed in their own precision)."""
        return self.__dict__.get("_precision", "nearest")

    @property
    def seed(self):
        """The seed of stochastic rounding's random bits."""
        return self.__dict__.get("_seed", 0)

    @property
    def capturable(self):
        return self.__dict__.get("_capturable", False)

    @property
    def _through_autograd(self):
        """differentiable=True: steps through torch operations, nothing packed."""
        return bool(self.defaults.get("differentiable", False))

    @property
    def _counted_on_device(self):
        """Whether the buffers' kernels count the steps (in the buffers' memory)."""
        return self._skip_nonfinite or self.capturable

    def _on_cuda(self):
        """Whether some buffer (or, before packing, some parameter) is on a CUDA device:
        only then can a step be inside a CUDA graph capture (asking torch otherwise would
        start CUDA in a CPU-only program)."""
        layout = self.__dict__.get("_layout")
        if layout is not None:
            return layout.on_cuda
        return any(p.is_cuda for group in self.param_groups for p in group["params"])

    def _reads_scaler_values(self, devices):
        """Whether GradScaler may hand its scale and found_inf to step() on these devices
        (`_step_supports_amp_scaling`): on the CPU, read on the host; on CUDA, read by the
        kernels, which needs the counters there (capturable or skip_nonfinite)."""
        kinds = {device.type for device in devices}
        return kinds <= {"cpu"} or (kinds == {"cuda"} and self._counted_on_device)

    @torch._disable_dynamo
    @torch.no_grad()
    def prepare(self):
        """Rewrites each buffer's update table from the param groups' current values, in
        place (same device addresses), now: a CUDA graph replayed next uses them. Call it
        after changing lr, momentum or any group value between graph replays (step()
        does it by itself when it runs eagerly). With differentiable=True there is no
        table: it does nothing."""
        if self._through_autograd:
            return
        layout = self._current_layout()
        self._take_group_values(layout)
        for bucket in layout.buckets:
            bucket.prepare()
            bucket.refresh(self._style)

    @property
    def pack_count(self):
        """How many times parameters were packed (moved) into this optimizer's flat
        buffers: once at construction, and again only after a parameter of its own left
        its buffer (`model.to(...)`, `p.data = ...`) or the param groups changed.
        Parameters in storage a wrapper owns (FSDP2's DTensors, ZeRO's bucket views,
        FSDP1's flat parameters) are updated where they live and never counted."""
        return self.__dict__.get("_pack_count", 0)

    @property
    def backends(self):
        """{(device, dtype): backend name} of the flat buffers (none with
        differentiable=True)."""
        if self._through_autograd:
            return {}
        return {(str(b.device), b.param_dtype): b.backend.name
                for b in self._current_layout().buckets}

    @property
    def step_count(self):
        """Steps that updated the parameters (waits for the device with skip_nonfinite)."""
        self._settle()
        return self._counts[0]

    @property
    def skipped_steps(self):
        """Steps skipped: GradScaler found an inf, or skip_nonfinite a non-finite
        gradient (waits for the device with skip_nonfinite)."""
        self._settle()
        return self._counts[1]

    @property
    def last_step_skipped(self):
        self._settle()
        return self._last_step_skipped

    # ---- torch.optim.Optimizer's methods ----------------------------------------------

    @torch._disable_dynamo
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if self.__dict__.get("_layout") is not None:
            try:
                self._layout = self._pack(self._layout)
            except BaseException:
                self.param_groups.pop()  # torch appended it: nothing changes on failure
                raise

    @torch._disable_dynamo
    def zero_grad(self, set_to_none=True):
        """Zeroes each flat gradient buffer in one call and leaves every `p.grad` of a
        parameter in a buffer a view of it, so that the next backward accumulates into the
        buffer in place. torch's meaning of set_to_none is kept: after
        set_to_none=True (the default) a parameter counts as having no gradient (torch's
        None: left alone at `step()`) until autograd accumulates one into it; after
        set_to_none=False one that had a gradient has a zero gradient (updated at
        `step()`, as in torch) and one that had none still has none. A gradient that was
        not a view of the buffer (one DDP hands over, one the user assigned) is dropped
        (True) or zeroed (False) as torch does, and the view takes its place where that is
        safe. Tensors kept out of the buffers get torch's zero_grad, and so does
        everything with differentiable=True."""
        if self._through_autograd:
            return super().zero_grad(set_to_none)
        capturing = self._on_cuda() and torch.cuda.is_current_stream_capturing()
        layout = self._current_layout(capturing)
        if capturing and any(bucket.grads.reshaped() for bucket in layout.buckets):
            raise RuntimeError(CAPTURE_REFUSED.format(
                "a parameter has a new shape: the buffers must be packed again"))
        # Under DDP (gradient_as_bucket_view=True, find_unused_parameters=True) a view
        # given to a parameter no rank uses comes back as DDP's bucket view, which a
        # step cannot tell from a reduced gradient: there a None .grad stays None.
        adopt = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            try:
                layout.zero_grad(set_to_none, adopt, capturing)
            except Reshaped:
                layout = self._layout = self._pack(layout)
                layout.zero_grad(set_to_none, adopt, capturing)

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; `closure` re-evaluates the
        model and returns the loss, as with torch.optim.SGD."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._through_autograd:
            step_param_groups(self.param_groups, self.state)
            self._counts[0] += 1
            return loss
        capturing = self._on_cuda() and torch.cuda.is_current_stream_capturing()
        if capturing and not self._counted_on_device:
            raise RuntimeError(CAPTURE_REFUSED.format(
                "the step counters are in host memory: construct the optimizer with "
                "capturable=True"))
        layout = self._current_layout(capturing)
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        # Everything that can fail is checked before anything is written.
        layout.check_kept_out(self.param_groups)
        self._take_group_values(layout, capturing)
        # CUDA buffers read GradScaler's values on the device (see _reads_scaler_values).
        on_device = layout.on_cuda
        device_scaling = on_device and (grad_scale is not None or found_inf is not None)
        inv_grad_scale = 1.0 if grad_scale is None or on_device else \
            1.0 / to_float(grad_scale)
        try:
            prepared = [bucket.prepare() for bucket in layout.buckets]
        except Reshaped:
            if capturing:
                raise RuntimeError(CAPTURE_REFUSED.format(
                    "a parameter has a new shape: the buffers must be packed again"))
            layout = self._layout = self._pack(layout)
            self._take_group_values(layout)
            prepared = [bucket.prepare() for bucket in layout.buckets]
        if edits_of(self.state) != self._state_seen:  # opt.state was edited or replaced
            if capturing:
                raise RuntimeError(CAPTURE_REFUSED.format(
                    "opt.state was edited: its tensors must be taken into the buffers "
                    "(take a step outside the capture first)"))
            self._settle()
            self.state = take_edits(self.state, layout.buckets)
            self._state_seen = edits_of(self.state)
        if found_inf is not None and not on_device and to_float(found_inf) != 0:
            # GradScaler found an inf: nothing changes, and a parameter's first step
            # stays its first step (torch's fused SGD gets this wrong; its for-loop not).
            self._settle()
            self._counts[1] += 1
            self._last_step_skipped = True
            return loss
        for bucket, foreign in zip(layout.buckets, prepared):
            bucket.grads.gather(foreign)
        skipped = False
        scaling = {"grad_scale": grad_scale, "found_inf": found_inf} if device_scaling \
            else {}
        for bucket in layout.buckets:
            skipped |= bucket.launch(self._style, inv_grad_scale, self.state,
                                     capturing, seed=self.seed, step_count=self._counts[0],
                                     **scaling)
        if not layout.counted_on_device:
            self._counts[1 if skipped else 0] += 1
            self._last_step_skipped = skipped
        self._state_seen = edits_of(self.state)  # (its own edits: first steps' buffers)
        return loss

    def _take_group_values(self, layout, capturing=False):
        """The param groups' values that changed since the update tables took them,
        checked against every buffer's compute dtype (nothing changes on a refusal, and
        the next step refuses them again), then written into the tables' rows in place."""
        changes = self._group_values.changes(self.param_groups, capturing)
        if changes and capturing:
            raise RuntimeError(CAPTURE_REFUSED.format(
                "the update table must be written (call opt.prepare() after changing a "
                "group's values)"))
        if changes:
            for bucket in layout.buckets:
                bucket.check_values(changes)
            self._group_values.accept(self.param_groups, changes)
            for bucket in layout.buckets:
                bucket.write_values(changes, self._style)

    # ---- packing -----------------------------------------------------------------------

    def _current_layout(self, capturing=False):
        """The layout, packed now if this is a copy's first use, packed again if the
        param groups changed or a parameter left its buffer (refused in a capture)."""
        layout = self._layout
        if layout is None or not layout.holds(self.param_groups):
            if capturing:
                raise RuntimeError(CAPTURE_REFUSED.format(
                    "the parameters must be packed into buffers (take a step before "
                    "capturing; after a change of the param groups or of a parameter's "
                    "storage, another)"))
            layout = self._layout = self._pack(layout)
        return layout

    def _pack(self, old):
        """A new Layout of the current param groups (layout.pack: a failure changes
        nothing), replacing `old`."""
        if old is not None:
            self._settle()
        layout = pack(self.param_groups, self.state, old,
                      backend_choice=self._backend_choice,
                      skip_nonfinite=self._skip_nonfinite, precision=self.precision,
                      counted_on_device=self._counted_on_device, step_count=self._counts[0],
                      velocity_dtype=self.velocity_dtype_name)
        self._step_supports_amp_scaling = self._reads_scaler_values(
            bucket.device for bucket in layout.buckets)
        if layout.moved:
            self._pack_count = self.pack_count + 1
        # The new buffers' tables take every group's values.
        self._group_values = GroupValues(layout.buckets, self._style)
        return layout

    def _settle(self):
        """Brings the host's counts and momentum buffers up to date with the counters of
        buffers that skip non-finite steps on the device (waits for it)."""
        layout = self.__dict__.get("_layout")
        if layout is not None and layout.counted_on_device:
            for bucket in layout.buckets:
                taken, skipped, last = bucket.settle(self.state)
                self._counts[0] += taken
                self._counts[1] += skipped
                if taken or skipped:
                    self._last_step_skipped = last


def _refuse_fused_only_options(**given):
    """differentiable=True computes torch.optim.SGD's update alone: UnsupportedOptionError
    naming the first of the library's options `given` a value other than its default."""
    for name, value in given.items():
        default = FUSED_ONLY_DEFAULTS[name]
        if value != default:
            raise UnsupportedOptionError(
                f"Invalid {name} value: {value!r} with differentiable=True (which steps "
                f"through torch.optim.SGD's update as torch operations, without {name}; "
                f"it must be {default!r})")


def _check_library_options(l1, decoupled_weight_decay, skip_nonfinite, capturable, style,
                           precision, seed, backend):
    """The checks of SGD's options that torch.optim.SGD lacks, after torch's; returns
    the seed, checked."""
    if l1 < 0.0:
        raise ValueError(f"Invalid l1 value: {l1} (l1 must be >= 0)")
    for name, value in (("decoupled_weight_decay", decoupled_weight_decay),
                        ("skip_nonfinite", skip_nonfinite),
                        ("capturable", capturable)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"Invalid {name} value: {value!r} ({name} must be True or "
                            f"False)")
    if not isinstance(style, str) or style not in STYLES:
        raise ValueError(f"Invalid style value: {style!r} (style must be one of "
                         f"{STYLES})")
    check_precision_name(precision)
    seed = check_seed(seed)
    if backend != "auto":
        backend_named(backend)  # an unknown or unavailable backend fails here
    return seed

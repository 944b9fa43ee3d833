"""`gpu_momentum.torch.SGD`: a drop-in `torch.optim.SGD` whose update is this library's fused
pass, one kernel launch per (device, dtype) per step (`pip install "gpu-momentum[torch]"`).

    from gpu_momentum.torch import SGD      # was: from torch.optim import SGD
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

How it works:
- At construction the parameters of each (device, dtype) are packed into one flat buffer
  (segments 16-byte aligned, as FlatParams lays them out) and each `p.data` becomes a view
  into it, with the strides it had (channels_last stays channels_last); complex
  parameters are packed as their real and imaginary parts. The Parameter objects stay the
  same, so modules, hooks and `module.state_dict()` are untouched. Gradients and momentum
  buffers have matching flat buffers; `state[p]["momentum_buffer"]` is a view into the
  velocity buffer.
- `zero_grad()`, with either set_to_none, zeroes each flat gradient buffer in one call and
  leaves each parameter's `.grad` a view of it: backward accumulates into the buffer in
  place and `step()` copies nothing. torch's None is kept as a meaning, not as a value: a
  post-accumulate-grad hook on each parameter marks it when autograd accumulates into its
  `.grad`, and one that received nothing since `zero_grad(set_to_none=True)` (its `.grad`
  a zero view) is left alone at `step()`, as torch leaves a None `.grad`. After
  `zero_grad(set_to_none=False)` a parameter that had a gradient has a zero one (updated,
  as in torch) and one that had none still has none. DDP writes the reduced gradient of a
  parameter this process did not use into its view in place, without autograd: each view
  has its own version counter, and a check queued at the end of each backward pass
  counts such a write as a gradient. A backward captured into a CUDA graph zeroes the
  cleared views first, in the graph (a gradient hook on each CUDA parameter): each
  replay finds the last replay's gradients there.
- A `.grad` that is not the view at `step()` (autograd's own after `model.zero_grad()`,
  DDP's bucket views, a `p.grad` the user assigned, a gradient with a graph) is a
  gradient: all of them are copied into the buffer with one `torch._foreach_copy_`, and
  a standalone tensor is then replaced by its view (same values). A None `.grad` at
  `step()` is no gradient. In a `torch.distributed` process group `zero_grad()` leaves a
  None `.grad` None and makes DDP's bucket views None, as torch does: DDP would hand a
  view given to a parameter that no rank used back as a zero bucket view, which `step()`
  cannot tell from a reduced gradient.
- `step()` reads every parameter group's hyperparameters (any change, such as a
  scheduler's, reaches the kernel without a recompile) into one row of the kernels' update
  table per parameter, so each parameter has its group's values and its own first step,
  and a parameter whose `.grad` is None is left alone (its range is NO_GROUP). The table is
  rewritten, in place, only when a value changed; then one launch updates the whole
  buffer.
- A parameter moved out of its buffer after construction (`model.to(...)`,
  `p.data = ...`, `model.to_empty(...)`) is found at the next `step()` or `zero_grad()`
  and everything is packed again from the current tensors, keeping momentum buffers and
  gradients.

Devices: CPU tensors are updated by the "cpu" backend through NumPy views; CUDA tensors by
"cupy" (or "numba-cuda" when asked), zero-copy, queued on torch's current CUDA stream,
with no host synchronisation in `step()` (a CUDA tensor lr is read with `.item()`, as
torch.optim.SGD's for-loop reads it).
"""

import contextlib
import itertools
import operator
import weakref

import numpy as np

try:
    import torch
except ImportError as error:  # `import gpu_momentum` itself never needs torch
    raise ImportError(f"gpu_momentum.torch needs PyTorch: pip install "
                      f"'gpu-momentum[torch]' ({error})") from error
from torch.optim.optimizer import Optimizer

from .arrays import compute_dtype
from .backends import (REGISTRY, BackendUnavailableError, backend_named, check_arrays,
                       device_table, unavailable_reason)
from .flat import SEGMENT_ALIGNMENT_BYTES
from .groups import UpdateTable
from .hyperparams import STYLES, keeps_velocity, row_flags, table_row
from .kernels.layout import (CLASSIC, GROUP_SLOTS, KEEP_VELOCITY, LAST_STEP_SKIPPED,
                             NO_GROUP, PRECISION_NAMES, SKIPPED_STEPS, STEP_COUNT,
                             VELOCITY_INITIALIZED)
from .precision import (BFLOAT16_EXTRA, PRECISION_BUFFER_NAMES, check_precision_name,
                        check_same_precision, check_seed)
from .state_format import STATE_KEY, STATE_VERSION, state_version, torch_extras_keys

__all__ = ["SGD", "UnsupportedOptionError"]

# What torch.optim.SGD.__setstate__ fills into the param groups of an older checkpoint.
TORCH_GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None,
                        "differentiable": False, "fused": False}
# The library's own per-group options, kept in `defaults` (and so in every group) only
# when given other values: with the defaults the groups hold exactly torch's keys.
EXTRA_GROUP_DEFAULTS = {"l1": 0.0, "decoupled_weight_decay": False}
# The backends for each torch device type, in the order "auto" tries them.
DEVICE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cupy", "numba-cuda")}
NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
                torch.float64: np.dtype(np.float64)}
try:  # torch.bfloat16 as NumPy knows it: ml_dtypes' (the "bf16" extra)
    import ml_dtypes
    NUMPY_DTYPES[torch.bfloat16] = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    pass
TORCH_DTYPES = {numpy: torch_dtype for torch_dtype, numpy in NUMPY_DTYPES.items()}
_data_ptr = torch.Tensor.data_ptr
_ENGINE = torch.autograd.Variable._execution_engine
_grad_of = operator.attrgetter("grad")


_CAPTURE_REFUSED = ("gpu_momentum.torch.SGD is being captured into a CUDA graph (step() "
                    "or zero_grad()), but {}: a replay would not do it. Nothing was "
                    "changed.")


class UnsupportedOptionError(ValueError, NotImplementedError):
    """An option torch.optim.SGD has and this optimizer does not (differentiable=True).
    A ValueError, as every invalid value here, and a NotImplementedError (a RuntimeError,
    what torch raises for options its fused SGD lacks)."""


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, as torch.optim.SGD, in one fused pass
    over flat buffers (see the module's docstring for how).

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
    - backend: "auto", "cpu", "cupy" or "numba-cuda".
    foreach and fused are accepted and ignored (the update is always one fused pass);
    differentiable=True raises UnsupportedOptionError.

    Parameters in bfloat16 (with ml_dtypes installed), float16, float32 or float64 (and
    their complex types) are updated on every device; 16-bit ones are computed in float32,
    with a float32 momentum buffer (kept float32 through load_state_dict, which in torch
    casts it to the parameter's dtype). A trainable parameter of another dtype is refused
    with a TypeError at construction; integer tensors, and frozen ones of those dtypes,
    stay out of the buffers (a gradient on one at `step()` is an error).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, l1=0.0, decoupled_weight_decay=False,
                 skip_nonfinite=False, capturable=False, precision="nearest", seed=0,
                 style="torch", backend="auto", foreach=None, fused=None,
                 differentiable=False):
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
        if differentiable:
            raise UnsupportedOptionError(
                "Invalid differentiable value: True (gpu_momentum.torch.SGD updates in "
                "place in a fused kernel outside autograd; use torch.optim.SGD("
                "differentiable=True) to differentiate through the update)")
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
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov,
                    "maximize": maximize, "foreach": foreach,
                    "differentiable": differentiable, "fused": fused}
        for name, value in (("l1", l1), ("decoupled_weight_decay", decoupled_weight_decay)):
            if value != EXTRA_GROUP_DEFAULTS[name]:
                defaults[name] = type(EXTRA_GROUP_DEFAULTS[name])(value)
        self._style = style
        self._precision, self._seed = precision, seed
        self._backend_choice = backend
        self._skip_nonfinite = bool(skip_nonfinite)
        self._capturable = bool(capturable)
        self._counts = [0, 0]  # steps taken, steps skipped (beyond the buffers' counters)
        self._last_step_skipped = False
        self._layout = None  # add_param_group packs only once the optimizer exists
        super().__init__(params, defaults)
        self._layout = self._pack(None)

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
        does it by itself when it runs eagerly)."""
        layout = self._current_layout()
        settings = self._group_settings()
        for bucket in layout.buckets:
            bucket.prepare()
            bucket.refresh(settings, self._style)

    @property
    def backends(self):
        """{(device, dtype): backend name} of the flat buffers."""
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

    def __getstate__(self):
        self._settle()
        return {**super().__getstate__(), "_style": self._style,
                "_precision": self.precision, "_seed": self.seed,
                "_backend_choice": self._backend_choice,
                "_skip_nonfinite": self._skip_nonfinite, "_capturable": self.capturable,
                "_counts": list(self._counts),
                "_last_step_skipped": self._last_step_skipped}

    def __setstate__(self, state):
        """Called by load_state_dict (with the new state and groups) and by unpickling
        and copy.deepcopy (a copy packs its new parameters at its first step)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, default)
            for key in EXTRA_GROUP_DEFAULTS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
        layout = self.__dict__.get("_layout")
        if layout is None:
            self._layout = None
            self._step_supports_amp_scaling = self._reads_scaler_values(
                p.device for g in self.param_groups for p in g["params"])
        else:
            for bucket in layout.buckets:
                bucket.check_state(self.state)
            for bucket in layout.buckets:
                bucket.adopt_state(self.state)

    @torch._disable_dynamo
    def state_dict(self):
        """torch.optim.SGD's state dict (`state[i]["momentum_buffer"]` for the parameters
        that have one, views of the flat velocity, and with precision "kahan" or "master"
        `state[i]["compensation"]` or `state[i]["master"]` for the 16-bit parameters that
        took a step; `param_groups` with torch's keys), plus the library's extras under
        "gpu_momentum" (format: the state version of gpu_momentum.state_format; style,
        precision, seed and the step counts), which torch.optim.SGD ignores (it keeps the
        extra per-parameter tensors as state)."""
        self._settle()
        state_dict = super().state_dict()
        state_dict[STATE_KEY] = {"format": STATE_VERSION, "style": self._style,
                                 "precision": self.precision, "seed": self.seed,
                                 "step_count": self._counts[0],
                                 "skipped_steps": self._counts[1]}
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict):
        """Loads a state dict of this optimizer or of torch.optim.SGD: momentum buffers are
        copied into the flat velocity (cast to its dtype and device). Checked before
        anything changes; a rejected state leaves the optimizer as it was."""
        extras = _extras(state_dict)
        style = "torch" if extras is None else extras["style"]
        # A state that names its precision must have this optimizer's (torch.optim.SGD's
        # and format 1's name none, and hold no precision buffers: those start afresh).
        check_same_precision(self.precision if extras is None else
                             extras.get("precision", self.precision), self.precision)
        if style != self._style and _has_momentum_buffers(state_dict):
            source = ("torch.optim.SGD state" if extras is None else
                      f"state of a style={style!r} optimizer")
            raise ValueError(f"Invalid state_dict value: a {source} holds {style}-style "
                             f"momentum buffers, but this optimizer has style="
                             f"{self._style!r} (the two velocities differ)")
        self._settle()
        before = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.state, self.param_groups = before
            raise
        self._restore_uncast(state_dict)
        if extras is not None:
            self._counts = [extras["step_count"], extras["skipped_steps"]]
            self._seed = extras.get("seed", 0)
        self._last_step_skipped = False
        layout = self.__dict__.get("_layout")
        for bucket in [] if layout is None else layout.buckets:
            bucket.count_from(self._counts[0])

    def _restore_uncast(self, state_dict):
        """torch's load_state_dict casts every floating-point state tensor to its
        parameter's dtype: a float32 momentum buffer or master copy of a 16-bit parameter
        would lose its low bits. They take the saved values again, exactly (checked: the
        shapes are the parameters')."""
        saved = state_dict["state"]
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(ids, params):
            entry, current = saved.get(saved_id), self.state.get(p)
            if not entry or not current:
                continue
            for key in ("momentum_buffer", *PRECISION_BUFFER_NAMES.values()):
                value, loaded = entry.get(key), current.get(key)
                if not isinstance(value, torch.Tensor) or loaded is None:
                    continue
                if self.__dict__.get("_layout") is None:  # packed later, from the state
                    current[key] = value.detach().to(p.device, copy=True)
                else:
                    loaded.copy_(_dense(value))

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
        safe. Tensors kept out of the buffers get torch's zero_grad."""
        capturing = self._on_cuda() and torch.cuda.is_current_stream_capturing()
        layout = self._current_layout(capturing)
        if capturing and any(bucket.reshaped() for bucket in layout.buckets):
            raise RuntimeError(_CAPTURE_REFUSED.format(
                "a parameter has a new shape: the buffers must be packed again"))
        # Under DDP (gradient_as_bucket_view=True, find_unused_parameters=True) a view
        # given to a parameter no rank uses comes back as DDP's bucket view, which a
        # step cannot tell from a reduced gradient: there a None .grad stays None.
        adopt = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            try:
                for bucket in layout.buckets:
                    bucket.zero_grad(set_to_none, adopt, capturing)
            except _Reshaped:
                layout = self._layout = self._pack(layout)
                for bucket in layout.buckets:
                    bucket.zero_grad(set_to_none, adopt, capturing)
            for p in layout.kept_out:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        _zero_in_place(p.grad)

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; `closure` re-evaluates the
        model and returns the loss, as with torch.optim.SGD."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        capturing = self._on_cuda() and torch.cuda.is_current_stream_capturing()
        if capturing and not self._counted_on_device:
            raise RuntimeError(_CAPTURE_REFUSED.format(
                "the step counters are in host memory: construct the optimizer with "
                "capturable=True"))
        layout = self._current_layout(capturing)
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        # Everything that can fail is checked before anything is written.
        layout.check_kept_out()
        settings = self._group_settings()
        # CUDA buffers read GradScaler's values on the device (see _reads_scaler_values).
        on_device = layout.on_cuda
        device_scaling = on_device and (grad_scale is not None or found_inf is not None)
        inv_grad_scale = 1.0 if grad_scale is None or on_device else \
            1.0 / _number(grad_scale)
        try:
            prepared = [bucket.prepare() for bucket in layout.buckets]
        except _Reshaped:
            if capturing:
                raise RuntimeError(_CAPTURE_REFUSED.format(
                    "a parameter has a new shape: the buffers must be packed again"))
            layout = self._layout = self._pack(layout)
            prepared = [bucket.prepare() for bucket in layout.buckets]
        if found_inf is not None and not on_device and _number(found_inf) != 0:
            # GradScaler found an inf: nothing changes, and a parameter's first step
            # stays its first step (torch's fused SGD gets this wrong; its for-loop not).
            self._settle()
            self._counts[1] += 1
            self._last_step_skipped = True
            return loss
        for bucket, foreign in zip(layout.buckets, prepared):
            bucket.gather(foreign)
        skipped = False
        scaling = {"grad_scale": grad_scale, "found_inf": found_inf} if device_scaling \
            else {}
        for bucket in layout.buckets:
            skipped |= bucket.launch(settings, self._style, inv_grad_scale, self.state,
                                     capturing, seed=self.seed, step_count=self._counts[0],
                                     **scaling)
        if not layout.counted_on_device:
            self._counts[1 if skipped else 0] += 1
            self._last_step_skipped = skipped
        return loss

    # ---- packing -----------------------------------------------------------------------

    def _current_layout(self, capturing=False):
        """The layout, packed now if this is a copy's first use, packed again if the
        param groups changed or a parameter left its buffer (refused in a capture)."""
        layout = self._layout
        if layout is None or not layout.holds(self.param_groups):
            if capturing:
                raise RuntimeError(_CAPTURE_REFUSED.format(
                    "the parameters must be packed into buffers (take a step before "
                    "capturing; after a change of the param groups or of a parameter's "
                    "storage, another)"))
            layout = self._layout = self._pack(layout)
        return layout

    def _pack(self, old):
        """A new _Layout of the current param groups, holding the parameters' current
        values, gradients and momentum buffers; everything is checked and copied into
        new buffers before any parameter is re-pointed, so a failure changes nothing."""
        if old is not None:
            self._settle()
        order, group_of = [], {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in group_of:  # a duplicate is updated once
                    group_of[id(p)] = index
                    order.append(p)
        packed, kept_out = {}, []
        for number, p in enumerate(order):
            backend = self._backend_for(number, p)
            if backend is None:
                kept_out.append(p)
            else:
                key = (backend.name, p.device, _real_dtype(p.dtype))
                packed.setdefault(key, []).append(p)
        if self._skip_nonfinite and len(packed) > 1:
            where = ", ".join(f"{device} {dtype}" for _, device, dtype in packed)
            raise ValueError(f"Invalid skip_nonfinite value: True (a step is skipped "
                             f"for all parameters or none, decided in one buffer's "
                             f"memory; these parameters need several: {where})")
        sixteen_bit = {dtype: dtype.itemsize == 2 for _, _, dtype in packed}
        if self.precision != "nearest" and packed and not any(sixteen_bit.values()):
            dtypes = ", ".join(sorted({str(dtype) for dtype in sixteen_bit}))
            raise ValueError(f"Invalid precision value: {self.precision!r} (the parameters "
                             f"are {dtypes}, computed in their own precision: only "
                             f"'nearest' applies to them; the other modes are for "
                             f"bfloat16 and float16 parameters)")
        _check_disjoint([p for ps in packed.values() for p in ps], order)
        old_views = {} if old is None else {
            id(view): cleared for bucket in old.buckets
            for view, cleared in zip(bucket.grad_views, bucket.cleared)}
        buckets = [_Bucket(REGISTRY[name], device, dtype, params,
                           [group_of[id(p)] for p in params], self._counted_on_device,
                           self._skip_nonfinite,
                           self.precision if sixteen_bit[dtype] else "nearest")
                   for (name, device, dtype), params in packed.items()]
        for bucket in buckets:
            bucket.check_state(self.state)
        for bucket in buckets:
            bucket.fill(self.state)
        for bucket in buckets:
            bucket.commit(self.state, old_views, self._counts[0])
        if old is not None:
            for bucket in old.buckets:
                bucket.unwatch()
        self._step_supports_amp_scaling = self._reads_scaler_values(b.device for b in buckets)
        return _Layout(self.param_groups, buckets, kept_out, self._counted_on_device)

    def _backend_for(self, number, p):
        """The backend that updates `p`, or None for a tensor kept out of the buffers
        (integer, sparse, on a device no backend serves, or of a dtype its backend lacks
        while it needs no update); a trainable parameter no backend can update raises."""
        if p.layout != torch.strided or not (p.is_floating_point() or p.is_complex()):
            return None
        names = DEVICE_BACKENDS.get(p.device.type)
        if names is None:
            return None  # meta tensors (model.to_empty() follows), other accelerators
        choice = self._backend_choice
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
        real = _real_dtype(p.dtype)
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

    def _group_settings(self):
        """Each param group's values as the kernels take them: (lr, momentum, dampening,
        weight_decay, l1, decoupled_weight_decay, nesterov, maximize)."""
        return tuple(
            (_number(g["lr"]), _number(g["momentum"]), _number(g["dampening"]),
             _number(g["weight_decay"]), _number(g.get("l1", 0.0)),
             bool(g.get("decoupled_weight_decay", False)), bool(g["nesterov"]),
             bool(g["maximize"]))
            for g in self.param_groups)

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


class _Reshaped(Exception):
    """A parameter has a new shape over the same memory: its views must be made again."""


class _Layout:
    """The buffers of one packing: which parameters they hold, and the cheap checks that
    they still hold them."""

    def __init__(self, param_groups, buckets, kept_out, counted_on_device):
        self.param_lists = [list(group["params"]) for group in param_groups]
        self.buckets = buckets
        self.kept_out = kept_out
        self.kept_out_ptrs = [_data_ptr(p) for p in kept_out]
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
        if list(map(_data_ptr, self.kept_out)) != self.kept_out_ptrs:
            return False  # e.g. meta parameters given storage by model.to_empty()
        return all(bucket.in_place() for bucket in self.buckets)

    def check_kept_out(self):
        for p in self.kept_out:
            if p.grad is not None:
                raise TypeError(f"a {p.dtype} {p.layout} tensor on {p.device} has a "
                                f"gradient, but gpu_momentum.torch.SGD cannot update it "
                                f"(it updates strided bfloat16, float16, float32, float64 "
                                f"and complex tensors)")


class _Bucket:
    """The parameters of one (device, dtype) in one flat buffer: flat param, gradient and
    velocity tensors whose segments are the parameters' data, gradient views and momentum
    buffers, the precision buffer of 16-bit parameters (kahan: the compensation, master:
    the float32 master copy; segments `state[p]["compensation"]` or `state[p]["master"]`
    once the parameter took a step), and the update table of its one launch (a row per
    parameter)."""

    def __init__(self, backend, device, dtype, params, groups, counted, check_nonfinite,
                 precision):
        self.backend, self.device, self.params = backend, device, params
        self.groups = np.array(groups, np.intp)  # the param group of each row
        self.param_dtype = dtype
        real = NUMPY_DTYPES[dtype]
        self.compute_dtype = compute_dtype(real)
        element = real.itemsize
        align = max(1, SEGMENT_ALIGNMENT_BYTES // element)
        offsets, ends, end = [], [], 0
        for p in params:
            offset = -(-end // align) * align
            end = offset + p.numel() * (2 if p.is_complex() else 1)
            offsets.append(offset)
            ends.append(end)
        total = -(-end // align) * align
        self.data = torch.zeros(total, dtype=dtype, device=device)
        self.grad = torch.zeros(total, dtype=dtype, device=device)
        self.velocity = torch.zeros(total, dtype=TORCH_DTYPES[self.compute_dtype],
                                    device=device)
        self.param_views = [_segment(self.data, o, p) for o, p in zip(offsets, params)]
        # .data: each gradient view with a version counter of its own (views share their
        # base's), so that an in-place write into one parameter's gradient shows.
        self.grad_views = [_segment(self.grad, o, p).data for o, p in zip(offsets, params)]
        self.velocity_views = [_segment(self.velocity, o, p) for o, p in zip(offsets, params)]
        self.precision = precision
        self.buffer_name = PRECISION_BUFFER_NAMES.get(precision)  # None: no buffer
        tensors = (self.data, self.grad, self.velocity)
        self.buffer = self.buffer_views = None
        if self.buffer_name is not None:
            self.buffer = torch.zeros(total, dtype=dtype if precision == "kahan" else
                                      torch.float32, device=device)
            self.buffer_views = [_segment(self.buffer, o, p) for o, p in zip(offsets, params)]
            tensors += (self.buffer,)
        self.buffered = np.zeros(len(params), bool)  # its buffer segment holds its state
        # Ranges: each parameter's elements (its row, or NO_GROUP while its grad is None),
        # then the padding after it (NO_GROUP: never read or written).
        range_ends, self.param_ranges = [], []
        for offset, end, following in zip(offsets, ends, offsets[1:] + [total]):
            self.param_ranges.append(len(range_ends))
            range_ends.append(end)
            if following > end:
                range_ends.append(following)
        if not range_ends or range_ends[-1] != total:
            range_ends.append(total)
        self.range_ends = np.array(range_ends, np.int64)
        self.present = [False] * len(params)
        # Parameters whose .grad is their view but which torch would show None: zeroed by
        # zero_grad(set_to_none=True), no gradient accumulated since (the hooks say).
        self.cleared = [False] * len(params)
        self.versions = None  # of the gradient views when last zeroed or pointed at
        self.unwatched = list(range(len(params)))  # no hook yet (frozen when packed)
        self.hooks = []
        weakref.finalize(self, _remove_hooks, self.hooks)
        self.backward_pending = False  # a hook ran in this backward: check at its end
        # On CUDA: whether the current stream is being captured into a CUDA graph, and
        # whether the graph being captured zeroes the flat gradient itself (its replays
        # must, before the captured backward accumulates into a cleared view).
        self.capturing = _capture_check(device)
        self.zeroed_in_graph = False
        self.initialized = np.zeros(len(params), bool)
        self.arrays = _ArraysFor(backend, device, tensors)
        with self.arrays.context():
            check_arrays(backend, *self.arrays.step_arrays()[:3], precision,
                         self._buffer_array(self.arrays.step_arrays()))
            self.counters = (backend.asarray(np.zeros(GROUP_SLOTS + len(params), np.int64))
                             if counted else None)
        self.check_nonfinite = check_nonfinite  # with counters: skip non-finite steps
        self.settings = None  # the group settings the table was last built from
        self.table_stale = True
        self.host_table = None
        self.device_table = None
        self.ptrs = None
        self._launch = None  # the prepared step, and what it was prepared with
        self._launch_made_with, self._launch_context = (), None

    # -- packing: check, fill, commit --

    def check_state(self, state):
        """Raises before anything changes if a momentum buffer, compensation or master
        copy in `state` cannot be this bucket's parameter's (or belongs to another
        precision than this bucket's)."""
        for index, p in enumerate(self.params):
            entry = state.get(p) or {}
            for name in PRECISION_BUFFER_NAMES.values():
                if name in entry and name != self.buffer_name:
                    raise ValueError(f"Invalid state_dict value: a parameter's state holds "
                                     f"{name!r}, which precision {self.precision!r} of "
                                     f"{self.param_dtype} parameters does not keep")
            _check_state_tensor("momentum_buffer", entry.get("momentum_buffer"), p,
                                self.velocity_views[index])
            if self.buffer_name is not None:
                _check_state_tensor(self.buffer_name, entry.get(self.buffer_name), p,
                                    self.buffer_views[index])

    def _state_pairs(self, state, index):
        """[(state key, tensor in `state` or None, its view in the buffers)] of parameter
        `index`: the momentum buffer, and the precision buffer if any."""
        entry = state.get(self.params[index]) or {}
        pairs = [("momentum_buffer", entry.get("momentum_buffer"),
                  self.velocity_views[index])]
        if self.buffer_name is not None:
            pairs.append((self.buffer_name, entry.get(self.buffer_name),
                          self.buffer_views[index]))
        return pairs

    def fill(self, state):
        """Copies the parameters' values, gradients, momentum buffers and precision
        buffers into the new buffers (nothing the user sees changes)."""
        for index, p in enumerate(self.params):
            self.param_views[index].copy_(p.detach())
            grad = p.grad
            if grad is not None and grad.shape == p.shape:
                self.grad_views[index].copy_(_dense(grad))
            for _, tensor, view in self._state_pairs(state, index):
                if tensor is not None:
                    view.copy_(_dense(tensor))

    def commit(self, state, old_views, step_count):
        """Points the parameters, their gradients, momentum buffers and precision buffers
        at the buffers. `old_views`: {id(gradient view of the previous buffers): whether
        cleared}; `step_count`: the optimizer's steps taken (stochastic rounding's key)."""
        for index, p in enumerate(self.params):
            p.data = self.param_views[index]
            grad = p.grad
            view = self.grad_views[index]
            cleared = old_views.get(id(grad))
            if grad is not None and grad.shape == view.shape and (
                    cleared is not None or _replaceable(grad, view)):
                p.grad = view  # fill() copied its values
                self.cleared[index] = bool(cleared)
            elif cleared:
                p.grad = None  # what it stood for, now that no view of its shape can
            self._point_state(state, index)
        self.ptrs = list(map(_data_ptr, self.params))
        self._write_counters(step_count, 0)
        self.watch()
        self.versions = [view._version for view in self.grad_views]

    def _point_state(self, state, index):
        """The state tensors of parameter `index` become their views (fill() or
        adopt_state() copied their values); which exist says what is initialized."""
        pairs = self._state_pairs(state, index)
        for key, tensor, view in pairs:
            if tensor is not None:
                state[self.params[index]][key] = view
        self.initialized[index] = pairs[0][1] is not None
        self.buffered[index] = len(pairs) > 1 and pairs[1][1] is not None

    def in_place(self):
        return list(map(_data_ptr, self.params)) == self.ptrs

    def adopt_state(self, state):
        """After load_state_dict: the loaded momentum buffers and precision buffers
        (checked by check_state) become views of the flat buffers; parameters without one
        start afresh."""
        for index in range(len(self.params)):
            for _, tensor, view in self._state_pairs(state, index):
                if tensor is not None and tensor is not view:
                    view.copy_(_dense(tensor))
            self._point_state(state, index)
        self.table_stale = True
        self._write_counters(0, 0)

    # -- gradients: the views, and which parameters have one --

    def watch(self):
        """Hooks each parameter that requires a gradient and has no hook yet: after
        autograd accumulates into its .grad (in place or not) it has a gradient; on CUDA,
        before it does, a cleared view is zeroed inside a CUDA graph capture."""
        if not self.unwatched:
            return
        still = []
        for index in self.unwatched:
            p = self.params[index]
            if p.requires_grad:
                self.hooks.append(p.register_post_accumulate_grad_hook(
                    _bucket_hook(self, "received", index)))
                if self.capturing is not None:
                    self.hooks.append(p.register_hook(
                        _bucket_hook(self, "accumulating", index)))
            else:
                still.append(index)  # frozen: no hook can be registered yet
        self.unwatched = still

    def unwatch(self):
        """Removes the hooks (these buffers are replaced)."""
        _remove_hooks(self.hooks)
        self.unwatched = list(range(len(self.params)))

    def accumulating(self, index):
        """Parameter `index`'s gradient hook on CUDA, before autograd accumulates into its
        .grad. Inside a CUDA graph capture a cleared view is zeroed first, in the graph:
        zero_grad() left it zero, but each replay finds the last replay's gradient there
        (with torch's None the graph would write a new gradient, not add to one). The
        whole buffer while no parameter has a gradient (one memset), else this view."""
        if not self.cleared[index] or self.zeroed_in_graph or not self.capturing():
            return
        if all(self.cleared):
            self.grad.zero_()
            self.zeroed_in_graph = True
        else:
            self.grad_views[index].zero_()

    def received(self, index):
        """Parameter `index`'s hook: autograd accumulated a gradient into its .grad. The
        first in a backward pass queues the check of what others write during it."""
        self.cleared[index] = False
        if not self.backward_pending:
            self.backward_pending = True
            # Queued from a callback, so that it runs after the callbacks queued in this
            # backward so far (DDP's reduction, queued from DDP's hooks, which run after
            # this one).
            try:
                _ENGINE.queue_callback(lambda: _ENGINE.queue_callback(self.backward_done))
            except RuntimeError:  # an engine that takes no callbacks: no check, and
                self.backward_pending = False  # never a failed backward

    def backward_done(self):
        """At the end of a backward pass in which some parameter received a gradient: a
        cleared gradient view that was written in place during it holds a gradient too.
        DDP (gradient_as_bucket_view=False) writes the reduced gradient of a parameter
        this process did not use, and torch.optim.SGD would update it (DDP hands it a
        gradient in place of its None)."""
        self.backward_pending = False
        if not any(self.cleared):
            return
        for index, cleared in enumerate(self.cleared):
            view = self.grad_views[index]
            if cleared and view._version != self.versions[index] and \
                    self.params[index].grad is view:
                self.cleared[index] = False

    def zero_grad(self, set_to_none, adopt, capturing=False):
        """Zeroes the flat gradient in one call; each hooked parameter's .grad that is
        its view stays so. set_to_none=True: every parameter then has no gradient until
        autograd accumulates one (an unhooked, frozen one gets None, as in torch); False:
        one that had a gradient has a zero one, one that had none has none. `adopt`: a
        None .grad, or one that is a view of another buffer, becomes the view too; else
        it gets what torch gives it (None, or zeroed in place), and a standalone one
        still becomes the view. `capturing`: this zeroing is in a CUDA graph, so its
        replays zero the buffer before a backward captured after it."""
        self.watch()  # parameters thawed since they were packed
        self.grad.zero_()
        self.zeroed_in_graph = capturing
        unwatched = set(self.unwatched)
        for index, p in enumerate(self.params):
            grad = p.grad
            view = self.grad_views[index]
            if grad is view:
                if set_to_none and index in unwatched:
                    p.grad = None
                continue
            watched = index not in unwatched
            if grad is None:
                if watched and adopt:
                    self._point(index, view)
                    self.cleared[index] = True
            elif set_to_none:
                if watched and (adopt or _replaceable(grad, view)):
                    self._point(index, view)
                else:
                    p.grad = None
            else:  # torch zeroes it, and it stays a gradient
                if _replaceable(_detached(grad), view):
                    self._point(index, view)
                else:
                    grad.zero_()  # DDP's bucket views: DDP keeps its own
                self.cleared[index] = False
        if set_to_none:
            self.cleared = [True] * len(self.params)
        self.versions = [view._version for view in self.grad_views]
        self.backward_pending = False  # (a failed backward runs no callbacks)

    def reshaped(self):
        """Whether a parameter has a new shape over the same memory (see _Reshaped)."""
        return any(p.shape != view.shape for p, view in zip(self.params, self.grad_views))

    def _point(self, index, view):
        p = self.params[index]
        if p.shape != view.shape:
            raise _Reshaped
        p.grad = view

    # -- a step --

    def prepare(self):
        """Which parameters have a gradient this step (not None, and not cleared unless a
        gradient came in outside the view), and the gradients that are not views of the
        flat buffer [(index, gradient)], checked."""
        grads = list(map(_grad_of, self.params))
        if all(map(operator.is_, grads, self.grad_views)):
            if not any(self.cleared):  # the common step: every parameter has a gradient
                if not all(self.present):
                    self.present = [True] * len(grads)
                    self.table_stale = True
                return []
            present = list(map(operator.not_, self.cleared))
            if present != self.present:
                self.present = present
                self.table_stale = True
            return []
        present = [grad is not None and (grad is not view or not cleared)
                   for grad, view, cleared in zip(grads, self.grad_views, self.cleared)]
        if present != self.present:
            self.present = present
            self.table_stale = True
        foreign = []
        for index, (grad, view) in enumerate(zip(grads, self.grad_views)):
            if grad is None or grad is view:
                continue
            p = self.params[index]
            if p.shape != view.shape:
                raise _Reshaped  # p.data = p.data.view(...): same memory, a new shape
            if grad.shape != p.shape or grad.device != p.device or grad.dtype != p.dtype:
                raise RuntimeError(f"a parameter's .grad ({grad.dtype}, shape "
                                   f"{tuple(grad.shape)}, on {grad.device}) does not match "
                                   f"the parameter ({p.dtype}, shape {tuple(p.shape)}, on "
                                   f"{p.device})")
            foreign.append((index, grad))
        return foreign

    def gather(self, foreign):
        """Copies gradients that live outside the flat buffer into it, in one launch; a
        standalone one is replaced by its view (same values)."""
        if not foreign:
            return
        views = [self.grad_views[index] for index, _ in foreign]
        torch._foreach_copy_(views, [_dense(grad) for _, grad in foreign])
        for (index, grad), view in zip(foreign, views):
            if _replaceable(grad, view):
                self.params[index].grad = view
                self.cleared[index] = False

    def refresh(self, settings, style, capturing=False):
        """The update table rewritten in place when the group settings, the gradients
        present or the first steps taken changed since it was written (refused while a
        CUDA graph is captured: a replay would not write it)."""
        if settings != self.settings:
            self.settings = settings
            self.table_stale = True
        if self.table_stale:
            if capturing:
                raise RuntimeError(_CAPTURE_REFUSED.format(
                    "the update table must be written (call opt.prepare() after changing "
                    "a group's values, and take the first steps before capturing)"))
            with self.arrays.context():
                self._write_table(style, self.arrays.step_arrays()[0])

    def launch(self, settings, style, inv_grad_scale, state, capturing=False,
               grad_scale=None, found_inf=None, seed=0, step_count=0):
        """The fused update of every parameter with a gradient, one launch; then the
        momentum buffers of first steps enter `state`. Returns whether the step was
        skipped (known on the host: without counters, or with counters in host memory).
        grad_scale and found_inf: GradScaler's 0-d CUDA tensors, read by the kernels.
        seed and step_count (the steps taken before this one; counters hold their own)
        key stochastic rounding."""
        self.refresh(settings, style, capturing)
        self._set_up_buffers(state, capturing)
        scaling = {name: value if value.device == self.device else
                   value.to(self.device, non_blocking=True)
                   for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf))
                   if value is not None}
        with self.arrays.context():
            arrays = self.arrays.step_arrays()
            self._launcher(arrays, seed)(arrays[1], inv_grad_scale, None,
                                         scaling.get("grad_scale"),
                                         scaling.get("found_inf"), step_count)
        if not self.awaiting_first:  # every velocity this table can create exists
            return bool(self.counters is not None and self.device.type == "cpu"
                        and self.counters[LAST_STEP_SKIPPED])
        first = np.fromiter(self.present, bool, len(self.present)) & ~self.initialized
        first &= ~self.keeps[self.groups]
        if self.counters is not None and self.device.type == "cpu":
            if self.counters[LAST_STEP_SKIPPED]:
                return True
        elif self.counters is not None:
            self.pending |= first  # settle() checks them against the device's counters
        if first.any():
            for index in np.flatnonzero(first):
                state[self.params[index]]["momentum_buffer"] = self.velocity_views[index]
            self.initialized |= first
            self.table_stale = True
        return False

    def _launcher(self, arrays, seed):
        """The backend's step prepared once (Backend.step_function) and kept while the
        table, the arrays, the counters, the seed and the stream it was prepared with
        stay the same."""
        made_with = (self.device_table, *arrays, self.counters)
        context = (seed, None if self.device.type == "cpu" else self.arrays._stream())
        if (context != self._launch_context or len(made_with) != len(self._launch_made_with)
                or any(a is not b for a, b in zip(made_with, self._launch_made_with))):
            self._launch = self.backend.step_function(
                arrays[0], arrays[2], self.device_table, self.counters,
                self.check_nonfinite, precision=self.precision,
                precision_buffer=self._buffer_array(arrays), seed=seed)
            self._launch_made_with, self._launch_context = made_with, context
        return self._launch

    def _buffer_array(self, arrays):
        """The precision buffer among the backend's `arrays`, or None."""
        return arrays[3] if self.buffer is not None else None

    def _set_up_buffers(self, state, capturing):
        """Each parameter taking its first step gets its precision buffer segment, in
        `state` from now on: kahan a zero compensation, master its current values widened
        (so values loaded into the parameters before their first step are kept)."""
        if self.buffer is None:
            return
        new = np.fromiter(self.present, bool, len(self.present)) & ~self.buffered
        if not new.any():
            return
        if capturing:
            raise RuntimeError(_CAPTURE_REFUSED.format(
                f"a parameter's first step must set up its {self.buffer_name} (take the "
                f"first steps before capturing)"))
        for index in np.flatnonzero(new):
            view = self.buffer_views[index]
            if self.precision == "master":
                view.copy_(self.param_views[index])
            else:
                view.zero_()
            state[self.params[index]][self.buffer_name] = view
        self.buffered |= new

    def _write_table(self, style, param_array):
        """The update table from the group settings, the gradients present and the first
        steps taken; rewritten in place in the backend's memory."""
        rows = np.array([table_row(*s[:6], self.compute_dtype) for s in self.settings],
                        self.compute_dtype)
        self.keeps = np.array([keeps_velocity(style, s[1]) for s in self.settings], bool)
        flags = np.array([row_flags(s[6], s[7], keep, False)
                          for s, keep in zip(self.settings, self.keeps)], np.uint32)
        flags = flags[self.groups]
        if self.counters is None:  # else the counters say which velocities exist
            flags |= np.where(self.initialized & ~self.keeps[self.groups],
                              np.uint32(VELOCITY_INITIALIZED), np.uint32(0))
        present = np.fromiter(self.present, bool, len(self.present))
        # A row no range reads must not count as initialized after a skipping step.
        flags |= np.where(present, np.uint32(0), np.uint32(KEEP_VELOCITY))
        range_groups = np.full(len(self.range_ends), NO_GROUP, np.int32)
        range_groups[np.asarray(self.param_ranges, np.intp)[present]] = np.flatnonzero(
            present)
        table = UpdateTable(rows[self.groups], flags, self.range_ends, range_groups,
                            CLASSIC if style == "classic" else 0)
        if self.device_table is None:
            self.device_table = device_table(self.backend, table, param_array)
        else:
            if not np.array_equal(range_groups, self.host_table.range_groups):
                self.backend.upload_into(self.device_table.range_groups, range_groups,
                                         param_array)
            self.device_table = device_table(self.backend, table, param_array,
                                             reuse=self.device_table)
        self.host_table = table
        self.table_stale = False
        self.awaiting_first = not (self.initialized | self.keeps[self.groups]).all()

    # -- counters of buffers that skip non-finite steps --

    def _write_counters(self, taken, skipped):
        """Counters in the buffer's memory (if any) holding `taken` and `skipped` steps
        (the base settle() counts from: STEP_COUNT keys stochastic rounding, so it keeps
        counting the optimizer's steps) and which velocities exist."""
        self.pending = np.zeros(len(self.params), bool)
        self.base = (taken, skipped)
        if self.counters is None:
            return
        counters = np.zeros(GROUP_SLOTS + len(self.params), np.int64)
        counters[[STEP_COUNT, SKIPPED_STEPS]] = taken, skipped
        counters[GROUP_SLOTS:] = self.initialized
        with self.arrays.context():
            self.backend.assign(self.counters, counters)

    def settle(self, state):
        """(taken, skipped, last skipped) since the last settle, from the counters (waits
        for the device); momentum buffers of first steps the device skipped leave
        `state`."""
        with self.arrays.context():
            counters = self.backend.to_numpy(self.counters).copy()
        initialized = counters[GROUP_SLOTS:] != 0
        for index in np.flatnonzero(self.pending & ~initialized):
            del state[self.params[index]]["momentum_buffer"]
            if not state[self.params[index]]:
                del state[self.params[index]]
        if (self.initialized != initialized).any():
            self.table_stale = True
        self.initialized = initialized
        self.pending = np.zeros(len(self.params), bool)
        taken, skipped = int(counters[STEP_COUNT]), int(counters[SKIPPED_STEPS])
        base, self.base = self.base, (taken, skipped)
        return taken - base[0], skipped - base[1], bool(counters[LAST_STEP_SKIPPED])

    def count_from(self, taken):
        """The optimizer's step count is `taken` (a state was loaded): the counters'
        STEP_COUNT, which keys stochastic rounding on the device, continues from it."""
        self._write_counters(taken, 0)


class _ArraysFor:
    """The flat tensors as the backend's arrays, and the context its launches run in:
    NumPy views on the CPU; on CUDA, torch's current stream of the buffers' device (CuPy
    launches on its current stream; numba-cuda on the stream an array names, and torch's
    __cuda_array_interface__ names none)."""

    def __init__(self, backend, device, tensors):
        self.backend, self.device, self.tensors = backend, device, tensors
        if device.type == "cpu":
            self.fixed = tuple(map(_numpy_view, tensors))
        elif backend.name == "cupy":
            import cupy
            with cupy.cuda.Device(self._index()):
                self.fixed = tuple(_StreamArray(t, None) if t.dtype == torch.bfloat16
                                   else cupy.asarray(t) for t in tensors)
        else:
            self.fixed = None  # numba-cuda: views naming the current stream, per step

    def _index(self):
        return self.device.index if self.device.index is not None else \
            torch.cuda.current_device()

    def _stream(self):
        return torch.cuda.current_stream(self.device).cuda_stream

    def context(self):
        if self.device.type == "cpu":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.backend.name == "cupy":
            import cupy
            stack.enter_context(cupy.cuda.Device(self._index()))
            stack.enter_context(cupy.cuda.ExternalStream(self._stream(), self._index()))
        else:
            from numba import cuda
            stack.enter_context(cuda.gpus[self._index()])
        return stack

    def step_arrays(self):
        if self.fixed is not None:
            return self.fixed
        stream = self._stream() or 1  # CAI v3: 1 is the legacy default stream, torch's 0
        return tuple(_StreamArray(t, stream) for t in self.tensors)


class _StreamArray:
    """A torch CUDA tensor's __cuda_array_interface__ (version 3) naming `stream`. torch
    gives bfloat16 tensors no interface: theirs is their bits' (an int16 view, described
    as "<u2") with `dtype` ml_dtypes' bfloat16, which the library's checks read
    (arrays.describe) and its kernels take as bits."""

    def __init__(self, tensor, stream):
        interface = tensor.__cuda_array_interface__ if tensor.dtype != torch.bfloat16 else \
            {**tensor.view(torch.int16).__cuda_array_interface__, "typestr": "<u2"}
        if tensor.dtype == torch.bfloat16:
            self.dtype = NUMPY_DTYPES[torch.bfloat16]
        self.__cuda_array_interface__ = {**interface, "version": 3, "stream": stream}


def _numpy_view(tensor):
    """A CPU tensor as a NumPy array over its memory: bfloat16 through its bits, as
    ml_dtypes' bfloat16 (NumPy has no torch.bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY_DTYPES[torch.bfloat16])
    return tensor.numpy()


def _real_dtype(dtype):
    """The dtype of the flat buffer that holds tensors of `dtype` (complex: real parts)."""
    return dtype.to_real() if dtype.is_complex else dtype


def _segment(flat, offset, like):
    """A view of `flat` from `offset` shaped like tensor `like`: with its strides where
    those cover its elements densely (channels_last, transposed), else contiguous;
    complex as view_as_complex of (real, imaginary) pairs."""
    if like.is_complex():
        pairs = flat[offset:offset + 2 * like.numel()].view(*like.shape, 2)
        return torch.view_as_complex(pairs)
    size = like.numel()
    strides = like.stride() if _covers_densely(like) else None
    piece = flat[offset:offset + size]
    return piece.view(like.shape) if strides is None else piece.as_strided(like.shape,
                                                                           strides)


def _covers_densely(tensor):
    """Whether the strides map the elements one to one onto numel() consecutive ones."""
    if tensor.numel() == 0:
        return False
    expected = 1
    for stride, size in sorted((t, s) for s, t in zip(tensor.shape, tensor.stride())
                               if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_disjoint(params, order):
    """Two parameters sharing memory cannot be packed apart: ValueError naming them."""
    spans = []
    for p in params:
        if p.numel():
            extent = 1 + sum((s - 1) * t for s, t in zip(p.shape, p.stride()))
            start = _data_ptr(p)
            spans.append((start, start + extent * p.element_size(), p))
    spans.sort(key=operator.itemgetter(0))
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            numbers = sorted(i for i, p in enumerate(order) if p is first or p is second)
            raise ValueError(f"Invalid params value: parameters {numbers[0]} and "
                             f"{numbers[1]} share memory; gpu_momentum.torch.SGD moves "
                             f"each parameter into its own segment of a flat buffer "
                             f"(tie shared weights by using one Parameter)")


def _replaceable(grad, view):
    """Whether `grad` may be replaced by `view` (same values) as the parameter's .grad: a
    standalone dense tensor no graph and no other buffer owns (autograd's, or one the
    user assigned). DDP's bucket views and gradients with a graph stay."""
    return (grad._base is None and not grad.requires_grad and grad.layout == torch.strided
            and grad.shape == view.shape and grad.dtype == view.dtype
            and grad.device == view.device)


def _detached(grad):
    """torch's zero_grad(set_to_none=False) on a gradient before it zeroes it."""
    if grad.grad_fn is not None:
        grad.detach_()
    else:
        grad.requires_grad_(False)
    return grad


def _zero_in_place(grad):
    _detached(grad).zero_()


def _bucket_hook(bucket, method, index):
    """A hook of parameter `index` that calls `bucket.<method>(index)`: the
    post-accumulate-grad hook ("received") or the gradient hook ("accumulating"). It holds
    its buffers weakly, and they remove it when they go; it is not saved with the
    tensor (torch.save of a model warns of a gradient hook that is not so marked)."""
    buffers = weakref.ref(bucket)

    @torch.utils.hooks.unserializable_hook
    def hook(tensor):
        bucket = buffers()
        if bucket is not None:
            getattr(bucket, method)(index)
    return hook


def _capture_check(device):
    """The function that tells whether the current stream is being captured into a CUDA
    graph, for buffers on `device`; None where no graph can be captured."""
    return torch.cuda.is_current_stream_capturing if device.type == "cuda" else None


def _remove_hooks(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


def _dense(tensor):
    return tensor.to_dense() if tensor.layout != torch.strided else tensor


def _check_state_tensor(name, tensor, p, view):
    """Raises unless `tensor` (state[p][name]: None, its view, or a loaded tensor) can be
    parameter p's `name`: a tensor of p's shape, complex where p is."""
    if tensor is None or tensor is view:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Invalid {name} value: a {type(tensor).__name__} for a parameter "
                        f"of shape {tuple(p.shape)} (a tensor)")
    if tensor.shape != p.shape:
        raise ValueError(f"Invalid {name} value: shape {tuple(tensor.shape)} for a "
                         f"parameter of shape {tuple(p.shape)}")
    if tensor.is_complex() != p.is_complex():
        raise TypeError(f"Invalid {name} value: dtype {tensor.dtype} for a parameter of "
                        f"dtype {p.dtype}")


def _number(value):
    """A group value as a Python float (a tensor's item: on CUDA that waits for it)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def _extras(state_dict):
    """The library's extras in `state_dict`, checked, or None (a torch.optim.SGD state)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"Invalid state_dict value: a {type(state_dict).__name__} (a dict "
                        f"from state_dict())")
    extras = state_dict.get(STATE_KEY)
    if extras is None:
        return None
    version = state_version("torch.SGD", extras.get("format") if isinstance(extras, dict)
                            else None, f"{STATE_KEY} format")
    keys = set(torch_extras_keys(version))
    if set(extras) != keys:
        raise ValueError(f"Invalid {STATE_KEY} value in state_dict: {extras!r} (a dict "
                         f"with keys {sorted(keys)})")
    if extras["style"] not in STYLES:
        raise ValueError(f"Invalid {STATE_KEY} style value: {extras['style']!r}")
    if version >= 4:
        if extras["precision"] not in PRECISION_NAMES:
            raise ValueError(f"Invalid {STATE_KEY} precision value: "
                             f"{extras['precision']!r}")
        check_seed(extras["seed"])
    for key in ("step_count", "skipped_steps"):
        value = extras[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {STATE_KEY} {key} value: {value!r} (an integer "
                             f">= 0)")
    return extras


def _has_momentum_buffers(state_dict):
    state = state_dict.get("state", {})
    return any(isinstance(entry, dict) and entry.get("momentum_buffer") is not None
               for entry in state.values())

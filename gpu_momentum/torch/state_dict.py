"""The library's part of `SGD.state_dict()`: the extras it saves beside torch.optim.SGD's
state and param groups (their versions are gpu_momentum.state_format's), the checks a state must pass to load, and
the 16-bit parameters' float32 state that torch's load_state_dict would cast."""

import itertools

import torch

from ..hyperparams import STYLES
from ..precision import (PRECISION_BUFFER_NAMES, check_precision_name, check_same_precision,
                        check_seed)
from ..state_format import STATE_KEY, STATE_VERSION, state_version, torch_extras_keys
from .float8_state import adopt_velocities, check_float8_extras, exact_velocities, \
    export_float8
from .state import edits_of, plain, tracked
from .tensors import dense

# What torch.optim.SGD.__setstate__ fills into the param groups of an older checkpoint.
TORCH_GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None,
                        "differentiable": False, "fused": False}
# The library's own per-group options, kept in `defaults` (and so in every group) only
# when given other values: with the defaults the groups hold exactly torch's keys.
EXTRA_GROUP_DEFAULTS = {"l1": 0.0, "decoupled_weight_decay": False}


def extras_of(style, precision, seed, step_count, skipped_steps):
    """The extras `SGD.state_dict()` saves under STATE_KEY (their format: the state
    version, gpu_momentum.state_format.STATE_VERSION)."""
    return {"format": STATE_VERSION, "style": style, "precision": precision, "seed": seed,
            "step_count": step_count, "skipped_steps": skipped_steps}


def read_extras(state_dict):
    """The library's extras in `state_dict`, checked, or None (a torch.optim.SGD state)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"Invalid state_dict value: a {type(state_dict).__name__} (a dict "
                        f"from state_dict())")
    extras = state_dict.get(STATE_KEY)
    if extras is None:
        return None
    version = state_version("torch.SGD", extras.get("format") if isinstance(extras, dict)
                            else None, f"{STATE_KEY} format")
    if version >= 4:
        check_float8_extras(extras)
    keys = set(torch_extras_keys(version, extras.get("velocity_dtype")))
    if set(extras) != keys:
        raise ValueError(f"Invalid {STATE_KEY} value in state_dict: {extras!r} (a dict "
                         f"with keys {sorted(keys)})")
    if extras["style"] not in STYLES:
        raise ValueError(f"Invalid {STATE_KEY} style value: {extras['style']!r}")
    if version >= 4:
        check_precision_name(extras["precision"], f"{STATE_KEY} precision")
        check_seed(extras["seed"])
    for key in ("step_count", "skipped_steps"):
        value = extras[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {STATE_KEY} {key} value: {value!r} (an integer "
                             f">= 0)")
    return extras


def check_loadable(state_dict, extras, style, precision):
    """Raises unless an optimizer of `style` and `precision` can load `state_dict`, whose
    extras (read_extras) are `extras`: a state that holds momentum buffers must be of
    the optimizer's style."""
    saved_style = "torch" if extras is None else extras["style"]
    # A state that names its precision must have this optimizer's (torch.optim.SGD's
    # and version 2's name none, and hold no precision buffers: those start afresh).
    check_same_precision(precision if extras is None else
                         extras.get("precision", precision), precision)
    if saved_style != style and _has_momentum_buffers(state_dict):
        source = ("torch.optim.SGD state" if extras is None else
                  f"state of a style={saved_style!r} optimizer")
        raise ValueError(f"Invalid state_dict value: a {source} holds {saved_style}-style "
                         f"momentum buffers, but this optimizer has style={style!r} (the "
                         f"two velocities differ)")


def restore_uncast(state_dict, param_groups, state, packed):
    """torch's load_state_dict casts every floating-point state tensor to its
    parameter's dtype: a float32 momentum buffer or master copy of a 16-bit parameter
    would lose its low bits. They take the saved values again, exactly (checked: the
    shapes are the parameters'). `state` and `param_groups`: the optimizer's, loaded;
    `packed`: whether its buffers exist (else the tensors are kept, to be packed)."""
    saved = state_dict["state"]
    ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in param_groups)
    for saved_id, p in zip(ids, params):
        entry, current = saved.get(saved_id), state.get(p)
        if not entry or not current:
            continue
        for key in ("momentum_buffer", *PRECISION_BUFFER_NAMES.values()):
            value, loaded = entry.get(key), current.get(key)
            if not isinstance(value, torch.Tensor) or loaded is None:
                continue
            if not packed:  # packed later, from the state
                current[key] = value.detach().to(p.device, copy=True)
            else:
                loaded.copy_(dense(value))


def _has_momentum_buffers(state_dict):
    state = state_dict.get("state", {})
    return any(isinstance(entry, dict) and entry.get("momentum_buffer") is not None
               for entry in state.values())


class SavedState:
    """SGD's pickling and state-dict methods (a base class of SGD, before
    torch.optim.Optimizer): torch's, with the flat buffers settled first, opt.state kept
    tracked, and the library's extras saved under STATE_KEY and checked on loading."""

    def __getstate__(self):
        self._settle()
        return {**super().__getstate__(), "_style": self._style,
                "_precision": self.precision, "_seed": self.seed,
                "_backend_choice": self._backend_choice,
                "_skip_nonfinite": self._skip_nonfinite, "_capturable": self.capturable,
                "_velocity_dtype": self.velocity_dtype_name,
                "_counts": list(self._counts),
                "_last_step_skipped": self._last_step_skipped}

    def __setstate__(self, state):
        """Called by load_state_dict (with the new state and groups) and by unpickling
        and copy.deepcopy (a copy packs its new parameters at its first step)."""
        super().__setstate__(state)
        self.state = tracked(self.state)
        self._state_seen = edits_of(self.state)
        for group in self.param_groups:
            for key, default in TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, default)
            for key in EXTRA_GROUP_DEFAULTS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
        layout = self.__dict__.get("_layout")
        if layout is None:
            self._layout = None
            self._step_supports_amp_scaling = not self._through_autograd and \
                self._reads_scaler_values(
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
        "gpu_momentum" (format 2: style, precision, seed and the step counts), which
        torch.optim.SGD ignores (it keeps the extra per-parameter tensors as state). With
        an FP8 velocity each momentum_buffer is the decoded velocity (a new float32
        tensor) and the extras hold the codes and scales too (float8_state)."""
        self._settle()
        state_dict = super().state_dict()
        if isinstance(state_dict.get("state"), dict):  # torch's dicts, not opt.state's
            state_dict["state"] = plain(state_dict["state"])
        state_dict[STATE_KEY] = extras_of(self._style, self.precision, self.seed,
                                          *self._counts)
        if self.velocity_dtype_name is not None:
            export_float8(state_dict, state_dict[STATE_KEY])
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict):
        """Loads a state dict of this optimizer or of torch.optim.SGD: momentum buffers are
        copied into the flat velocity (cast to its dtype and device); with an FP8 velocity
        an FP8 state's codes and scales are taken bit for bit and other momentum buffers
        quantized (float8_state). Checked before
        anything changes; a rejected state leaves the optimizer as it was."""
        extras = read_extras(state_dict)
        check_loadable(state_dict, extras, self._style, self.precision)
        velocities = {} if self.velocity_dtype_name is None else exact_velocities(
            state_dict, extras, self.param_groups)
        self._settle()
        before = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.state, self.param_groups = before
            raise
        if velocities:
            layout = self.__dict__.get("_layout")
            adopt_velocities(self.state, velocities, [] if layout is None else
                             layout.buckets)
        if not self._through_autograd:  # (which keeps torch's casts)
            restore_uncast(state_dict, self.param_groups, self.state,
                           self.__dict__.get("_layout") is not None)
        if extras is not None:
            self._counts = [extras["step_count"], extras["skipped_steps"]]
            self._seed = extras.get("seed", 0)
        self._last_step_skipped = False
        layout = self.__dict__.get("_layout")
        for bucket in [] if layout is None else layout.buckets:
            bucket.count_from(self._counts[0])
        self._state_seen = edits_of(self.state)

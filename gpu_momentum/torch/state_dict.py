"""The library's part of `SGD.state_dict()`: the extras it saves beside torch.optim.SGD's
state and param groups (their versions are gpu_momentum.state_format's), the checks a state must pass to load, and
the 16-bit parameters' float32 state that torch's load_state_dict would cast."""

import itertools

import torch

from ..hyperparams import STYLES
from ..precision import (PRECISION_BUFFER_NAMES, check_precision_name, check_same_precision,
                        check_seed)
from ..state_format import STATE_KEY, STATE_VERSION, state_version, torch_extras_keys
from .tensors import dense


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
    keys = set(torch_extras_keys(version))
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

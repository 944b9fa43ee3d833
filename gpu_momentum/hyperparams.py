"""Hyperparameters: validated once, in one place, with PyTorch-style messages."""

import dataclasses
import math
import numbers

import numpy as np

from .kernels.layout import (CLASSIC, KEEP_VELOCITY, MAXIMIZE, NESTEROV,
                             VELOCITY_INITIALIZED, GroupRow)

STYLES = ("classic", "torch")


def _invalid(name, value, rule):
    return f"Invalid {name} value: {value!r} ({name} must be {rule})"


def _real(name, value):
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        raise TypeError(_invalid(name, value, "a real number"))
    return float(value)


def flag(name, value):
    """value as a bool, after checking that it is one (a NumPy bool too)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(_invalid(name, value, "True or False"))
    return bool(value)


def inverse_grad_scale(grad_scale):
    """1 / grad_scale, after checking that grad_scale is a finite number > 0."""
    grad_scale = _real("grad_scale", grad_scale)
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(_invalid("grad_scale", grad_scale, "finite and > 0"))
    return 1.0 / grad_scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """One consistent set of update hyperparameters; invalid combinations cannot exist."""

    lr: float
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    style: str = "classic"
    l1: float = 0.0
    decoupled_weight_decay: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        for name in ("lr", "momentum", "dampening", "weight_decay", "l1"):
            set_(name, _real(name, getattr(self, name)))
        for name in ("nesterov", "maximize", "decoupled_weight_decay"):
            set_(name, flag(name, getattr(self, name)))
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(_invalid("lr", self.lr, "finite and >= 0"))
        if not 0 <= self.momentum < 1:
            raise ValueError(_invalid("momentum", self.momentum, "in [0, 1)"))
        if not 0 <= self.dampening <= 1:
            raise ValueError(_invalid("dampening", self.dampening, "in [0, 1]"))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(_invalid("weight_decay", self.weight_decay, "finite and >= 0"))
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise ValueError(_invalid("l1", self.l1, "finite and >= 0"))
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(_invalid("style", self.style, f"one of {STYLES}"))
        if self.nesterov and self.momentum == 0:
            raise ValueError(f"Invalid nesterov value: True (nesterov needs momentum > 0, "
                             f"got momentum={self.momentum!r})")
        if self.nesterov and self.style == "torch" and self.dampening != 0:
            raise ValueError(f"Invalid nesterov value: True (torch-style nesterov needs "
                             f"dampening == 0, got dampening={self.dampening!r})")

    @property
    def keeps_velocity(self):
        """Whether a step leaves the velocity alone (torch style with momentum 0, as
        PyTorch leaves its momentum buffer): it is then neither read nor initialized."""
        return self.style == "torch" and self.momentum == 0

    def group_row(self, compute_dtype):
        """This group's row of the kernels' scalar table (kernels.layout.GroupRow), in the
        compute dtype. The host folds the two kinds of weight decay into weight_decay
        (coupled) and decay (decoupled, 1 - lr * weight_decay)."""
        scalar = np.dtype(compute_dtype).type
        lr, weight_decay = scalar(self.lr), scalar(self.weight_decay)
        decoupled = self.decoupled_weight_decay and self.weight_decay != 0
        return GroupRow(lr=lr, momentum=scalar(self.momentum),
                        grad_coeff=scalar(1) - scalar(self.dampening),
                        weight_decay=scalar(0) if decoupled else weight_decay,
                        l1=scalar(self.l1),
                        decay=scalar(1) - lr * weight_decay if decoupled else scalar(1))

    def group_flags(self, velocity_initialized):
        """This group's flag bits (kernels.layout.FLAGS) for a step whose velocity is
        initialized already or not (its first step)."""
        bits = (NESTEROV if self.nesterov else 0) | (MAXIMIZE if self.maximize else 0)
        if self.keeps_velocity:
            return bits | KEEP_VELOCITY
        return bits | VELOCITY_INITIALIZED if velocity_initialized else bits

    def launch_flags(self):
        """The launch-wide flag bits: the style, one per launch."""
        return CLASSIC if self.style == "classic" else 0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)

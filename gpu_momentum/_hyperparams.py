"""Hyperparameters: validated once, in one place, with PyTorch-style messages."""

import dataclasses
import math
import numbers

STYLES = ("classic", "torch")


def _invalid(name, value, rule):
    return f"Invalid {name} value: {value!r} ({name} must be {rule})"


def _real(name, value):
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        raise TypeError(_invalid(name, value, "a real number"))
    return float(value)


def _flag(name, value):
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(_invalid(name, value, "True or False"))
    return bool(value)


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """One consistent set of update hyperparameters; invalid combinations cannot exist."""

    lr: float
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    style: str = "classic"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            set_(name, _real(name, getattr(self, name)))
        for name in ("nesterov", "maximize"):
            set_(name, _flag(name, getattr(self, name)))
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(_invalid("lr", self.lr, "finite and >= 0"))
        if not 0 <= self.momentum < 1:
            raise ValueError(_invalid("momentum", self.momentum, "in [0, 1)"))
        if not 0 <= self.dampening <= 1:
            raise ValueError(_invalid("dampening", self.dampening, "in [0, 1]"))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(_invalid("weight_decay", self.weight_decay, "finite and >= 0"))
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(_invalid("style", self.style, f"one of {STYLES}"))
        if self.nesterov and self.momentum == 0:
            raise ValueError(f"Invalid nesterov value: True (nesterov needs momentum > 0, "
                             f"got momentum={self.momentum!r})")
        if self.nesterov and self.style == "torch" and self.dampening != 0:
            raise ValueError(f"Invalid nesterov value: True (torch-style nesterov needs "
                             f"dampening == 0, got dampening={self.dampening!r})")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)

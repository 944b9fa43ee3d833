"""Hyperparameters: validated once, in one place, with PyTorch-style messages."""

import dataclasses
import functools
import math
import numbers

import numpy as np

from .arrays import compute_dtype
from .kernels.layout import (CLASSIC, KEEP_VELOCITY, MAXIMIZE, NESTEROV,
                             VELOCITY_INITIALIZED, GroupRow)

STYLES = ("classic", "torch")


def shown(value):
    """repr(value), but an integer too large for a float (10**400) in short scientific form:
    its full digits say nothing more (and past 4300 digits repr refuses)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
            abs(int(value)) >= 2**1024:
        magnitude = abs(int(value))
        exponent = int(math.log10(magnitude)) - 4
        digits = magnitude // 10**exponent if exponent > 0 else magnitude
        while digits >= 10**5:
            digits, exponent = digits // 10, exponent + 1
        text = str(digits)
        sign = "-" if value < 0 else ""
        return f"{sign}{text[0]}.{text[1:]}e+{exponent + len(text) - 1}"
    return repr(value)


def _invalid(name, value, rule):
    return f"Invalid {name} value: {shown(value)} ({name} must be {rule})"


@functools.cache
def _largest(dtype):
    return float(np.finfo(dtype).max)


@functools.cache
def _smallest(dtype):
    """The smallest positive normal number of `dtype`."""
    return float(np.finfo(dtype).tiny)


def _real(name, value):
    """value as a float, after checking that it is a real number (a NumPy one too) that a
    float holds."""
    if isinstance(value, (bool, str, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(_invalid(name, value, "a real number"))
    try:
        return float(value)
    except OverflowError:  # an integer past the largest float
        raise ValueError(_invalid(name, value, f"at most {_largest(np.float64)!r}, the "
                                               f"largest float64")) from None


def flag(name, value):
    """value as a bool, after checking that it is one (a NumPy bool too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(_invalid(name, value, "True or False"))
    return bool(value)


class _Why:
    """The reason of a rule of the compute dtype, formatted only when a message shows it
    (checks that pass are on every call's path)."""

    def __init__(self, compute, param_dtype):
        self.compute, self.param_dtype = compute, param_dtype

    def __str__(self):
        return f"the update computes in {self.compute} for {self.param_dtype} parameters"


@functools.cache
def _computes_in(param_dtype):
    """(compute dtype, why) for parameters of `param_dtype`: why names the rule's reason."""
    param_dtype = np.dtype(param_dtype)
    compute = compute_dtype(param_dtype)
    return compute, _Why(compute, param_dtype)


@functools.cache
def _compute_and_largest(param_dtype):
    """(compute dtype, its largest finite value) for parameters of `param_dtype`."""
    compute = _computes_in(param_dtype)[0]
    return compute, _largest(compute)


def inverse_grad_scale(grad_scale, param_dtype):
    """1 / grad_scale, after checking that grad_scale is a finite number > 0 whose inverse
    is a finite, normal number in the compute dtype of `param_dtype` parameters (the
    update multiplies the gradient by it; GPUs flush subnormal float32 to 0)."""
    grad_scale = _real("grad_scale", grad_scale)
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(_invalid("grad_scale", grad_scale, "finite and > 0"))
    compute, why = _computes_in(param_dtype)
    inverse, largest, smallest = 1.0 / grad_scale, _largest(compute), _smallest(compute)
    if inverse > largest:
        raise ValueError(_invalid("grad_scale", grad_scale,
                                  f"at least {1 / largest!r}, so that 1 / grad_scale is at "
                                  f"most {largest!r}, the largest {compute}: {why}"))
    if inverse < smallest:
        raise ValueError(_invalid("grad_scale", grad_scale,
                                  f"at most {1 / smallest!r}, so that 1 / grad_scale is at "
                                  f"least {smallest!r}, the smallest normal {compute} "
                                  f"(below it the gradient vanishes): {why}"))
    return inverse


def check_row_fits(lr, momentum, dampening, weight_decay, l1, decoupled_weight_decay,
                   param_dtype):
    """Raises ValueError unless the compute dtype of `param_dtype` parameters holds the
    table row (`table_row`) of these values, which are not otherwise checked (torch.optim.SGD
    takes a momentum above 1, a negative dampening or lr): each of lr, momentum,
    1 - dampening, weight_decay and l1 at most its largest finite value in magnitude, and
    with decoupled weight decay a finite lr * weight_decay, so that finite inputs never
    turn into inf there. Hyperparameters.check_dtype says the same of checked values."""
    compute, why = _computes_in(param_dtype)
    largest = _largest(compute)
    for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                        ("weight_decay", weight_decay), ("l1", l1)):
        held = 1 - value if name == "dampening" else value
        if abs(held) > largest:
            rule = f"at most {largest!r} in magnitude, the largest {compute}: {why}"
            if name == "dampening":
                rule = f"such that 1 - dampening is {rule}"
            raise ValueError(_invalid(name, value, rule))
    if decoupled_weight_decay and not _product_is_finite(lr, weight_decay, compute):
        raise ValueError(_decay_product_message(lr, weight_decay, largest, compute, why))


def _product_is_finite(lr, weight_decay, compute):
    with np.errstate(over="ignore"):
        return bool(np.isfinite(compute.type(lr) * compute.type(weight_decay)))


def _decay_product_message(lr, weight_decay, largest, compute, why):
    return (f"Invalid lr * weight_decay value: {lr!r} * {weight_decay!r} (with "
            f"decoupled_weight_decay, parameters are multiplied by 1 - lr * weight_decay, "
            f"so lr * weight_decay must be at most {largest!r}, the largest {compute}: "
            f"{why})")


def keeps_velocity(style, momentum):
    """Whether a step leaves the velocity alone: torch style with momentum 0, as PyTorch
    leaves its momentum buffer (neither read nor initialized)."""
    return style == "torch" and momentum == 0


def table_row(lr, momentum, dampening, weight_decay, l1, decoupled_weight_decay,
              compute_dtype):
    """One group's row of the kernels' scalar table (kernels.layout.GroupRow), in the
    compute dtype, from values that are not checked here (Hyperparameters checks its own;
    gpu_momentum.torch takes whatever torch.optim.SGD takes). The two kinds of weight decay
    fold into weight_decay (coupled) and decay (decoupled, 1 - lr * weight_decay)."""
    scalar = np.dtype(compute_dtype).type
    lr, weight_decay = scalar(lr), scalar(weight_decay)
    decoupled = decoupled_weight_decay and weight_decay != 0
    return GroupRow(lr=lr, momentum=scalar(momentum),
                    grad_coeff=scalar(1) - scalar(dampening),
                    weight_decay=scalar(0) if decoupled else weight_decay,
                    l1=scalar(l1),
                    decay=scalar(1) - lr * weight_decay if decoupled else scalar(1))


def row_flags(nesterov, maximize, keeps_velocity, velocity_initialized):
    """A group's flag bits (kernels.layout.FLAGS): NESTEROV, MAXIMIZE, and KEEP_VELOCITY
    for a group that leaves its velocity alone, else VELOCITY_INITIALIZED once a step has
    written the velocity (not on its first step)."""
    bits = (NESTEROV if nesterov else 0) | (MAXIMIZE if maximize else 0)
    if keeps_velocity:
        return bits | KEEP_VELOCITY
    return bits | VELOCITY_INITIALIZED if velocity_initialized else bits


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

    def check_dtype(self, param_dtype):
        """Raises ValueError unless the compute dtype of `param_dtype` parameters (float32
        for float16 and float32, float64 for float64) holds every value of this group's
        table row, so that finite inputs never turn into inf or NaN there: lr,
        weight_decay and l1 at most its largest finite value, momentum still below 1 once
        rounded, and with decoupled weight decay a finite lr * weight_decay (p is
        multiplied by 1 - lr * weight_decay). 1 - dampening always fits; for 1 /
        grad_scale see inverse_grad_scale."""
        compute, why = _computes_in(param_dtype)
        largest = _largest(compute)
        for name in ("lr", "weight_decay", "l1"):
            value = getattr(self, name)
            if value > largest:
                raise ValueError(_invalid(name, value, f"at most {largest!r}, the largest "
                                                       f"{compute}: {why}"))
        if compute.type(self.momentum) >= 1:
            below_one = float(np.nextafter(compute.type(1), compute.type(0)))
            raise ValueError(_invalid("momentum", self.momentum,
                                      f"at most {below_one!r}, the largest {compute} below "
                                      f"1 (it rounds to 1.0 in {compute}): {why}"))
        if self.decoupled_weight_decay and not _product_is_finite(self.lr, self.weight_decay,
                                                                  compute):
            raise ValueError(_decay_product_message(self.lr, self.weight_decay, largest,
                                                    compute, why))
        return self

    def with_lr(self, lr, param_dtype):
        """`replace(lr=lr).check_dtype(param_dtype)`, on a schedule's path: a float lr
        that every rule accepts (finite, >= 0, at most the compute dtype's largest, and
        with decoupled weight decay a finite lr * weight_decay) is checked alone, the other
        values being this checked group's; anything else takes the full checks, which
        raise as they do at construction."""
        compute, largest = _compute_and_largest(param_dtype)
        if type(lr) is float and 0 <= lr <= largest and (
                not self.decoupled_weight_decay or _product_is_finite(
                    lr, self.weight_decay, compute)):
            changed = object.__new__(Hyperparameters)
            values = changed.__dict__
            values.update(self.__dict__)
            values["lr"] = lr
            return changed
        return self.replace(lr=lr).check_dtype(param_dtype)

    @property
    def keeps_velocity(self):
        """Whether a step leaves the velocity alone (torch style with momentum 0, as
        PyTorch leaves its momentum buffer): it is then neither read nor initialized."""
        return keeps_velocity(self.style, self.momentum)

    def group_row(self, compute_dtype):
        """This group's row of the kernels' scalar table (`table_row`)."""
        return table_row(self.lr, self.momentum, self.dampening, self.weight_decay, self.l1,
                         self.decoupled_weight_decay, compute_dtype)

    def group_flags(self, velocity_initialized):
        """This group's flag bits (`row_flags`) for a step whose velocity is initialized
        already or not (its first step)."""
        return row_flags(self.nesterov, self.maximize, self.keeps_velocity,
                         velocity_initialized)

    def launch_flags(self):
        """The launch-wide flag bits: the style, one per launch."""
        return CLASSIC if self.style == "classic" else 0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)

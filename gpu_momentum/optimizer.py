"""The public update: `momentum_step` (stateless) and `MomentumSGD` (owns the velocity)."""

import numbers

import numpy as np

from ._arrays import check_param, check_update, describe, state_dtype, type_name
from ._backends import select_backend
from ._hyperparams import Hyperparameters, _flag, inverse_grad_scale
from .flat import FlatParams
from .kernels.elementwise import (LAST_STEP_SKIPPED, SKIPPED_STEPS, STEP_COUNT,
                                  VELOCITY_INITIALIZED)

STATE_FORMAT = 1


def _check_arrays(backend, param, grad, velocity):
    check_update(describe("param", param), describe("grad", grad),
                 describe("velocity", velocity), backend.dtypes, backend.name)


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Invalid {name} value: {value!r} ({name} must be an integer "
                         f">= 0)")
    return int(value)


def momentum_step(param, grad, velocity, *, lr, momentum=0.9, dampening=0.0,
                  weight_decay=0.0, nesterov=False, maximize=False, style="classic",
                  first_step=False, grad_scale=1.0, backend=None):
    """One fused in-place momentum update of `param` and `velocity`.

    With g = grad / grad_scale (computed as grad * (1 / grad_scale); grad_scale is the
    loss scale of mixed-precision training, 1 by default) and
    g' = (-g if maximize else g) + weight_decay * param:

    - style="classic" (Sutskever et al. 2013, Keras): velocity = momentum*velocity - lr*g',
      then param += velocity (nesterov: param += momentum*velocity - lr*g').
    - style="torch" (torch.optim.SGD, Optax): velocity = momentum*velocity
      + (1 - dampening)*g', then param -= lr*velocity (nesterov: param -= lr*(g'
      + momentum*velocity)).

    first_step=True means the old velocity is not read (it may be uninitialised): classic
    starts from velocity 0, torch sets velocity = g' without dampening, as PyTorch does on
    its first step. Torch style with momentum 0 is param -= lr*g' and leaves the velocity
    as it is, as PyTorch leaves its momentum buffer.

    Arrays are contiguous, of one shape, with grad of param's dtype and a velocity of
    param's dtype (float32 for float16 params). backend=None picks the best backend for the
    arrays' type. Every argument is checked before anything is written.
    """
    hyper = Hyperparameters(lr, momentum, dampening, weight_decay, nesterov, maximize,
                            style)
    first_step = _flag("first_step", first_step)
    inv_grad_scale = inverse_grad_scale(grad_scale)
    backend = select_backend(backend, param)
    _check_arrays(backend, param, grad, velocity)
    backend.step(param, grad, velocity, hyper, first_step, inv_grad_scale)


class MomentumSGD:
    """Momentum SGD over one flat parameter buffer, one fused kernel launch per step.

    Formulas as in `momentum_step` (style="classic" by default; style="torch" tracks
    torch.optim.SGD step for step). The velocity starts at zero and the first `step()` does
    not read it: classic starts from 0, torch style sets it to the gradient, skipping
    dampening. In torch style that first step is the first one with momentum > 0, since
    PyTorch creates its momentum buffer only then.

    params: a FlatParams (then `step()` without arguments uses its gradient buffer) or one
    contiguous array. lr, momentum, dampening, weight_decay, nesterov and maximize may be
    changed between steps (schedules); each change is validated and costs no recompile.

    skip_nonfinite=True: a step whose (scaled) gradient holds a NaN or inf changes neither
    params nor velocity, does not count in `step_count` (a skipped first step leaves the
    next one first), and counts in `skipped_steps`; `last_step_skipped` tells. The check
    and the skip run in the backend's memory without waiting for the device; reading
    those counters then waits for it.
    """

    def __init__(self, params, *, lr, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, style="classic", skip_nonfinite=False,
                 backend="auto"):
        self._hyper = Hyperparameters(lr, momentum, dampening, weight_decay, nesterov,
                                      maximize, style)
        self.skip_nonfinite = _flag("skip_nonfinite", skip_nonfinite)
        self.flat = params if isinstance(params, FlatParams) else None
        self.param = params.data if self.flat is not None else params
        self._backend = select_backend(backend, self.param)
        info = describe("params", self.param)
        check_param(info, self._backend.dtypes, self._backend.name)
        self.velocity = self._backend.zeros(info.shape, state_dtype(info.dtype))
        self._counters = self._new_counters(0, False, 0)

    def _new_counters(self, step_count, velocity_initialized, skipped_steps):
        counters = np.array([0] * 4, np.int64)
        counters[[STEP_COUNT, VELOCITY_INITIALIZED, SKIPPED_STEPS]] = (
            step_count, velocity_initialized, skipped_steps)
        return self._backend.asarray(counters) if self.skip_nonfinite else counters

    def _counter(self, index):
        counters = self._counters
        if self.skip_nonfinite:
            counters = self._backend.to_numpy(counters)
        return int(counters[index])

    step_count = property(lambda self: self._counter(STEP_COUNT),
                          doc="Steps taken (skipped steps not counted).")
    velocity_initialized = property(
        lambda self: bool(self._counter(VELOCITY_INITIALIZED)),
        doc="Whether a step has written the velocity (the next step is not a first step).")
    skipped_steps = property(lambda self: self._counter(SKIPPED_STEPS),
                             doc="Steps skipped for a non-finite gradient.")
    last_step_skipped = property(lambda self: bool(self._counter(LAST_STEP_SKIPPED)),
                                 doc="Whether the latest step was skipped.")

    @property
    def backend(self):
        """Name of the backend running the updates."""
        return self._backend.name

    @property
    def style(self):
        return self._hyper.style

    def _set(self, **change):
        self._hyper = self._hyper.replace(**change)

    lr = property(lambda self: self._hyper.lr, lambda self, v: self._set(lr=v))
    momentum = property(lambda self: self._hyper.momentum,
                        lambda self, v: self._set(momentum=v))
    dampening = property(lambda self: self._hyper.dampening,
                         lambda self, v: self._set(dampening=v))
    weight_decay = property(lambda self: self._hyper.weight_decay,
                            lambda self, v: self._set(weight_decay=v))
    nesterov = property(lambda self: self._hyper.nesterov,
                        lambda self, v: self._set(nesterov=v))
    maximize = property(lambda self: self._hyper.maximize,
                        lambda self, v: self._set(maximize=v))

    def step(self, grad=None, *, grad_scale=1.0):
        """Updates the parameters with `grad` (default: the FlatParams' gradient buffer)
        divided by `grad_scale` (the loss scale, inside the same fused pass)."""
        inv_grad_scale = inverse_grad_scale(grad_scale)
        if grad is None:
            if self.flat is None:
                raise TypeError("grad is None, but params is a single array: pass grad "
                                "(only FlatParams carry their own gradient buffer)")
            grad = self.flat.grad
        backend, hyper, counters = self._backend, self._hyper, self._counters
        _check_arrays(backend, self.param, grad, self.velocity)
        if self.skip_nonfinite:
            backend.step_skipping_nonfinite(self.param, grad, self.velocity, hyper,
                                            inv_grad_scale, counters)
            return
        backend.step(self.param, grad, self.velocity, hyper,
                     not counters[VELOCITY_INITIALIZED], inv_grad_scale)
        counters[STEP_COUNT] += 1
        counters[VELOCITY_INITIALIZED] |= hyper.initializes_velocity

    def state_dict(self):
        """A plain dict: format version, hyperparameters, step count and a velocity copy."""
        return {"format": STATE_FORMAT, **self._hyper.as_dict(),
                "step_count": self.step_count,
                "velocity_initialized": self.velocity_initialized,
                "skipped_steps": self.skipped_steps,
                "velocity": self._backend.copy(self.velocity)}

    def load_state_dict(self, state):
        """Restores `state_dict()` output; validates everything before changing anything."""
        self._restore(state)

    def save(self, path):
        """Writes a checkpoint atomically (see `gpu_momentum.checkpoint`)."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self, path)

    def load(self, path):
        """Restores params and state from `save(path)`, all or nothing."""
        from .checkpoint import load_checkpoint
        load_checkpoint(self, path)

    def _restore(self, state, param=None):
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type_name(state)}")
        expected = set(self.state_dict_keys())
        if set(state) != expected:
            raise ValueError(f"state has keys {sorted(state)}, expected {sorted(expected)}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"Invalid format value: {state['format']!r} (this version "
                             f"reads format {STATE_FORMAT})")
        hyper = Hyperparameters(**{k: state[k] for k in Hyperparameters.__dataclass_fields__})
        if hyper.style != self.style:
            raise ValueError(f"Invalid style value: {hyper.style!r} (this optimizer uses "
                             f"style {self.style!r}; velocities of the two styles differ)")
        counters = self._new_counters(
            _count("step_count", state["step_count"]),
            _flag("velocity_initialized", state["velocity_initialized"]),
            _count("skipped_steps", state["skipped_steps"]))
        velocity = self._like("velocity", state["velocity"], self.velocity)
        if param is not None:
            param = self._like("param", param, self.param)
        # Everything is checked: from here on nothing can fail half way.
        self._backend.assign(self.velocity, velocity)
        if param is not None:
            self._backend.assign(self.param, param)
        self._hyper = hyper
        self._counters = counters

    def _like(self, name, array, target):
        """`array` in this backend's memory, checked to have `target`'s shape and dtype."""
        describe(name, array)
        array = self._backend.asarray(array)
        have, want = describe(name, array), describe(name, target)
        if (have.shape, have.dtype) != (want.shape, want.dtype):
            raise ValueError(f"{name} has shape {have.shape} and dtype {have.dtype}; "
                             f"this optimizer needs shape {want.shape}, dtype {want.dtype}")
        return array

    @staticmethod
    def state_dict_keys():
        return ("format", *Hyperparameters.__dataclass_fields__, "step_count",
                "velocity_initialized", "skipped_steps", "velocity")

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self._hyper.as_dict().items())
        return (f"MomentumSGD({fields}, backend={self.backend!r}, "
                f"step_count={self.step_count})")

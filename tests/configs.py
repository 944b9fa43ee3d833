"""The shared tables: optimizer configurations, sizes and bad inputs.

No entry names a backend: every backend's tests run over all of them.
"""

import numpy as np
import pytest

STEPS = 7
SIZES = (0, 1, 3, 1023, 278011)

# Learning rate (and, for some, momentum) changes between steps, as schedules do.
LR_SCHEDULE = (0.05, 0.05, 0.02, 0.1, 0.1, 0.01, 0.03)
MOMENTUM_SCHEDULE = (0.9, 0.9, 0.5, 0.5, 0.99, 0.0, 0.8)


def _config(id_, style, schedule_momentum=False, **hyper):
    config = {"style": style, "lr": LR_SCHEDULE, **hyper}
    if schedule_momentum:
        config["momentum"] = MOMENTUM_SCHEDULE
    return pytest.param(config, id=id_)


CONFIGS = [
    _config("classic", "classic", momentum=0.9),
    _config("classic-nesterov", "classic", momentum=0.9, nesterov=True),
    _config("classic-wd", "classic", momentum=0.9, weight_decay=0.01),
    _config("classic-maximize", "classic", momentum=0.9, maximize=True),
    _config("classic-nesterov-wd-maximize", "classic", momentum=0.5, nesterov=True,
            weight_decay=0.1, maximize=True),
    _config("classic-no-momentum", "classic", momentum=0.0),
    _config("classic-momentum-schedule", "classic", schedule_momentum=True,
            weight_decay=0.001),
    _config("torch", "torch", momentum=0.9),
    _config("torch-dampening", "torch", momentum=0.9, dampening=0.3),
    _config("torch-nesterov", "torch", momentum=0.9, nesterov=True),
    _config("torch-wd", "torch", momentum=0.9, weight_decay=0.01),
    _config("torch-maximize-dampening", "torch", momentum=0.7, dampening=0.5,
            maximize=True),
    _config("torch-nesterov-wd-maximize", "torch", momentum=0.5, nesterov=True,
            weight_decay=0.1, maximize=True),
    _config("torch-no-momentum-dampening", "torch", momentum=0.0, dampening=0.5),
    _config("torch-momentum-schedule", "torch", schedule_momentum=True, dampening=0.1),
]


def hyper_at(config, step):
    """The keyword arguments of step `step` (0-based) of a configuration."""
    return {k: (v[step] if isinstance(v, tuple) else v) for k, v in config.items()}


def problem(size, steps=STEPS, dtype=np.float64, seed=0):
    """Initial params and one gradient per step, in float64 (cast by the caller)."""
    rng = np.random.default_rng([seed, size])
    param = rng.standard_normal(size).astype(dtype)
    grads = [rng.standard_normal(size).astype(dtype) for _ in range(steps)]
    return param, grads


# Bad hyperparameters: (id, keyword arguments, exception type, message pattern).
# Checked by momentum_step, by the MomentumSGD constructor and by its setters.
HYPER_ERRORS = [
    ("lr-nan", {"lr": float("nan")}, ValueError, r"lr.*nan"),
    ("lr-inf", {"lr": float("inf")}, ValueError, r"lr.*inf"),
    ("lr-negative", {"lr": -0.1}, ValueError, r"lr.*-0\.1"),
    ("lr-string", {"lr": "0.1"}, TypeError, r"lr.*'0\.1'"),
    ("lr-none", {"lr": None}, TypeError, r"lr.*None"),
    ("momentum-one", {"momentum": 1.0}, ValueError, r"momentum.*1\.0"),
    ("momentum-negative", {"momentum": -0.5}, ValueError, r"momentum.*-0\.5"),
    ("momentum-nan", {"momentum": float("nan")}, ValueError, r"momentum.*nan"),
    ("dampening-above-one", {"dampening": 1.5}, ValueError, r"dampening.*1\.5"),
    ("dampening-negative", {"dampening": -0.1}, ValueError, r"dampening.*-0\.1"),
    ("weight-decay-negative", {"weight_decay": -1e-4}, ValueError, r"weight_decay.*-0\.0001"),
    ("weight-decay-inf", {"weight_decay": float("inf")}, ValueError, r"weight_decay.*inf"),
    ("nesterov-no-momentum", {"nesterov": True, "momentum": 0.0}, ValueError,
     r"nesterov.*momentum"),
    ("nesterov-torch-dampening", {"nesterov": True, "style": "torch", "dampening": 0.1},
     ValueError, r"nesterov.*dampening"),
    ("nesterov-not-bool", {"nesterov": "yes"}, TypeError, r"nesterov.*'yes'"),
    ("maximize-not-bool", {"maximize": 1}, TypeError, r"maximize.*1"),
    ("style-unknown", {"style": "adam"}, ValueError, r"style.*'adam'"),
    ("backend-unknown", {"backend": "tpu"}, ValueError, r"backend.*'tpu'"),
]


# Bad arrays: (id, make(harness, param, grad, velocity) -> (param, grad, velocity),
# exception type, message pattern). Some cases exist only in host or only in device memory.
def _host_only(make):
    make.applies = lambda harness: not harness.on_device
    return make


def _device_only(make):
    make.applies = lambda harness: harness.on_device
    return make


def _list_param(h, p, g, v):
    return [1.0, 2.0], g, v


def _grad_size(h, p, g, v):
    return p, h.from_numpy(np.zeros(p.size + 1)), v


def _grad_shape(h, p, g, v):
    return p, h.from_numpy(np.zeros((1, p.size))), v


def _velocity_size(h, p, g, v):
    return p, g, h.from_numpy(np.zeros(p.size - 1))


def _grad_dtype(h, p, g, v):
    return p, h.from_numpy(np.zeros(p.size, np.float32)), v


def _velocity_dtype(h, p, g, v):
    return p, g, h.from_numpy(np.zeros(p.size, np.float32))


def _grad_not_contiguous(h, p, g, v):
    return p, h.from_numpy(np.zeros(2 * p.size))[::2], v


def _param_not_contiguous(h, p, g, v):
    return h.from_numpy(np.ones(2 * p.size))[::2], g, v


def _velocity_is_param(h, p, g, v):
    return p, g, p


def _velocity_is_grad(h, p, g, v):
    return p, g, g


def _grad_is_param(h, p, g, v):
    return p, p, v


def _integer_param(h, p, g, v):
    return h.from_numpy(np.arange(p.size)), g, v


@_host_only
def _read_only_param(h, p, g, v):
    p = p.copy()
    p.flags.writeable = False
    return p, g, v


@_host_only
def _read_only_velocity(h, p, g, v):
    v = v.copy()
    v.flags.writeable = False
    return p, g, v


@_device_only
def _host_grad_for_device_param(h, p, g, v):
    return p, np.zeros(p.size), v


ARRAY_ERRORS = [
    ("param-is-a-list", _list_param, TypeError, r"param.*list"),
    ("grad-size", _grad_size, ValueError, r"grad.*shape"),
    ("grad-shape", _grad_shape, ValueError, r"grad.*shape"),
    ("velocity-size", _velocity_size, ValueError, r"velocity.*shape"),
    ("grad-dtype", _grad_dtype, TypeError, r"grad.*float32"),
    ("velocity-dtype", _velocity_dtype, TypeError, r"velocity.*float32"),
    ("grad-not-contiguous", _grad_not_contiguous, ValueError, r"grad.*contiguous"),
    ("param-not-contiguous", _param_not_contiguous, ValueError, r"param.*contiguous"),
    ("velocity-aliases-param", _velocity_is_param, ValueError, r"velocity overlaps param"),
    ("velocity-aliases-grad", _velocity_is_grad, ValueError, r"velocity overlaps grad"),
    ("grad-aliases-param", _grad_is_param, ValueError, r"grad overlaps param"),
    ("integer-param", _integer_param, TypeError, r"param.*int64"),
    ("read-only-param", _read_only_param, ValueError, r"param.*read-only"),
    ("read-only-velocity", _read_only_velocity, ValueError, r"velocity.*read-only"),
    ("host-grad", _host_grad_for_device_param, TypeError, r"grad.*memory"),
]

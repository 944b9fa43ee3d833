"""The shared tables: optimizer configurations, sizes and bad inputs.

No entry names a backend: every backend's tests run over all of them.
"""

import warnings

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
    _config("classic-l1", "classic", momentum=0.9, l1=0.01),
    _config("classic-decoupled-wd", "classic", momentum=0.9, weight_decay=0.1,
            decoupled_weight_decay=True),
    _config("torch-nesterov-l1-wd", "torch", momentum=0.9, nesterov=True, l1=0.02,
            weight_decay=0.01),
    _config("torch-decoupled-wd-l1-schedule", "torch", schedule_momentum=True,
            weight_decay=0.1, l1=0.005, decoupled_weight_decay=True),
]


# Options a MomentumSGD takes only in its constructor (the rest are settable per step).
CONSTRUCTOR_ONLY = ("style", "decoupled_weight_decay")


def hyper_at(config, step):
    """The keyword arguments of step `step` (0-based) of a configuration."""
    return {k: (v[step] if isinstance(v, tuple) else v) for k, v in config.items()}


# Parameter groups over one FlatParams of these segments (odd sizes: ranges end inside
# 16-byte words of the padded buffer only where segments do).
SEGMENT_SIZES = (1023, 5, 4099, 1, 2048, 33)
SEGMENT_NAMES = ("stem.w", "stem.b", "block.w", "block.scale", "head.w", "head.b")


def _groups(id_, options, groups):
    return pytest.param({"options": options, "groups": groups}, id=id_)


# Each: the optimizer's options and its groups. Steps use LR_SCHEDULE for the optimizer's
# own lr, and every group's lr is halved from step 3 on (a per-group schedule).
GROUP_CONFIGS = [
    _groups("classic-head-lr-l1", {"style": "classic", "momentum": 0.9},
            [{"params": ["head.w", "head.b"], "lr": 0.01, "l1": 0.001}]),
    _groups("classic-per-segment", {"style": "classic", "momentum": 0.9,
                                    "weight_decay": 0.01},
            [{"params": [i], "lr": 0.01 * (i + 1), "momentum": 0.1 * i,
              "weight_decay": 0.001 * i} for i in range(len(SEGMENT_SIZES))]),
    _groups("classic-nesterov-decoupled", {"style": "classic", "momentum": 0.9,
                                           "weight_decay": 0.1,
                                           "decoupled_weight_decay": True},
            [{"params": [0, "block.w"], "nesterov": True, "weight_decay": 0.0},
             {"params": ["block.scale", 5], "lr": 0.2, "l1": 0.05}]),
    # momentum 0 leaves the optimizer's own velocity untouched while groups with momentum
    # take their first step: per-group first steps.
    _groups("torch-per-group-momentum", {"style": "torch", "momentum": 0.0,
                                         "dampening": 0.5},
            [{"params": ["stem.w", "stem.b"], "momentum": 0.9, "nesterov": True,
              "dampening": 0.0},
             {"params": ["head.w"], "momentum": 0.5, "l1": 0.01, "weight_decay": 0.01}]),
    _groups("torch-decoupled-maximize", {"style": "torch", "momentum": 0.9,
                                         "maximize": True, "weight_decay": 0.05,
                                         "decoupled_weight_decay": True},
            [{"params": ["block.w"], "lr": 0.001, "dampening": 0.3}]),
]


# Bad groups (over SEGMENT_NAMES): (id, groups, exception type, message pattern). Checked
# by resolve_groups, the MomentumSGD constructor, load_state_dict and checkpoints.
GROUP_ERRORS = [
    ("not-a-list", {"params": [0]}, TypeError, r"groups must be a list of dicts"),
    ("not-a-dict", [[0]], TypeError, r"groups\[0\] must be a dict"),
    ("no-params", [{"lr": 0.1}], ValueError, r"groups\[0\] has no 'params'"),
    ("empty-params", [{"params": []}], ValueError, r"names at least one segment"),
    ("params-not-a-list", [{"params": 3}], TypeError, r"params must be a list"),
    ("unknown-option", [{"params": [0], "betas": 0.9}], ValueError,
     r"groups\[0\] has unknown option 'betas'"),
    ("style-per-group", [{"params": [0], "style": "torch"}], ValueError,
     r"groups\[0\] has unknown option 'style'"),
    ("decoupled-per-group", [{"params": [0], "decoupled_weight_decay": True}], ValueError,
     r"groups\[0\] has unknown option 'decoupled_weight_decay'"),
    ("unknown-name", [{"params": ["tail"]}], ValueError, r"no segment is named 'tail'"),
    ("index-out-of-range", [{"params": [6]}], ValueError, r"segment 6 does not exist"),
    ("bool-index", [{"params": [True]}], TypeError, r"a segment index or name"),
    ("overlapping", [{"params": [2]}, {"params": ["block.w"]}], ValueError,
     r"groups\[1\]: segment 2 \('block.w'\) is named by groups\[0\] too"),
    ("twice", [{"params": [1, 1]}], ValueError, r"is named by it twice"),
    ("bad-lr", [{"params": [0]}, {"params": [1], "lr": -1.0}], ValueError,
     r"groups\[1\]: Invalid lr value: -1.0"),
    ("bad-l1", [{"params": [0], "l1": float("nan")}], ValueError,
     r"groups\[0\]: Invalid l1 value: nan"),
    ("bad-momentum-type", [{"params": [0], "momentum": "high"}], TypeError,
     r"groups\[0\]: Invalid momentum value: 'high'"),
    ("bad-nesterov", [{"params": [0], "momentum": 0.0, "nesterov": True}], ValueError,
     r"groups\[0\]: Invalid nesterov value"),
    ("lr-int-too-large", [{"params": [0], "lr": 10**400}], ValueError,
     r"groups\[0\]: Invalid lr value: 1\.0000e\+400"),
    ("momentum-numpy-bool", [{"params": [0], "momentum": np.True_}], TypeError,
     r"groups\[0\]: Invalid momentum value: np\.True_"),
    ("nesterov-numpy-float", [{"params": [0], "nesterov": np.float64(1)}], TypeError,
     r"groups\[0\]: Invalid nesterov value"),
    ("numpy-bool-index", [{"params": [np.True_]}], TypeError, r"a segment index or name"),
    ("index-too-large", [{"params": [10**5000]}], ValueError,
     r"segment 1\.0000e\+5000 does not exist"),
    ("numpy-index-out-of-range", [{"params": [np.int64(-1)]}], ValueError,
     r"segment -1 does not exist"),
]


def group_lr(group, step):
    """The lr a group (a dict of GROUP_CONFIGS) has at step `step` of the tests."""
    lr = group.get("lr", LR_SCHEDULE[step])
    return lr / 2 if step >= 3 else lr


def grouped_reference_step(param, grad, velocity, config, step, initialized,
                           offsets, sizes, step_fn=None, **common):
    """The reference over a grouped buffer: each segment stepped with its group's
    hyperparameters (first step where its group's velocity is not `initialized`; the list
    is updated); the padding between segments is left as it is. Returns new (param,
    velocity); step_fn defaults to reference_step."""
    from gpu_momentum.reference import reference_step

    step_fn = step_fn or reference_step
    options, groups = config["options"], config["groups"]
    owner = {}
    for number, group in enumerate(groups):
        for segment in group["params"]:
            owner[segment if isinstance(segment, int) else
                  SEGMENT_NAMES.index(segment)] = number + 1
    group_hyper = [{**options, "lr": LR_SCHEDULE[step]}]
    group_hyper += [{**options, **{k: v for k, v in g.items() if k != "params"},
                     "lr": group_lr(g, step)} for g in groups]
    param, velocity = np.array(param), np.array(velocity)
    for segment, (start, size) in enumerate(zip(offsets, sizes)):
        k, end = owner.get(segment, 0), start + size
        p, v = step_fn(param[start:end], grad[start:end], velocity[start:end],
                       first_step=not initialized[k], **group_hyper[k], **common)
        param[start:end], velocity[start:end] = p, v
    for k, hyper in enumerate(group_hyper):
        initialized[k] |= hyper["style"] == "classic" or hyper.get("momentum", 0.9) != 0
    return param, velocity


# What the tests write into the gradient's padding between FlatParams segments: the update
# must neither read it (no skipped step, no NaN) nor move the padding of params or velocity.
PADDING_GRADIENTS = (float("nan"), float("inf"), -float("inf"), 1e300, -0.0, 3.0)


def padding_mask(offsets, sizes, total):
    """True where a flat buffer of these segments holds padding."""
    mask = np.ones(total, bool)
    for offset, size in zip(offsets, sizes):
        mask[offset:offset + size] = False
    return mask


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
    ("l1-negative", {"l1": -0.01}, ValueError, r"l1.*-0\.01"),
    ("l1-nan", {"l1": float("nan")}, ValueError, r"l1.*nan"),
    ("l1-string", {"l1": "0"}, TypeError, r"l1.*'0'"),
    ("decoupled-not-bool", {"decoupled_weight_decay": 1}, TypeError,
     r"decoupled_weight_decay.*1"),
    ("nesterov-no-momentum", {"nesterov": True, "momentum": 0.0}, ValueError,
     r"nesterov.*momentum"),
    ("nesterov-torch-dampening", {"nesterov": True, "style": "torch", "dampening": 0.1},
     ValueError, r"nesterov.*dampening"),
    ("nesterov-not-bool", {"nesterov": "yes"}, TypeError, r"nesterov.*'yes'"),
    ("maximize-not-bool", {"maximize": 1}, TypeError, r"maximize.*1"),
    ("style-unknown", {"style": "adam"}, ValueError, r"style.*'adam'"),
    ("backend-unknown", {"backend": "tpu"}, ValueError, r"backend.*'tpu'"),
    # Python integers past the largest float: a ValueError naming them, not OverflowError.
    ("lr-int-too-large", {"lr": 10**400}, ValueError,
     r"Invalid lr value: 1\.0000e\+400 \(lr must be at most 1\.7976931348623157e\+308, the "
     r"largest float64\)"),
    ("momentum-int-too-large", {"momentum": -10**400}, ValueError,
     r"Invalid momentum value: -1\.0000e\+400"),
    ("weight-decay-int-too-large", {"weight_decay": 10**5000}, ValueError,
     r"Invalid weight_decay value: 1\.0000e\+5000"),
    ("l1-int-too-large", {"l1": 2**1024}, ValueError, r"Invalid l1 value: 1\.7976e\+308"),
    ("dampening-numpy-bool", {"dampening": np.True_}, TypeError,
     r"Invalid dampening value: np\.True_"),
    ("nesterov-numpy-int", {"nesterov": np.int64(1)}, TypeError, r"Invalid nesterov value"),
    ("momentum-numpy-one", {"momentum": np.float32(1)}, ValueError,
     r"Invalid momentum value: 1\.0"),
]


# Values a float holds but the update's compute dtype does not (float32 for float16 and
# float32 parameters, float64 for float64): (id, keyword arguments, the parameter dtypes
# that refuse them, those that take them, message pattern). A ValueError everywhere a
# value enters (momentum_step, the constructor, setters, param_groups, groups,
# load_state_dict); the dtypes that take them give finite steps.
_FLOAT32 = (r"the largest float32: the update computes in float32 for float(16|32) "
            r"parameters")
SINGLE = ("float16", "float32")  # computed in float32
DOUBLE = ("float64",)
DTYPE_HYPER_ERRORS = [
    ("lr-above-float32", {"lr": 1e39}, SINGLE, DOUBLE,
     rf"Invalid lr value: 1e\+39 \(lr must be at most 3\.4028234663852886e\+38, "
     rf"{_FLOAT32}\)"),
    ("weight-decay-above-float32", {"weight_decay": 3.5e38}, SINGLE, DOUBLE,
     rf"Invalid weight_decay value: 3\.5e\+38 \(weight_decay must be at most .*{_FLOAT32}"),
    ("l1-above-float32", {"l1": 1e300}, SINGLE, DOUBLE,
     rf"Invalid l1 value: 1e\+300 .*{_FLOAT32}"),
    ("momentum-rounds-to-one", {"momentum": 0.999999999}, SINGLE, DOUBLE,
     r"Invalid momentum value: 0\.999999999 \(momentum must be at most 0\.99999994039\d*, "
     r"the largest float32 below 1 \(it rounds to 1\.0 in float32\)"),
    ("momentum-halfway-to-one", {"momentum": 1 - 2**-25}, SINGLE, DOUBLE,
     r"Invalid momentum value: 0\.99999997"),
    ("decoupled-decay-overflows-float32", {"decoupled_weight_decay": True, "lr": 1e20,
                                           "weight_decay": 1e20}, SINGLE, DOUBLE,
     rf"Invalid lr \* weight_decay value: 1e\+20 \* 1e\+20 \(with decoupled_weight_decay, "
     rf".*{_FLOAT32}"),
    # In float32 lr alone is refused already (lr-above-float32).
    ("decoupled-decay-overflows-float64", {"decoupled_weight_decay": True, "lr": 1e160,
                                           "weight_decay": 1e160}, DOUBLE, (),
     r"Invalid lr \* weight_decay value: 1e\+160 \* 1e\+160 \(.*the largest float64: "
     r"the update computes in float64 for float64 parameters\)"),
]

# grad_scale whose inverse the compute dtype cannot hold as a finite normal number:
# (id, grad_scale, the parameter dtypes that refuse it, message pattern). Checked by
# momentum_step and MomentumSGD.step; the other dtypes take it.
GRAD_SCALE_ERRORS = [
    ("tiny-for-float32", 1e-39, SINGLE,
     rf"Invalid grad_scale value: 1e-39 \(grad_scale must be at least 2\.93\d*e-39, so "
     rf"that 1 / grad_scale is at most 3\.4028234663852886e\+38, {_FLOAT32}\)"),
    ("tiny-for-float64", 1e-310, ("float16", "float32", "float64"),
     r"Invalid grad_scale value: 1e-310 \(grad_scale must be at least"),
    ("huge-for-float32", 1e38, SINGLE,
     r"Invalid grad_scale value: 1e\+38 \(grad_scale must be at most 8\.50\d*e\+37, so "
     r"that 1 / grad_scale is at least 1\.17\d*e-38, the smallest normal float32"),
    ("int-too-large", 10**400, ("float16", "float32", "float64"),
     r"Invalid grad_scale value: 1\.0000e\+400 \(grad_scale must be at most "
     r"1\.7976931348623157e\+308"),
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


def _masked_grad(h, p, g, v):
    grad = h.to_numpy(g)
    return p, np.ma.masked_array(grad, mask=np.arange(grad.size) % 3 == 0), v


def _masked_velocity(h, p, g, v):
    return p, g, np.ma.masked_array(h.to_numpy(v))  # no element masked: still refused


def _matrix_param(h, p, g, v):
    with warnings.catch_warnings():  # NumPy discourages np.matrix; users still hold some
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(h.to_numpy(p)), g, v


class Tagged(np.ndarray):
    """An ndarray subclass carrying something the update knows nothing of."""


def _subclass_grad(h, p, g, v):
    return p, h.to_numpy(g).view(Tagged), v


class InterfaceOnly:
    """Host memory described by __array_interface__ alone: no ndarray."""

    def __init__(self, array):
        self._array = array
        self.__array_interface__ = array.__array_interface__


@_host_only
def _interface_only_grad(h, p, g, v):
    return p, InterfaceOnly(h.to_numpy(g)), v


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
    # ndarray subclasses: what they mean (a mask, matrix semantics) would be ignored.
    ("masked-grad", _masked_grad, TypeError,
     r"grad is a numpy\.MaskedArray, a subclass of numpy\.ndarray.*mask would be ignored"),
    ("masked-velocity-without-mask", _masked_velocity, TypeError,
     r"velocity is a numpy\.MaskedArray"),
    ("matrix-param", _matrix_param, TypeError, r"param is a numpy\.matrix, a subclass"),
    ("subclass-grad", _subclass_grad, TypeError, r"grad is a configs\.Tagged, a subclass"),
    ("interface-only-grad", _interface_only_grad, TypeError,
     r"grad is a configs\.InterfaceOnly, which backend '{backend}' cannot read"),
]


# Collective errors of gpu_momentum.distributed, made by tests/mpi_checks.py on every rank
# of an mpiexec run: (case, exception type, the failing rank ("last", 0 or "all"),
# pattern on the failing ranks, pattern on the others (None: the failing rank's), and
# whether it needs a second rank: with one rank there is nothing to differ from). Every
# rank must raise and nothing may change on any. {last} and {ranks} are filled in.
DISTRIBUTED_ERRORS = [
    ("layout", "ValueError", "all",
     r"^rank {last} differs from rank 0 in segment shapes", None, True),
    ("values", "ValueError", "all",
     r"^rank {last} differs from rank 0 in initial parameter values \(checksum\)", None,
     True),
    ("options", "ValueError", "all",
     r"^rank {last} differs from rank 0 in hyperparameters\[0\]\['lr'\]: 0\.2 against 0\.1",
     None, True),
    ("bad-option", "ValueError", "last", r"^Invalid momentum value: 1\.0",
     r"^rank {last} of {ranks} failed: Invalid momentum value: 1\.0", False),
    ("bad-group", "ValueError", "last", r"^Invalid params value in groups\[0\]: no segment "
     r"is named 'nope'", r"^rank {last} of {ranks} failed: Invalid params value", False),
    ("comm-null", "TypeError", "all", r"^Invalid comm value: .*intracommunicator", None,
     False),
    ("nccl-on-host", "ValueError", "all", r"^Invalid collectives value: 'nccl'", None, False),
    ("collectives-unknown", "ValueError", "all", r"^Invalid collectives value: 'gloo'", None,
     False),
    ("unknown-option", "TypeError", "last", r"unexpected keyword argument 'betas'",
     r"^rank {last} of {ranks} failed: .*unexpected keyword argument 'betas'", False),
    ("grads-reduced-differs", "ValueError", "all",
     r"^grads_reduced differs between ranks: rank {last} has grads_reduced = True, rank 0 "
     r"has False", None, True),
    ("grad-scale-differs", "ValueError", "all",
     r"^grad_scale differs between ranks: rank {last} has grad_scale = 2\.0, rank 0 has "
     r"1\.0", None, True),
    ("lr-on-one-rank", "ValueError", "all",
     r"^hyperparameters differs between ranks: rank {last} has hyperparameters\[0\]\['lr'\]"
     r" = 0\.3, rank 0 has 0\.1", None, True),
    ("grad-dtype", "TypeError", "last", r"^grad has dtype float32 but param has dtype float64",
     r"^rank {last} of {ranks} failed: grad has dtype float32", False),
    ("grad-shape", "ValueError", "last", r"^grad has shape \(7213,\) but param has shape",
     r"^rank {last} of {ranks} failed: grad has shape", False),
    ("grad-is-param", "ValueError", "last", r"^grad overlaps param in memory",
     r"^rank {last} of {ranks} failed: grad overlaps param", False),
    ("grad-scale-zero", "ValueError", "all", r"^Invalid grad_scale value: 0\.0", None, False),
    ("grad-scale-over-ranks", "ValueError", "all", r"^Invalid grad_scale value: 6e\+37 \(the "
     r"update divides the sum over {ranks} ranks by {ranks} \* grad_scale", None, True),
    ("grad-none-single-array", "TypeError", "all", r"^grad is None, but params is a single "
     r"array", None, False),
    ("state-velocity-shape", "ValueError", "last", r"^velocity has shape \(7213,\); this "
     r"optimizer's state covers the whole buffer",
     r"^rank {last} of {ranks} failed: velocity has shape \(7213,\)", False),
    ("load-damaged-on-one-rank", "CheckpointError", "last",
     r"^checkpoint \S*damaged\.npz is truncated, corrupted",
     r"^rank {last} of {ranks} failed: checkpoint \S*damaged\.npz is truncated", False),
    ("save-unwritable", "FileNotFoundError", 0, r"No such file or directory",
     r"^rank 0 of {ranks} failed: .*No such file or directory", False),
    # What the ranks must agree on beyond their own checks (mpi_checks.disagreements).
    ("values-swapped-segments", "ValueError", "all",
     r"^rank {last} differs from rank 0 in initial parameter values \(checksum\)", None,
     True),
    ("capturable-lr-on-one-rank", "ValueError", "all",
     r"^hyperparameters differs between ranks: rank {last} has hyperparameters\[0\]\['lr'\]"
     r" = 0\.3, rank 0 has 0\.1", None, True),
    ("capturable-group-lr-on-one-rank", "ValueError", "all",
     r"^hyperparameters differs between ranks: rank {last} has hyperparameters\[1\]\['lr'\]"
     r" = 0\.02, rank 0 has 0\.01", None, True),
    ("load-other-step-on-one-rank", "ValueError", "all",
     r"^step_count of the checkpoint read differs between ranks: rank {last} has step_count "
     r"of the checkpoint read = 4, rank 0 has 3", None, True),
    ("load-other-content-on-one-rank", "ValueError", "all",
     r"^content of the checkpoint read \(digest\) differs between ranks: rank {last} has "
     r"content of the checkpoint read \(digest\) = '[0-9a-f]{{14}}', rank 0 has "
     r"'[0-9a-f]{{14}}'", None, True),
    ("load-state-other-content-on-one-rank", "ValueError", "all",
     r"^content of the state given \(digest\) differs between ranks: rank {last} has",
     None, True),
]


# gpu_momentum.torch.SGD: bad constructor arguments beyond torch's own error inputs
# (optim_error_inputs_func_sgd, which tests/test_torch_sgd.py runs too): (id, keyword
# arguments, exception type, message pattern). torch.optim.SGD's own checks keep its types
# and messages; nothing is packed when one fails.
TORCH_SGD_ERRORS = [
    ("lr-negative", {"lr": -1.0}, ValueError, r"^Invalid learning rate: -1\.0$"),
    ("lr-negative-tensor", {"lr": "tensor(-1.0)"}, ValueError,
     r"^Invalid learning rate: -1\.0$"),
    ("lr-string", {"lr": "0.1"}, TypeError, r"'<' not supported"),
    ("momentum-negative", {"momentum": -0.5}, ValueError, r"^Invalid momentum value: -0\.5$"),
    ("weight-decay-negative", {"weight_decay": -1e-4}, ValueError,
     r"^Invalid weight_decay value: -0\.0001$"),
    ("nesterov-no-momentum", {"nesterov": True}, ValueError,
     r"^Nesterov momentum requires a momentum and zero dampening$"),
    ("nesterov-dampening", {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
     ValueError, r"^Nesterov momentum requires a momentum and zero dampening$"),
    ("fused-and-foreach", {"fused": True, "foreach": True}, RuntimeError,
     r"`fused` and `foreach` cannot be `True` together"),
    ("fused-and-differentiable", {"fused": True, "differentiable": True}, RuntimeError,
     r"`fused` does not support `differentiable`"),
    ("differentiable-with-l1", {"differentiable": True, "l1": 0.01}, ValueError,
     r"^Invalid l1 value: 0\.01 with differentiable=True \(.*torch\.optim\.SGD's update"),
    ("differentiable-with-skip-nonfinite", {"differentiable": True, "skip_nonfinite": True},
     ValueError, r"^Invalid skip_nonfinite value: True with differentiable=True"),
    ("differentiable-with-classic-style", {"differentiable": True, "style": "classic"},
     ValueError, r"^Invalid style value: 'classic' with differentiable=True"),
    ("l1-negative", {"l1": -0.01}, ValueError, r"Invalid l1 value: -0\.01"),
    ("decoupled-not-bool", {"decoupled_weight_decay": 1}, TypeError,
     r"Invalid decoupled_weight_decay value: 1"),
    ("skip-nonfinite-not-bool", {"skip_nonfinite": "yes"}, TypeError,
     r"Invalid skip_nonfinite value: 'yes'"),
    ("style-unknown", {"style": "adam"}, ValueError, r"Invalid style value: 'adam'"),
    ("backend-unknown", {"backend": "tpu"}, ValueError, r"Invalid backend value: 'tpu'"),
    ("velocity-dtype-unknown", {"velocity_dtype": "fp8"}, ValueError,
     r"Invalid velocity_dtype value: 'fp8'"),
    ("differentiable-with-float8", {"differentiable": True,
                                    "velocity_dtype": "float8_e4m3fn"}, ValueError,
     r"^Invalid velocity_dtype value: 'float8_e4m3fn' with differentiable=True"),
]

# gpu_momentum.torch.SGD's velocity_dtype refused: (id, keyword arguments, param dtype
# name, exception type, message pattern); nothing is packed when one fails.
TORCH_FLOAT8_ERRORS = [
    ("unknown-name", {"velocity_dtype": "fp8"}, "float32", ValueError,
     r"Invalid velocity_dtype value: 'fp8' \(not a dtype"),
    ("float16-velocity", {"velocity_dtype": "float16"}, "float16", ValueError,
     r"Invalid velocity_dtype value: 'float16' \(the velocity is float32"),
    ("torch-bfloat16-velocity", {"velocity_dtype": "torch.bfloat16"}, "bfloat16",
     ValueError, r"Invalid velocity_dtype value: 'bfloat16'"),
    ("not-a-dtype", {"velocity_dtype": 8}, "float32", TypeError,
     r"Invalid velocity_dtype value: 8"),
    ("float64-params", {"velocity_dtype": "float8_e4m3fn"}, "float64", ValueError,
     r"Invalid velocity_dtype value: 'float8_e4m3fn' \(float64 parameters cannot"),
    ("complex-params", {"velocity_dtype": "float8_e4m3fn"}, "complex64", ValueError,
     r"Invalid velocity_dtype value: 'float8_e4m3fn' \(complex parameters"),
    ("kahan-on-float32", {"velocity_dtype": "float8_e4m3fn", "precision": "kahan"},
     "float32", ValueError, r"Invalid precision value: 'kahan'"),
]

# What torch.optim.SGD accepts although it looks odd (no upper bound on momentum, negative
# dampening, a tensor weight decay, a 1-d tensor lr): gpu_momentum.torch.SGD accepts it too
# and computes the same. Values as TORCH_SGD_ERRORS writes them ("tensor(...)").
TORCH_SGD_ACCEPTED = [
    ("momentum-above-one", {"lr": 0.01, "momentum": 1.5}),
    ("dampening-negative", {"lr": 0.01, "momentum": 0.9, "dampening": -0.5}),
    ("weight-decay-tensor", {"lr": 0.01, "momentum": 0.9, "weight_decay": "tensor(0.1)"}),
    ("lr-1d-tensor", {"lr": "tensor([0.01])", "momentum": 0.5}),
    ("lr-int", {"lr": 0, "momentum": 0.9}),
]


# 16-bit parameters: every kind the kernels compile, (param dtype, velocity dtype,
# precision), by name.
PRECISION_NAMES = ("nearest", "stochastic", "kahan", "master")
LOW_PRECISION_KINDS = [pytest.param((param, velocity, precision),
                                    id=f"{param}-{velocity}-velocity-{precision}")
                       for param in ("bfloat16", "float16")
                       for velocity in ("float32", param) for precision in PRECISION_NAMES]
# Configurations of CONFIGS the 16-bit kinds run: nesterov, weight decay and maximize;
# dampening; a velocity left alone (torch, momentum 0); decoupled decay; l1 with nesterov.
# The first two compile the CPU's plain loop only (l1 and decoupled decay have loops of
# their own, seconds of compiling each): every kind runs those, a few kinds all five.
LOW_PRECISION_CONFIGS = [c for c in CONFIGS if c.id in (
    "classic-nesterov-wd-maximize", "torch-no-momentum-dampening", "torch-dampening",
    "classic-decoupled-wd", "torch-nesterov-l1-wd")]
# Those few kinds' other configurations are marked slow: the fast loop (`pytest -m "not
# slow"`) leaves them out, CI runs them.
LOW_PRECISION_CASES = [
    pytest.param(kind.values[0], config.values[0], id=f"{kind.id}-{config.id}",
                 marks=[] if config in LOW_PRECISION_CONFIGS[:2] else [pytest.mark.slow])
    for kind in LOW_PRECISION_KINDS for config in LOW_PRECISION_CONFIGS
    if config in LOW_PRECISION_CONFIGS[:2] or kind.id in (
        "bfloat16-float32-velocity-stochastic", "float16-float16-velocity-kahan",
        "bfloat16-bfloat16-velocity-master")]
SEED = 20240611


def storage_dtype(name):
    """The NumPy dtype called `name` ("bfloat16" needs ml_dtypes)."""
    if name == "bfloat16":
        from harness import require

        return np.dtype(require("ml_dtypes").bfloat16)
    return np.dtype(name)


def low_precision_problem(size, dtype, steps=STEPS, seed=0, subnormals=True):
    """Params and per-step gradients of a 16-bit `dtype`; from 16 elements on, with the
    values rounding must get right at the front: NaN, infinities, the largest finite
    values, a subnormal and signed zeros in the params, NaN, inf and signed zeros among
    the gradients, and every other step gradients that overflow the largest params.
    subnormals=False: the smallest normal value in place of the subnormal, for a backend
    whose float32 arithmetic flushes subnormals (bfloat16's are float32's)."""
    from harness import require

    finfo = require("ml_dtypes").finfo(dtype)  # NumPy's finfo knows no bfloat16
    param, grads = problem(size, steps, seed=seed)
    grads = [0.1 * g for g in grads]
    largest = float(finfo.max)
    if size >= 16:
        small = float(finfo.smallest_subnormal) * 3 if subnormals else float(finfo.tiny)
        param[:9] = [np.nan, np.inf, -np.inf, largest, -largest, largest * 0.99, small,
                     0.0, -0.0]
        for step, grad in enumerate(grads):
            grad[9:13] = [np.nan, np.inf, -0.0, 0.0]
            if step % 2:
                grad[3:5] = [-largest / 4, largest / 4]
    with np.errstate(over="ignore"):
        return param.astype(dtype), [g.astype(dtype) for g in grads]


# Bad precision settings: (id, keyword arguments, param dtype name, exception, pattern).
# Checked by momentum_step and the MomentumSGD constructor; nothing may change.
PRECISION_ERRORS = [
    ("kahan-on-float32", {"precision": "kahan"}, "float32", ValueError,
     r"Invalid precision value: 'kahan' \(float32 parameters .* only 'nearest'"),
    ("stochastic-on-float64", {"precision": "stochastic"}, "float64", ValueError,
     r"Invalid precision value: 'stochastic' \(float64"),
    ("master-on-float32", {"precision": "master"}, "float32", ValueError,
     r"precision value: 'master'"),
    ("unknown-precision", {"precision": "fast"}, "bfloat16", ValueError,
     r"Invalid precision value: 'fast' \(precision must be one of"),
    ("precision-not-a-string", {"precision": 1}, "float16", ValueError,
     r"Invalid precision value: 1"),
    ("velocity-bfloat16-on-float32", {"velocity_dtype": "bfloat16"}, "float32", ValueError,
     r"Invalid velocity_dtype value: 'bfloat16' \(float32 parameters keep a 'float32'"),
    ("velocity-float16-on-bfloat16", {"velocity_dtype": "float16"}, "bfloat16", ValueError,
     r"Invalid velocity_dtype value: 'float16' \(bfloat16 parameters keep a 'float32' or "
     r"'bfloat16'"),
    ("velocity-float64-on-float16", {"velocity_dtype": np.float64}, "float16", ValueError,
     r"velocity_dtype value: 'float64'"),
    ("velocity-not-a-dtype", {"velocity_dtype": "fp8"}, "bfloat16", ValueError,
     r"Invalid velocity_dtype value: 'fp8'"),
    ("seed-string", {"seed": "7"}, "bfloat16", TypeError, r"Invalid seed value: '7'"),
    ("seed-float", {"seed": 7.0}, "bfloat16", TypeError, r"Invalid seed value: 7\.0"),
    ("seed-bool", {"seed": True}, "float16", TypeError, r"Invalid seed value: True"),
    ("seed-none", {"seed": None}, "float32", TypeError, r"Invalid seed value: None"),
    ("seed-negative", {"seed": -1}, "bfloat16", ValueError, r"Invalid seed value: -1"),
    ("seed-too-large", {"seed": 2**64}, "bfloat16", ValueError,
     r"Invalid seed value: 18446744073709551616"),
]

"""`momentum_step`: the stateless update (the caller holds the velocity), with the caches
that let calls repeating their hyperparameters skip checking them and building their table;
and the checks of a loss scale or found_inf given as an array, which MomentumSGD.step
shares."""

import math

import numpy as np

from .arrays import compute_dtype, describe, type_name
from .backends import check_arrays, device_table, select_backend
from .groups import update_table
from .hyperparams import Hyperparameters, flag, inverse_grad_scale
from .float8_velocity import is_float8_velocity
from .kernels.layout import FLOAT8_VELOCITY
from .precision import (PRECISION_BUFFER_NAMES, Precision, check_key_integer,
                        check_precision_name, check_seed)


def _step_count(step_count):
    """A step count given by a caller: an integer in [0, 2**63) (the counters are int64)."""
    return check_key_integer("step_count", step_count, 63)


def _precision_buffer(precision, compensation, master):
    """The array of momentum_step's `compensation` and `master` that `precision` reads
    (None for nearest and stochastic); ValueError for one it does not read."""
    given = {"compensation": compensation, "master": master}
    for name, array in given.items():
        if array is not None and PRECISION_BUFFER_NAMES.get(precision) != name:
            raise ValueError(f"Invalid {name} value: an array, but precision {precision!r} "
                             f"reads none (compensation is for 'kahan', master for "
                             f"'master')")
    return given.get(PRECISION_BUFFER_NAMES.get(precision))


def momentum_step(param, grad, velocity, *, lr, momentum=0.9, dampening=0.0,
                  weight_decay=0.0, l1=0.0, nesterov=False, maximize=False,
                  style="classic", decoupled_weight_decay=False, first_step=False,
                  grad_scale=1.0, precision="nearest", seed=0, step_count=0,
                  compensation=None, master=None, backend=None):
    """One fused in-place momentum update of `param` and `velocity`.

    With g = grad / grad_scale (computed as grad * (1 / grad_scale); grad_scale is the
    loss scale of mixed-precision training, 1 by default) and
    g' = (-g if maximize else g) + weight_decay * param + l1 * sign(param) (sign(0) = 0):

    - style="classic" (Sutskever et al. 2013, Keras): velocity = momentum*velocity - lr*g',
      then param += velocity (nesterov: param += momentum*velocity - lr*g').
    - style="torch" (torch.optim.SGD, Optax): velocity = momentum*velocity
      + (1 - dampening)*g', then param -= lr*velocity (nesterov: param -= lr*(g'
      + momentum*velocity)).

    decoupled_weight_decay=True (SGDW, as AdamW and Keras decay weights): g' has no
    weight_decay * param term; instead param *= 1 - lr*weight_decay before the update.

    first_step=True: the step that initializes the velocity (after it, the optimizers'
    state says velocity_initialized), so the old velocity is not read (it may be
    garbage): classic starts from velocity 0, torch sets velocity = g' without dampening, as PyTorch does on
    its first step. Torch style with momentum 0 is param -= lr*g' and leaves the velocity
    as it is, as PyTorch leaves its momentum buffer.

    16-bit parameters (bfloat16, float16) are computed in float32 and rounded back as
    `precision` says (see MomentumSGD): "nearest"; "stochastic", whose random bits are
    keyed by `seed` and `step_count` (the steps taken before this one: give each step its
    own) and each element's index; "kahan", which reads and writes `compensation` (an
    array of param's dtype and shape, zeros at first); "master", which updates `master`
    (a float32 copy of the parameters) and writes its rounding to param.

    Arrays are contiguous, of one shape, with grad of param's dtype and a velocity of
    param's dtype (float32 or param's dtype for 16-bit params); or, for float32 and
    16-bit params, an FP8 velocity: a gpu_momentum.Float8Velocity(codes, scales) (uint8
    E4M3 codes of param's size and one float32 scale per FLOAT8_BLOCK = 256 elements,
    zeros at first; reference.float8_velocity_step), with which float32 params have
    precision "stochastic" too (rounding the codes). backend=None picks the
    best backend for the arrays' type. Every argument is checked before anything is
    written, hyperparameters also against the compute dtype (float32 for 16-bit and
    float32 params, float64 for float64: see Hyperparameters.check_dtype and
    inverse_grad_scale). grad_scale may also
    be a 0-d float array in the arrays' memory, read by the kernels (see
    MomentumSGD.step). On a GPU backend the hyperparameters are copied to the device when
    they differ from recent calls'.
    """
    options = dict(lr=lr, momentum=momentum, dampening=dampening,
                   weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                   style=style, l1=l1, decoupled_weight_decay=decoupled_weight_decay)
    key = _values_key((*options.values(), first_step))

    def checked():
        return Hyperparameters(**options), flag("first_step", first_step)

    hyper, first_step = checked() if key is None else _recent(_STATELESS_HYPERS, key, checked)
    seed, step_count = check_seed(seed), _step_count(step_count)
    check_precision_name(precision)
    buffer = _precision_buffer(precision, compensation, master)
    info = describe("param", param)
    backend = select_backend(backend, param)
    Precision(info.dtype, precision,
              FLOAT8_VELOCITY if is_float8_velocity(velocity) else None, seed=seed)
    check_arrays(backend, param, grad, velocity, precision, buffer)
    hyper.check_dtype(info.dtype)
    device_scale = None
    if is_array(grad_scale):
        device_scale = scalar_array("grad_scale", grad_scale, backend, info.on_device,
                                     FLOAT_KINDS)
        inv_grad_scale = 1.0  # not read
    else:
        inv_grad_scale = inverse_grad_scale(grad_scale, info.dtype)
    compute, size = compute_dtype(info.dtype), math.prod(info.shape)

    def table():
        if info.on_device and backend.capturing(param):
            raise RuntimeError("momentum_step() is being captured into a CUDA graph, but "
                               "its hyperparameters' table must be copied to the device "
                               "first: a replay would not copy it. Call it once with "
                               "these hyperparameters before capturing. Nothing was "
                               "changed.")
        host = update_table([hyper], [not first_step], compute, size=size)
        return device_table(backend, host, param)

    if key is not None:
        table_key = (backend.name, backend.place(param), compute, size, key)
        table = _recent(_STATELESS_TABLES, table_key, table)
    else:
        table = table()
    backend.step(param, grad, velocity, table, inv_grad_scale, grad_scale=device_scale,
                 precision=precision, precision_buffer=buffer, seed=seed,
                 step_count=step_count)


# momentum_step's latest hyperparameters, checked (values key -> (Hyperparameters,
# first_step)), and its latest tables in the backends' memory ((backend, place, compute
# dtype, size, values key) -> device table), so that calls repeating their
# hyperparameters neither check them again nor build, allocate or copy a table.
_STATELESS_HYPERS, _STATELESS_TABLES = {}, {}
STATELESS_TABLES_KEPT = 16


def _values_key(values):
    """A key for hyperparameter values that tells apart any two the update could treat
    differently: each value with its type (True == 1 == 1.0), and the signs of lr and
    momentum (0.0 == -0.0, but they round to zeros of different signs). None where a
    value is not a hashable number, bool or string (it is then checked, and refused, as
    usual)."""
    try:
        key = (*((type(v), v) for v in values), math.copysign(1.0, values[0]),
               math.copysign(1.0, values[1]))
        hash(key)
    except (TypeError, ValueError, OverflowError):
        return None
    return key


def _recent(cache, key, make):
    """cache[key], made by make() when absent; the STATELESS_TABLES_KEPT most recently
    used keys stay."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
    cache[key] = value
    while len(cache) > STATELESS_TABLES_KEPT:
        del cache[next(iter(cache))]
    return value


FLOAT_KINDS, NUMBER_KINDS = "f", "biuf"  # dtype kinds of a loss scale, of found_inf


def is_array(value):
    """Whether `value` is an array (host or device), not a number (NumPy scalars
    included)."""
    return isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__") or \
        bool(getattr(value, "__cuda_ndarray__", False))


def scalar_array(name, value, backend, on_device, kinds):
    """`value`, after checking that it is a 0-d array of one of the dtype `kinds` in the
    memory `backend` updates in (on_device: the parameters'); its value is not read."""
    info = describe(name, value)
    if info.shape != ():
        raise ValueError(f"Invalid {name} value: an array of shape {info.shape} ({name} "
                         f"in the backend's memory is a 0-d array: one number)")
    if info.dtype.kind not in kinds:
        raise TypeError(f"Invalid {name} value: an array of dtype {info.dtype} ({name} "
                        f"must be a {'float' if kinds == FLOAT_KINDS else 'number'} array)")
    if info.on_device != on_device or not backend.owns(value):
        where = "GPU memory" if on_device else "host memory"
        raise TypeError(f"Invalid {name} value: a {type_name(value)}, which backend "
                        f"{backend.name!r} cannot read in its place (an array in {where}, "
                        f"where the parameters are, is needed)")
    return value

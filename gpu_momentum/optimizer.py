"""The public update: `momentum_step` (stateless) and `MomentumSGD` (owns the velocity)."""

import collections.abc
import dataclasses
import math
import numbers

import numpy as np

from .arrays import array_state, check_param, compute_dtype, describe, overlaps, type_name
from .backends import check_arrays, device_table, select_backend
from .flat import FlatParams
from .groups import GROUP_OPTIONS, resolve_groups, update_table
from .hyperparams import Hyperparameters, flag, inverse_grad_scale
from .kernels.elementwise import count_step, mark_velocities_initialized
from .kernels.layout import (GROUP_SLOTS, KEEP_VELOCITY, LAST_STEP_SKIPPED, SKIPPED_STEPS,
                             STEP_COUNT, VELOCITY_INITIALIZED)
from .precision import (PRECISION_BUFFER_NAMES, Precision, check_key_integer,
                        check_precision_name, check_same_precision, check_seed)
from .state_format import STATE_VERSION, momentum_sgd_keys, state_version


COUNT_LIMIT = 2**63 - 1  # the counters are int64
_NOTHING = object()  # no grad_scale checked yet


def _count(name, value):
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or not 0 <= value <= COUNT_LIMIT):
        raise ValueError(f"Invalid {name} value: {value!r} ({name} must be an integer "
                         f"in [0, {COUNT_LIMIT}])")
    return int(value)


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

    first_step=True means the old velocity is not read (it may be uninitialised): classic
    starts from velocity 0, torch sets velocity = g' without dampening, as PyTorch does on
    its first step. Torch style with momentum 0 is param -= lr*g' and leaves the velocity
    as it is, as PyTorch leaves its momentum buffer.

    16-bit parameters (bfloat16, float16) are computed in float32 and rounded back as
    `precision` says (see MomentumSGD): "nearest"; "stochastic", whose random bits are
    keyed by `seed` and `step_count` (the steps taken before this one: give each step its
    own) and each element's index; "kahan", which reads and writes `compensation` (an
    array of param's dtype and shape, zeros at first); "master", which updates `master`
    (a float32 copy of the parameters) and writes its rounding to param.

    Arrays are contiguous, of one shape, with grad of param's dtype and a velocity of
    param's dtype (float32 or param's dtype for 16-bit params). backend=None picks the
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
    Precision(info.dtype, precision, seed=seed)
    check_arrays(backend, param, grad, velocity, precision, buffer)
    hyper.check_dtype(info.dtype)
    device_scale = None
    if _is_array(grad_scale):
        device_scale = _scalar_array("grad_scale", grad_scale, backend, info.on_device,
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


def _size(array):
    return math.prod(describe("array", array).shape)


FLOAT_KINDS, NUMBER_KINDS = "f", "biuf"  # dtype kinds of a loss scale, of found_inf


def _is_array(value):
    """Whether `value` is an array (host or device), not a number (NumPy scalars
    included)."""
    return isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__") or \
        bool(getattr(value, "__cuda_ndarray__", False))


def _scalar_array(name, value, backend, on_device, kinds):
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


class ParamGroup(collections.abc.MutableMapping):
    """One parameter group of a MomentumSGD, as in `torch.optim`: `group["lr"] = 0.01`
    changes it for the next step (validated on assignment; no recompile). "params" (the
    segments it covers) is fixed; its keys are "params" and GROUP_OPTIONS, none of which
    can be added or removed. Every change (`[key] =`, `update`, `|=`, `setdefault`) is
    validated as a whole before it applies: all of its keys or none."""

    def __init__(self, optimizer, index, params):
        # As given, but NumPy integers and strings as Python ones (state dicts and
        # checkpoints hold plain JSON values).
        self._optimizer, self._index = optimizer, index
        self._params = tuple(str(p) if isinstance(p, str) else int(p) for p in params)

    def __getitem__(self, key):
        if key == "params":
            return list(self._params)
        if key not in GROUP_OPTIONS:
            raise KeyError(key)
        return getattr(self._optimizer._hypers[self._index], key)

    def __setitem__(self, key, value):
        self.update({key: value})

    def update(self, other=(), /, **options):
        """Sets every given option at once, validated together: all of them or none.
        "params" may be given only as it is."""
        changes = dict(other, **options)
        for key, value in changes.items():
            if key == "params" and isinstance(value, (list, tuple)) and \
                    list(value) == list(self._params):
                continue
            if key not in GROUP_OPTIONS:
                raise KeyError(f"{key!r} cannot be set on a parameter group (settable: "
                               f"{GROUP_OPTIONS})")
        changes.pop("params", None)
        if changes:
            self._optimizer._set(self._index, **changes)

    def __ior__(self, other):
        self.update(other)
        return self

    def __or__(self, other):
        if not isinstance(other, collections.abc.Mapping):
            return NotImplemented
        return dict(self) | dict(other)  # a new dict, as dict | dict gives

    def __ror__(self, other):
        if not isinstance(other, collections.abc.Mapping):
            return NotImplemented
        return dict(other) | dict(self)

    def setdefault(self, key, default=None):
        if key not in self:
            raise KeyError(f"{key!r} cannot be added to a parameter group (its keys: "
                           f"{tuple(self)})")
        return self[key]

    def __delitem__(self, key):
        raise TypeError(f"options of a parameter group cannot be removed (tried {key!r})")

    def popitem(self):
        raise TypeError("options of a parameter group cannot be removed")

    def clear(self):
        raise TypeError("options of a parameter group cannot be removed")

    def __iter__(self):
        return iter(("params", *GROUP_OPTIONS))

    def __len__(self):
        return 1 + len(GROUP_OPTIONS)

    def __repr__(self):
        return repr(dict(self))


class ParamGroups(collections.abc.Sequence):
    """`MomentumSGD.param_groups`: one ParamGroup per group given to the constructor, in
    order. The groups are fixed at construction (MomentumSGD has no add_param_group):
    every mutator of a list raises TypeError; each group's options stay settable."""

    FIXED = ("param_groups is fixed at construction (MomentumSGD has no "
             "add_param_group): pass every group to MomentumSGD(..., groups=[...])")

    def __init__(self, groups):
        self._groups = tuple(groups)

    def __getitem__(self, index):
        return self._groups[index]

    def __len__(self):
        return len(self._groups)

    def __eq__(self, other):
        if isinstance(other, (ParamGroups, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return repr(list(self._groups))

    def __setitem__(self, index, value):
        # `param_groups[i] |= {...}` updates the group in place, then stores it back: that
        # store of the very same group must not raise after the change.
        try:
            same = not isinstance(index, slice) and value is self._groups[index]
        except (IndexError, TypeError):
            same = False
        if not same:
            raise TypeError(self.FIXED)

    def _fixed(self, *args, **kwargs):
        raise TypeError(self.FIXED)

    __delitem__ = __iadd__ = __imul__ = _fixed
    append = extend = insert = pop = remove = clear = reverse = sort = _fixed


class MomentumSGD:
    """Momentum SGD over one flat parameter buffer, one fused kernel launch per step.

    Formulas as in `momentum_step` (style="classic" by default; style="torch" tracks
    torch.optim.SGD step for step). The velocity starts at zero and the first `step()` does
    not read it: classic starts from 0, torch style sets it to the gradient, skipping
    dampening. In torch style that first step is the first one with momentum > 0, since
    PyTorch creates its momentum buffer only then; with groups, each group has its own.

    params: a FlatParams (then `step()` without arguments uses its gradient buffer) or one
    contiguous array (one segment, index 0). lr, momentum, dampening, weight_decay, l1,
    nesterov and maximize may be changed between steps (schedules); each change is
    validated and costs no recompile.

    groups: per-layer hyperparameters, as torch.optim's parameter groups: a list of dicts,
    each with "params" (a list of FlatParams segment indices, or of the names given to
    `FlatParams.from_arrays(..., names=...)`) and overrides of any of lr, momentum,
    dampening, weight_decay, l1 and nesterov. A segment belongs to at most one group;
    segments no group names use the optimizer's own hyperparameters (`opt.lr`, ...), which
    are also the defaults of every group's missing options. `param_groups[i]` is groups[i],
    settable like torch's; the groups themselves are fixed at construction (no
    add_param_group). style, maximize and decoupled_weight_decay are the optimizer's.
    Every value is also checked against the compute dtype (Hyperparameters.check_dtype).
    Still one kernel launch per step, whatever the number of groups.

    skip_nonfinite=True: a step whose (scaled) gradient holds a NaN or inf changes neither
    params nor velocity, does not count in `step_count` (a skipped first step leaves the
    next one first), and counts in `skipped_steps`; `last_step_skipped` tells. The check
    and the skip run in the backend's memory without waiting for the device; reading
    those counters then waits for it.

    16-bit parameters (bfloat16 from ml_dtypes, float16) are computed in float32 and
    stored back once per step as `precision` says (bytes moved per element with a float32
    velocity in brackets; float32 parameters move 20):
    - "nearest" (default; 14): rounded to nearest even, bit for bit the float32 update
      cast as ml_dtypes (bfloat16) or NumPy (float16) cast. An update below half an ulp
      of its parameter (2**-9 relative in bfloat16) is lost: training with small steps
      stalls.
    - "stochastic" (14): rounded up or down at random with the probabilities that make
      the expected result exact; the random bits come from a hash of (`seed`, the step
      count, the element's index), reproducible and the same on every backend. No extra
      memory.
    - "kahan" (18): `compensation`, a buffer of the parameter dtype (zeros at first),
      carries each step's rounding error into the next (as optimi does); the update
      reads param + compensation.
    - "master" (20): `master`, a float32 copy of the parameters (taken at construction
      and restored by load), is updated; the parameters are its rounding, written in the
      same pass (as Apex's master weights; writes to the parameters themselves are lost).
    velocity_dtype: float32 (default) or, for 16-bit parameters, their own dtype, which
    halves the optimizer state (10 bytes per element with "nearest") but rounds the
    velocity every step as the parameters are rounded: lossy. float32 and float64
    parameters have "nearest" only. `seed`: an integer in [0, 2**64).
    """

    # (start, stop): the optimizer updates these elements of its buffer alone, and its
    # velocity covers them alone (a shard: gpu_momentum.distributed); None: all of them.
    _window = None

    def __init__(self, params, *, lr, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 l1=0.0, nesterov=False, maximize=False, style="classic",
                 decoupled_weight_decay=False, groups=None, skip_nonfinite=False,
                 capturable=False, precision="nearest", velocity_dtype=None, seed=0,
                 backend="auto"):
        defaults = Hyperparameters(lr=lr, momentum=momentum, dampening=dampening,
                                   weight_decay=weight_decay, nesterov=nesterov,
                                   maximize=maximize, style=style, l1=l1,
                                   decoupled_weight_decay=decoupled_weight_decay)
        self._skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        self._capturable = flag("capturable", capturable)
        # The step counters live in the backend's memory, counted by the kernels.
        self._counted_on_device = self._skip_nonfinite or self._capturable
        self.flat = params if isinstance(params, FlatParams) else None
        self.param = params.data if self.flat is not None else params
        info = describe("params", self.param)
        self._backend = select_backend(backend, self.param)
        check_param(info, self._backend.dtypes, self._backend.name)
        self._param_dtype = info.dtype
        self._on_device = info.on_device
        self._buffer_size = _size(self.param)
        self._precision = Precision(info.dtype, precision, velocity_dtype, seed)
        self._compute_dtype = compute_dtype(info.dtype)
        self._plan = self._resolve(groups, defaults)
        if self._window is not None:
            self.param = self.param.reshape(_size(self.param))[slice(*self._window)]
            info = describe("params", self.param)
        self._param_groups = ParamGroups(ParamGroup(self, index + 1, g["params"])
                                         for index, g in enumerate(groups or []))
        self._hypers = list(self._plan.hypers)
        self.velocity = self._backend.zeros(info.shape, self._precision.velocity_dtype)
        self._precision_buffer = self._new_precision_buffer()
        self._counters = self._new_counters(0, [False] * len(self._hypers), 0)
        self._table = None  # the update table in the backend's memory
        self._table_stale = True  # hyperparameters or first-step flags changed since
        # What the latest step checked and prepared, so that a step repeating it does no
        # more than compare (see step).
        self._grad_scale = self._inv_grad_scale = _NOTHING
        self._grad = self._velocity = self._launch = self._launch_key = None
        self._array_states = None
        self._first_steps_pending = True  # some group's next step is its first
        if self._capturable:
            self.prepare()

    def _resolve(self, groups, defaults):
        if self.flat is None:
            plan = resolve_groups(groups, defaults, [0], [self._buffer_size],
                                  self._buffer_size, param_dtype=self._param_dtype)
        else:
            plan = resolve_groups(groups, defaults, self.flat.offsets, self.flat.sizes,
                                  self._buffer_size, self.flat.names,
                                  param_dtype=self._param_dtype)
        return plan if self._window is None else plan.window(*self._window)

    def _new_precision_buffer(self):
        """kahan: a zero compensation; master: the parameters widened to float32 (through
        host memory, once); else None."""
        if self.precision == "kahan":
            return self._backend.zeros(describe("params", self.param).shape,
                                       self._precision.buffer_dtype)
        if self.precision == "master":
            host = self._backend.to_numpy(self.param).astype(np.float32)
            return self._backend.asarray(host)
        return None

    def _new_counters(self, step_count, velocity_initialized, skipped_steps):
        counters = np.zeros(GROUP_SLOTS + len(velocity_initialized), np.int64)
        counters[[STEP_COUNT, SKIPPED_STEPS]] = step_count, skipped_steps
        counters[GROUP_SLOTS:] = velocity_initialized
        return self._backend.asarray(counters) if self._counted_on_device else counters

    def _host_counters(self):
        counters = self._counters
        return self._backend.to_numpy(counters) if self._counted_on_device else counters

    def _counter(self, index):
        return int(self._host_counters()[index])

    step_count = property(lambda self: self._counter(STEP_COUNT),
                          doc="Steps taken (skipped steps not counted).")
    skipped_steps = property(lambda self: self._counter(SKIPPED_STEPS),
                             doc="Steps skipped for a non-finite gradient.")
    last_step_skipped = property(lambda self: bool(self._counter(LAST_STEP_SKIPPED)),
                                 doc="Whether the latest step was skipped.")

    @property
    def velocity_initialized(self):
        """Whether steps have written every group's velocity (the next step is no group's
        first step)."""
        return bool(self._host_counters()[GROUP_SLOTS:].all())

    @property
    def skip_nonfinite(self):
        """Whether steps with a non-finite gradient are skipped (fixed at construction:
        the counters that decide first steps live in the backend's memory then)."""
        return self._skip_nonfinite

    @property
    def capturable(self):
        """Whether step() can be captured in a CUDA graph (fixed at construction): the
        step counters live in the backend's memory, counted by the kernels, and a
        hyperparameter change is written to the table in the backend's memory at once
        (same addresses), so that the next replay uses it."""
        return self._capturable

    @property
    def backend(self):
        """Name of the backend running the updates."""
        return self._backend.name

    precision = property(lambda self: self._precision.precision,
                         doc="How 16-bit parameters are rounded: 'nearest', 'stochastic', "
                             "'kahan' or 'master'.")
    seed = property(lambda self: self._precision.seed,
                    doc="The seed of stochastic rounding's random bits.")
    velocity_dtype = property(lambda self: self._precision.velocity_dtype,
                              doc="The velocity's dtype.")
    compensation = property(
        lambda self: self._precision_buffer if self.precision == "kahan" else None,
        doc="precision='kahan': each parameter's rounding error, in the parameter "
            "dtype; else None.")
    master = property(
        lambda self: self._precision_buffer if self.precision == "master" else None,
        doc="precision='master': the float32 master copy of the parameters; else None.")

    @property
    def style(self):
        return self._hypers[0].style

    @property
    def decoupled_weight_decay(self):
        return self._hypers[0].decoupled_weight_decay

    @property
    def param_groups(self):
        """One ParamGroup per entry of the constructor's `groups`, in order: a read-only
        sequence (the groups are fixed at construction) of settable mappings."""
        return self._param_groups

    def _set(self, group, **change):
        hyper = self._hypers[group].replace(**change).check_dtype(self._param_dtype)
        if self._capturable:
            self._refuse_host_work("a hyperparameter change writes the table")
        if group == 0 and "maximize" in change:  # one per launch: every group follows
            self._hypers = [h.replace(maximize=hyper.maximize) for h in self._hypers]
        self._hypers[group] = hyper
        self._table_stale = True
        if self._capturable:  # graphs replayed from now on read the new table
            self._device_table()

    def _default(name):
        return property(lambda self: getattr(self._hypers[0], name),
                        lambda self, value: self._set(0, **{name: value}),
                        doc=f"{name} of the segments no group names.")

    lr = _default("lr")
    momentum = _default("momentum")
    dampening = _default("dampening")
    weight_decay = _default("weight_decay")
    l1 = _default("l1")
    nesterov = _default("nesterov")
    maximize = _default("maximize")
    del _default

    def _device_table(self):
        if self._table_stale:
            # Counters in the backend's memory: the kernels read first steps from them.
            initialized = ([True] * len(self._hypers) if self._counted_on_device else
                           self._counters[GROUP_SLOTS:])
            table = update_table(self._hypers, initialized, self._compute_dtype,
                                 self._plan.range_ends, self._plan.range_groups)
            self._group_flags = table.group_flags  # in host memory, for the host's counting
            self._table = device_table(self._backend, table, self.param, reuse=self._table)
            self._table_stale = False
            self._first_steps_pending = not self._counted_on_device and bool(
                ((table.group_flags & (VELOCITY_INITIALIZED | KEEP_VELOCITY)) == 0).any())
        return self._table

    def step(self, grad=None, *, grad_scale=1.0, found_inf=None):
        """Updates the parameters with `grad` (default: the FlatParams' gradient buffer)
        divided by `grad_scale` (the loss scale, inside the same fused pass).

        grad_scale: a number, checked as inverse_grad_scale says; or a 0-d float array in
        the backend's memory (a CuPy array or torch CUDA tensor, such as
        torch.amp.GradScaler's scale; a NumPy array on the CPU), which the kernels read
        when they run (so a CUDA graph replays its value of the moment): the gradient is
        multiplied by 1 / grad_scale worked out in the compute dtype, for the power-of-two
        scales of loss scalers exactly the number's 1 / grad_scale. Its value is not
        checked (that would wait for the device); with skip_nonfinite a scale whose
        inverse is not finite skips the step. found_inf: None, or a 0-d array in the
        backend's memory (GradScaler's found_inf): when it is nonzero the step is
        skipped, changing nothing but the counters (on a GPU the counters must be in its
        memory: capturable or skip_nonfinite).

        A step with the grad and grad_scale objects of the step before, unchanged (same
        shape, strides, dtype, flags: arrays.array_state), and unchanged hyperparameters
        only compares them and launches the update prepared then (the backend's
        step_function); anything else is checked in full first."""
        device_scale = None
        if grad_scale is self._grad_scale:
            inv_grad_scale = self._inv_grad_scale
        elif _is_array(grad_scale):
            device_scale = _scalar_array("grad_scale", grad_scale, self._backend,
                                         self._on_device, FLOAT_KINDS)
            inv_grad_scale = 1.0  # not read
        else:
            inv_grad_scale = inverse_grad_scale(grad_scale, self._param_dtype)
            self._grad_scale, self._inv_grad_scale = grad_scale, inv_grad_scale
        if found_inf is not None:
            found_inf = _scalar_array("found_inf", found_inf, self._backend,
                                      self._on_device, NUMBER_KINDS)
            if self._on_device and not self._counted_on_device:
                raise ValueError("Invalid found_inf value: an array, but this optimizer "
                                 "counts its steps on the host, which cannot read it "
                                 "without waiting for the device (construct it with "
                                 "capturable=True or skip_nonfinite=True)")
        self._step(self._gradient(None) if grad is None else grad, inv_grad_scale,
                   grad_scale=device_scale, found_inf=found_inf)

    def _gradient(self, grad):
        """`grad`, or the FlatParams' gradient buffer for None."""
        if grad is not None:
            return grad
        if self.flat is None:
            raise TypeError("grad is None, but params is a single array: pass grad "
                            "(only FlatParams carry their own gradient buffer)")
        return self.flat.grad

    def _step(self, grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None):
        """The step over `param` (the window's elements) with `grad` of its shape; `agree`
        as in Backend.step, with skip_nonfinite; grad_scale and found_inf checked 0-d
        arrays in the backend's memory, or None."""
        if (self._table_stale or grad is not self._grad or self.velocity is not self._velocity
                or self._array_states != (array_state(self.param), array_state(grad),
                                          array_state(self.velocity))):
            self._prepare_step(grad)
        if self._counted_on_device:
            self._launch(grad, inv_grad_scale, agree, grad_scale, found_inf)
            return
        if self._on_device:  # a CUDA graph would replay the launch, not the counting
            self._refuse_host_work("the step counters are in host memory (construct the "
                                   "optimizer with capturable=True)")
        # The counters stay in host memory: counted here as the kernels count theirs
        # (found_inf too is in host memory here).
        counters = self._counters
        skipped = found_inf is not None and bool(found_inf[()] != 0)
        if not skipped:
            self._launch(grad, inv_grad_scale, agree, grad_scale, step_count=counters[
                STEP_COUNT])
        if skipped or counters[LAST_STEP_SKIPPED]:
            counters[LAST_STEP_SKIPPED] = skipped
        count_step(counters)
        if self._first_steps_pending and not skipped:  # their flags change: the table too
            mark_velocities_initialized(counters, self._group_flags, 0, 1)
            self._table_stale = True

    def _prepare_step(self, grad):
        """Every check of a step's arrays, then `prepare`."""
        self._grad = None  # nothing counts as checked until every check passed
        param, velocity = self.param, self.velocity
        check_arrays(self._backend, param, grad, velocity, self.precision,
                     self._precision_buffer)
        self.prepare()
        self._array_states = (array_state(param), array_state(grad), array_state(velocity))
        self._grad, self._velocity = grad, velocity

    def prepare(self):
        """Does now what a step needs besides its launches: the table in the backend's
        memory (after a hyperparameter change) and the launches prepared (kernels
        compiled and loaded, launch geometry, arguments). A capturable optimizer does this
        at construction and after every change, so that step() can be captured in a CUDA
        graph (`cupy.cuda.Stream.begin_capture()`, `torch.cuda.graph`); a step inside a
        capture that would need it raises RuntimeError instead. Prepared again only when
        the table, the velocity, the counters or the precision settings (a seed loaded)
        are other objects; a prepared launch holds the seed, so a capturable optimizer
        whose state loads another seed needs its graphs captured again."""
        velocity, counters = self.velocity, self._counters
        key = (self._table, velocity, counters, self._precision)
        if not self._table_stale and self._launch_key is not None and all(
                a is b for a, b in zip(key, self._launch_key)):
            return
        self._refuse_host_work("the update table or the launches must be prepared (call "
                               "opt.prepare() before capturing)")
        table = self._device_table()
        key = (table, velocity, counters, self._precision)
        if self._launch_key is None or any(a is not b for a, b in zip(key, self._launch_key)):
            self._launch = self._backend.step_function(
                self.param, velocity, table, counters if self._counted_on_device else None,
                check_nonfinite=self._skip_nonfinite, precision=self.precision,
                precision_buffer=self._precision_buffer, seed=self.seed)
            self._launch_key = key

    def _refuse_host_work(self, why):
        """RuntimeError when param's stream is being captured into a CUDA graph, which
        would record the launches and not the host work `why` names."""
        if self._on_device and self._backend.capturing(self.param):
            raise RuntimeError(f"MomentumSGD.step() is being captured into a CUDA graph, "
                               f"but {why}: a replay would not do it. Nothing was "
                               f"changed.")

    def state_dict(self):
        """A plain dict: format (the state version, gpu_momentum.state_format), the
        optimizer's hyperparameters, precision, velocity_dtype (its name) and seed, its
        groups (each with "params" as given and every option), step count, whether each
        group's velocity is initialized (the optimizer's own first, then one per group), a
        velocity copy and, with precision "kahan" or "master", a copy of the compensation
        or master buffer under that name."""
        counters = self._host_counters()
        state = {"format": STATE_VERSION, **self._hypers[0].as_dict(),
                 "precision": self.precision, "velocity_dtype": self.velocity_dtype.name,
                 "seed": self.seed,
                 "groups": [dict(group) for group in self.param_groups],
                 "step_count": int(counters[STEP_COUNT]),
                 "velocity_initialized": [bool(c) for c in counters[GROUP_SLOTS:]],
                 "skipped_steps": int(counters[SKIPPED_STEPS]),
                 "velocity": self._backend.copy(self.velocity)}
        if self._precision_buffer is not None:
            state[self._precision.buffer_name] = self._backend.copy(self._precision_buffer)
        return state

    def load_state_dict(self, state, params=None):
        """Restores `state_dict()` output (of any state version: before version 4 as
        precision "nearest", the default velocity dtype, seed 0) and, given `params` (an
        array of the flat buffer's shape and dtype, in host or this backend's memory), the
        parameters too. The state's precision must be this optimizer's. Validates everything before changing anything: every value (also against the
        compute dtype), and that every array it writes (the velocity; the parameters,
        given params) is writable and fits."""
        self._checked_state(state, params)()

    def _checked_state(self, state, params=None):
        """Validates `state` and `params` as load_state_dict does and returns a function
        without arguments that restores them, which cannot fail."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type_name(state)}")
        version = state_version("MomentumSGD", state.get("format"))
        check_same_precision(state.get("precision", "nearest") if version >= 4 else
                             "nearest", self.precision)
        expected = set(momentum_sgd_keys(self.precision, version))
        if set(state) != expected:
            raise ValueError(f"state has keys {sorted(state)}, expected {sorted(expected)}")
        if version >= 4:
            velocity_dtype = state["velocity_dtype"]
            if velocity_dtype != self.velocity_dtype.name:
                raise ValueError(f"Invalid velocity_dtype value: {velocity_dtype!r} (this "
                                 f"optimizer keeps a {self.velocity_dtype.name} velocity)")
        seed = check_seed(state["seed"]) if version >= 4 else 0
        defaults = Hyperparameters(
            **{k: state[k] for k in Hyperparameters.__dataclass_fields__})
        if defaults.style != self.style:
            raise ValueError(f"Invalid style value: {defaults.style!r} (this optimizer uses "
                             f"style {self.style!r}; velocities of the two styles differ)")
        if not isinstance(state["groups"], list):
            raise TypeError(f"Invalid groups value: {state['groups']!r} (a list of dicts)")
        plan = self._resolve(state["groups"], defaults)
        if plan.segment_groups != self._plan.segment_groups:
            raise ValueError(f"Invalid groups value: the state's groups cover segments "
                             f"{plan.segment_groups}, this optimizer's "
                             f"{self._plan.segment_groups} (group of each segment)")
        initialized = state["velocity_initialized"]
        if not isinstance(initialized, list) or len(initialized) != len(plan.hypers):
            raise ValueError(f"Invalid velocity_initialized value: {initialized!r} (a list "
                             f"of {len(plan.hypers)} bools: the optimizer's, then each "
                             f"group's)")
        counters = self._new_counters(
            _count("step_count", state["step_count"]),
            [flag("velocity_initialized", value) for value in initialized],
            _count("skipped_steps", state["skipped_steps"]))
        velocity = self._like('state["velocity"]', state["velocity"], "velocity",
                              self.velocity)
        name = self._precision.buffer_name
        buffer = None if name is None else self._like(f'state["{name}"]', state[name], name,
                                                      self._precision_buffer)
        if params is not None:
            params = self._like("params", params, "params", self.param)
            written = [self.velocity] + ([] if buffer is None else [self._precision_buffer])
            if any(overlaps(describe("params", params), describe("written", array))
                   for array in written):
                params = self._backend.copy(params)  # read before the state is written

        def restore():  # everything is checked: nothing can fail half way
            self._backend.assign(self.velocity, velocity)
            if buffer is not None:
                self._backend.assign(self._precision_buffer, buffer)
            if params is not None:
                self._backend.assign(self.param, params)
            self._hypers = list(plan.hypers)
            if seed != self.seed:  # a new seed: the launches are prepared again
                self._precision = dataclasses.replace(self._precision, seed=seed)
            # In place: a captured graph keeps reading the same counters.
            if self._counted_on_device:
                self._backend.assign(self._counters, counters)
            else:
                self._counters[...] = counters
            self._table_stale = True
            if self._capturable:
                self._device_table()

        return restore

    def save(self, path):
        """Writes a checkpoint atomically (see `gpu_momentum.checkpoint`)."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self, path)

    def load(self, path):
        """Restores params and state from `save(path)`, all or nothing."""
        from .checkpoint import load_checkpoint
        load_checkpoint(self, path)

    def _like(self, name, array, target_name, target):
        """`array` in this backend's memory, checked to have the shape and dtype of
        `target` (this optimizer's `target_name`), which must be writable."""
        describe(name, array)
        if describe(target_name, target).readonly:
            raise ValueError(f"this optimizer's {target_name} array is read-only; loading "
                             f"writes it in place (nothing was changed)")
        array = self._backend.asarray(array)
        have, want = describe(name, array), describe(target_name, target)
        if (have.shape, have.dtype) != (want.shape, want.dtype):
            raise ValueError(f"{name} has shape {have.shape} and dtype {have.dtype}; "
                             f"this optimizer needs shape {want.shape}, dtype {want.dtype}")
        return array

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self._hypers[0].as_dict().items())
        if self.precision != "nearest" or self.velocity_dtype != self._compute_dtype:
            fields += (f", precision={self.precision!r}, velocity_dtype="
                       f"{self.velocity_dtype.name!r}, seed={self.seed}")
        groups = f", groups={len(self._param_groups)}" if self._param_groups else ""
        return (f"MomentumSGD({fields}{groups}, backend={self.backend!r}, "
                f"step_count={self.step_count})")

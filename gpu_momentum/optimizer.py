"""`MomentumSGD`: momentum SGD that owns the velocity of one flat parameter buffer.

MomentumSGD validates its arguments and owns the options, the groups and the state dict;
`_FlatUpdate`, its base, holds the arrays, counters, update table and prepared launches
of the fused step, and runs it. `momentum_step` (gpu_momentum.functional), `ParamGroup`
and `ParamGroups` (gpu_momentum.param_groups) and the state format's names
(gpu_momentum.optimizer_state) are importable from here too.

MomentumSGD's interface for subclasses (protected: a subclass uses it through `self`;
nothing outside this module and its subclasses does). gpu_momentum.distributed's
ShardUpdate, the update of one rank's shard, is built on it:
- `_window`: None, or (start, stop), set before MomentumSGD.__init__ runs: the optimizer
  then updates these elements of its buffer alone, its velocity (and precision buffer)
  covers them alone, and its groups are cut at the window's edges.
- `_backend`: the Backend object running the updates (`backend` is its name).
- `_hypers`: every group's Hyperparameters, [0] the optimizer's own; read-only (changes
  go through the option setters and `param_groups`).
- `_table_stale`: True from a loaded state (or a first step's flags, or a change of
  whether a group keeps its velocity) until the next step writes the update table. A
  changed hyperparameter is written into the table's row in place at once instead.
- `_hypers_version`: counts the changes of `_hypers` (option setters, loaded states).
- `_gradient(grad)`: `grad`, or the FlatParams' gradient buffer for None.
- `_step(grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None)`: one step
  over the window with `grad` of its shape, multiplied by `inv_grad_scale`: step() after
  its checks of grad_scale and found_inf; `agree` as in Backend.step.
- `_checked_state(state, params=None)`: every check of load_state_dict, on this
  optimizer's window; returns the function that restores them, which cannot fail.
"""

import dataclasses
import functools
import math

import numpy as np

from .arrays import array_state, check_param, compute_dtype, describe, overlaps
from .backends import check_arrays, device_table, select_backend
from .flat import FlatParams
from .float8_velocity import is_float8_velocity, zeros_float8_velocity
from .functional import (FLOAT_KINDS, NUMBER_KINDS, STATELESS_TABLES_KEPT, is_array,
                         momentum_step, scalar_array)
from .groups import GROUP_FIELDS, resolve_groups, row_terms, table_terms, update_table
from .hyperparams import Hyperparameters, flag, inverse_grad_scale
from .kernels.elementwise import count_step, mark_velocities_initialized
from .kernels.layout import (GROUP_SLOTS, KEEP_VELOCITY, LAST_STEP_SKIPPED, LR,
                             SKIPPED_STEPS, STEP_COUNT, VELOCITY_INITIALIZED)
from .optimizer_state import (COUNT_LIMIT, converted_velocity, count, like, read_header,
                              saved_float8_velocity, state_dict_keys)
from .param_groups import ParamGroup, ParamGroups
from .precision import Precision
from .reference import dequantize_velocity
from .state_format import STATE_VERSION

__all__ = ["MomentumSGD", "momentum_step", "ParamGroup", "ParamGroups", "STATE_VERSION",
           "COUNT_LIMIT", "STATELESS_TABLES_KEPT", "FLOAT_KINDS", "NUMBER_KINDS"]

_NOTHING = object()  # no grad_scale checked yet


def _size(array):
    return math.prod(describe("array", array).shape)


def _velocity_state(velocity):
    """array_state of the velocity, or of both arrays of a Float8Velocity."""
    if is_float8_velocity(velocity):
        return tuple(array_state(array) for array in velocity)
    return array_state(velocity)


class _FlatUpdate:
    """The fused update a MomentumSGD runs over its flat buffer (or over the window of it
    that `_window` names): the arrays it writes (param, velocity, precision buffer), the
    step counters, the update table in the backend's memory and the prepared launches,
    kept while nothing they depend on changes, and the step over them. It checks no
    argument: MomentumSGD validates everything first, and owns the groups' options."""

    def __init__(self, param, backend, precision, plan, skip_nonfinite, capturable):
        self.param, self._backend, self._precision = param, backend, precision
        self._plan, self._hypers = plan, list(plan.hypers)
        self._skip_nonfinite, self._capturable = skip_nonfinite, capturable
        # The step counters live in the backend's memory, counted by the kernels.
        self._counted_on_device = skip_nonfinite or capturable
        info = describe("params", param)
        self._on_device = info.on_device
        self._compute_dtype = compute_dtype(info.dtype)
        self.velocity = (zeros_float8_velocity(backend, math.prod(info.shape))
                         if precision.float8 else
                         backend.zeros(info.shape, precision.velocity_dtype))
        self._precision_buffer = self._new_precision_buffer()
        self._counters = self._new_counters(0, [False] * len(self._hypers), 0)
        self._table = None  # the update table in the backend's memory
        self._host_table = None  # the same in host memory (the very table on the CPU)
        self._table_stale = True  # hyperparameters or first-step flags changed since
        self._hypers_version = 0
        self._launch_terms = frozenset()  # the row_terms the prepared launch handles
        # What the latest step checked and prepared, so that a step repeating it does no
        # more than compare (see MomentumSGD.step).
        self._grad = self._velocity = self._prepared_step = self._prepared_with = None
        self._array_states = None
        self._velocities_uninitialized = True  # some group's velocity is not yet initialized

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

    @property
    def velocity_codes(self):
        """An FP8 velocity's E4M3 codes (uint8, one per element of the flat buffer, in
        the backend's memory; `velocity.codes`); None for another velocity."""
        return self.velocity.codes if self._precision.float8 else None

    @property
    def velocity_scales(self):
        """An FP8 velocity's float32 scales, one per FLOAT8_BLOCK elements of the flat
        buffer (`velocity.scales`); None for another velocity."""
        return self.velocity.scales if self._precision.float8 else None

    def dequantized_velocity(self):
        """The velocity as a new float32 array of the parameters' shape in host memory
        (NumPy): an FP8 one decoded (e4m3 value of each code times its block's scale, as
        reference.dequantize_velocity), any other one widened."""
        shape = describe("params", self.param).shape
        if not self._precision.float8:
            return self._backend.to_numpy(self.velocity).astype(np.float32).reshape(shape)
        codes, scales = (self._backend.to_numpy(a) for a in self.velocity)
        return dequantize_velocity(codes, scales).reshape(shape)
    compensation = property(
        lambda self: self._precision_buffer if self.precision == "kahan" else None,
        doc="precision='kahan': each parameter's rounding error, in the parameter "
            "dtype; else None.")
    master = property(
        lambda self: self._precision_buffer if self.precision == "master" else None,
        doc="precision='master': the float32 master copy of the parameters; else None.")

    def _device_table(self):
        if self._table_stale:
            # Counters in the backend's memory: the kernels read first steps from them.
            initialized = ([True] * len(self._hypers) if self._counted_on_device else
                           self._counters[GROUP_SLOTS:])
            table = update_table(self._hypers, initialized, self._compute_dtype,
                                 self._plan.range_ends, self._plan.range_groups)
            if self._host_table is not None:  # the rows _write_rows writes stay the same
                for name in GROUP_FIELDS:
                    getattr(self._host_table, name)[...] = getattr(table, name)
                table = dataclasses.replace(self._host_table,
                                            launch_flags=table.launch_flags)
            self._group_flags = table.group_flags  # in host memory, for the host's counting
            self._table = device_table(self._backend, table, self.param, reuse=self._table)
            if self._host_table is None:
                self._host_table = table
            else:  # in place: on the CPU the host table's arrays are the table's
                self._host_table.scalars[...] = table.scalars
                self._host_table.group_flags[...] = table.group_flags
            if not table_terms(table.scalars) <= self._launch_terms:
                self._prepared_with = None  # its rows use a term the launch was not made for
            self._table_stale = False
            self._velocities_uninitialized = not self._counted_on_device and bool(
                ((table.group_flags & (VELOCITY_INITIALIZED | KEEP_VELOCITY)) == 0).any())
        return self._table

    def _write_rows(self, groups, lr_only=False):
        """The rows (scalars, flags) of `groups`, whose Hyperparameters changed, written
        into the update table in place: in host memory, then each changed row copied into
        the backend's table with `upload_into` (queued on param's stream, no waiting; on
        the CPU the host table is the table). No table is built and no array allocated;
        the prepared launch stays, unless a row now uses a term of the update it was not
        prepared for (groups.row_terms). A change of whether a group keeps its velocity
        (momentum 0 in torch style) rewrites the table at the next step instead.
        lr_only: only the lr changed, which (without decoupled weight decay) is the lr
        column alone."""
        host = self._host_table
        if self._table_stale or host is None:
            return  # the next step (or prepare) builds the table from _hypers
        dtype, shared = self._compute_dtype, host.scalars is self._table.scalars
        for group in groups:
            hyper = self._hypers[group]
            if lr_only and not hyper.decoupled_weight_decay:
                host.scalars[group, LR] = hyper.lr  # cast as table_row casts it
                if not shared:
                    self._backend.upload_into(self._table.scalars[group:group + 1],
                                              host.scalars[group:group + 1], self.param)
                continue
            if self._counted_on_device:
                initialized = True
            else:
                initialized = bool(self._counters[GROUP_SLOTS + group])
            flags = hyper.group_flags(initialized)
            if (flags ^ int(host.group_flags[group])) & KEEP_VELOCITY:
                self._table_stale = True
                return
            row = hyper.group_row(dtype)
            host.scalars[group] = row
            if row_terms(host.scalars[group]) not in self._launch_terms:
                self._prepared_with = None  # the launch is prepared again for it
            flags_changed = flags != host.group_flags[group]
            if flags_changed:
                host.group_flags[group] = flags
            if not shared:
                self._backend.upload_into(self._table.scalars[group:group + 1],
                                          host.scalars[group:group + 1], self.param)
                if flags_changed:
                    self._backend.upload_into(self._table.group_flags[group:group + 1],
                                              host.group_flags[group:group + 1],
                                              self.param)

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
        if (self._table_stale or self._prepared_with is None or grad is not self._grad
                or self.velocity is not self._velocity
                or self._array_states != (array_state(self.param), array_state(grad),
                                          _velocity_state(self.velocity))):
            self._prepare_step(grad)
        if self._counted_on_device:
            self._prepared_step(grad, inv_grad_scale, agree, grad_scale, found_inf)
            return
        if self._on_device:  # a CUDA graph would replay the launch, not the counting
            self._refuse_host_work("the step counters are in host memory (construct the "
                                   "optimizer with capturable=True)")
        # The counters stay in host memory: counted here as the kernels count theirs
        # (found_inf too is in host memory here).
        counters = self._counters
        skipped = found_inf is not None and bool(found_inf[()] != 0)
        if not skipped:
            self._prepared_step(grad, inv_grad_scale, agree, grad_scale, step_count=counters[
                STEP_COUNT])
        if skipped or counters[LAST_STEP_SKIPPED]:
            counters[LAST_STEP_SKIPPED] = skipped
        count_step(counters)
        if self._velocities_uninitialized and not skipped:  # their flags change: the table too
            mark_velocities_initialized(counters, self._group_flags, 0, 1)
            self._table_stale = True

    def _prepare_step(self, grad):
        """Every check of a step's arrays, then `prepare`."""
        self._grad = None  # nothing counts as checked until every check passed
        param, velocity = self.param, self.velocity
        check_arrays(self._backend, param, grad, velocity, self.precision,
                     self._precision_buffer)
        self.prepare()
        self._array_states = (array_state(param), array_state(grad),
                              _velocity_state(velocity))
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
        if not self._table_stale and self._prepared_with is not None and all(
                a is b for a, b in zip(key, self._prepared_with)):
            return
        self._refuse_host_work("the update table or the launches must be prepared (call "
                               "opt.prepare() before capturing)")
        table = self._device_table()
        key = (table, velocity, counters, self._precision)
        if self._prepared_with is None or any(
                a is not b for a, b in zip(key, self._prepared_with)):
            self._prepared_step = self._backend.step_function(
                self.param, velocity, table, counters if self._counted_on_device else None,
                check_nonfinite=self._skip_nonfinite, precision=self.precision,
                precision_buffer=self._precision_buffer, seed=self.seed)
            self._prepared_with = key
            self._launch_terms = table_terms(self._host_table.scalars)

    def _refuse_host_work(self, why):
        """RuntimeError when param's stream is being captured into a CUDA graph, which
        would record the launches and not the host work `why` names."""
        if self._on_device and self._backend.capturing(self.param):
            raise RuntimeError(f"MomentumSGD.step() is being captured into a CUDA graph, "
                               f"but {why}: a replay would not do it. Nothing was "
                               f"changed.")



class MomentumSGD(_FlatUpdate):
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

    velocity_dtype="float8_e4m3fn" (or ml_dtypes.float8_e4m3fn), for float32 and 16-bit
    parameters: an 8-bit velocity, E4M3 codes with one float32 scale per 256 elements of
    the flat buffer (1 + 4/256 bytes per element; a step moves 14 bytes per float32
    element, 8 per bfloat16 one with "nearest"), requantized in the same pass. `velocity`
    is then a Float8Velocity: `velocity.codes` (uint8, one per element) and
    `velocity.scales` (float32, one per block), also `velocity_codes` and
    `velocity_scales`; `dequantized_velocity()` decodes it. float32 parameters have
    "stochastic" with it too, which rounds the codes stochastically; 16-bit ones every
    mode. float64 parameters refuse it. state_dict() and checkpoints hold the codes and
    scales, and load into a float32 velocity (decoded) or from one (quantized). See
    docs/precision.md.
    """

    _window = None  # the interface for subclasses: see the module docstring

    def __init__(self, params, *, lr, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 l1=0.0, nesterov=False, maximize=False, style="classic",
                 decoupled_weight_decay=False, groups=None, skip_nonfinite=False,
                 capturable=False, precision="nearest", velocity_dtype=None, seed=0,
                 backend="auto"):
        defaults = Hyperparameters(lr=lr, momentum=momentum, dampening=dampening,
                                   weight_decay=weight_decay, nesterov=nesterov,
                                   maximize=maximize, style=style, l1=l1,
                                   decoupled_weight_decay=decoupled_weight_decay)
        skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        capturable = flag("capturable", capturable)
        self.flat = params if isinstance(params, FlatParams) else None
        param = params.data if self.flat is not None else params
        info = describe("params", param)
        backend = select_backend(backend, param)
        check_param(info, backend.dtypes, backend.name)
        self._param_dtype = info.dtype
        self._buffer_size = _size(param)
        precision = Precision(info.dtype, precision, velocity_dtype, seed)
        plan = self._resolve(groups, defaults)
        if self._window is not None:
            param = param.reshape(self._buffer_size)[slice(*self._window)]
        super().__init__(param, backend, precision, plan, skip_nonfinite, capturable)
        self._param_groups = ParamGroups(
            ParamGroup(g["params"], lambda group=index + 1: self._hypers[group],
                       functools.partial(self._set, index + 1))
            for index, g in enumerate(groups or []))
        self._grad_scale = self._inv_grad_scale = _NOTHING  # the latest step's, checked
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
        """Validates the change once (as at construction) and writes the changed rows of
        the update table in place (_write_rows): a scalar write, no table built."""
        if len(change) == 1 and "lr" in change:
            self._set_lr(group, change["lr"])
            return
        hyper = self._hypers[group].replace(**change).check_dtype(self._param_dtype)
        if self._capturable:
            self._refuse_host_work("a hyperparameter change writes the table")
        changed = [group]
        if group == 0 and "maximize" in change:  # one per launch: every group follows
            self._hypers = [h.replace(maximize=hyper.maximize) for h in self._hypers]
            changed = range(len(self._hypers))
        self._hypers[group] = hyper
        self._hypers_version += 1
        self._write_rows(changed)
        if self._capturable:  # graphs replayed from now on read the new table
            self.prepare()

    def _set_lr(self, group, lr):
        """_set(group, lr=lr), on a schedule's path (Hyperparameters.with_lr): without
        decoupled weight decay the row's lr alone is written."""
        hyper = self._hypers[group].with_lr(lr, self._param_dtype)
        if self._capturable:
            self._refuse_host_work("a hyperparameter change writes the table")
        self._hypers[group] = hyper
        self._hypers_version += 1
        self._write_rows((group,), lr_only=True)
        if self._capturable:
            self.prepare()

    def _default(name):
        return property(lambda self: getattr(self._hypers[0], name),
                        lambda self, value: self._set(0, **{name: value}),
                        doc=f"{name} of the segments no group names.")

    lr = property(lambda self: self._hypers[0].lr, lambda self, lr: self._set_lr(0, lr),
                  doc="lr of the segments no group names.")
    momentum = _default("momentum")
    dampening = _default("dampening")
    weight_decay = _default("weight_decay")
    l1 = _default("l1")
    nesterov = _default("nesterov")
    maximize = _default("maximize")
    del _default

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
        elif is_array(grad_scale):
            device_scale = scalar_array("grad_scale", grad_scale, self._backend,
                                         self._on_device, FLOAT_KINDS)
            inv_grad_scale = 1.0  # not read
        else:
            inv_grad_scale = inverse_grad_scale(grad_scale, self._param_dtype)
            self._grad_scale, self._inv_grad_scale = grad_scale, inv_grad_scale
        if found_inf is not None:
            found_inf = scalar_array("found_inf", found_inf, self._backend,
                                      self._on_device, NUMBER_KINDS)
            if self._on_device and not self._counted_on_device:
                raise ValueError("Invalid found_inf value: an array, but this optimizer "
                                 "counts its steps on the host, which cannot read it "
                                 "without waiting for the device (construct it with "
                                 "capturable=True or skip_nonfinite=True)")
        self._step(self._gradient(None) if grad is None else grad, inv_grad_scale,
                   grad_scale=device_scale, found_inf=found_inf)

    def state_dict(self):
        """A plain dict: format (the state version, gpu_momentum.state_format), the
        optimizer's hyperparameters, precision, velocity_dtype (its name) and seed, its
        groups (each with "params" as given and every option), step count, whether each
        group's velocity is initialized (the optimizer's own first, then one per group), a
        velocity copy (an FP8 velocity's as copies of its codes and scales, under
        "velocity_codes" and "velocity_scales", with velocity_dtype "float8_e4m3fn") and,
        with precision "kahan" or "master", a copy of the compensation or master buffer
        under that name."""
        counters = self._host_counters()
        state = {"format": STATE_VERSION, **self._hypers[0].as_dict(),
                 "precision": self.precision, "velocity_dtype": self.velocity_dtype.name,
                 "seed": self.seed,
                 "groups": [dict(group) for group in self.param_groups],
                 "step_count": int(counters[STEP_COUNT]),
                 "velocity_initialized": [bool(c) for c in counters[GROUP_SLOTS:]],
                 "skipped_steps": int(counters[SKIPPED_STEPS])}
        if self._precision.float8:
            state["velocity_codes"] = self._backend.copy(self.velocity.codes)
            state["velocity_scales"] = self._backend.copy(self.velocity.scales)
        else:
            state["velocity"] = self._backend.copy(self.velocity)
        if self._precision_buffer is not None:
            state[self._precision.buffer_name] = self._backend.copy(self._precision_buffer)
        return state

    def load_state_dict(self, state, params=None):
        """Restores `state_dict()` output (of any state version: before version 4 as
        precision "nearest", the default velocity dtype, seed 0) and, given `params` (an
        array of the flat buffer's shape and dtype, in host or this backend's memory), the
        parameters too. The state's precision must be this optimizer's. Validates
        everything before changing anything: every value (also against the compute
        dtype), and that every array it writes (the velocity; the parameters, given
        params) is writable and fits.

        An FP8 state (codes uint8[n], scales float32[ceil(n / 256)], finite and >= 0)
        loads into an FP8 optimizer bit for bit, and into a float32-velocity one
        dequantized (reference.dequantize_velocity); a float32 velocity loads into an FP8
        optimizer quantized (reference.quantize_velocity, rounded to nearest)."""
        self._checked_state(state, params)()

    def _checked_state(self, state, params=None):
        """Validates `state` and `params` as load_state_dict does and returns a function
        without arguments that restores them, which cannot fail."""
        header = read_header(state, self.precision, self.velocity_dtype, self.style)
        seed, defaults = header.seed, header.defaults
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
            count("step_count", state["step_count"]),
            [flag("velocity_initialized", value) for value in initialized],
            count("skipped_steps", state["skipped_steps"]))
        backend = self._backend
        velocity = self._saved_velocity(state, header.velocity_dtype)
        name = self._precision.buffer_name
        buffer = None if name is None else like(backend, f'state["{name}"]', state[name],
                                                name, self._precision_buffer)
        if params is not None:
            params = like(backend, "params", params, "params", self.param)
            written = (list(self.velocity) if self._precision.float8
                       else [self.velocity])
            written += [] if buffer is None else [self._precision_buffer]
            if any(overlaps(describe("params", params), describe("written", array))
                   for array in written):
                params = self._backend.copy(params)  # read before the state is written

        def restore():  # everything is checked: nothing can fail half way
            if self._precision.float8:
                for array, saved in zip(self.velocity, velocity):
                    self._backend.assign(array, saved)
            else:
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
            self._hypers_version += 1
            if self._capturable:
                self._device_table()

        return restore

    def _saved_velocity(self, state, saved_velocity_dtype):
        """A checked `state`'s velocity in this backend's memory, in this optimizer's
        format: an array like self.velocity, or for an FP8 velocity a (codes, scales)
        pair; converted across the float32 and FP8 formats (converted_velocity)."""
        backend = self._backend
        shape = describe("param", self.param).shape
        converted = converted_velocity(backend, state, saved_velocity_dtype,
                                       self._precision.float8, shape)
        if self._precision.float8:
            if converted is None:
                converted = saved_float8_velocity(backend, state, math.prod(shape))
            return tuple(like(backend, name, array, name, target) for name, array, target
                         in zip(("velocity_codes", "velocity_scales"), converted,
                                self.velocity))
        if converted is not None:
            return like(backend, 'state["velocity"]', converted, "velocity",
                        self.velocity)
        return like(backend, 'state["velocity"]', state["velocity"], "velocity",
                    self.velocity)

    def save(self, path):
        """Writes a checkpoint atomically (see `gpu_momentum.checkpoint`)."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self, path)

    def load(self, path):
        """Restores params and state from `save(path)`, all or nothing."""
        from .checkpoint import load_checkpoint
        load_checkpoint(self, path)

    state_dict_keys = staticmethod(state_dict_keys)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self._hypers[0].as_dict().items())
        if self.precision != "nearest" or self.velocity_dtype != self._compute_dtype:
            fields += (f", precision={self.precision!r}, velocity_dtype="
                       f"{self.velocity_dtype.name!r}, seed={self.seed}")
        groups = f", groups={len(self._param_groups)}" if self._param_groups else ""
        return (f"MomentumSGD({fields}{groups}, backend={self.backend!r}, "
                f"step_count={self.step_count})")

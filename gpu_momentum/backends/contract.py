"""The backend contract: what every backend provides (`Backend`), and what they share.

A backend is one class implementing `Backend`, listed in `gpu_momentum.backends.REGISTRY`
(the built-in ones are modules of this package, with their kernels in the `kernels`
package; others join with `gpu_momentum.backends.register_backend`). Its step is
`runner.StepRunner`, the same for every backend: a backend supplies its kernels, array
views and streams as a `runner.StepKernels`. The optimizer
and `momentum_step` reach the kernels only through these methods, in this order per step:
`check_arrays` (every array check, before anything is written), `device_table` (the
hyperparameters' UpdateTable in the memory where the update runs, copied only when it
changed), then `step`. A changed hyperparameter is written into that table in place:
its rows alone, through `upload_into`, on the step's stream and without waiting.

16-bit parameters reach the kernels as their bits (`bits_view`): Numba has no bfloat16
(and no float16 on the CPU), and the CUDA C kernel stores both as unsigned short.
"""

import dataclasses
from typing import Hashable, Protocol

import numpy as np

from ..arrays import check_update, compute_dtype, describe, type_name
from ..groups import ARRAY_FIELDS, GROUP_FIELDS, UpdateTable, check_table
from ..float8_velocity import is_float8_velocity
from ..precision import PRECISION_BUFFER_NAMES, as_bits


class Backend(Protocol):
    name: str
    dtypes: tuple  # names of the parameter dtypes its kernels update ("bfloat16", ...)
    element_aligned: bool  # its kernels need element-aligned arrays (a GPU faults)
    device_type: str  # the torch device type whose tensors it updates: "cpu", "cuda"
    # Its arrays name the stream its work on them runs on: from_torch's views are made
    # again at each step, naming torch's current stream then.
    arrays_name_stream: bool

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else why not."""

    def owns(self, array) -> bool:
        """Whether it can update `array` in place (its memory and type)."""

    def native(self, array) -> bool:
        """Whether `array` is this backend's own array type, which wins the automatic
        choice: a Numba array goes to numba-cuda although CuPy takes it too."""

    def zeros(self, shape, dtype):
        """A new zero array in its memory."""

    def copy(self, array):
        """A copy of one of its arrays, in its memory."""

    def asarray(self, array):
        """Host or own arrays as its own arrays (for loading state; may wait)."""

    def assign(self, target, source) -> None:
        """Copies host or own memory into `target` (same shape and dtype), in place."""

    def to_numpy(self, array) -> np.ndarray:
        """A host copy (waits for queued work)."""

    def synchronize(self) -> None:
        """Waits for queued work (for timing)."""

    def capturing(self, param) -> bool:
        """Whether the stream param's update runs on is being captured into a CUDA graph
        now: host work (copies, allocations, compiling, counting on the host) would not
        be replayed then (always False on the CPU)."""

    def place(self, param) -> Hashable:
        """Where and in which order param's update runs: device and stream (None on the
        CPU)."""

    def upload(self, array, param):
        """The host NumPy `array` copied into the memory where param's update runs,
        queued on its stream without waiting for the device."""

    def upload_into(self, target, array, param) -> None:
        """The host NumPy `array` copied into `target` (contiguous: an array `upload`
        returned, or a span of its rows), in place (same addresses), queued on the stream
        param's step launches on, so that the next launch reads it: a changed
        hyperparameter's rows of the update table. Once warmed up it neither waits for the
        device nor allocates device memory, and `array` may be rewritten as soon as it
        returns (the GPU backends copy from pinned staging slots, backends.staging).

        Never called while param's stream is being captured into a CUDA graph (the
        optimizers refuse a hyperparameter change there: see `capturing`): the graph
        would record the copy, reading a staging slot that is reused by then. Between
        replays it is a plain copy on the stream, and a replay queued after it reads the
        rewritten rows: that is how capturable optimizers take a new lr."""

    def torch_stream(self, device) -> Hashable:
        """The stream its work over tensors on torch `device` runs on now: torch's current
        stream there (None on the CPU). A step prepared on one stream is prepared again
        on another."""

    def torch_context(self, device):
        """A context manager under which its work over tensors on torch `device` follows
        torch: that device current, its launches queued on torch's current stream."""

    def from_torch(self, tensor, stream=None):
        """One of its arrays over the memory of the torch tensor `tensor` (of its
        device_type), without a copy, as its checks and kernels take it (bfloat16 as
        ml_dtypes' bfloat16). stream: for arrays_name_stream, the torch stream handle it
        names (torch_stream's; None: the current one)."""

    def step_function(self, param, velocity, table: UpdateTable, counters=None,
                      check_nonfinite=True, *, precision="nearest", precision_buffer=None,
                      seed=0):
        """The step of these arrays, table and counters with everything that stays the
        same from step to step prepared once (a runner.StepRunner over the backend's
        runner.StepKernels) (views, kernels, launch geometry, kernel
        arguments; the kernels compiled and loaded): a function `launch(grad,
        inv_grad_scale, agree=None, grad_scale=None, found_inf=None, step_count=0)` that
        queues what `step(param, grad, velocity, table, inv_grad_scale, counters, agree,
        ..., grad_scale, found_inf, precision=..., precision_buffer=..., seed=...,
        step_count=step_count)` queues, doing no checks, copies or allocations of its own,
        so that a CUDA graph can capture it. check_nonfinite=False (with
        counters): a counted step that does not look for non-finite values (the launches
        without "find_nonfinite"). Each grad it gets must be one that
        `check_arrays` accepted with param and velocity, unchanged since (see
        arrays.array_state); a table rewritten in place at the same addresses
        (`device_table` with reuse, or rows through `upload_into`) keeps it valid while
        its rows use only the terms they used when it was prepared
        (gpu_momentum.groups.row_terms)."""

    def step(self, param, grad, velocity, table: UpdateTable, inv_grad_scale,
             counters=None, agree=None, check_nonfinite=True, grad_scale=None,
             found_inf=None, *, precision="nearest", precision_buffer=None, seed=0,
             step_count=0) -> None:
        """The fused update of every group in one kernel launch over arrays that
        `check_arrays` accepted, with a table from `device_table`; queued without waiting
        for the device.

        counters None: each group's first step comes from its VELOCITY_INITIALIZED flag in
        the table. Else int64[GROUP_SLOTS + groups] in the backend's memory (slots as in
        kernels.layout): a step whose scaled gradient holds a NaN or inf changes nothing
        but the counters, which also say whether each group's velocity is initialized and
        count taken and skipped steps (kernels.cuda_launch.step_launches).

        agree: with counters, a function called with them after the non-finite check and
        before the update, in stream order (it queues work; it does not wait for it),
        even over no elements: processes sharing one step combine their
        counters[LAST_STEP_SKIPPED] there, so all skip together (gpu_momentum.distributed).

        check_nonfinite=False, with counters: a counted step that does not look for
        non-finite values (a capturable optimizer's, without skip_nonfinite).

        grad_scale: None, or the loss scale as a 0-d float array in the backend's memory
        (a CuPy array, a torch CUDA tensor; a NumPy array on the CPU), read when the
        kernels run (a CUDA graph replays the read): the gradient is multiplied by 1 /
        grad_scale worked out in the compute dtype (for the power-of-two scales of loss
        scalers exactly inv_grad_scale's 1 / grad_scale), and inv_grad_scale is not used.
        Its value is not checked (that would wait for the device): a scale whose inverse
        is not finite makes the gradient non-finite. found_inf: None, or a 0-d array in
        the backend's memory (torch.amp.GradScaler's): with counters, a nonzero value
        skips the step (the first launch sets LAST_STEP_SKIPPED from it); refused
        without counters.

        16-bit parameters (bfloat16, float16; a float32 or 16-bit velocity): `precision`
        (one of kernels.layout.PRECISION_NAMES) chooses the kernel; `precision_buffer` is
        its extra buffer (kahan: the compensation, of param's dtype; master: the float32
        master copy; else None). The random bits of "stochastic" are keyed by `seed` (an
        int in [0, 2**64)) and the count of steps taken before this one: counters[
        STEP_COUNT], read by the kernels, when there are counters, else `step_count`.

        velocity a gpu_momentum.float8_velocity.Float8Velocity (float32 and 16-bit
        parameters): the FP8 kernels run, rewriting its codes and block scales in place
        (reference.float8_velocity_step; float32 parameters have "nearest" and
        "stochastic", which rounds the codes).
        """


class PreparedStep:
    """Backend.step as the backends write it: their step_function's launch, called once."""

    def step(self, param, grad, velocity, table, inv_grad_scale, counters=None,
             agree=None, check_nonfinite=True, grad_scale=None, found_inf=None, *,
             precision="nearest", precision_buffer=None, seed=0, step_count=0):
        self.step_function(param, velocity, table, counters, check_nonfinite,
                           precision=precision, precision_buffer=precision_buffer,
                           seed=seed)(grad, inv_grad_scale, agree, grad_scale, found_inf,
                                      step_count)


def refuse_found_inf_without_counters(found_inf):
    """ValueError for a found_inf given to a step without counters: skipping on the
    device is a counted step's (its first launch reads found_inf)."""
    if found_inf is not None:
        raise ValueError("found_inf needs the step counters in the backend's memory (a "
                         "counted step: skip_nonfinite or capturable) to skip the step "
                         "on the device")


def check_arrays(backend, param, grad, velocity, precision="nearest",
                 precision_buffer=None):
    """Every check of one update's arrays for `backend`; raises before anything is
    written. velocity None: param and grad alone (a sharded step's whole gradient); a
    Float8Velocity: its codes and scales. precision_buffer: see Backend.step, described
    by the name the user knows it by."""
    buffer = None
    if precision_buffer is not None:
        buffer = describe(PRECISION_BUFFER_NAMES.get(precision, "precision_buffer"),
                          precision_buffer)
    float8 = is_float8_velocity(velocity)
    owned = [("grad", grad), (PRECISION_BUFFER_NAMES.get(precision), precision_buffer)]
    if float8:
        owned += [("velocity codes", velocity.codes), ("velocity scales", velocity.scales)]
    else:
        owned.append(("velocity", velocity))
    check_update(describe("param", param), describe("grad", grad),
                 None if velocity is None or float8 else describe("velocity", velocity),
                 backend.dtypes, backend.name, backend.element_aligned, precision, buffer,
                 float8_velocity=(describe("velocity codes", velocity.codes),
                                  describe("velocity scales", velocity.scales))
                 if float8 else None)
    for name, array in owned:
        if array is not None and not backend.owns(array):
            raise TypeError(f"{name} is a {type_name(array)}, which backend "
                            f"{backend.name!r} cannot read; pass arrays of param's kind "
                            f"({type_name(param)})")


def device_table(backend, table, param, reuse=None):
    """The host UpdateTable `table`, checked against param's size and compute dtype, in
    the memory where param's update runs. `reuse`, a table this returned before for the
    same ranges, is overwritten in place instead (same addresses, as a captured CUDA graph
    needs): only the per-group arrays change."""
    info = describe("param", param)
    check_table(table, int(np.prod(info.shape, dtype=np.int64)), compute_dtype(info.dtype))
    if reuse is None:
        return dataclasses.replace(
            table, **{name: backend.upload(getattr(table, name), param)
                      for name in ARRAY_FIELDS})
    for name in GROUP_FIELDS:
        backend.upload_into(getattr(reuse, name), getattr(table, name), param)
    if reuse.launch_flags == table.launch_flags:
        return reuse  # the very table: step functions prepared with it stay valid
    return dataclasses.replace(reuse, launch_flags=table.launch_flags)


def bits_view(array):
    """A 1-D view of a contiguous array of one backend's memory: 16-bit elements
    (bfloat16, float16) as uint16, the rest as they are."""
    flat = array.reshape(array.size) if array.ndim != 1 else array
    return as_bits(flat)

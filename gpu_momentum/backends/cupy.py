"""The cupy backend: the CUDA C kernel (kernels/momentum.cu) compiled by CuPy's RawModule,
over CuPy arrays or any `__cuda_array_interface__` array that cupy.asarray takes without
a copy. A step queues its launches on CuPy's current stream and returns: no
synchronisation and no device allocation. So does a changed hyperparameter's row of the
update table (upload_into): one asynchronous copy from a pinned staging slot on that
stream (backends.staging).

The module is compiled once per device (memoized RawModule) and each dtype's launch limit
is worked out once per device.
"""

import contextlib
import ctypes
import functools

import numpy as np

from ..arrays import describe
from ..float8_velocity import is_float8_velocity
from ..kernels.cuda_launch import check_counters, float8_grid_size, launch_plan
from ..kernels.cuda_source import (BLOCK_SIZE, FINISH_EXPRESSION, entry_point,
                                   float8_entry_point, module_options, module_source,
                                   name_expressions)
from ..kernels.layout import (FLOAT8_VELOCITY, GROUP_COLUMNS, GROUP_SLOTS,
                              LAST_STEP_SKIPPED, READ_COUNTERS)
from ..precision import BITS_DTYPE, as_bits, storage_dtype
from .contract import PreparedStep
from .runner import StepKernels, StepRunner, null_array, warm_up_once
from .staging import StagingRing
from .torch_arrays import CudaTensorArray, current_stream, device_index


class CupyBackend(PreparedStep):
    name = "cupy"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    element_aligned = True
    device_type = "cuda"
    arrays_name_stream = False  # it launches on CuPy's current stream (torch_context)

    def unavailable_reason(self):
        try:
            import cupy
        except Exception as error:  # a broken CUDA install fails with more than ImportError
            return f"CuPy cannot be imported ({type(error).__name__}: {error})"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as error:
            return f"CUDA has no usable device ({error})"
        return None if count else "no CUDA device is present"

    def owns(self, array):
        return hasattr(array, "__cuda_array_interface__")

    def native(self, array):
        return type(array).__module__.split(".")[0] == "cupy"

    def zeros(self, shape, dtype):
        import cupy
        return cupy.zeros(shape, dtype)

    def copy(self, array):
        import cupy
        return cupy.array(array, copy=True)

    def asarray(self, array):
        import cupy
        return cupy.asarray(array)

    def to_numpy(self, array):
        import cupy
        return cupy.asnumpy(array)

    def assign(self, target, source):
        import cupy
        cupy.asarray(target)[...] = cupy.asarray(source)

    def synchronize(self):
        import cupy
        cupy.cuda.get_current_stream().synchronize()

    def place(self, param):
        import cupy
        return cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr

    def upload(self, array, param):
        # cupy.asarray stages through pinned memory and copies without waiting (a copy
        # from pageable memory may wait for the stream).
        import cupy
        return cupy.asarray(array)

    def upload_into(self, target, array, param):
        # One asynchronous copy from a pinned staging slot on the current stream, which
        # the step launches on: no device allocation and no waiting (backends.staging).
        import cupy

        staging_ring(cupy.cuda.runtime.getDevice()).copy(
            target, array, cupy.cuda.get_current_stream())

    def capturing(self, param):
        import cupy

        return cupy.cuda.get_current_stream().is_capturing()

    torch_stream = staticmethod(current_stream)

    def torch_context(self, device):
        """torch's device current for CuPy, and torch's current stream CuPy's."""
        import cupy

        stack = contextlib.ExitStack()
        index = device_index(device)
        stack.enter_context(cupy.cuda.Device(index))
        stack.enter_context(cupy.cuda.ExternalStream(current_stream(device), index))
        return stack

    def from_torch(self, tensor, stream=None):
        import cupy
        import torch

        with cupy.cuda.Device(device_index(tensor.device)):
            return (CudaTensorArray(tensor, None) if tensor.dtype == torch.bfloat16
                    else cupy.asarray(tensor))

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        """Launches on the current stream of the device the arrays are on, which must be
        the current device at every step (checked: one runtime call)."""
        kernels = _CupyKernels(self, param, velocity, table, counters, precision,
                               precision_buffer, seed)
        return StepRunner(kernels, kernels.plan.grid, check_nonfinite)


class _CupyKernels(StepKernels):
    """The CUDA C kernels' launches (kernels.cuda_launch) on CuPy's current stream, with
    the views, launch geometry and scalar arguments worked out once."""

    def __init__(self, backend, param, velocity, table, counters, precision,
                 precision_buffer, seed):
        import cupy

        float8 = is_float8_velocity(velocity)
        named = ({"param": param, "velocity codes": velocity.codes,
                  "velocity scales": velocity.scales} if float8 else
                 {"param": param, "velocity": velocity})
        if precision_buffer is not None:
            named["precision_buffer"] = precision_buffer
        infos = {name: describe(name, array) for name, array in named.items()}
        arrays = {name: _kernel_array(array, infos[name]) for name, array in named.items()}
        param = arrays["param"]
        # The arrays the update takes between grad and the precision buffer.
        velocity = ((arrays["velocity codes"], arrays["velocity scales"]) if float8 else
                    (arrays["velocity"],))
        named = [*arrays.items(),
                 *((f"table.{name}", array) for name, array in
                   zip(("scalars", "group_flags", "range_ends", "range_groups"),
                       table.arrays()))]
        if counters is not None:
            check_counters(counters, table.group_count)
            named.append(("counters", counters))
        self.device = device = _on_current_device(named)
        self.named = named
        entry = (float8_entry_point(infos["param"].dtype, precision) if float8 else
                 entry_point(infos["param"].dtype, infos["velocity"].dtype, precision))
        self.update, self.check, self.finish, max_blocks = _kernels(device, entry)
        self.plan = plan = launch_plan(infos["param"].dtype, param.size, table, 1.0,
                                       max_blocks, counters is not None, seed)
        # The FP8 update runs a warp per block of the buffer; the other launches keep
        # the plan's grid.
        self.update_grid = ((float8_grid_size(param.size, max_blocks),) if float8 else
                            (plan.grid,))
        self.buffer = arrays.get("precision_buffer", null_array(backend, device, BITS_DTYPE))
        self.scalar = type(plan.inv_grad_scale)
        self.grid, self.block = (plan.grid,), (plan.block,)
        self.counters = counters
        self.skipped = None if counters is None else \
            counters[LAST_STEP_SKIPPED:LAST_STEP_SKIPPED + 1]
        self.param, self.velocity, self.table = param, velocity, table
        self.update_tail = (plan.n, *table.arrays(), plan.range_count)
        self.update_counters = (null_array(backend, device, np.int64) if counters is None
                                else counters)
        self.finish_args = (counters, table.group_flags, plan.group_count)
        self.compute = self.scalar(0).dtype
        # A null pointer for a step without a loss scale in device memory: the kernels
        # read inv_grad_scale then.
        self.no_grad_scale = null_array(backend, device, self.compute)
        self.scale_slot = None  # a loss scale of another dtype, converted (made once)
        self.runtime = cupy.cuda.runtime

    def before_step(self):
        if self.runtime.getDevice() != self.device:
            _on_current_device(self.named)  # raises, naming the arrays' device

    def kernel_grad(self, grad):
        kernel_grad = _kernel_array(grad, describe("grad", grad))
        _on_current_device([("grad", kernel_grad)])
        return kernel_grad

    def kernel_found_inf(self, found_inf):
        return _on_device("found_inf", found_inf)

    def kernel_grad_scale(self, grad_scale):
        import cupy

        device_scale = _on_device("grad_scale", grad_scale).reshape(1)
        if device_scale.dtype != self.compute:  # converted on the stream, in order
            if self.scale_slot is None:  # made once, by the first such step
                self.scale_slot = cupy.empty(1, self.compute)
            cupy.copyto(self.scale_slot, device_scale, casting="same_kind")
            device_scale = self.scale_slot
        return device_scale

    def launches(self):
        import cupy

        plan, table, counters = self.plan, self.table, self.counters
        grid, block, skipped = self.grid, self.block, self.skipped
        finish_block = (plan.finish_block,)
        return {
            "clear": lambda step: skipped.fill(0) if step.found_inf is None else
            cupy.not_equal(step.found_inf, 0, out=skipped),
            "find_nonfinite": lambda step: self.check(grid, block, (
                step.grad, plan.n, table.range_ends, table.range_groups,
                plan.range_count, step.inv_grad_scale, step.grad_scale, counters)),
            "update": lambda step: self.update(self.update_grid, block, (
                self.param, step.grad, *self.velocity, self.buffer, *self.update_tail,
                step.inv_grad_scale, step.grad_scale, plan.launch_flags,
                self.update_counters, plan.seed, step.step_count)),
            "finish": lambda step: self.finish((1,), finish_block, self.finish_args),
        }


@functools.cache
def staging_ring(device_id):
    """The pinned staging slots of `upload_into` on a device (backends.staging)."""
    return StagingRing(CupyStagingMemory())


class CupyStagingMemory:
    """A StagingRing's CUDA calls through CuPy, on the current device."""

    def pinned(self, nbytes):
        import cupyx

        return cupyx.empty_pinned(nbytes, np.uint8)

    def new_event(self):
        import cupy

        return cupy.cuda.Event(disable_timing=True)

    def record(self, event, stream):
        event.record(stream)

    def completed(self, event):
        return event.done  # cudaEventQuery: asks, never waits

    def copy(self, target, host, address, stream):
        if not target.flags.c_contiguous:
            raise ValueError(f"the table rows to upload into are not contiguous (strides "
                             f"{target.strides}): upload_into copies whole rows")
        # A ctypes pointer: CuPy takes it in every version (an int only in newer ones).
        target.data.copy_from_host_async(ctypes.c_void_p(address), host.nbytes, stream)


def _on_device(name, array):
    """`array` as a CuPy array, on the current device (else a ValueError naming it)."""
    import cupy

    as_cupy = cupy.asarray(array)
    _on_current_device([(name, as_cupy)])
    return as_cupy


def _kernel_array(array, info):
    """A CuPy array over `array`'s memory, without a copy: 16-bit elements (bfloat16,
    float16) as their bits, uint16, which the kernel stores them as; so an interface that
    describes bfloat16 only as raw bytes ("<V2") needs nothing from CuPy's dtypes."""
    import cupy

    if info.dtype.itemsize != 2:
        return cupy.asarray(array)
    if isinstance(array, cupy.ndarray):
        return as_bits(array)
    if info.nbytes == 0:
        return cupy.empty(info.shape, BITS_DTYPE)
    memory = cupy.cuda.UnownedMemory(info.address, info.nbytes, array)
    return cupy.ndarray(info.shape, BITS_DTYPE, cupy.cuda.MemoryPointer(memory, 0))


@functools.cache
def _module(device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=module_source(), options=module_options(),
                              name_expressions=name_expressions())


@functools.cache
def _kernels(device_id, entry):
    """(update, non-finite check, finish_step, max_blocks) of an EntryPoint on a device,
    each launched once over no elements (the module compiled, each function loaded: a
    CUDA graph captured later records launches only)."""
    import cupy

    with cupy.cuda.Device(device_id):
        module = _module(device_id)
        update = module.get_function(entry.update_expression)
        check = module.get_function(entry.check_expression)
        finish = module.get_function(FINISH_EXPRESSION)
        sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        per_sm = min(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernel.kernel.ptr, BLOCK_SIZE, 0) for kernel in (update, check))
        warm_up_once(("cupy", device_id, entry),
                     lambda: _launch_each(update, check, finish, entry),
                     lambda: cupy.cuda.get_current_stream().synchronize())
    return update, check, finish, sms * per_sm


def _launch_each(update, check, finish, entry):
    """Each kernel launched once over no elements, with scratch counters."""
    import cupy

    compute = entry.compute_dtype
    param = cupy.zeros(0, storage_dtype(entry.param_dtype))
    velocity = ((cupy.zeros(0, np.uint8), cupy.zeros(0, np.float32))
                if entry.velocity_dtype == FLOAT8_VELOCITY else
                (cupy.zeros(0, storage_dtype(entry.velocity_dtype)),))
    table = (cupy.zeros((1, GROUP_COLUMNS), compute), cupy.zeros(1, np.uint32),
             cupy.zeros(1, np.int64), cupy.zeros(1, np.int32))
    counters = cupy.zeros(GROUP_SLOTS + 1, np.int64)
    one, scale = compute.type(1), cupy.ones(1, compute)
    update((1,), (BLOCK_SIZE,), (param, param, *velocity, param, np.int64(0), *table,
                                 np.int32(1), one, scale, np.uint32(READ_COUNTERS),
                                 counters, np.uint64(0), np.int64(0)))
    check((1,), (BLOCK_SIZE,), (param, np.int64(0), table[2], table[3], np.int32(1), one,
                                scale, counters))
    finish((1,), (32,), (counters, table[1], np.int32(1)))


def _on_current_device(named_arrays):
    import cupy

    current = cupy.cuda.runtime.getDevice()
    for name, array in named_arrays:
        if array.device.id != current:
            raise ValueError(f"{name} is on GPU {array.device.id} but the current device is "
                             f"GPU {current}; step under `with cupy.cuda.Device("
                             f"{array.device.id}):` or move the arrays to GPU {current}")
    return current

"""The numba-cuda backend: the kernels of kernels/numba_cuda.py over Numba device arrays
or any `__cuda_array_interface__` array, without copies. A step queues its launches on
the stream param names and returns without waiting.

param's stream is the one its exporter named (CuPy names its current stream), or the one
a Numba array is bound to, else Numba's default stream, so the update runs after the work
queued there that produced the gradient. PyTorch's interface is version 2, without
streams: its tensors' updates go to the legacy default stream, which is torch's default
stream too.
"""

import functools
import importlib.util

import numpy as np

from ..arrays import describe
from ..float8_velocity import is_float8_velocity
from ..kernels.elementwise import storage_format
from ..kernels.layout import GROUP_SLOTS, PRECISIONS, READ_COUNTERS
from ..precision import as_bits
from .contract import PreparedStep, bits_view
from .numba_launch import launcher
from .runner import StepKernels, StepRunner, null_array, warm_up_once
from .staging import StagingRing
from .torch_arrays import CudaTensorArray, current_stream, device_index


class NumbaCudaBackend(PreparedStep):
    name = "numba-cuda"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    element_aligned = True
    device_type = "cuda"
    # Its launches follow the stream param names; torch's __cuda_array_interface__ names
    # none, so the views of torch tensors name torch's current stream, made at each step.
    arrays_name_stream = True

    def unavailable_reason(self):
        if importlib.util.find_spec("numba_cuda") is None:
            return "the numba-cuda package is not installed"
        from numba import cuda

        if not cuda.is_available():
            why = " ".join(str(cuda.cuda_error()).split())
            return f"Numba finds no usable CUDA GPU ({why})"
        from ..kernels.numba_cuda import compiler_problem

        return compiler_problem()

    def owns(self, array):
        # Numba device arrays (also the CUDA simulator's, which wrap host memory) and
        # anything exporting __cuda_array_interface__: CuPy arrays, PyTorch CUDA tensors.
        return _is_numba_array(array) or hasattr(array, "__cuda_array_interface__")

    def native(self, array):
        return _is_numba_array(array)

    def zeros(self, shape, dtype):
        from numba import cuda
        from numba.cuda.cudadrv.driver import device_memset

        array = cuda.device_array(shape, dtype)
        if array.size:
            device_memset(array, 0, array.nbytes)
        return array

    def copy(self, array):
        from numba import cuda

        array = self.asarray(array)
        out = cuda.device_array(array.shape, array.dtype)
        self.assign(out, array)
        return out

    def asarray(self, array):
        from numba import cuda

        if self.owns(array):
            return array if _is_numba_array(array) else cuda.as_cuda_array(array)
        return cuda.to_device(np.asarray(array, order="C"))

    def to_numpy(self, array):
        if not self.owns(array):
            return np.asarray(array)
        return self.asarray(array).copy_to_host()

    def assign(self, target, source):
        # Real (not simulated) Numba device arrays take no `[...] =`; copy_to_device
        # refuses empty arrays whose strides differ, though there is nothing to copy.
        # 16-bit arrays go as their bits: a bfloat16 device array reads back through its
        # interface as raw "<V2" bytes, which NumPy will not cast to bfloat16.
        target = self.asarray(target)
        source = self.asarray(source) if self.owns(source) else np.asarray(source)
        if target.size:
            target, source = as_bits(target), as_bits(source)
            target.copy_to_device(source)

    def synchronize(self):
        from numba import cuda

        cuda.synchronize()

    def place(self, param):
        stream = _stream_view(param).stream
        device = _current_device()
        handle = getattr(stream, "handle", stream)  # 0: an array bound to no stream
        return device, getattr(handle, "value", handle)

    def upload(self, array, param):
        from numba import cuda

        return cuda.to_device(array, stream=_stream_view(param).stream)

    def upload_into(self, target, array, param):
        # One asynchronous copy from a pinned staging slot on the stream the step launches
        # on: no device allocation and no waiting (backends.staging).
        staging_ring(_current_device()).copy(target, array, _stream_view(param).stream)

    def capturing(self, param):
        from numba.core import config

        if config.ENABLE_CUDASIM:
            return False  # the simulator has no graphs
        from cuda.bindings import driver

        if _is_numba_array(param):
            handle = getattr(param.stream, "handle", param.stream)
            handle = getattr(handle, "value", handle)
        else:  # the stream its exporter names now, read without making a view
            handle = _exported_stream(param)
        error, status = driver.cuStreamIsCapturing(int(handle or 0))
        if error != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamIsCapturing failed: {error}")
        return status != driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE

    torch_stream = staticmethod(current_stream)

    def torch_context(self, device):
        from numba import cuda

        return cuda.gpus[device_index(device)]

    def from_torch(self, tensor, stream=None):
        """A view naming `stream` (torch's current stream when None)."""
        if stream is None:
            stream = current_stream(tensor.device)
        return CudaTensorArray(tensor, stream or 1)  # CAI v3: 1 is the legacy default

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        """For arrays of another exporter (CuPy, PyTorch) the launches follow the stream
        it names: each step reads param's interface and prepares them again when the
        stream changed (CuPy names its current stream)."""
        prepare = lambda: _prepared(self, param, velocity, table, counters,
                                    check_nonfinite, precision, precision_buffer, seed)
        if _is_numba_array(param):
            return prepare()
        exported, launch = _exported_stream(param), prepare()

        def launch_on_exported_stream(grad, inv_grad_scale, agree=None, grad_scale=None,
                                      found_inf=None, step_count=0):
            nonlocal exported, launch
            if _exported_stream(param) != exported:
                exported, launch = _exported_stream(param), prepare()
            launch(grad, inv_grad_scale, agree, grad_scale, found_inf, step_count)

        return launch_on_exported_stream


def _prepared(backend, param, velocity, table, counters, check_nonfinite, precision,
              precision_buffer, seed):
    kernels = _NumbaKernels(backend, param, velocity, table, counters, precision,
                            precision_buffer, seed)
    return StepRunner(kernels, kernels.param.size, check_nonfinite)


class _NumbaKernels(StepKernels):
    """The launches of a step on param's stream, with everything but the gradient, the
    loss scale and `agree` prepared: views, launch geometry and the configured kernels,
    each compiled and loaded (launched once over no elements, the first time for its kind
    on a device)."""

    def __init__(self, backend, param, velocity, table, counters, precision,
                 precision_buffer, seed):
        from ..kernels import numba_cuda as kernels

        float8 = is_float8_velocity(velocity)
        param_format = storage_format(describe("param", param).dtype)
        formats = (param_format,) if float8 else (
            param_format, storage_format(describe("velocity", velocity).dtype))
        param = self.param = _kernel_view(param)
        # The arrays the update takes between grad and the precision buffer.
        velocity = self.velocity = (tuple(_stream_view(a) for a in velocity) if float8
                                    else (_kernel_view(velocity),))
        device = _current_device()
        self.buffer = (null_array(backend, device, np.float32) if precision_buffer is None
                       else _kernel_view(precision_buffer))
        blocks, threads = kernels.launch_config(param.size)
        self.stream = stream = param.stream
        launch_flags = table.launch_flags
        if counters is None:
            self.update_counters = null_array(backend, device, np.int64)
        else:
            self.counters = self.update_counters = _stream_view(counters)
            launch_flags |= READ_COUNTERS
        kind = (*formats, PRECISIONS[precision.upper()])
        update_blocks, update_threads = _update_config(kind, param.size)
        self.update = _update_kernel(kind)[update_blocks, update_threads, stream]
        self.find_nonfinite = kernels.check_kernel(formats[0])[blocks, threads, stream]
        self.clear = kernels.clear_skip_kernel[1, 1, stream]
        self.finish = kernels.finish_step_kernel[1, kernels.FINISH_THREADS, stream]
        self.convert_scale = kernels.convert_scale_kernel[1, 1, stream]
        self.table, self.table_arrays = table, table.arrays()
        self.scalar = table.scalars.dtype.type  # the compute dtype
        self.compute = compute = self.scalar(0).dtype
        self.seed, self.launch_flags = np.uint64(seed), np.uint32(launch_flags)
        self.no_grad_scale = null_array(backend, device, compute)  # inv_grad_scale is read
        self.no_found_inf = null_array(backend, device, np.float32)
        self.scale_slot = None  # a loss scale of another dtype converted (made once)
        warm_up_once(("numba-cuda", device, *kind),
                     lambda: _launch_each(backend, param, velocity, self.buffer, table,
                                          stream, kind, compute),
                     backend.synchronize)

    def kernel_grad(self, grad):
        return _kernel_view(grad)

    def kernel_found_inf(self, found_inf):
        return _stream_view(found_inf).reshape(1)

    def kernel_grad_scale(self, grad_scale):
        scale = _stream_view(grad_scale).reshape(1)
        if scale.dtype != self.compute:  # converted first, in order
            if self.scale_slot is None:
                from numba import cuda
                self.scale_slot = cuda.device_array(1, self.compute, stream=self.stream)
            self.convert_scale(self.scale_slot, scale)
            scale = self.scale_slot
        return scale

    def launches(self):
        # Prepared launches (numba_launch): after the first step, a step repacks only
        # the arguments that changed (the gradient, the loss scale, the step count).
        counters, table = self.update_counters, self.table
        clear, find_nonfinite, update, finish = (launcher(configured) for configured in (
            self.clear, self.find_nonfinite, self.update, self.finish))
        return {
            "clear": lambda step: clear(counters, step.found_inf),
            "find_nonfinite": lambda step: find_nonfinite(
                step.grad, table.range_ends, table.range_groups, step.inv_grad_scale,
                step.grad_scale, counters),
            "update": lambda step: update(
                self.param, step.grad, *self.velocity, self.buffer, *self.table_arrays,
                step.inv_grad_scale, step.grad_scale, self.launch_flags, counters,
                self.seed, step.step_count),
            "finish": lambda step: finish(counters, table.group_flags),
        }


def _launch_each(backend, param, velocity, buffer, table, stream, kind, compute):
    """Each kernel launched once over no elements (empty views of the arrays) with scratch
    counters (for the argument types of steps without a loss scale or found_inf in device
    memory: a step with them compiles their kernels on first use)."""
    from numba import cuda

    from ..kernels import numba_cuda as kernels

    device = _current_device()
    p, b = param[:0], buffer[:0]
    v = tuple(a[:0] for a in velocity)
    counters = cuda.to_device(np.zeros(GROUP_SLOTS + table.group_count, np.int64),
                              stream=stream)
    one, no_scale = compute.type(1), null_array(backend, device, compute)
    kernels.clear_skip_kernel[1, 1, stream](counters,
                                            null_array(backend, device, np.float32))
    kernels.check_kernel(kind[0])[1, 32, stream](p, table.range_ends, table.range_groups,
                                                 one, no_scale, counters)
    _update_kernel(kind)[1, _update_config(kind, 0)[1], stream](
        p, p, *v, b, *table.arrays(), one, no_scale,
        np.uint32(table.launch_flags | READ_COUNTERS), counters, np.uint64(0), np.int64(0))
    kernels.finish_step_kernel[1, kernels.FINISH_THREADS, stream](counters,
                                                                  table.group_flags)


def _update_kernel(kind):
    """The update kernel of `kind`: (param format, velocity format, precision), or (param
    format, precision) for an FP8 velocity."""
    if len(kind) == 2:
        from ..kernels.numba_cuda_fp8 import float8_update_kernel

        return float8_update_kernel(*kind)
    from ..kernels.numba_cuda import update_kernel

    return update_kernel(*kind)


def _update_config(kind, size):
    """(blocks, threads) of the update kernel of `kind` over `size` elements: the FP8
    kernel takes whole warps per block of the buffer, up to as many thread blocks as the
    others launch at most (launch_config of an unbounded size)."""
    from ..kernels import numba_cuda as kernels

    if len(kind) == 2:
        from ..kernels.numba_cuda_fp8 import float8_launch_config

        return float8_launch_config(size, kernels.launch_config(1 << 62)[0])
    return kernels.launch_config(size)


@functools.cache
def staging_ring(device_id):
    """The pinned staging slots of `upload_into` on a device (backends.staging)."""
    return StagingRing(NumbaStagingMemory())


class NumbaStagingMemory:
    """A StagingRing's CUDA calls through numba-cuda, in the current context. In the CUDA
    simulator, whose copies are done when they return, its Event (which takes no timing
    argument and has no query) only records."""

    def __init__(self):
        from numba.core import config

        self.simulated = bool(config.ENABLE_CUDASIM)
        self.default_stream = None  # made at the first copy on stream 0

    def pinned(self, nbytes):
        from numba import cuda

        return cuda.pinned_array(nbytes, np.uint8)

    def new_event(self):
        from numba import cuda

        return cuda.event() if self.simulated else cuda.event(timing=False)

    def record(self, event, stream):
        event.record(self.stream(stream))

    def completed(self, event):
        return self.simulated or event.query()  # cuEventQuery: asks, never waits

    def copy(self, target, host, address, stream):
        target.copy_to_device(host, stream=self.stream(stream))

    def stream(self, stream):
        """`stream` as copy_to_device queues on it: stream 0 (an array bound to none,
        whose launches go to the default stream) would make its copies synchronous, so
        the default stream's object stands for it."""
        if stream:
            return stream
        if self.default_stream is None:
            from numba import cuda

            self.default_stream = cuda.default_stream()
        return self.default_stream


def _current_device():
    from numba import cuda

    return getattr(cuda.get_current_device(), "id", 0)  # the simulator's has no id


def _exported_stream(array):
    """The stream a `__cuda_array_interface__` exporter names now (None: none)."""
    return array.__cuda_array_interface__.get("stream")


def _is_numba_array(array):
    return getattr(array, "__cuda_ndarray__", False)


def _stream_view(array):
    """A Numba device array: `array` itself, or a zero-copy view of a
    `__cuda_array_interface__` array that records the stream its exporter named
    (`sync=False`: no waiting for it), so the update is queued there."""
    from numba import cuda

    return array if _is_numba_array(array) else cuda.as_cuda_array(array, sync=False)


def _kernel_view(array):
    """`array` as the kernels take it: a 1-D Numba device array on the stream it names,
    16-bit elements (bfloat16, float16) as their uint16 bits."""
    return bits_view(_stream_view(array))

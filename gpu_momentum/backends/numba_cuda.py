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
from ..kernels.cuda_launch import step_launches
from ..kernels.elementwise import storage_format
from ..kernels.layout import GROUP_SLOTS, PRECISIONS, READ_COUNTERS
from ..precision import as_bits
from .contract import PreparedStep, refuse_found_inf_without_counters


class NumbaCudaBackend(PreparedStep):
    name = "numba-cuda"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    element_aligned = True

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
        target.copy_to_device(array, stream=_stream_view(param).stream)

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

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        """For arrays of another exporter (CuPy, PyTorch) the launches follow the stream
        it names: each step reads param's interface and prepares them again when the
        stream changed (CuPy names its current stream)."""
        prepare = lambda: _Launches(param, velocity, table, counters, check_nonfinite,
                                    precision, precision_buffer, seed)
        if _is_numba_array(param):
            return prepare().launch
        exported, launches = _exported_stream(param), prepare()

        def launch(grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None,
                   step_count=0):
            nonlocal exported, launches
            if _exported_stream(param) != exported:
                exported, launches = _exported_stream(param), prepare()
            launches.launch(grad, inv_grad_scale, agree, grad_scale, found_inf, step_count)

        return launch



class _Launches:
    """The launches of a step (kernels.cuda_launch.step_launches) on param's stream, with
    everything but the gradient, the loss scale and `agree` prepared: views, launch
    geometry and the configured kernels, each compiled and loaded (launched once over no
    elements, the first time for its kind on a device)."""

    def __init__(self, param, velocity, table, counters, check_nonfinite, precision,
                 precision_buffer, seed):
        from ..kernels import numba_cuda as kernels

        formats = tuple(storage_format(describe(name, array).dtype) for name, array in
                        (("param", param), ("velocity", velocity)))
        param, velocity = (_kernel_view(a) for a in (param, velocity))
        buffer = (_empty(_current_device(), np.float32) if precision_buffer is None else
                  _kernel_view(precision_buffer))
        blocks, threads = kernels.launch_config(param.size)
        stream = param.stream
        launch_flags = table.launch_flags
        device = _current_device()
        if counters is None:
            counters = _empty(device, np.int64)
        else:
            counters = _stream_view(counters)
            launch_flags |= READ_COUNTERS
        kind = (*formats, PRECISIONS[precision.upper()])
        update = kernels.update_kernel(*kind)[blocks, threads, stream]
        find_nonfinite = kernels.check_kernel(formats[0])[blocks, threads, stream]
        clear = kernels.clear_skip_kernel[1, 1, stream]
        finish = kernels.finish_step_kernel[1, kernels.FINISH_THREADS, stream]
        self._convert_scale = kernels.convert_scale_kernel[1, 1, stream]
        arrays = table.arrays()
        self._scalar = table.scalars.dtype.type  # the compute dtype
        compute = self._scalar(0).dtype
        seed, self._step_count = np.uint64(seed), np.int64(0)
        launch_flags = np.uint32(launch_flags)
        self._counted = counters.size != 0
        self._no_scale = _empty(device, compute)  # inv_grad_scale is read
        self._no_found_inf = _empty(device, np.float32)
        self._scale_slot = None  # a loss scale of another dtype converted (made once)
        self._stream = stream
        self._last_grad = self._last_scale = self._grad = self._inv = self._agree = None
        self._scale, self._found = self._no_scale, self._no_found_inf
        launches = {
            "clear": lambda: clear(counters, self._found),
            "find_nonfinite": lambda: find_nonfinite(self._grad, table.range_ends,
                                                     table.range_groups, self._inv,
                                                     self._scale, counters),
            "agree": lambda: self._agree(counters),
            "update": lambda: update(param, self._grad, velocity, buffer, *arrays,
                                     self._inv, self._scale, launch_flags, counters, seed,
                                     self._step_count),
            "finish": lambda: finish(counters, table.group_flags),
        }
        read_counters = launch_flags & READ_COUNTERS != 0
        self._launches, self._agreeing = (
            [launches[name] for name in step_launches(param.size, read_counters, agree,
                                                      check_nonfinite)]
            for agree in (False, True))
        _warm_up(param, velocity, buffer, table, stream, kind, compute)

    def launch(self, grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None,
               step_count=0):
        if grad is not self._last_grad:
            self._last_grad, self._grad = grad, _kernel_view(grad)
        self._step_count = np.int64(step_count)
        if inv_grad_scale is not self._last_scale:
            self._last_scale, self._inv = inv_grad_scale, self._scalar(inv_grad_scale)
        if not self._counted:
            refuse_found_inf_without_counters(found_inf)
        self._found = (self._no_found_inf if found_inf is None else
                       _stream_view(found_inf).reshape(1))
        self._scale = self._no_scale
        if grad_scale is not None:
            self._scale = _stream_view(grad_scale).reshape(1)
            if self._scale.dtype != self._scalar(0).dtype:  # converted first, in order
                if self._scale_slot is None:
                    from numba import cuda
                    self._scale_slot = cuda.device_array(1, self._scalar(0).dtype,
                                                         stream=self._stream)
                self._convert_scale(self._scale_slot, self._scale)
                self._scale = self._scale_slot
        self._agree = agree
        for queue in self._launches if agree is None else self._agreeing:
            queue()


_WARM = set()  # (device, param format, velocity format, precision) launched once


def _warm_up(param, velocity, buffer, table, stream, kind, compute):
    """Each kernel launched once over no elements (empty views of the arrays) with scratch
    counters and waited for: compiled and loaded, so that a CUDA graph captured later
    records launches only (for the argument types of steps without a loss scale or
    found_inf in device memory: a step with them compiles their kernels on first use)."""
    from numba import cuda

    from ..kernels import numba_cuda as kernels

    key = (_current_device(), *kind)
    if key in _WARM:
        return
    p, v, b = param[:0], velocity[:0], buffer[:0]
    counters = cuda.to_device(np.zeros(GROUP_SLOTS + table.group_count, np.int64),
                              stream=stream)
    one, no_scale = compute.type(1), _empty(key[0], compute)
    kernels.clear_skip_kernel[1, 1, stream](counters, _empty(key[0], np.float32))
    kernels.check_kernel(kind[0])[1, 32, stream](p, table.range_ends, table.range_groups,
                                                 one, no_scale, counters)
    kernels.update_kernel(*kind)[1, 32, stream](
        p, p, v, b, *table.arrays(), one, no_scale,
        np.uint32(table.launch_flags | READ_COUNTERS), counters, np.uint64(0), np.int64(0))
    kernels.finish_step_kernel[1, kernels.FINISH_THREADS, stream](counters,
                                                                  table.group_flags)
    cuda.synchronize()
    _WARM.add(key)


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
    array = _stream_view(array)
    array = array if array.ndim == 1 else array.reshape(array.size)
    return as_bits(array)


@functools.cache
def _empty(device_id, dtype):
    """An empty array of `dtype` on a device: what the kernels get for an optional array
    argument (counters=None, no loss scale or found_inf in device memory); never read."""
    from numba import cuda

    return cuda.device_array(0, dtype)

"""Backend registry and choice. Each backend is a thin adapter around its kernel module.

A backend provides: `name`, `dtypes`, `unavailable_reason()` (None when usable),
`owns(array)` (can update it), `native(array)` (it is this backend's own array type, which
wins the automatic choice: a Numba array goes to numba-cuda although CuPy takes it too),
`zeros(shape, dtype)`, `copy(array)`, `asarray(array)` (host or own arrays to own arrays,
for loading state and the demo), `assign(target, source)` (copies host or own memory into
`target`, of the same shape and dtype, in place), `to_numpy(array)`, `synchronize()`
(waits for queued work, for timing), `place(param)` (where and in which order param's
update runs: device and stream, None on the CPU), `device_table(table, param, reuse=None)`
(a `gpu_momentum.groups.UpdateTable` in the memory where `param`'s update runs, copied
on its stream without waiting; `reuse`, a table it returned before for the same ranges,
is overwritten in place instead of allocating) and the update over arrays that
`gpu_momentum._arrays.check_update` has accepted:

- `step(param, grad, velocity, table, inv_grad_scale, counters=None)`: the fused update of
  every group in one kernel launch, with a table from `device_table`. With `counters`
  (int64[VELOCITY_INITIALIZED + groups] in the backend's memory, slots as in
  `kernels.elementwise`) a step whose scaled gradient holds a NaN or inf changes nothing
  but the counters, and the counters give each group's first-step flag and count taken
  and skipped steps, all without waiting for the device.
"""

import dataclasses
import functools
import importlib.util

import numpy as np

from ._arrays import SUPPORTED_DTYPES, type_name
from .groups import ARRAY_FIELDS

BACKEND_NAMES = ("cupy", "numba-cuda", "cpu")  # best first


class BackendUnavailableError(ValueError):
    """A backend was asked for by name but cannot run on this machine."""


class CpuBackend:
    name = "cpu"
    dtypes = (np.dtype(np.float32), np.dtype(np.float64))  # Numba has no CPU float16

    def unavailable_reason(self):
        return None

    def owns(self, array):
        return isinstance(array, np.ndarray)

    native = owns

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def copy(self, array):
        return np.array(array, copy=True)

    def asarray(self, array):
        return np.asarray(array)

    def to_numpy(self, array):
        return np.asarray(array)

    def assign(self, target, source):
        target[...] = source

    def synchronize(self):
        pass

    def place(self, param):
        return None

    def device_table(self, table, param, reuse=None):
        return table

    def step(self, param, grad, velocity, table, inv_grad_scale, counters=None):
        from .kernels.cpu import momentum_step_cpu, momentum_step_skipping_nonfinite_cpu

        kernel = (momentum_step_cpu if counters is None else
                  momentum_step_skipping_nonfinite_cpu)
        kernel(param.reshape(-1), grad.reshape(-1), velocity.reshape(-1), table.scalars,
               table.group_flags, table.range_ends, table.range_groups,
               table.scalars.dtype.type(inv_grad_scale), table.launch_flags,
               _NO_COUNTERS if counters is None else counters)


_NO_COUNTERS = np.zeros(0, np.int64)


class CupyBackend:
    """CUDA C kernels through CuPy: CuPy arrays, or any `__cuda_array_interface__` array
    that cupy.asarray takes without a copy. `step` only queues work on CuPy's current
    stream."""

    name = "cupy"
    dtypes = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

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

    def device_table(self, table, param, reuse=None):
        import cupy
        if reuse is None:
            return table.on(cupy.asarray)
        # cupy.asarray stages through pinned memory and copies without waiting (a copy
        # from pageable memory may wait for the stream); the copy into the table keeps its
        # addresses, as a captured CUDA graph would need.
        for name in ("scalars", "group_flags"):
            cupy.copyto(getattr(reuse, name), cupy.asarray(getattr(table, name)))
        return dataclasses.replace(reuse, launch_flags=table.launch_flags)

    def step(self, param, grad, velocity, table, inv_grad_scale, counters=None):
        from .kernels.cupy_kernels import momentum_step_cupy

        momentum_step_cupy(param, grad, velocity, table, inv_grad_scale, counters)


class NumbaCudaBackend:
    name = "numba-cuda"
    dtypes = SUPPORTED_DTYPES  # float16 params are computed in float32

    def unavailable_reason(self):
        if importlib.util.find_spec("numba_cuda") is None:
            return "the numba-cuda package is not installed"
        from numba import cuda

        if not cuda.is_available():
            why = " ".join(str(cuda.cuda_error()).split())
            return f"Numba finds no usable CUDA GPU ({why})"
        from .kernels.numba_cuda import compiler_problem

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
        out.copy_to_device(array)
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
        target = self.asarray(target)
        if target.size:
            target.copy_to_device(self.asarray(source) if self.owns(source)
                                  else np.asarray(source))

    def synchronize(self):
        from numba import cuda

        cuda.synchronize()

    def place(self, param):
        from .kernels.numba_cuda import place

        return place(param)

    def device_table(self, table, param, reuse=None):
        from .kernels.numba_cuda import upload_table

        return upload_table(table, param, reuse)

    def step(self, param, grad, velocity, table, inv_grad_scale, counters=None):
        from .kernels.numba_cuda import momentum_step_numba_cuda

        momentum_step_numba_cuda(param, grad, velocity, table, inv_grad_scale, counters)


_STATELESS_TABLES = {}  # (backend, place, contents) -> device table, oldest first
STATELESS_TABLES_KEPT = 16


def stateless_table(backend, table, param):
    """`table` in `param`'s memory for a stateless update (`momentum_step`): the latest few
    stay there, so steps repeating their hyperparameters neither allocate nor copy."""
    key = (backend.name, backend.place(param), table.launch_flags,
           *(getattr(table, name).tobytes() for name in ARRAY_FIELDS))
    device = _STATELESS_TABLES.pop(key, None)
    if device is None:
        device = backend.device_table(table, param)
    _STATELESS_TABLES[key] = device
    while len(_STATELESS_TABLES) > STATELESS_TABLES_KEPT:
        del _STATELESS_TABLES[next(iter(_STATELESS_TABLES))]
    return device


def _is_numba_array(array):
    return getattr(array, "__cuda_ndarray__", False)


_BACKENDS = {"cpu": CpuBackend(), "cupy": CupyBackend(), "numba-cuda": NumbaCudaBackend()}


def _registered(name):
    return _BACKENDS.get(name)


@functools.cache
def _unavailable_reason(name):
    backend = _registered(name)
    if backend is None:
        return "it is not part of this version of gpu-momentum"
    return backend.unavailable_reason()


def available_backends():
    """Names of the backends usable on this machine, best first."""
    return [name for name in BACKEND_NAMES if _unavailable_reason(name) is None]


def backend_named(name):
    """The backend called `name`, or an error saying why it cannot be used."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend value: {name!r} (backend must be 'auto' or "
                         f"one of {BACKEND_NAMES})")
    reason = _unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available on this "
                                      f"machine: {reason}")
    return _registered(name)


def select_backend(name, param):
    """Explicit choice wins; otherwise the available backend whose own array type `param`
    is, else the best available backend that can update it."""
    if name is None or name == "auto":
        owners = [_registered(candidate) for candidate in available_backends()
                  if _registered(candidate).owns(param)]
        if owners:
            return next((b for b in owners if b.native(param)), owners[0])
        raise TypeError(f"no available backend takes param of type {type_name(param)} "
                        f"(available: {available_backends()})")
    backend = backend_named(name)
    if not backend.owns(param):
        raise TypeError(f"backend {name!r} cannot update param of type "
                        f"{type_name(param)}")
    return backend

"""Backend registry and choice. Each backend is a thin adapter around its kernel module.

A backend provides: `name`, `dtypes`, `unavailable_reason()` (None when usable),
`owns(array)`, `zeros(shape, dtype)`, `copy(array)`, `asarray(array)` (host or own
arrays to own arrays, for loading state and the demo), `to_numpy(array)`, `synchronize()`
(waits for queued work, for timing) and `step(param, grad, velocity, hyper,
fresh_velocity)`, which runs the fused kernel on arrays that
`gpu_momentum._arrays.check_update` has accepted.
"""

import functools
import importlib.util

import numpy as np

from ._arrays import SUPPORTED_DTYPES, type_name

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

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def copy(self, array):
        return np.array(array, copy=True)

    def asarray(self, array):
        return np.asarray(array)

    def to_numpy(self, array):
        return np.asarray(array)

    def synchronize(self):
        pass

    def step(self, param, grad, velocity, hyper, fresh_velocity):
        from .kernels.cpu import momentum_step_cpu

        scalar = param.dtype.type
        momentum_step_cpu(
            param.reshape(-1), grad.reshape(-1), velocity.reshape(-1),
            scalar(hyper.lr), scalar(hyper.momentum), scalar(1) - scalar(hyper.dampening),
            scalar(hyper.weight_decay), hyper.style == "classic", hyper.nesterov,
            hyper.maximize, fresh_velocity)


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
        return None

    def owns(self, array):
        # Numba device arrays (also the CUDA simulator's, which wrap host memory) and
        # anything exporting __cuda_array_interface__: CuPy arrays, PyTorch CUDA tensors.
        return _is_numba_array(array) or hasattr(array, "__cuda_array_interface__")

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
        return cuda.to_device(np.ascontiguousarray(array))

    def to_numpy(self, array):
        if not self.owns(array):
            return np.asarray(array)
        return self.asarray(array).copy_to_host()

    def synchronize(self):
        from numba import cuda

        cuda.synchronize()

    def step(self, param, grad, velocity, hyper, fresh_velocity):
        from .kernels.numba_cuda import momentum_step_numba_cuda

        momentum_step_numba_cuda(
            param, grad, velocity, hyper.lr, hyper.momentum, hyper.dampening,
            hyper.weight_decay, hyper.style == "classic", hyper.nesterov, hyper.maximize,
            fresh_velocity)


def _is_numba_array(array):
    return getattr(array, "__cuda_ndarray__", False)


_BACKENDS = {"cpu": CpuBackend(), "numba-cuda": NumbaCudaBackend()}


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
    """Explicit choice wins; otherwise the best available backend that owns `param`."""
    if name is None or name == "auto":
        for candidate in available_backends():
            if _registered(candidate).owns(param):
                return _registered(candidate)
        raise TypeError(f"no available backend takes param of type {type_name(param)} "
                        f"(available: {available_backends()})")
    backend = backend_named(name)
    if not backend.owns(param):
        raise TypeError(f"backend {name!r} cannot update param of type "
                        f"{type_name(param)}")
    return backend

"""The backends and the choice between them.

Each backend implements `contract.Backend` (the contract and the helpers every backend
shares are in `contract.py`; the step every backend runs is `runner.py`). The built-in
ones are modules of this package listed in REGISTRY; another joins with
`register_backend`. `select_backend` picks one for an array.
"""

import functools
import typing

from ..arrays import type_name
from .contract import Backend, check_arrays, device_table
from .cpu import CpuBackend
from .cupy import CupyBackend
from .numba_cuda import NumbaCudaBackend

# Every backend by name, best first: "auto" tries them in this order.
REGISTRY = {backend.name: backend for backend in (CupyBackend(), NumbaCudaBackend(),
                                                   CpuBackend())}

__all__ = ["Backend", "BackendUnavailableError", "REGISTRY", "available_backends",
           "backend_named", "backend_names", "backends_for_device", "check_arrays",
           "device_table", "register_backend", "select_backend", "unavailable_reason",
           "unregister_backend"]


class BackendUnavailableError(ValueError):
    """A backend was asked for by name but cannot run on this machine."""


# What a backend must have: the members of the Backend protocol.
_MEMBERS = tuple(name for name in (*typing.get_type_hints(Backend), *vars(Backend))
                 if not name.startswith("_"))


def register_backend(backend):
    """Adds `backend`, an object implementing `contract.Backend`, to REGISTRY under
    `backend.name`, after the others (so "auto" tries it last): it is then chosen by
    name anywhere a backend is (MomentumSGD, momentum_step, gpu_momentum.torch.SGD for
    tensors of its device_type, the benchmark). Its step is best a `runner.StepRunner`
    over its own `runner.StepKernels`. Raises ValueError for a name already taken and
    TypeError for a missing member of the protocol."""
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"Invalid backend name value: {name!r} (a backend needs a "
                         f"non-empty str name other than 'auto')")
    if name in REGISTRY:
        raise ValueError(f"Invalid backend name value: {name!r} (a backend of that name "
                         f"is registered already)")
    missing = [member for member in _MEMBERS if not hasattr(backend, member)]
    if missing:
        raise TypeError(f"backend {name!r} lacks {', '.join(missing)} of the Backend "
                        f"protocol (gpu_momentum.backends.contract.Backend)")
    REGISTRY[name] = backend
    unavailable_reason.cache_clear()


def unregister_backend(name):
    """Removes the backend called `name` that `register_backend` added."""
    if name not in REGISTRY:
        raise ValueError(f"Invalid backend value: {name!r} (registered: "
                         f"{backend_names()})")
    del REGISTRY[name]
    unavailable_reason.cache_clear()


def backend_names():
    """Names of the registered backends, best first."""
    return tuple(REGISTRY)


def backends_for_device(device_type):
    """Names of the registered backends that update torch tensors of `device_type`
    ("cpu", "cuda"), best first."""
    return tuple(name for name, backend in REGISTRY.items()
                 if backend.device_type == device_type)


@functools.cache
def unavailable_reason(name):
    """None when the backend called `name` can run here, else why not (checked once)."""
    backend = REGISTRY.get(name)
    if backend is None:
        return "it is not part of this version of gpu-momentum"
    return backend.unavailable_reason()


def available_backends():
    """Names of the backends usable on this machine, best first."""
    return [name for name in REGISTRY if unavailable_reason(name) is None]


def backend_named(name):
    """The backend called `name`, or an error saying why it cannot be used."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"Invalid backend value: {name!r} (backend must be 'auto' or "
                         f"one of {backend_names()})")
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available on this "
                                      f"machine: {reason}")
    return REGISTRY[name]


def select_backend(name, param):
    """Explicit choice wins; otherwise the available backend whose own array type `param`
    is, else the best available backend that can update it."""
    if name is None or name == "auto":
        owners = [REGISTRY[candidate] for candidate in available_backends()
                  if REGISTRY[candidate].owns(param)]
        if owners:
            return next((b for b in owners if b.native(param)), owners[0])
        raise TypeError(f"no available backend takes param of type {type_name(param)} "
                        f"(available: {available_backends()})")
    backend = backend_named(name)
    if not backend.owns(param):
        raise TypeError(f"backend {name!r} cannot update param of type "
                        f"{type_name(param)}")
    return backend

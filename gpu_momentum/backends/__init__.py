"""The backends and the choice between them.

Each backend is one module of this package implementing `contract.Backend` (the contract
and the helpers every backend shares are in `contract.py`); adding one means a module and
a line in REGISTRY. `select_backend` picks one for an array.
"""

import functools

from ..arrays import type_name
from .contract import Backend, check_arrays, device_table
from .cpu import CpuBackend
from .cupy import CupyBackend
from .numba_cuda import NumbaCudaBackend

# Every backend, best first.
REGISTRY = {backend.name: backend for backend in (CupyBackend(), NumbaCudaBackend(),
                                                   CpuBackend())}
BACKEND_NAMES = tuple(REGISTRY)

__all__ = ["Backend", "BackendUnavailableError", "BACKEND_NAMES", "REGISTRY",
           "available_backends", "backend_named", "check_arrays", "device_table",
           "select_backend", "unavailable_reason"]


class BackendUnavailableError(ValueError):
    """A backend was asked for by name but cannot run on this machine."""


@functools.cache
def unavailable_reason(name):
    """None when the backend called `name` can run here, else why not (checked once)."""
    backend = REGISTRY.get(name)
    if backend is None:
        return "it is not part of this version of gpu-momentum"
    return backend.unavailable_reason()


def available_backends():
    """Names of the backends usable on this machine, best first."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name) is None]


def backend_named(name):
    """The backend called `name`, or an error saying why it cannot be used."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend value: {name!r} (backend must be 'auto' or "
                         f"one of {BACKEND_NAMES})")
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

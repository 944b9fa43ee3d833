"""Checks on the arrays of an update, shared by every backend.

Arrays are described through `__array_interface__` / `__cuda_array_interface__`, so NumPy,
CuPy, Numba device arrays and PyTorch CUDA tensors are all checked the same way, before
anything is written. Every entry point describes its arrays here, so every one refuses
ndarray subclasses (whose meaning the update would ignore) and takes numpy.memmap.
"""

import math
from typing import NamedTuple

import numpy as np

from .kernels.layout import FLOAT8_VELOCITY
from .precision import (PARAM_DTYPE_NAMES, PRECISION_BUFFER_NAMES, compute_dtype,
                        float8_precisions, float8_state_shapes, precision_buffer_dtype,
                        velocity_dtypes)

__all__ = ["ArrayInfo", "array_state", "check_param", "check_param_dtype", "check_plain",
           "check_update", "compute_dtype", "describe", "overlaps", "type_name"]


def type_name(obj):
    cls = type(obj)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


class ArrayInfo(NamedTuple):
    name: str
    on_device: bool
    shape: tuple
    dtype: np.dtype
    address: int
    nbytes: int
    readonly: bool
    contiguous: bool


def describe(name, array):
    """ArrayInfo of `array`, or TypeError naming `name` when it is not an array, or is an
    ndarray subclass other than numpy.memmap (see check_plain)."""
    check_plain(name, array)
    if isinstance(array, np.ndarray):  # plain or a memmap: read without the lookups below
        address, readonly = array.__array_interface__["data"]
        return ArrayInfo(name, False, array.shape, array.dtype, address or 0, array.nbytes,
                         bool(readonly), array.flags.c_contiguous)
    iface = getattr(array, "__cuda_array_interface__", None)
    # Numba device arrays say so with __cuda_ndarray__; under the CUDA simulator they wrap
    # host memory and describe it with __array_interface__ only.
    on_device = iface is not None or bool(getattr(array, "__cuda_ndarray__", False))
    if iface is None:
        iface = getattr(array, "__array_interface__", None)
    if iface is None or isinstance(array, np.generic):
        raise TypeError(f"{name} must be a NumPy array or a CUDA array "
                        f"(cupy.ndarray, numba device array), got {type_name(array)}")
    shape = tuple(iface["shape"])
    dtype = np.dtype(iface["typestr"])
    if dtype.kind in "uV" and dtype.itemsize == 2:
        # bfloat16 is "<V2" in the interfaces (or its bits, "<u2", where an exporter has
        # none for it: gpu_momentum.torch); the array's own dtype knows better
        dtype = _own_dtype(array, dtype)
    address, readonly = iface["data"]
    strides = iface.get("strides")
    size = math.prod(shape)
    contiguous = (strides is None or size <= 1
                  or tuple(strides) == _c_strides(shape, dtype.itemsize))
    return ArrayInfo(name, on_device, shape, dtype, address or 0, size * dtype.itemsize,
                     bool(readonly), contiguous)


def array_state(array):
    """What an update's checks (`describe`, check_update) read of `array` that can change
    on the same object between two steps, read as cheaply as its type allows, so that a
    caller re-checks an array it checked before only when this changed.

    NumPy arrays: class, shape, strides, dtype and the writeable flag (all settable in
    place); the data pointer cannot move while a view of the array exists (resize refuses,
    `data` cannot be set), and the kernels' callers hold one. CuPy arrays: shape, strides,
    dtype and the data pointer. Anything else: its whole description (`describe`), which
    reads its array interface."""
    if isinstance(array, np.ndarray):
        return type(array), array.shape, array.strides, array.dtype, array.flags.writeable
    if type(array).__module__.split(".")[0] == "cupy":
        return type(array), array.shape, array.strides, array.dtype, array.data.ptr
    return describe("array", array)


def check_plain(name, array):
    """TypeError naming `name` for an ndarray subclass (numpy.matrix, a masked array,
    units...): the update would ignore what the subclass means (a mask would be updated
    through), so none is taken. numpy.memmap is a plain buffer in a file, the way to hold
    parameters larger than memory: it is taken, and the kernels get plain views of it."""
    if not isinstance(array, np.ndarray) or type(array) is np.ndarray or isinstance(
            array, np.memmap):
        return
    if isinstance(array, np.ma.MaskedArray):
        hint = (f"its mask would be ignored and the masked elements updated: pass "
                f"{name}.filled(value), or leave those elements out")
    else:
        hint = (f"what it adds would be ignored: pass np.asarray({name}) if a plain view "
                f"is meant")
    raise TypeError(f"{name} is a {type_name(array)}, a subclass of numpy.ndarray; "
                    f"gpu-momentum takes plain numpy.ndarray and numpy.memmap only "
                    f"({hint})")


def _own_dtype(array, interface_dtype):
    """The array's own `dtype` (ml_dtypes' bfloat16) where its interface says only "raw
    bytes" of the same size."""
    try:
        own = np.dtype(getattr(array, "dtype", None))
    except TypeError:
        return interface_dtype
    return own if own.itemsize == interface_dtype.itemsize else interface_dtype


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def check_param_dtype(name, dtype):
    """TypeError naming `name` unless `dtype` is a parameter dtype the library updates."""
    if dtype.name not in PARAM_DTYPE_NAMES or (dtype.kind == "V" and dtype.itemsize != 2):
        raise TypeError(f"{name} has dtype {dtype}; gpu-momentum updates floating-point "
                        f"parameters only ({', '.join(PARAM_DTYPE_NAMES)})")


def check_param(info, supported_dtypes, backend_name):
    """`supported_dtypes`: the names of the parameter dtypes the backend updates."""
    check_param_dtype(info.name, info.dtype)
    if info.dtype.name not in supported_dtypes:
        raise TypeError(f"backend {backend_name!r} does not support {info.name} dtype "
                        f"{info.dtype} (supported: {', '.join(supported_dtypes)})")
    _check_layout(info)
    if info.readonly:
        raise ValueError(f"{info.name} is read-only; the update writes it in place")


def check_update(param, grad, velocity, supported_dtypes, backend_name,
                 element_aligned=False, precision="nearest", precision_buffer=None,
                 float8_velocity=None):
    """Validates the ArrayInfos of one update against each other; element_aligned: each
    array must start on a multiple of its element size (a GPU faults otherwise).
    velocity None checks param and grad alone: the whole gradient of a sharded step, whose
    velocity covers a shard (gpu_momentum.distributed). `precision_buffer`: the ArrayInfo
    of `precision`'s extra buffer (kahan: the compensation, of param's dtype; master: the
    float32 master copy), None for the other modes. float8_velocity: instead of velocity,
    the ArrayInfos (codes, scales) of an FP8 velocity (gpu_momentum.float8_velocity)."""
    check_param(param, supported_dtypes, backend_name)
    if float8_velocity is not None:
        _check_float8(param, *float8_velocity, precision)
        velocity = float8_velocity[0]  # where a velocity is, for the checks below
    arrays = [param, grad] if velocity is None else [param, grad, velocity]
    buffer_dtype = precision_buffer_dtype(param.dtype, precision)
    if buffer_dtype is not None and precision_buffer is None and velocity is not None:
        raise ValueError(f"precision {precision!r} needs its "
                         f"{PRECISION_BUFFER_NAMES[precision]} array")
    if buffer_dtype is None and precision_buffer is not None:
        raise ValueError(f"{precision_buffer.name} is not used by precision {precision!r}")
    if precision_buffer is not None:
        arrays.append(precision_buffer)
        if precision_buffer.dtype != buffer_dtype:
            raise TypeError(f"{precision_buffer.name} has dtype {precision_buffer.dtype}; "
                            f"precision {precision!r} with {param.dtype} parameters needs "
                            f"a {buffer_dtype} {precision_buffer.name}")
    for other in arrays[1:]:
        if other.on_device != param.on_device:
            where = lambda info: "GPU memory" if info.on_device else "host memory"
            raise TypeError(f"{other.name} is in {where(other)} but {param.name} is in "
                            f"{where(param)}; all arrays of an update must live together")
    if grad.dtype != param.dtype:
        raise TypeError(f"grad has dtype {grad.dtype} but param has dtype {param.dtype}; "
                        f"they must match")
    if velocity is not None and float8_velocity is None:
        allowed = velocity_dtypes(param.dtype)
        if velocity.dtype not in allowed:
            names = " or ".join(str(d) for d in allowed)
            raise TypeError(f"velocity has dtype {velocity.dtype}; parameters of dtype "
                            f"{param.dtype} need a {names} velocity")
    for other in arrays[1:]:
        if other.shape != param.shape and (float8_velocity is None
                                           or other is not float8_velocity[0]):
            raise ValueError(f"{other.name} has shape {other.shape} but param has shape "
                             f"{param.shape}; they must match")
        _check_layout(other)
    if float8_velocity is not None:
        arrays.insert(3, float8_velocity[1])
    for written in arrays[2:]:
        if written.readonly:
            raise ValueError(f"{written.name} is read-only; the update writes it in place")
    for i, a in enumerate(arrays):
        for b in arrays[:i]:
            if overlaps(a, b):
                raise ValueError(f"{a.name} overlaps {b.name} in memory; the update needs "
                                 f"{len(arrays)} separate buffers")
    if element_aligned:
        for info in arrays:
            if info.address % info.dtype.itemsize:
                raise ValueError(
                    f"{info.name} starts at address {info.address:#x}, which is not a "
                    f"multiple of its {info.dtype.itemsize}-byte element size; the CUDA "
                    f"kernels need element-aligned arrays (make an aligned copy)")


def param_size(info):
    """The number of elements of an ArrayInfo."""
    return int(np.prod(info.shape, dtype=np.int64))


def _check_float8(param, codes, scales, precision):
    """An FP8 velocity's arrays (codes uint8[n], scales float32[ceil(n / FLOAT8_BLOCK)],
    contiguous) and whether param's dtype and `precision` have FP8 kernels."""
    allowed = float8_precisions(param.dtype)
    if not allowed:
        raise TypeError(f"{param.dtype} parameters cannot have a {FLOAT8_VELOCITY} "
                        f"velocity (it is for float32, bfloat16 and float16 parameters)")
    if precision not in allowed:
        raise ValueError(f"precision {precision!r} has no {FLOAT8_VELOCITY} kernel for "
                         f"{param.dtype} parameters (they have {allowed})")
    codes_shape, scales_shape = float8_state_shapes(param_size(param))
    for info, dtype, shape in ((codes, np.uint8, codes_shape),
                               (scales, np.float32, scales_shape)):
        if info.dtype != dtype or tuple(info.shape) != shape:
            raise TypeError(f"{info.name} is {info.dtype}{list(info.shape)}; a "
                            f"{FLOAT8_VELOCITY} velocity over {param_size(param)} elements "
                            f"needs {np.dtype(dtype)}{list(shape)}")
        _check_layout(info)


def _check_layout(info):
    if not info.contiguous:
        raise ValueError(f"{info.name} is not C-contiguous; the fused update runs over "
                         f"one contiguous buffer (make a contiguous copy first)")


def overlaps(a, b):
    return (a.nbytes > 0 and b.nbytes > 0 and a.address < b.address + b.nbytes
            and b.address < a.address + a.nbytes)

"""Bitwise checks of the CUDA C kernel against the reference in the kernel's precision."""

import numpy as np

from configs import problem
from gpu_momentum.reference import reference_step

SIZES = (0, 1, 3, 5, 1023, 278011)
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def same_precision_step(param, grad, velocity, **hyper):
    """The reference in the kernel's precision: float16 params are stored in float16 and
    computed in float32, like the kernel's __half entry point."""
    if param.dtype != np.float16:
        return reference_step(param, grad, velocity, dtype=param.dtype, **hyper)
    p, v = reference_step(param.astype(np.float32), grad.astype(np.float32), velocity,
                          dtype=np.float32, **hyper)
    return p.astype(np.float16), v


def assert_bitwise(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    uint = _UINT[actual.dtype.itemsize]
    mismatch = np.flatnonzero(actual.view(uint) != expected.reshape(-1).view(uint))
    assert mismatch.size == 0, (f"{what}: {mismatch.size} elements differ, first at "
                                f"{mismatch[0]}: {actual[mismatch[0]]!r} != "
                                f"{expected.reshape(-1)[mismatch[0]]!r}")


def start(size, dtype):
    """Params, per-step gradients and a NaN velocity: the first step must not read it."""
    param, grads = problem(size)
    velocity_dtype = np.float32 if dtype == np.float16 else dtype
    return (param.astype(dtype), [g.astype(dtype) for g in grads],
            np.full(size, np.nan, velocity_dtype))

"""Asks the CUDA driver for GPUs without importing numba (numba reads its simulator
switch, NUMBA_ENABLE_CUDASIM, once, on its first import)."""

import ctypes


def cuda_device_count():
    """GPUs the CUDA driver reports; 0 when there is no driver or it fails to start."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value

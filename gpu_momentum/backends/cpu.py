"""The cpu backend: NumPy arrays, updated by the parallel Numba loop of kernels/cpu.py."""

import numpy as np

from ..kernels.layout import READ_COUNTERS

NO_COUNTERS = np.zeros(0, np.int64)  # what the kernels get for counters=None


class CpuBackend:
    name = "cpu"
    dtypes = (np.dtype(np.float32), np.dtype(np.float64))  # Numba has no CPU float16
    element_aligned = False  # Numba's loads handle any address

    zeros = staticmethod(np.zeros)
    copy = staticmethod(np.copy)
    asarray = to_numpy = staticmethod(np.asarray)

    def unavailable_reason(self):
        return None

    def owns(self, array):
        return isinstance(array, np.ndarray)

    native = owns

    def assign(self, target, source):
        target[...] = source

    def synchronize(self):
        pass

    def place(self, param):
        return None

    def upload(self, array, param):
        return array  # the update runs in host memory: the host table is the table

    def upload_into(self, target, array, param):
        target[...] = array

    def step(self, param, grad, velocity, table, inv_grad_scale, counters=None,
             agree=None):
        from ..kernels.cpu import (find_nonfinite_cpu, momentum_step_cpu,
                                   update_unless_skipped_cpu)

        # Plain ndarray views: a numpy.memmap is passed as the buffer it is.
        arrays = (*(np.asarray(a).reshape(-1) for a in (param, grad, velocity)),
                  *table.arrays())
        inv_grad_scale = table.scalars.dtype.type(inv_grad_scale)
        if counters is None:
            momentum_step_cpu(*arrays, inv_grad_scale, table.launch_flags, NO_COUNTERS)
            return
        launch_flags = table.launch_flags | READ_COUNTERS
        find_nonfinite_cpu(*arrays, inv_grad_scale, launch_flags, counters)
        if agree is not None:
            agree(counters)
        update_unless_skipped_cpu(*arrays, inv_grad_scale, launch_flags, counters)

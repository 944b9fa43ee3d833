"""How the shared tests reach each backend: array conversion and availability.

Each harness moves NumPy arrays to the backend's memory and back. A backend that CI can
run on a CPU-only machine (`runs_in_ci`) fails instead of skipping when CI=true and it is
unavailable: a skip must never hide missing tooling there.
"""

import os

import numpy as np

import gpu_momentum

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SIMULATED_MAX_SIZE = 4099


class CpuHarness:
    name = "cpu"
    on_device = False
    runs_in_ci = True
    dtypes = (np.float32, np.float64)

    def size_limit(self, size):
        return None

    def from_numpy(self, array):
        return np.array(array, copy=True)

    def to_numpy(self, array):
        return np.array(array, copy=True)


class NumbaCudaHarness:
    name = "numba-cuda"
    on_device = True
    runs_in_ci = True  # on CPU-only machines under the CUDA simulator (see conftest.py)
    dtypes = (np.float16, np.float32, np.float64)

    @property
    def simulated(self):
        from numba.core import config

        return bool(config.ENABLE_CUDASIM)

    def size_limit(self, size):
        """Why `size` elements are not run here, or None."""
        # The simulator runs every GPU thread as a Python thread, ~40 us per element: the
        # table's 278011-element case would take ~20 minutes. At 1023 elements its grid of
        # 2 blocks of 32 threads already makes 16 grid-stride rounds with a ragged end.
        if self.simulated and size > SIMULATED_MAX_SIZE:
            return (f"{size} elements take minutes in the CUDA simulator (limit "
                    f"{SIMULATED_MAX_SIZE}); real GPUs run this size")
        return None

    def from_numpy(self, array):
        from numba import cuda

        return cuda.to_device(np.ascontiguousarray(array))

    def to_numpy(self, array):
        if isinstance(array, np.ndarray):
            return np.array(array, copy=True)
        return array.copy_to_host()


HARNESSES = [CpuHarness(), NumbaCudaHarness()]


def unavailable_reason(harness):
    if harness.name in gpu_momentum.available_backends():
        return None
    return f"backend {harness.name!r} is not available on this machine"

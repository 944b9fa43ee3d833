"""How the shared tests reach each backend: array conversion and availability.

Each harness moves NumPy arrays to the backend's memory and back. A backend that CI can
run on a CPU-only machine (`runs_in_ci`) fails instead of skipping when CI=true and it is
unavailable: a skip must never hide missing tooling there.
"""

import importlib
import os

import numpy as np
import pytest

import gpu_momentum

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SIMULATED_MAX_SIZE = 4099


def library_env():
    """The environment for a subprocess that runs the library as users run it: with the
    real numba-cuda, not the CUDA simulator conftest.py may have switched on for the test
    process (the simulator would make numba-cuda look available and run the demo and the
    benchmark in it, thousands of times slower), importing the gpu_momentum this process
    tests: a script's sys.path starts at its own folder, so without this a child could
    import another installed copy, or none (a checkout that pip could not install)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    tested = os.path.dirname(os.path.dirname(os.path.abspath(gpu_momentum.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tested, env.get("PYTHONPATH")]))
    return env


def require(module_name):
    """Imports a test tool; skips with the reason where it is missing, fails in CI."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        reason = f"{module_name} is not installed ({error})"
        if IN_CI:
            pytest.fail(f"{reason}, and CI must run this test (CI=true)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def missing_tool(reason):
    """A tool a CPU-only test needs is absent: skip with the reason, fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason}, and CI must run this test (CI=true)", pytrace=False)
    pytest.skip(reason)


class Harness:
    """What every harness shares; each one adds name, on_device, runs_in_ci, dtypes,
    from_numpy and to_numpy."""

    simulated = False
    contracts_fma = False  # a * b + c rounds twice, as in the reference
    flushes_subnormals = False  # float32 subnormals are computed with, not flushed

    def size_limit(self, size):
        """Why `size` elements are not run here, or None."""
        return None

    def assign(self, target, array):
        """Writes the NumPy `array` into `target`, in the backend's memory, in place."""
        array = self.from_numpy(np.asarray(array, dtype=target.dtype))
        gpu_momentum.backends.backend_named(self.name).assign(target, array)


class CpuHarness(Harness):
    name = "cpu"
    on_device = False
    runs_in_ci = True
    dtypes = (np.float16, np.float32, np.float64)

    def from_numpy(self, array):
        return np.array(array, copy=True)

    def to_numpy(self, array):
        return np.array(array, copy=True)


class CupyHarness(Harness):
    name = "cupy"
    on_device = True
    runs_in_ci = False  # needs a GPU; tests/test_cuda_*.py prove the kernel without one
    dtypes = (np.float16, np.float32, np.float64)  # compiled with --fmad=false: no FMAs
    flushes_subnormals = True  # CuPy compiles with -ftz=true

    def from_numpy(self, array):
        import cupy
        return cupy.array(array)

    def to_numpy(self, array):
        import cupy
        return cupy.asnumpy(array)


class NumbaCudaHarness(Harness):
    name = "numba-cuda"
    on_device = True
    runs_in_ci = True  # on CPU-only machines under the CUDA simulator (see conftest.py)
    dtypes = (np.float16, np.float32, np.float64)

    @property
    def simulated(self):
        from numba.core import config

        return bool(config.ENABLE_CUDASIM)

    @property
    def contracts_fma(self):
        # NVVM fuses a * b + c into one rounding and numba-cuda has no switch to stop it;
        # the simulator computes with NumPy scalars, as the reference does.
        return not self.simulated

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

        return cuda.to_device(np.asarray(array, order="C"))

    def to_numpy(self, array):
        if isinstance(array, np.ndarray):
            return np.array(array, copy=True)
        return array.copy_to_host()


HARNESSES = [CpuHarness(), CupyHarness(), NumbaCudaHarness()]


def unavailable_reason(harness):
    if harness.name in gpu_momentum.available_backends():
        return None
    return f"backend {harness.name!r} is not available on this machine"


def usable(harness):
    """`harness`, or a skip saying why its backend is unavailable (a failure in CI for a
    backend that CI can run)."""
    reason = unavailable_reason(harness)
    if reason is not None:
        if IN_CI and harness.runs_in_ci:
            pytest.fail(f"{reason}, and CI must run it (CI=true)")
        pytest.skip(reason)
    return harness

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


class CpuHarness:
    name = "cpu"
    on_device = False
    runs_in_ci = True
    dtypes = (np.float32, np.float64)

    def from_numpy(self, array):
        return np.array(array, copy=True)

    def to_numpy(self, array):
        return np.array(array, copy=True)


class CupyHarness:
    name = "cupy"
    on_device = True
    runs_in_ci = False  # needs a GPU; tests/test_cuda_*.py prove the kernel without one
    dtypes = (np.float16, np.float32, np.float64)

    def from_numpy(self, array):
        import cupy
        return cupy.array(array)

    def to_numpy(self, array):
        import cupy
        return cupy.asnumpy(array)


HARNESSES = [CpuHarness(), CupyHarness()]


def unavailable_reason(harness):
    if harness.name in gpu_momentum.available_backends():
        return None
    return f"backend {harness.name!r} is not available on this machine"

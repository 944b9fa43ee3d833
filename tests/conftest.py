import os
import tempfile

from cuda_driver import cuda_device_count

# Without a GPU the numba-cuda backend runs its tests in Numba's CUDA simulator, so CPU-only
# machines and CI check it too; with one it runs on the hardware. NUMBA_ENABLE_CUDASIM set
# by hand wins. Numba reads it once, on its first import.
if cuda_device_count() == 0:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Numba's on-disk cache is keyed on the kernel's own file, not on kernels/elementwise.py
# that it inlines: a fresh cache per run keeps an edit of the maths from being masked by a
# stale compiled kernel. Set before numba is first imported.
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="gpu-momentum-numba-"))

import pytest  # noqa: E402

from harness import HARNESSES, usable  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU; runs wherever one is "
                                       "present, skipped with a reason elsewhere")
    config.addinivalue_line("markers", "hardware_first: what had not yet run on a GPU; "
                                       ".ci/gpu runs these first (pytest -m hardware_first)")
    config.addinivalue_line("markers", "slow: takes many seconds (MPI jobs, DDP, soak, big "
                                       "simulator and host-shim tables); the fast loop "
                                       "`pytest -m \"not slow\"` leaves it out, CI runs it")


@pytest.fixture(params=HARNESSES, ids=lambda h: h.name)
def backend(request):
    """A harness for each backend; every shared test runs once per backend."""
    return usable(request.param)

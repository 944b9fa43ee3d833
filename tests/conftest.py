import pytest

from harness import HARNESSES, IN_CI, unavailable_reason


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU; runs wherever one is "
                                       "present, skipped with a reason elsewhere")


@pytest.fixture(params=HARNESSES, ids=lambda h: h.name)
def backend(request):
    """A harness for each backend; every shared test runs once per backend."""
    harness = request.param
    reason = unavailable_reason(harness)
    if reason is not None:
        if IN_CI and harness.runs_in_ci:
            pytest.fail(f"{reason}, and CI must run it (CI=true)")
        pytest.skip(reason)
    return harness

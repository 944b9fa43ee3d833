"""A fourth backend, added through the registry alone (tests/numpy_backend.py), runs the
shared tests: every test below that takes the `backend` fixture is one of the shared
modules' own, collected here again over the NumPy backend; and torch.SGD, MomentumSGD and
momentum_step reach it by name.

16-bit parameters (tests/test_low_precision.py) are left out: the backend lists float32
and float64 only, as a backend may.
"""

import inspect

import numpy as np
import pytest

import gpu_momentum as gm
import test_capture
import test_checkpoint
import test_flat
import test_groups
import test_loss_scale
import test_nonfinite
import test_overhead
import test_update
from configs import CONFIGS, hyper_at, problem
from gpu_momentum.backends import (REGISTRY, backend_named, backends_for_device,
                                   register_backend, select_backend, unregister_backend)
from gpu_momentum.backends.runner import StepKernels, StepRunner
from gpu_momentum.reference import reference_step
from harness import Harness
from numpy_backend import NumpyBackend

SHARED_MODULES = (test_update, test_groups, test_nonfinite, test_loss_scale,
                  test_overhead, test_flat, test_capture, test_checkpoint)


class NumpyHarness(Harness):
    name = "numpy"
    on_device = False
    runs_in_ci = True
    dtypes = (np.float32, np.float64)

    def from_numpy(self, array):
        return np.array(array, copy=True)

    def to_numpy(self, array):
        return np.array(array, copy=True)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The NumPy backend in the registry while this module's tests run."""
    register_backend(NumpyBackend())
    yield REGISTRY["numpy"]
    unregister_backend("numpy")


@pytest.fixture
def backend(registered):
    """Overrides conftest's: the shared tests collected here run over the NumPy backend."""
    return NumpyHarness()


def _shared_tests():
    for module in SHARED_MODULES:
        for name, function in vars(module).items():
            if (name.startswith("test_") and inspect.isfunction(function)
                    and "backend" in inspect.signature(function).parameters):
                yield f"test_{module.__name__[len('test_'):]}__{name[len('test_'):]}", \
                    function


for _name, _function in _shared_tests():
    globals()[_name] = _function


def test_shared_tests_are_collected_here():
    names = [name for name, _ in _shared_tests()]
    assert len(names) > 40
    assert "test_update__momentum_step_matches_reference" in names


@pytest.mark.parametrize("config", CONFIGS[:4])
def test_its_steps_are_the_cpu_backends_bit_for_bit(config):
    """Same operations in the same order, one rounding each: the cpu backend's bits."""
    param, grads = problem(1023, steps=3, dtype=np.float32)
    results = []
    for name in ("cpu", "numpy"):
        opt = gm.MomentumSGD(param.copy(), backend=name, **hyper_at(config, 0))
        for step, grad in enumerate(grads):
            opt.lr = hyper_at(config, step)["lr"]
            opt.step(grad)
        results.append((opt.param.tobytes(), opt.velocity.tobytes()))
    assert results[0] == results[1]


def test_the_registry_reaches_it_by_name_and_never_by_default():
    assert "numpy" in gm.available_backends()
    assert backend_named("numpy") is REGISTRY["numpy"]
    assert backends_for_device("cpu") == ("cpu", "numpy")
    assert select_backend("auto", np.zeros(4)).name == "cpu"
    param, (grad,) = problem(16, steps=1)
    p, v = param.copy(), np.zeros(16)
    gm.momentum_step(p, grad, v, lr=0.1, momentum=0.9, first_step=True, backend="numpy")
    expected, _ = reference_step(param, grad, np.zeros(16), lr=0.1, momentum=0.9,
                                 first_step=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-12)


def test_registering_refuses_a_taken_name_and_an_incomplete_backend():
    with pytest.raises(ValueError, match="'numpy'.*registered already"):
        register_backend(NumpyBackend())
    incomplete = type("Incomplete", (), {"name": "incomplete", "dtypes": ("float32",)})()
    with pytest.raises(TypeError, match="'incomplete' lacks element_aligned, "
                                        "device_type"):
        register_backend(incomplete)
    with pytest.raises(ValueError, match="'auto'"):
        register_backend(type("Auto", (NumpyBackend,), {"name": "auto"})())
    with pytest.raises(ValueError, match="'missing'"):
        unregister_backend("missing")
    assert "incomplete" not in REGISTRY and "auto" not in REGISTRY


def test_torch_sgd_steps_on_it_as_torch_optim_sgd():
    torch = pytest.importorskip("torch")
    from gpu_momentum.torch import SGD

    torch.manual_seed(0)
    ours, theirs = (torch.nn.Linear(5, 3).double() for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    optimizers = [SGD(ours.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                      backend="numpy"),
                  torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, nesterov=True)]
    assert optimizers[0].backends == {("cpu", torch.float64): "numpy"}
    for _ in range(3):
        x = torch.randn(4, 5, dtype=torch.float64)
        for model, opt in zip((ours, theirs), optimizers):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)


class _Recording(StepKernels):
    """Launches that record their names and the arguments they were given."""

    def __init__(self, counted):
        self.counters = np.zeros(4, np.int64) if counted else None
        self.log, self.converted = [], []
        self.no_grad_scale, self.no_found_inf = "no scale", "no found_inf"

    def kernel_grad(self, grad):
        self.converted.append("grad")
        return ("view", grad)

    def kernel_grad_scale(self, grad_scale):
        return ("scale", grad_scale)

    def kernel_found_inf(self, found_inf):
        return ("found", found_inf)

    def launches(self):
        record = lambda name: lambda step: self.log.append(
            (name, step.grad, step.inv_grad_scale, step.grad_scale, step.found_inf,
             int(step.step_count)))
        return {"clear": record("clear"), "find_nonfinite": record("find_nonfinite"),
                "update": record("update"), "finish": None}


def test_the_runner_queues_step_launches_in_order_and_converts_only_what_changed():
    counted = _Recording(counted=True)
    runner = StepRunner(counted, elements=5)
    agreed = []
    grad = object()
    runner(grad, 0.5, agree=agreed.append, grad_scale="s", found_inf="f", step_count=3)
    assert [entry[0] for entry in counted.log] == ["clear", "find_nonfinite", "update"]
    assert agreed == [counted.counters]  # between find_nonfinite and update
    assert counted.log[1] == ("find_nonfinite", ("view", grad), np.float32(0.5),
                              ("scale", "s"), ("found", "f"), 3)
    counted.log.clear()
    runner(grad, 0.5)
    assert counted.converted == ["grad"]  # the same grad object: converted once
    assert counted.log[0][3:] == ("no scale", "no found_inf", 0)
    assert len(agreed) == 1

    uncounted = _Recording(counted=False)
    runner = StepRunner(uncounted, elements=0)
    runner(grad, 1.0)
    assert uncounted.log == []  # nothing over no elements without counters
    with pytest.raises(ValueError, match="found_inf needs the step counters"):
        runner(grad, 1.0, found_inf="f")

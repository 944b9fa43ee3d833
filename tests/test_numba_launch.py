"""Prepared Numba launches (gpu_momentum.backends.numba_launch): the Python work of a step
after warm-up, counted through a fake compiled kernel and launch function put in the
module's one switch, and the same launches on a GPU."""

import numpy as np
import pytest

from gpu_momentum.backends import numba_launch


class FakeKernel:
    """Stands in for numba's compiled `_Kernel`: packs an argument as numba does for a
    scalar (one value) and counts each packing."""

    def __init__(self, argument_types):
        self.argument_types = argument_types
        self.packed = []
        self._codelibrary = self

    def get_cufunc(self):
        return self

    kernel = "function handle"

    def _prepare_args(self, ty, value, stream, retr, out):
        self.packed.append(value)
        out.extend(value if isinstance(value, tuple) else (value,))


class FakeDispatcher:
    def __init__(self):
        self.typed = 0

    def typeof_pyval(self, value):
        self.typed += 1
        return type(value).__name__


class FakeConfigured:
    griddim, blockdim, stream = (4, 1, 1), (256, 1, 1), "stream"

    def __init__(self):
        self.dispatcher = FakeDispatcher()
        self.dispatcher_calls = 0

    def __call__(self, *args):
        self.dispatcher_calls += 1


@pytest.fixture
def fakes(monkeypatch):
    kernels, launches = [], []

    def kernel_of(configured, args):
        kernels.append(FakeKernel([configured.dispatcher.typeof_pyval(a) for a in args]))
        return kernels[-1]

    launch = lambda stream, config, function, *flat: launches.append((stream, config,
                                                                     function, flat))
    monkeypatch.setitem(numba_launch.LAUNCH_WITH, "kernel_of", kernel_of)
    monkeypatch.setitem(numba_launch.LAUNCH_WITH, "launch",
                        (launch, lambda grid, block: (grid, block)))
    return kernels, launches


def test_a_prepared_step_packs_only_what_changed(fakes):
    kernels, launches = fakes
    configured = FakeConfigured()
    prepared = numba_launch.launcher(configured)
    assert isinstance(prepared, numba_launch.PreparedLaunch)
    param, grad, scale, count = (1, 2, 3), (4, 5, 6), np.float32(0.5), np.int64(1)
    prepared(param, grad, scale, count)
    typed_after_warm_up = configured.dispatcher.typed
    assert kernels[0].packed == [param, grad, scale, count]
    for _ in range(3):  # the same objects: nothing typed or packed, one launch each
        prepared(param, grad, scale, count)
    assert kernels[0].packed == [param, grad, scale, count]
    assert configured.dispatcher.typed == typed_after_warm_up
    assert configured.dispatcher_calls == 0
    new_grad, new_count = (7, 8, 9), np.int64(2)
    prepared(param, new_grad, scale, new_count)
    assert kernels[0].packed[4:] == [new_grad, new_count]
    assert len(kernels) == 1
    assert [flat for *_, flat in launches] == (
        [(1, 2, 3, 4, 5, 6, scale, count)] * 4 + [(1, 2, 3, 7, 8, 9, scale, new_count)])
    assert {(stream, config, function) for stream, config, function, _ in launches} == {
        ("stream", ((4, 1, 1), (256, 1, 1)), "function handle")}


def test_arguments_of_other_types_prepare_again(fakes):
    kernels, launches = fakes
    prepared = numba_launch.launcher(FakeConfigured())
    prepared(np.float32(1), np.int64(1))
    prepared(np.float64(1), np.int64(1))
    assert len(kernels) == 2
    assert kernels[1].argument_types == ["float64", "int64"]
    assert launches[-1][-1] == (np.float64(1), np.int64(1))


def test_the_simulator_launches_through_the_dispatcher():
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("on a GPU launches are prepared (the other tests)")
    configured = FakeConfigured()
    assert numba_launch.launcher(configured) is configured


@pytest.mark.gpu
@pytest.mark.hardware_first
def test_prepared_launch_matches_the_dispatcher_on_a_gpu():
    from numba import cuda
    from numba.core import config

    if config.ENABLE_CUDASIM or not cuda.is_available():
        pytest.skip("needs a CUDA GPU (the simulator has no driver)")

    @cuda.jit
    def axpy(out, x, a, n):
        i = cuda.grid(1)
        if i < n:
            out[i] = a * x[i] + out[i]

    x = cuda.to_device(np.arange(1000, dtype=np.float32))
    out, expected = cuda.device_array(1000, np.float32), np.zeros(1000, np.float32)
    out.copy_to_device(expected)
    stream = cuda.stream()
    prepared = numba_launch.launcher(axpy[4, 256, stream])
    a, n = np.float32(2), np.int64(1000)
    for step in range(3):
        prepared(out, x, a, n)
        expected = np.float32(2) * np.arange(1000, dtype=np.float32) + expected
    a = np.float32(-1)
    prepared(out, x, a, n)
    expected = np.float32(-1) * np.arange(1000, dtype=np.float32) + expected
    stream.synchronize()
    np.testing.assert_array_equal(out.copy_to_host(), expected)
    assert prepared.packed_arguments == 5  # four at the first launch, then a

"""Prepared Numba launches (gpu_momentum.backends.numba_launch): the Python work of a step
after warm-up, counted through a driver standing in for numba's in the module's one
switch, and the same launches on a GPU."""

import numpy as np
import pytest

import gpu_momentum as gm
from gpu_momentum.backends import numba_launch
from harness import NumbaCudaHarness, usable


class CountingDriver:
    """Stands in for NumbaDriver: each argument packs as itself (one flat value), and a
    launch either records its flat arguments or, with `run`, runs the kernel on them (the
    CUDA simulator's kernels, to keep the maths). Counts compilations, type lookups and
    packings."""

    def __init__(self, run=False):
        self.run = run
        self.compiled_count = self.typed = 0
        self.packed, self.launched = [], []

    def compiled(self, configured, args):
        self.compiled_count += 1
        kernel = [type(value) for value in args]
        if self.run:  # the simulator's kernel object, reconfigured by each [grid, block]
            geometry = configured.grid_dim, configured.block_dim
        else:
            geometry = configured.griddim, configured.blockdim
        return kernel, configured, geometry, configured.stream

    def type_of(self, configured, value):
        self.typed += 1
        return type(value)

    def argument_type(self, kernel, index):
        return kernel[index]

    def pack(self, kernel, index, value, stream):
        self.packed.append(value)
        return [value]

    def launch(self, stream, geometry, function, flat):
        self.launched.append((stream, geometry, function, tuple(flat)))
        if self.run:
            function[(*geometry, stream)](*flat)


class Configured:
    griddim, blockdim, stream = (4, 1, 1), (256, 1, 1), "stream"


def test_a_prepared_launch_packs_only_the_arguments_that_changed(monkeypatch):
    driver = CountingDriver()
    monkeypatch.setitem(numba_launch.DRIVER, "override", driver)
    configured = Configured()
    prepared = numba_launch.launcher(configured)
    param, grad, scale, count = np.zeros(3), np.ones(3), np.float32(0.5), np.int64(1)
    prepared(param, grad, scale, count)
    assert driver.packed == [param, grad, scale, count] and driver.compiled_count == 1
    for _ in range(3):  # the same objects: nothing typed, compiled or packed
        prepared(param, grad, scale, count)
    assert (len(driver.packed), driver.typed, driver.compiled_count) == (4, 0, 1)
    new_grad, new_count = np.ones(3), np.int64(2)
    prepared(param, new_grad, scale, new_count)
    assert driver.packed[4:] == [new_grad, new_count]
    # the new array typed again, the step count (a NumPy scalar of the same class) not
    assert (driver.typed, driver.compiled_count, prepared.packed_arguments) == (1, 1, 6)
    assert [flat for *_, flat in driver.launched] == (
        [(param, grad, scale, count)] * 4 + [(param, new_grad, scale, new_count)])
    assert {launch[:3] for launch in driver.launched} == {
        ("stream", ((4, 1, 1), (256, 1, 1)), configured)}


def test_an_argument_of_another_type_prepares_the_launch_again(monkeypatch):
    driver = CountingDriver()
    monkeypatch.setitem(numba_launch.DRIVER, "override", driver)
    prepared = numba_launch.launcher(Configured())
    prepared(np.float32(1), np.int64(1))
    prepared(np.float64(1), np.int64(1))
    assert driver.compiled_count == 2
    assert driver.launched[-1][-1] == (np.float64(1), np.int64(1))


def test_the_simulator_launches_through_the_dispatcher():
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("on a GPU launches are prepared (the other tests)")
    configured = Configured()
    assert numba_launch.launcher(configured) is configured


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_warm_numba_steps_compile_type_and_pack_nothing(monkeypatch, skip_nonfinite):
    """The numba-cuda backend's steps through prepared launches (in the simulator, the
    driver runs the simulator's kernels): after the first step, a step with the same
    gradient compiles and types nothing and packs only the step count (nothing with
    device counters), and its results are the dispatcher's."""
    harness = usable(NumbaCudaHarness())
    backend = gm.backends.backend_named("numba-cuda")
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("counts the simulator's launches; on a GPU the next test checks them")
    results = []
    for driver in (None, CountingDriver(run=True)):
        monkeypatch.setitem(numba_launch.DRIVER, "override", driver)
        arrays = [harness.from_numpy(np.linspace(-1, 1, size)) for size in (37, 64)]
        flat = gm.FlatParams.from_arrays(arrays)
        backend.assign(flat.grad, np.linspace(-2, 3, flat.grad.size))
        opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9, skip_nonfinite=skip_nonfinite,
                             backend="numba-cuda")
        opt.step()
        if driver is not None:
            warm = (driver.compiled_count, driver.typed, len(driver.packed),
                    len(driver.launched))
            assert warm[0] == warm[3]  # each launch prepared once
        for _ in range(3):
            opt.step()
        if driver is not None:
            # The step count alone repacked, as a NumPy scalar; the device counters hold
            # it when there are some: nothing repacked.
            assert (driver.compiled_count, driver.typed) == warm[:2]
            assert [int(value) for value in driver.packed[warm[2]:]] == (
                [] if skip_nonfinite else [1, 2, 3])
            assert {type(value) for value in driver.packed[warm[2]:]} <= {np.int64}
            assert len(driver.launched) == 4 * warm[3]
        results.append((backend.to_numpy(flat.data),
                        backend.to_numpy(opt.velocity)))
    for dispatcher_result, prepared_result in zip(*results):
        np.testing.assert_array_equal(prepared_result, dispatcher_result)


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

    x_host = np.arange(1000, dtype=np.float32)
    x, out = cuda.to_device(x_host), cuda.to_device(np.zeros(1000, np.float32))
    expected = np.zeros(1000, np.float32)
    stream = cuda.stream()
    prepared = numba_launch.launcher(axpy[4, 256, stream])
    assert isinstance(prepared, numba_launch.PreparedLaunch)
    a, n = np.float32(2), np.int64(1000)
    for _ in range(3):
        prepared(out, x, a, n)
        expected = a * x_host + expected
    a = np.float32(-1)
    prepared(out, x, a, n)
    expected = a * x_host + expected
    stream.synchronize()
    np.testing.assert_array_equal(out.copy_to_host(), expected)
    assert prepared.packed_arguments == 5  # four at the first launch, then a

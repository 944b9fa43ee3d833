"""Long runs: no memory growth, results identical to the reference, deterministic."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import problem
from gpu_momentum.reference import reference_step

pytestmark = pytest.mark.slow  # thousands of steps, large buffers: CI runs them


def _host_rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _device_pool_bytes(backend):
    if backend.name != "cupy":
        return 0
    import cupy
    return cupy.get_default_memory_pool().used_bytes()


def _skip_simulated(backend):
    if backend.simulated:
        pytest.skip("the CUDA simulator runs Python per thread: its speed, memory and "
                    "determinism say nothing about the backend; these run on the CPU and "
                    "on real GPUs")


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_20000_small_steps_grow_no_memory_and_match_the_reference(backend, skip_nonfinite):
    _skip_simulated(backend)
    size, steps = 1000, 20_000
    rng = np.random.default_rng(7)
    param = rng.standard_normal(size)
    grads = rng.standard_normal((16, size))  # cycled: the reference needs them on the host
    p = backend.from_numpy(param)
    device_grads = [backend.from_numpy(g) for g in grads]
    opt = gm.MomentumSGD(p, lr=0.01, momentum=0.9, style="torch", weight_decay=1e-4,
                         skip_nonfinite=skip_nonfinite, backend=backend.name)
    lrs = 0.01 * (1 + np.cos(np.arange(steps) / steps * np.pi)) / 2  # a cosine schedule
    for step in range(steps):
        opt.lr = lrs[step]
        opt.step(device_grads[step % 16])
        if step == 1000:
            rss, pool = _host_rss_bytes(), _device_pool_bytes(backend)
    assert _host_rss_bytes() - rss < 1 << 20, "host memory grew over 19,000 steps"
    assert _device_pool_bytes(backend) == pool, "device memory pool grew"
    assert opt.step_count == steps

    velocity = np.zeros(size)
    for step in range(steps):
        param, velocity = reference_step(param, grads[step % 16], velocity, lr=lrs[step],
                                         momentum=0.9, style="torch", weight_decay=1e-4,
                                         first_step=step == 0)
    np.testing.assert_allclose(backend.to_numpy(p), param, rtol=1e-9, atol=1e-12)


def test_200_large_steps_match_the_same_precision_reference(backend):
    _skip_simulated(backend)
    size, steps = (1 << 22) + 3, 200
    rng = np.random.default_rng(8)
    param = rng.standard_normal(size, dtype=np.float32)
    grads = [rng.standard_normal(size, dtype=np.float32) for _ in range(4)]
    p = backend.from_numpy(param)
    device_grads = [backend.from_numpy(g) for g in grads]
    opt = gm.MomentumSGD(p, lr=0.01, momentum=0.9, nesterov=True, backend=backend.name)
    lrs = 0.01 * 0.99 ** np.arange(steps)
    for step in range(steps):
        opt.lr = lrs[step]
        opt.step(device_grads[step % 4])
        if step == 10:
            rss, pool = _host_rss_bytes(), _device_pool_bytes(backend)
    assert _host_rss_bytes() - rss < 1 << 20, "host memory grew"
    assert _device_pool_bytes(backend) == pool, "device memory pool grew"

    velocity = np.zeros(size, np.float32)
    for step in range(steps):
        param, velocity = reference_step(param, grads[step % 4], velocity, lr=lrs[step],
                                         momentum=0.9, nesterov=True, first_step=step == 0,
                                         dtype=np.float32)
    np.testing.assert_allclose(backend.to_numpy(p), param, rtol=1e-4, atol=1e-5)


def test_runs_are_bitwise_deterministic(backend):
    _skip_simulated(backend)

    def run():
        param, grads = problem(278011)
        opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.05, momentum=0.9,
                             style="torch", dampening=0.1, weight_decay=0.01,
                             backend=backend.name)
        for grad in grads:
            opt.step(backend.from_numpy(grad))
        return [backend.to_numpy(a).tobytes() for a in (opt.param, opt.velocity)]

    assert run() == run()

"""The cupy backend on a real GPU (marked gpu; skipped with the reason elsewhere).

With --fmad=false the GPU rounds every multiply and add on its own, like the reference in
the kernel's precision, so results are compared bit for bit, as on the host
(tests/test_cuda_host.py). The shared tests in tests/test_update.py also run on this
backend through CupyHarness.
"""

import numpy as np
import pytest

import gpu_momentum as gm
from bitwise import SIZES, assert_bitwise, same_precision_step, start
from configs import CONFIGS, GROUP_CONFIGS, grouped_reference_step, hyper_at
from gpu_momentum.hyperparams import Hyperparameters
from gpu_momentum.groups import update_table
from gpu_momentum.backends import cupy as cupy_backend
from gpu_momentum.backends import device_table
from gpu_momentum.kernels.layout import (GROUP_SLOTS, LAST_STEP_SKIPPED, SKIPPED_STEPS,
                                         STEP_COUNT)
from host_kernel import grouped_problem, grouped_table

pytestmark = pytest.mark.gpu

DTYPES = [np.float16, np.float32, np.float64]


@pytest.fixture(scope="module")
def cupy():
    if "cupy" not in gm.available_backends():
        from gpu_momentum.backends import unavailable_reason
        pytest.skip(f"backend 'cupy' is not available: {unavailable_reason('cupy')}")
    import cupy
    return cupy


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
def test_cupy_matches_reference_bitwise(cupy, config, size, dtype):
    param, grads, velocity = start(size, dtype)
    p, v = cupy.asarray(param), cupy.asarray(velocity)
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        gm.momentum_step(p, cupy.asarray(grad), v, first_step=step == 0, backend="cupy",
                         **hyper)
        param, velocity = same_precision_step(param, grad, velocity, first_step=step == 0,
                                              **hyper)
        assert_bitwise(cupy.asnumpy(p), param, f"param after step {step + 1}")
        assert_bitwise(cupy.asnumpy(v), velocity, f"velocity after step {step + 1}")


@pytest.mark.parametrize("counted", [False, True], ids=["flags", "counters"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", GROUP_CONFIGS)
def test_cupy_groups_match_reference_bitwise(cupy, config, dtype, counted):
    """Every group in one launch, as tests/test_cuda_host.py checks it on the host; with
    counters, poisoned steps change nothing but the counters in device memory."""
    param, grads, velocity, offsets, sizes = grouped_problem(dtype)
    p, v = cupy.asarray(param), cupy.asarray(velocity)
    groups = 1 + len(config["groups"])
    backend = gm.backends.backend_named("cupy")
    initialized = [False] * groups
    counters = cupy.zeros(GROUP_SLOTS + groups, np.int64) if counted else None
    poisoned = {0: 3, 3: offsets[-1]} if counted else {}
    taken = 0
    for step, grad in enumerate(grads):
        table = grouped_table(config, step, [True] * groups if counted else initialized,
                              offsets, sizes, param.size, dtype)
        if step in poisoned:
            grad = grad.copy()
            grad[poisoned[step]] = np.inf
        backend.step(p, cupy.asarray(grad), v, device_table(backend, table, p), 1.0,
                     counters)
        if step not in poisoned:
            param, velocity = grouped_reference_step(
                param, grad, velocity, config, step, initialized, offsets, sizes,
                step_fn=same_precision_step)
            taken += 1
        assert_bitwise(cupy.asnumpy(p), param, f"param after step {step + 1}")
        assert_bitwise(cupy.asnumpy(v), velocity, f"velocity after step {step + 1}")
        if counted:
            host = cupy.asnumpy(counters)
            assert host[LAST_STEP_SKIPPED] == (step in poisoned)
            assert (host[STEP_COUNT], host[SKIPPED_STEPS]) == (taken, step + 1 - taken)
            assert host[GROUP_SLOTS:].tolist() == [int(i) for i in initialized]


def test_cupy_table_in_another_dtype_is_a_clear_error(cupy):
    p, g, v = (cupy.ones(8, np.float32), cupy.ones(8, np.float32),
               cupy.zeros(8, np.float32))
    table = update_table([Hyperparameters(lr=0.1)], [True], np.float64, size=8)
    with pytest.raises(TypeError, match=r"scalars are float64, but the kernel computes "
                                        r"in float32"):
        backend = gm.backends.backend_named("cupy")
        backend.step(p, g, v, device_table(backend, table, p), 1.0)
    assert float(p[0]) == 1.0


@pytest.mark.parametrize("byte_offset", [4, 8, 12])
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_views_past_an_aligned_address(cupy, dtype, byte_offset):
    itemsize = np.dtype(dtype).itemsize
    param, grads, velocity = start(4099, dtype)

    def view(values):
        skip = byte_offset // values.itemsize
        buffer = cupy.full(values.size + 16, np.nan, values.dtype)
        out = buffer[skip:skip + values.size]
        out[...] = cupy.asarray(values)
        return out, buffer, skip

    (p, p_buf, p_skip), (g, _, _), (v, v_buf, v_skip) = map(view, (param, grads[0],
                                                                  velocity))
    assert p.data.ptr % 16 == byte_offset and itemsize <= byte_offset
    for step in range(3):
        g[...] = cupy.asarray(grads[step])
        gm.momentum_step(p, g, v, lr=0.05, momentum=0.9, weight_decay=0.01,
                         first_step=step == 0)
        param, velocity = same_precision_step(param, grads[step], velocity, lr=0.05,
                                              momentum=0.9, weight_decay=0.01,
                                              first_step=step == 0)
    assert_bitwise(cupy.asnumpy(p), param, "param")
    assert_bitwise(cupy.asnumpy(v), velocity, "velocity")
    for buffer, skip, size in ((p_buf, p_skip, param.size), (v_buf, v_skip, velocity.size)):
        outside = cupy.asnumpy(cupy.concatenate([buffer[:skip], buffer[skip + size:]]))
        assert np.isnan(outside.astype(np.float32)).all(), "bytes outside the view changed"


def test_buffer_over_2_31_elements(cupy):
    n = 2**31 + 5
    need = 3 * 4 * n + (1 << 30)
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory for 3 float32 "
                    f"buffers of 2**31 + 5 elements, has {free / 2**30:.1f} GiB")
    param = cupy.ones(n, np.float32)
    grad = cupy.full(n, 0.5, np.float32)
    watched = np.array([0, 1, 2**31 - 1, 2**31, 2**31 + 1, n - 2, n - 1])
    grad[cupy.asarray(watched)] = cupy.asarray(np.arange(1, watched.size + 1),
                                               np.float32)
    opt = gm.MomentumSGD(param, lr=0.1, momentum=0.9, weight_decay=0.01)
    expected_p = np.ones(watched.size, np.float32)
    expected_v = np.zeros(watched.size, np.float32)
    host_grad = cupy.asnumpy(grad[cupy.asarray(watched)])
    for step in range(2):
        opt.step(grad)
        expected_p, expected_v = same_precision_step(
            expected_p, host_grad, expected_v, lr=0.1, momentum=0.9, weight_decay=0.01,
            first_step=step == 0)
    cupy.cuda.get_current_stream().synchronize()
    assert_bitwise(cupy.asnumpy(param[cupy.asarray(watched)]), expected_p, "param")
    assert_bitwise(cupy.asnumpy(opt.velocity[cupy.asarray(watched)]), expected_v,
                   "velocity")
    assert float(param[2**31 + 2]) == float(param[2]), "an untouched middle element"


_SPIN = r"""
__device__ unsigned long long now() {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
}
extern "C" __global__ void spin(unsigned long long nanoseconds) {
    const unsigned long long start = now();
    while (now() - start < nanoseconds) {}
}
"""


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_step_queues_work_without_synchronising_or_allocating(cupy, skip_nonfinite):
    param = cupy.zeros(1 << 20, np.float32)
    grad = cupy.ones(1 << 20, np.float32)
    opt = gm.MomentumSGD(param, lr=0.1, momentum=0.9, skip_nonfinite=skip_nonfinite)
    opt.step(grad)  # compiles the module and works out the launch limit
    cupy.cuda.get_current_stream().synchronize()
    compiled = cupy_backend._kernels.cache_info().currsize
    pool = cupy.get_default_memory_pool()
    used = pool.used_bytes()

    spin = cupy.RawKernel(_SPIN, "spin")
    stream = cupy.cuda.get_current_stream()
    spin((1,), (1,), (np.uint64(2 * 10**9),))  # the stream stays busy for two seconds
    for lr in (0.1, 0.05, 0.02):  # a schedule: new scalars, no recompile
        opt.lr = lr
        opt.step(grad)
    assert not stream.done, "step() waited for the GPU"
    assert pool.used_bytes() == used, "step() allocated device memory"
    assert cupy_backend._kernels.cache_info().currsize == compiled
    stream.synchronize()
    velocity = np.float32(-0.1)
    for lr in (np.float32(0.1), np.float32(0.05), np.float32(0.02)):
        velocity = np.float32(0.9) * velocity - lr * np.float32(1)
    np.testing.assert_array_equal(cupy.asnumpy(opt.velocity[:3]), velocity)
    assert (opt.step_count, opt.skipped_steps) == (4, 0)


def test_cuda_array_interface_arrays_are_taken_without_a_copy(cupy):
    class Foreign:  # stands in for a Numba or PyTorch device array
        def __init__(self, array):
            self.array = array
            self.__cuda_array_interface__ = array.__cuda_array_interface__

    p, g, v = (cupy.ones(1023, np.float32), cupy.ones(1023, np.float32),
               cupy.zeros(1023, np.float32))
    gm.momentum_step(Foreign(p), Foreign(g), Foreign(v), lr=0.5, first_step=True)
    assert float(p[0]) == 0.5 and float(v[-1]) == -0.5


def test_host_arrays_are_a_clear_error(cupy):
    p = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match=r"backend 'cupy' cannot update param of type "
                                        r"numpy\.ndarray"):
        gm.momentum_step(p, np.ones(8, np.float32), np.zeros(8, np.float32), lr=0.1,
                         backend="cupy")
    with pytest.raises(TypeError, match=r"grad is in host memory"):
        gm.momentum_step(cupy.zeros(8, np.float32), np.ones(8, np.float32),
                         cupy.zeros(8, np.float32), lr=0.1)
    assert not p.any()


def test_arrays_on_another_device_are_a_clear_error(cupy):
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cupy.cuda.Device(1):
        p = cupy.zeros(8, np.float32)
    g, v = cupy.ones(8, np.float32), cupy.zeros(8, np.float32)
    with pytest.raises(ValueError, match=r"param is on GPU 1 but the current device is "
                                         r"GPU 0"):
        gm.momentum_step(p, g, v, lr=0.1)
    assert not p.any()


def test_element_misaligned_arrays_are_a_clear_error(cupy):
    raw = cupy.zeros(17, np.float32)
    memory = cupy.cuda.MemoryPointer(raw.data.mem, 2)  # 2 bytes into a float32 buffer
    p = cupy.ndarray((8,), np.float32, memory)
    g, v = cupy.ones(8, np.float32), cupy.zeros(8, np.float32)
    with pytest.raises(ValueError, match=r"param starts at address 0x[0-9a-f]+, which is "
                                         r"not a multiple of its 4-byte element size"):
        gm.momentum_step(p, g, v, lr=0.1)
    assert not raw.any()

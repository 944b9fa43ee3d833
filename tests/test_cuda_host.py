"""The cupy backend's CUDA C kernel executed on the CPU (see tests/host_kernel.py).

Built with -ffp-contract=off, like the GPU build with --fmad=false, it must equal the
reference computed in the kernel's precision bit for bit: float32 and float64 directly,
float16 against float16 storage with float32 arithmetic.
"""

import subprocess

import numpy as np
import pytest

from bitwise import SIZES, assert_bitwise, same_precision_step, start
from configs import CONFIGS, hyper_at
from gpu_momentum._hyperparams import Hyperparameters
from gpu_momentum.kernels.cuda_source import BLOCK_SIZE, FLAGS, vector_width
from gpu_momentum.kernels.cupy_kernels import grid_size, kernel_flags, launch_plan
from gpu_momentum.kernels.elementwise import (LAST_STEP_SKIPPED, SKIPPED_STEPS, STEP_COUNT,
                                              VELOCITY_INITIALIZED)
from gpu_momentum.reference import reference_step
from host_kernel import (GUARD_BYTE, HostKernel, build_library, build_sanitized_driver,
                         view_at)

DTYPES = [np.float16, np.float32, np.float64]


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    return HostKernel(build_library(tmp_path_factory.mktemp("cuda-host")))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
def test_host_kernel_matches_reference_bitwise(kernel, config, size, dtype):
    param, grads, velocity = start(size, dtype)
    p, v = param.copy(), velocity.copy()
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        kernel.step(p, grad, v, first_step=step == 0, **hyper)
        param, velocity = same_precision_step(param, grad, velocity, first_step=step == 0,
                                              **hyper)
        assert_bitwise(p, param, f"param after step {step + 1}")
        assert_bitwise(v, velocity, f"velocity after step {step + 1}")


@pytest.mark.parametrize("config", CONFIGS[:5] + CONFIGS[7:12])
def test_float16_error_is_bounded_by_the_same_precision_reference(kernel, config):
    """Against float64, the float16 kernel errs no more than float16 storage itself does."""
    param, grads, velocity = start(278011, np.float16)
    exact_p, exact_v = param.astype(np.float64), np.zeros(param.size)
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        kernel.step(param, grad, velocity, first_step=step == 0, **hyper)
        exact_p, exact_v = reference_step(exact_p, grad, exact_v, first_step=step == 0,
                                          **hyper)
    # The same-precision reference run alone from the start, as a yardstick.
    same_p, _, same_v = start(278011, np.float16)
    for step, grad in enumerate(grads):
        same_p, same_v = same_precision_step(same_p, grad, same_v, first_step=step == 0,
                                             **hyper_at(config, step))
    bound = np.abs(same_p.astype(np.float64) - exact_p).max()
    assert 0 < bound < 0.01
    assert np.abs(param.astype(np.float64) - exact_p).max() <= 2 * bound
    v_bound = np.abs(same_v.astype(np.float64) - exact_v).max()
    assert np.abs(velocity.astype(np.float64) - exact_v).max() <= 2 * v_bound


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_grad_scale_divides_the_gradient_bitwise(kernel, config, dtype):
    """grad * (1 / grad_scale) first, in the compute dtype, as the reference does."""
    param, grads, velocity = start(1023, dtype)
    p, v = param.copy(), velocity.copy()
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        scaled = (grad.astype(np.float64) * 3).astype(dtype)
        kernel.step(p, scaled, v, first_step=step == 0, grad_scale=3.0, **hyper)
        param, velocity = same_precision_step(param, scaled, velocity, first_step=step == 0,
                                              grad_scale=3.0, **hyper)
        assert_bitwise(p, param, f"param after step {step + 1}")
        assert_bitwise(v, velocity, f"velocity after step {step + 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("style", ["classic", "torch"])
def test_nonfinite_gradients_skip_the_step_on_the_device(kernel, style, dtype):
    """The skipping path's four operations: a poisoned step changes only the counters; a
    skipped first step leaves the next one first (the NaN velocity is never read)."""
    param, grads, velocity = start(4099, dtype)
    p, v = param.copy(), velocity.copy()
    counters = np.zeros(4, np.int64)
    poisoned = {0: (0, np.nan), 1: (4098, np.inf), 3: (2047, -np.inf)}
    hyper = {"lr": 0.1, "momentum": 0.9, "style": style}
    taken = 0
    for step, grad in enumerate(grads):
        if step in poisoned:
            where, value = poisoned[step]
            grad = grad.copy()
            grad[where] = value
        before = p.tobytes(), v.tobytes()
        kernel.step_skipping_nonfinite(p, grad, v, counters, **hyper)
        if step in poisoned:
            assert (p.tobytes(), v.tobytes()) == before
        else:
            param, velocity = same_precision_step(param, grad, velocity,
                                                  first_step=taken == 0, **hyper)
            taken += 1
            assert_bitwise(p, param, f"param after step {step + 1}")
            assert_bitwise(v, velocity, f"velocity after step {step + 1}")
        assert counters[LAST_STEP_SKIPPED] == (step in poisoned)
        assert counters[STEP_COUNT] == taken
        assert counters[SKIPPED_STEPS] == step + 1 - taken
        assert counters[VELOCITY_INITIALIZED] == (taken > 0)


def test_skipping_counts_overflow_when_unscaling_and_keeps_torch_momentum_0_first(kernel):
    p, v = np.ones(9, np.float32), np.full(9, np.nan, np.float32)
    counters = np.zeros(4, np.int64)
    kernel.step_skipping_nonfinite(p, np.full(9, 3e38, np.float32), v, counters, lr=0.1,
                                   grad_scale=0.1)  # 3e39 is inf in float32
    assert list(counters) == [0, 0, 1, 1] and (p == 1).all()
    kernel.step_skipping_nonfinite(p, np.ones(9, np.float32), v, counters, lr=0.5,
                                   momentum=0.0, style="torch")
    assert list(counters) == [1, 0, 1, 0] and (p == 0.5).all() and np.isnan(v).all()


MISALIGNED_CONFIGS = [CONFIGS[4], CONFIGS[6], CONFIGS[11], CONFIGS[14]]


# float64 elements cannot start 4 or 12 bytes past a boundary: see
# test_element_misaligned_arrays_are_rejected.
OFFSETS = [pytest.param(dtype, offset, id=f"{np.dtype(dtype).name}-{offset}B")
           for dtype in DTYPES for offset in (4, 8, 12)
           if offset % np.dtype(dtype).itemsize == 0]


@pytest.mark.parametrize("max_blocks", [1, 10**6])
@pytest.mark.parametrize("size", [5, 1023, 4099])
@pytest.mark.parametrize("dtype, byte_offset", OFFSETS)
@pytest.mark.parametrize("config", MISALIGNED_CONFIGS)
def test_views_past_an_aligned_address(kernel, config, dtype, byte_offset, size,
                                       max_blocks):
    """param, grad and velocity all start `byte_offset` bytes past a 16-byte boundary:
    scalar head, vector body, scalar tail; nothing outside the views is touched."""
    param, grads, velocity = start(size, dtype)
    views = [view_at(a, byte_offset) for a in (param, grads[0], velocity)]
    (p, p_raw, _), (g, g_raw, _), (v, v_raw, _) = views
    for step in range(3):
        g[...] = grads[step]
        hyper = hyper_at(config, step)
        kernel.step(p, g, v, first_step=step == 0, max_blocks=max_blocks, **hyper)
        param, velocity = same_precision_step(param, grads[step], velocity,
                                              first_step=step == 0, **hyper)
        assert_bitwise(p, param, f"param after step {step + 1}")
        assert_bitwise(v, velocity, f"velocity after step {step + 1}")
    for view, raw, (begin, end) in views:
        outside = np.concatenate([raw[:begin], raw[end:]])
        assert (outside == GUARD_BYTE).all(), "bytes outside the view were written"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_arrays_misaligned_against_each_other_take_the_scalar_path(kernel, dtype):
    itemsize = np.dtype(dtype).itemsize
    param, grads, velocity = start(4099, dtype)
    (p, _, _), (g, _, _), (v, _, _) = (view_at(param, 0), view_at(grads[0], itemsize),
                                       view_at(velocity, 8))
    for step in range(3):
        g[...] = grads[step]
        kernel.step(p, g, v, first_step=step == 0, lr=0.05, momentum=0.9,
                    weight_decay=0.01, nesterov=True)
        param, velocity = same_precision_step(param, grads[step], velocity,
                                              first_step=step == 0, lr=0.05, momentum=0.9,
                                              weight_decay=0.01, nesterov=True)
    assert_bitwise(p, param, "param")
    assert_bitwise(v, velocity, "velocity")


@pytest.mark.parametrize("dtype, name, byte_offset", [(np.float64, "param", 4),
                                                      (np.float64, "grad", 12),
                                                      (np.float32, "velocity", 2),
                                                      (np.float16, "velocity", 2)])
def test_element_misaligned_arrays_are_rejected(kernel, dtype, name, byte_offset):
    """Off the element size, the GPU would fault: refused before any launch."""
    param, grads, velocity = start(64, dtype)
    arrays = {"param": param, "grad": grads[0], "velocity": velocity}
    arrays[name], raw, _ = view_at(arrays[name], byte_offset)
    before = [a.tobytes() for a in arrays.values()]
    with pytest.raises(ValueError, match=rf"{name} starts at address 0x[0-9a-f]+, which "
                                         rf"is not a multiple of its \d-byte element"):
        kernel.step(*arrays.values(), lr=0.1)
    assert [a.tobytes() for a in arrays.values()] == before


def test_sanitizers_find_nothing(tmp_path):
    """AddressSanitizer and UBSan over odd sizes, every misaligned start and every flag
    combination; the vector body must also agree with the scalar path bit for bit."""
    driver = build_sanitized_driver(tmp_path)
    done = subprocess.run([str(driver)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.rstrip().endswith(" launches, 0 failures"), done.stdout


def test_flags_encode_every_variant():
    hyper = Hyperparameters(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True,
                            maximize=True)
    assert kernel_flags(hyper, True) == (FLAGS["CLASSIC"] | FLAGS["NESTEROV"]
                                         | FLAGS["MAXIMIZE"] | FLAGS["WEIGHT_DECAY"]
                                         | FLAGS["FRESH_VELOCITY"])
    assert kernel_flags(Hyperparameters(lr=0.1, style="torch"), False) == 0
    # Torch style without momentum leaves the velocity alone, first step or not.
    keep = Hyperparameters(lr=0.1, momentum=0.0, style="torch")
    assert kernel_flags(keep, True) == kernel_flags(keep, False) == FLAGS["KEEP_VELOCITY"]
    assert kernel_flags(Hyperparameters(lr=0.1, momentum=0.0), False) == FLAGS["CLASSIC"]
    assert kernel_flags(Hyperparameters(lr=0.1), False, counters=True) == (
        FLAGS["CLASSIC"] | FLAGS["COUNTERS"])


@pytest.mark.parametrize("dtype, compute", [(np.float16, np.float32),
                                            (np.float32, np.float32),
                                            (np.float64, np.float64)])
def test_scalars_are_in_the_compute_dtype(dtype, compute):
    hyper = Hyperparameters(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-4,
                            style="torch")
    plan = launch_plan(dtype, 8, [0, 16, 32], hyper, False, 0.25, 10)
    *scalars, flags = plan.scalars
    assert [type(s) for s in scalars] == [compute] * 5
    assert scalars[2] == compute(1) - compute(0.3) and scalars[4] == 0.25
    assert type(flags) is np.uint32 and type(plan.initializes_velocity) is np.uint32


def test_grid_covers_the_buffer_up_to_one_wave():
    assert grid_size(0, np.float32, 1056) == 0
    assert grid_size(1, np.float64, 1056) == 1
    assert grid_size(4 * BLOCK_SIZE, np.float32, 1056) == 1
    assert grid_size(4 * BLOCK_SIZE + 1, np.float32, 1056) == 2
    assert grid_size(2**31 + 5, np.float32, 1056) == 1056
    plan = launch_plan(np.float32, 2**31 + 5, [0, 16, 32], Hyperparameters(lr=0.1), False,
                       1.0, 1056)
    assert type(plan.n) is np.int64 and plan.n == 2**31 + 5
    assert vector_width(np.float16) == 8 and vector_width(np.float64) == 2

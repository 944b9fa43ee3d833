"""The cupy backend's CUDA C kernel executed on the CPU (see tests/host_kernel.py).

Built with -ffp-contract=off, like the GPU build with --fmad=false, it must equal the
reference computed in the kernel's precision bit for bit: float32 and float64 directly,
float16 against float16 storage with float32 arithmetic.
"""

import dataclasses
import subprocess

import numpy as np
import pytest

from bitwise import SIZES, assert_bitwise, same_precision_step, start
from configs import (CONFIGS, GROUP_CONFIGS, LOW_PRECISION_CONFIGS, LOW_PRECISION_KINDS,
                     SEED, grouped_reference_step, hyper_at, low_precision_problem,
                     storage_dtype)
from gpu_momentum.groups import check_table, update_table
from gpu_momentum.hyperparams import Hyperparameters
from gpu_momentum.kernels.cuda_launch import finish_block, grid_size, launch_plan
from gpu_momentum.kernels.cuda_source import BLOCK_SIZE, vector_width
from gpu_momentum.precision import compute_dtype
from gpu_momentum.kernels.layout import (CLASSIC, GRAD_COEFF, GROUP_SLOTS, KEEP_VELOCITY,
                                         LAST_STEP_SKIPPED, MAXIMIZE, NESTEROV,
                                         READ_COUNTERS, SKIPPED_STEPS, STEP_COUNT,
                                         VELOCITY_INITIALIZED)
from gpu_momentum.reference import low_precision_step, reference_step
from host_kernel import (GUARD_BYTE, HostKernel, build_library, build_sanitized_driver,
                         grouped_problem, grouped_table, single_group_table, view_at)

DTYPES = [np.float16, np.float32, np.float64]


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    return HostKernel(build_library(tmp_path_factory.mktemp("cuda-host")))


# The largest size with the first configuration only in the fast loop; CI runs them all.
SIZED_CONFIGS = [pytest.param(config.values[0], size, id=f"{config.id}-{size}",
                              marks=[pytest.mark.slow] if size == max(SIZES) and i else [])
                 for i, config in enumerate(CONFIGS) for size in SIZES]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config, size", SIZED_CONFIGS)
def test_host_kernel_matches_reference_bitwise(kernel, config, size, dtype):
    param, grads, velocity = start(size, dtype)
    p, v = param.copy(), velocity.copy()
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        kernel.step_hyper(p, grad, v, first_step=step == 0, **hyper)
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
        kernel.step_hyper(param, grad, velocity, first_step=step == 0, **hyper)
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
        kernel.step_hyper(p, scaled, v, first_step=step == 0, grad_scale=3.0, **hyper)
        param, velocity = same_precision_step(param, scaled, velocity, first_step=step == 0,
                                              grad_scale=3.0, **hyper)
        assert_bitwise(p, param, f"param after step {step + 1}")
        assert_bitwise(v, velocity, f"velocity after step {step + 1}")


@pytest.mark.parametrize("counted", ["uncounted", "counted", "counted-unchecked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_loss_scale_and_found_inf_in_device_memory(kernel, dtype, counted):
    """The kernels' grad_scale pointer (the loss scale in device memory: each thread works
    out 1 / scale in the compute dtype) gives the bits of inv_grad_scale for power-of-two
    scales, with the non-finite check and without; a counted step whose first launch
    reads found_inf != 0 changes nothing but the counters."""
    param, grads, velocity = start(1023, dtype)
    compute = compute_dtype(dtype)
    (p, v), (q, w) = (param.copy(), velocity.copy()), (param.copy(), velocity.copy())
    counters = None if counted == "uncounted" else [np.zeros(4, np.int64) for _ in "ab"]
    check = counted != "counted-unchecked"
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    for step, (grad, scale) in enumerate(zip(grads, [1024.0, 0.25, 2.0**-12])):
        scaled = (grad.astype(np.float64) * scale).astype(dtype)
        table = single_group_table(dtype, param.size, step == 0, **hyper)
        for args, grad_scale in (((p, v), None), ((q, w), np.array([scale], compute))):
            inverse = 1.0 / scale if grad_scale is None else 99.0  # not read with a pointer
            which = 0 if grad_scale is None else 1
            kernel.step(*args[:1], scaled, *args[1:], table, inverse,
                        None if counters is None else counters[which], grad_scale=grad_scale,
                        found_inf=None if counters is None else np.float32(0),
                        check_nonfinite=check)
        assert_bitwise(q, p, f"param after step {step + 1}")
        assert_bitwise(w, v, f"velocity after step {step + 1}")
    if counters is not None:
        before = q.tobytes(), w.tobytes()
        kernel.step(q, grads[0], w, table, 1.0, counters[1], grad_scale=None,
                    found_inf=np.float32(1), check_nonfinite=check)
        assert (q.tobytes(), w.tobytes()) == before
        assert counters[1][[STEP_COUNT, SKIPPED_STEPS, LAST_STEP_SKIPPED]].tolist() == [
            3, 1, 1]


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
        kernel.step_hyper(p, grad, v, counters=counters, **hyper)
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
        assert counters[GROUP_SLOTS] == (taken > 0)


def test_skipping_counts_overflow_when_unscaling_and_keeps_torch_momentum_0_first(kernel):
    p, v = np.ones(9, np.float32), np.full(9, np.nan, np.float32)
    counters = np.zeros(4, np.int64)
    kernel.step_hyper(p, np.full(9, 3e38, np.float32), v, counters=counters, lr=0.1,
                      grad_scale=0.1)  # 3e39 is inf in float32
    assert list(counters) == [0, 1, 1, 0] and (p == 1).all()
    kernel.step_hyper(p, np.ones(9, np.float32), v, counters=counters, lr=0.5,
                      momentum=0.0, style="torch")
    assert list(counters) == [1, 1, 0, 0] and (p == 0.5).all() and np.isnan(v).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("hyper", [{}, {"l1": 0.25}, {"weight_decay": 0.5},
                                   {"weight_decay": 0.5, "decoupled_weight_decay": True}],
                         ids=["plain", "l1", "wd", "decoupled"])
def test_terms_that_are_zero_are_skipped_not_added(kernel, hyper, dtype):
    """A -0.0 gradient stays -0.0 where l1 and weight decay add nothing (-0.0 + 0 would be
    +0.0), as in the reference; l1 acts as branches on the sign of p."""
    p = np.array([2.0, -3.0, 0.0, -0.0, 0.0, 1.0, 5.0], dtype)
    g = np.array([0.5, 0.5, -0.0, -0.0, 0.5, -0.0, -0.0], dtype)
    v = np.full(p.size, np.nan, np.float32 if dtype == np.float16 else dtype)
    expected = same_precision_step(p, g, v, first_step=True, lr=0.0, style="torch", **hyper)
    kernel.step_hyper(p, g, v, first_step=True, lr=0.0, style="torch", **hyper)
    assert_bitwise(p, expected[0], "param")
    assert_bitwise(v, expected[1], "velocity")
    coupled = bool(hyper.get("weight_decay")) and not hyper.get("decoupled_weight_decay")
    assert np.signbit(v[3]) and np.signbit(v[2]) != coupled  # -0.0 + 0.5 * 0.0 is +0.0


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
        kernel.step_hyper(p, g, v, first_step=step == 0, max_blocks=max_blocks, **hyper)
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
        kernel.step_hyper(p, g, v, first_step=step == 0, lr=0.05, momentum=0.9,
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
        kernel.step_hyper(*arrays.values(), lr=0.1)
    assert [a.tobytes() for a in arrays.values()] == before


@pytest.mark.slow
def test_sanitizers_find_nothing(tmp_path):
    """AddressSanitizer and UBSan over odd sizes, every misaligned start and every flag
    combination; the vector body must also agree with the scalar path bit for bit."""
    driver = build_sanitized_driver(tmp_path)
    done = subprocess.run([str(driver)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.rstrip().endswith(" launches, 0 failures"), done.stdout


def test_launch_flags_are_the_tables_plus_counters():
    table = single_group_table(np.float32, 8, lr=0.1, momentum=0.9, nesterov=True,
                               maximize=True)
    assert table.launch_flags == CLASSIC
    assert table.group_flags.tolist() == [MAXIMIZE | NESTEROV | VELOCITY_INITIALIZED]
    plan = launch_plan(np.float32, 8, table, 1.0, 10)
    assert type(plan.launch_flags) is np.uint32 and plan.launch_flags == CLASSIC
    counted = launch_plan(np.float32, 8, table, 1.0, 10, read_counters=True)
    assert counted.launch_flags == CLASSIC | READ_COUNTERS
    torch = single_group_table(np.float32, 8, lr=0.1, style="torch", momentum=0.0)
    assert torch.launch_flags == 0 and torch.group_flags.tolist() == [KEEP_VELOCITY]


@pytest.mark.parametrize("dtype, compute", [(np.float16, np.float32),
                                            (np.float32, np.float32),
                                            (np.float64, np.float64)])
def test_scalars_are_in_the_compute_dtype(dtype, compute):
    table = single_group_table(dtype, 8, lr=0.1, momentum=0.9, dampening=0.3,
                               weight_decay=1e-4, style="torch")
    assert table.scalars.dtype == compute
    assert table.scalars[0, GRAD_COEFF] == compute(1) - compute(0.3)
    plan = launch_plan(dtype, 8, table, 0.25, 10)
    assert type(plan.inv_grad_scale) is compute and plan.inv_grad_scale == 0.25
    assert type(plan.range_count) is type(plan.group_count) is np.int32
    other = np.float64 if compute == np.float32 else np.float32
    wrong = update_table([Hyperparameters(lr=0.1)], [True], other, size=8)
    with pytest.raises(TypeError, match=rf"scalars are {np.dtype(other).name}, but the "
                                        rf"kernel computes in {np.dtype(compute).name}"):
        check_table(wrong, 8, np.dtype(compute))


@pytest.mark.parametrize("change, error, pattern", [
    ({"range_ends": np.array([7], np.int64)}, ValueError, r"end at the element count 8"),
    ({"range_ends": np.array([5, 4, 8], np.int64),
      "range_groups": np.zeros(3, np.int32)}, ValueError, r"must increase"),
    ({"range_groups": np.array([1], np.int32)}, ValueError, r"outside 0\.\.0"),
    ({"range_groups": np.array([-2], np.int32)}, ValueError, r"outside 0\.\.0 \(or -1"),
    ({"range_groups": np.zeros(1, np.int64)}, TypeError, r"range_groups is int64"),
    ({"scalars": np.zeros((1, 5), np.float32)}, ValueError, r"shape \(1, 5\)"),
    ({"range_ends": np.zeros(0, np.int64), "range_groups": np.zeros(0, np.int32)},
     ValueError, r"no ranges"),
])
def test_inconsistent_tables_are_refused(change, error, pattern):
    table = dataclasses.replace(single_group_table(np.float32, 8, lr=0.1), **change)
    with pytest.raises(error, match=pattern):
        check_table(table, 8, np.dtype(np.float32))


def test_grid_covers_the_buffer_up_to_one_wave():
    assert grid_size(0, np.float32, 1056) == 0
    assert grid_size(1, np.float64, 1056) == 1
    assert grid_size(4 * BLOCK_SIZE, np.float32, 1056) == 1
    assert grid_size(4 * BLOCK_SIZE + 1, np.float32, 1056) == 2
    assert grid_size(2**31 + 5, np.float32, 1056) == 1056
    plan = launch_plan(np.float32, 2**31 + 5,
                       single_group_table(np.float32, 2**31 + 5, lr=0.1), 1.0, 1056)
    assert type(plan.n) is np.int64 and plan.n == 2**31 + 5
    assert vector_width(np.float16) == 8 and vector_width(np.float64) == 2
    assert [finish_block(g) for g in (1, 32, 33, 1000)] == [32, 32, 64, BLOCK_SIZE]


# Parameter groups: one launch over a FlatParams buffer, each segment's range with its
# group's hyperparameters, against the reference stepped segment by segment.

@pytest.mark.parametrize("counted", [False, True], ids=["flags", "counters"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", GROUP_CONFIGS)
def test_groups_match_the_reference_bitwise(kernel, config, dtype, counted):
    """Every group in one launch. counters: first steps come from the device counters,
    and poisoned steps (the first, and one in the middle) change nothing but them."""
    p, grads, v, offsets, sizes = grouped_problem(dtype)
    assert all(o * p.itemsize % 16 == 0 for o in offsets)
    param, velocity = p.copy(), v.copy()
    groups = 1 + len(config["groups"])
    initialized = [False] * groups
    counters = np.zeros(GROUP_SLOTS + groups, np.int64) if counted else None
    poisoned = {0: 3, 3: offsets[-1]} if counted else {}
    taken = 0
    for step, grad in enumerate(grads):
        # With counters the table says every velocity exists, as MomentumSGD builds it:
        # the counters must override it.
        table = grouped_table(config, step, [True] * groups if counted else initialized,
                              offsets, sizes, p.size, dtype)
        if step in poisoned:
            grad = grad.copy()
            grad[poisoned[step]] = np.inf
            before = p.tobytes(), v.tobytes()
        kernel.step(p, grad, v, table, counters=counters, max_blocks=3)
        if step in poisoned:
            assert (p.tobytes(), v.tobytes()) == before, f"poisoned step {step + 1}"
        else:
            param, velocity = grouped_reference_step(
                param, grad, velocity, config, step, initialized, offsets, sizes,
                step_fn=same_precision_step)
            taken += 1
            assert_bitwise(p, param, f"param after step {step + 1}")
            assert_bitwise(v, velocity, f"velocity after step {step + 1}")
        if counted:
            assert counters[LAST_STEP_SKIPPED] == (step in poisoned)
            assert (counters[STEP_COUNT], counters[SKIPPED_STEPS]) == (taken,
                                                                      step + 1 - taken)
            assert counters[GROUP_SLOTS:].tolist() == [int(i) for i in initialized]


# Tiny ranges with odd ends, several inside one 16-byte word, over groups of every kind,
# then longer ones: with one block of 256 threads each thread takes several vectors.
TINY_ENDS = [1, 2, 3, 5, 6, 7, 9, 10, 17, 18, 19, 20, 33, 35, 36, 37, 61, 100, 101, 257,
             258, 400, 513, 600, 601, 777, 998, 1003, 2053, 3001, 4099]
TINY_GROUPS = {
    "classic": [{"lr": 0.05, "momentum": 0.9},
                {"lr": 0.1, "momentum": 0.5, "nesterov": True, "l1": 0.01},
                {"lr": 0.02, "momentum": 0.0, "weight_decay": 0.1},
                {"lr": 0.03, "momentum": 0.8, "weight_decay": 0.05,
                 "decoupled_weight_decay": True}],
    "torch": [{"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
              {"lr": 0.1, "momentum": 0.0},  # leaves its velocity alone
              {"lr": 0.02, "momentum": 0.5, "nesterov": True, "l1": 0.02,
               "weight_decay": 0.01},
              {"lr": 0.03, "momentum": 0.7, "weight_decay": 0.1,
               "decoupled_weight_decay": True}],
}


@pytest.mark.parametrize("max_blocks", [1, 10**6])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("style", ["classic", "torch"])
def test_range_ends_inside_a_vector_take_each_elements_group(kernel, style, dtype,
                                                             max_blocks):
    """Views one element past a 16-byte boundary: words that hold range ends fall back to
    per-element updates, each element with its own group (forward and, for the head after
    the body, backward cursor moves); nothing outside the views is touched."""
    size = TINY_ENDS[-1]
    ends = np.array(TINY_ENDS, np.int64)
    owners = np.arange(ends.size, dtype=np.int32) % 4
    hypers = [{"style": style, **h} for h in TINY_GROUPS[style]]
    param, grads, velocity = start(size, dtype)
    views = [view_at(a, a.itemsize) for a in (param, grads[0], velocity)]
    (p, _, _), (g, _, _), (v, _, _) = views
    initialized = [False] * 4
    for step in range(3):
        g[...] = grads[step]
        table = update_table([Hyperparameters(**h) for h in hypers], initialized,
                             compute_dtype(dtype), ends, owners)
        kernel.step(p, g, v, table, max_blocks=max_blocks)
        for begin, end, k in zip([0, *ends[:-1]], ends, owners):
            param[begin:end], velocity[begin:end] = same_precision_step(
                param[begin:end], grads[step][begin:end], velocity[begin:end],
                first_step=not initialized[k], **hypers[k])
        initialized = [not Hyperparameters(**h).keeps_velocity or i
                       for h, i in zip(hypers, initialized)]
        assert_bitwise(p, param, f"param after step {step + 1}")
        assert_bitwise(v, velocity, f"velocity after step {step + 1}")
    for view, raw, (begin, end) in views:
        outside = np.concatenate([raw[:begin], raw[end:]])
        assert (outside == GUARD_BYTE).all(), "bytes outside the view were written"


# 16-bit parameters: every entry point of bfloat16 and float16 against the float32-compute
# reference (gpu_momentum.reference.low_precision_step), bit for bit.

LOW_SIZES = (0, 1, 3, 5, 1023, 4099)


def _low_precision_start(kind, size, steps=4):
    """(param, grads, velocity, precision buffer or None) of a kind: velocity NaN (the
    first step must not read it), a compensation of small values, a master copy near the
    params."""
    param_name, velocity_name, precision = kind
    dtype = storage_dtype(param_name)
    param, grads = low_precision_problem(size, dtype, steps)
    velocity = np.full(size, np.nan, storage_dtype(velocity_name))
    rng = np.random.default_rng([size, 9])
    small = (1e-3 * rng.standard_normal(size)).astype(np.float32)
    buffer = {"kahan": lambda: small.astype(dtype),
              "master": lambda: param.astype(np.float32) + small}.get(precision,
                                                                      lambda: None)()
    return param, grads, velocity, buffer


def _reference_buffer(precision, buffer):
    return {"kahan": {"compensation": buffer}, "master": {"master": buffer}}.get(
        precision, {})


def _same(actual, expected, what):
    """Bit for bit, except that float32 results may hold any NaN where expected does."""
    actual, expected = np.asarray(actual).reshape(-1), np.asarray(expected).reshape(-1)
    if actual.dtype == np.float32:
        nan = np.isnan(expected)
        assert (np.isnan(actual) == nan).all(), f"{what}: NaNs differ"
        actual, expected = actual[~nan], expected[~nan]
    assert_bitwise(actual, expected, what)


@pytest.mark.parametrize("size", LOW_SIZES)
@pytest.mark.parametrize("config", LOW_PRECISION_CONFIGS)
@pytest.mark.parametrize("kind", LOW_PRECISION_KINDS)
def test_16_bit_entry_points_match_the_reference_bitwise(kernel, kind, config, size):
    precision = kind[2]
    param, grads, velocity, buffer = _low_precision_start(kind, size)
    p, v = param.copy(), velocity.copy()
    b = None if buffer is None else buffer.copy()
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        kernel.step_hyper(p, grad, v, first_step=step == 0, precision=precision,
                          precision_buffer=b, seed=SEED, step_count=step + 5, **hyper)
        param, velocity, new = low_precision_step(
            param, grad, velocity, precision=precision, seed=SEED, step_count=step + 5,
            first_step=step == 0, **_reference_buffer(precision, buffer), **hyper)
        buffer = new if buffer is not None else None
        _same(p, param, f"param after step {step + 1}")
        _same(v, velocity, f"velocity after step {step + 1}")
        if b is not None:
            _same(b, buffer, f"{precision} buffer after step {step + 1}")


@pytest.mark.parametrize("max_blocks", [1, 10**6])
@pytest.mark.parametrize("kind", [("bfloat16", "float32", "master"),
                                  ("bfloat16", "bfloat16", "stochastic"),
                                  ("float16", "float32", "kahan")],
                         ids=lambda k: "-".join(k))
@pytest.mark.parametrize("byte_offset", [2, 6, 14])
def test_16_bit_views_past_an_aligned_address(kernel, kind, byte_offset, max_blocks):
    """Every array (the precision buffer too) starts `byte_offset` bytes (a float32
    velocity or master copy twice as far) past a 16-byte boundary: scalar head, vector
    body of 8 elements, scalar tail, and a stochastic key per element index; nothing
    outside the views is touched."""
    precision = kind[2]
    param, grads, velocity, buffer = _low_precision_start(kind, 4099, steps=3)
    arrays = [param, grads[0], velocity] + ([buffer] if buffer is not None else [])
    views = [view_at(a, byte_offset * a.itemsize // 2) for a in arrays]
    p, g, v = (view for view, _, _ in views[:3])
    b = views[3][0] if buffer is not None else None
    for step in range(3):
        g[...] = grads[step]
        kernel.step_hyper(p, g, v, first_step=step == 0, max_blocks=max_blocks,
                          precision=precision, precision_buffer=b, seed=SEED,
                          step_count=step, lr=0.05, momentum=0.9, weight_decay=0.01)
        param, velocity, new = low_precision_step(
            param, grads[step], velocity, precision=precision, seed=SEED, step_count=step,
            first_step=step == 0, lr=0.05, momentum=0.9, weight_decay=0.01,
            **_reference_buffer(precision, buffer))
        buffer = new if buffer is not None else None
    _same(p, param, "param")
    _same(v, velocity, "velocity")
    if b is not None:
        _same(b, buffer, "buffer")
    for view, raw, (begin, end) in views:
        outside = np.concatenate([raw[:begin], raw[end:]])
        assert (outside == GUARD_BYTE).all(), "bytes outside the view were written"


@pytest.mark.parametrize("precision", ["stochastic", "master"])
def test_16_bit_skipped_steps_count_on_the_device(kernel, precision):
    """With counters the kernel keys its random bits by counters[STEP_COUNT]: a skipped
    step changes nothing and takes no key; a float16 compensation or master copy keeps its
    bits through it."""
    kind = ("bfloat16", "bfloat16", precision)
    param, grads, velocity, buffer = _low_precision_start(kind, 4099, steps=4)
    grads = [np.nan_to_num(g.astype(np.float32), nan=0.5, posinf=0.5).astype(g.dtype)
             for g in grads]
    poisoned = grads[2].copy()
    poisoned[77] = np.inf
    p, v = param.copy(), velocity.copy()
    b = None if buffer is None else buffer.copy()
    counters = np.zeros(4, np.int64)
    for step, grad in enumerate([grads[0], grads[1], poisoned, grads[3]]):
        before = [a.tobytes() for a in (p, v, b) if a is not None]
        kernel.step_hyper(p, grad, v, counters=counters, precision=precision,
                          precision_buffer=b, seed=SEED, step_count=999, lr=0.1,
                          momentum=0.9)
        if step == 2:
            assert [a.tobytes() for a in (p, v, b) if a is not None] == before
            continue
        taken = int(counters[STEP_COUNT]) - 1
        param, velocity, new = low_precision_step(
            param, grad, velocity, precision=precision, seed=SEED, step_count=taken,
            first_step=taken == 0, lr=0.1, momentum=0.9,
            **_reference_buffer(precision, buffer))
        buffer = new if buffer is not None else None
        _same(p, param, f"param after step {step + 1}")
        _same(v, velocity, f"velocity after step {step + 1}")
    assert list(counters[:3]) == [3, 1, 0]

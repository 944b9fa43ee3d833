"""The FP8 velocity through the front ends: each backend's step (the runner's launches
with a Float8Velocity) equal bit for bit to the CPU kernels and the reference, with
counters, a loss scale and skipped steps; bad FP8 arrays refused with nothing changed."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import CONFIGS, GROUP_CONFIGS
from float8_runs import assert_same_states, grouped_problem, run, single_group_problem
from gpu_momentum.backends import backend_named
from gpu_momentum.backends.contract import check_arrays, device_table
from gpu_momentum.float8_velocity import Float8Velocity, zeros_float8_velocity
from gpu_momentum.kernels.layout import GROUP_SLOTS, LAST_STEP_SKIPPED, STEP_COUNT
from harness import require

require("ml_dtypes")

BACKEND_CONFIGS = [c for c in CONFIGS if c.id in ("classic-nesterov-wd-maximize",
                                                  "torch-decoupled-wd-l1-schedule")]
BACKEND_KINDS = [("float32", "nearest"), ("float32", "stochastic"),
                 ("bfloat16", "stochastic"), ("float16", "kahan"), ("bfloat16", "master")]
STEPS = 4


def _to_backend(harness, array):
    """A NumPy array (16-bit ones as their bits, viewed back) in the backend's memory."""
    if array.dtype.itemsize != 2:
        return harness.from_numpy(array)
    return harness.from_numpy(array.view(np.uint16)).view(array.dtype)


def _to_numpy(harness, array, dtype):
    bits = np.uint16 if np.dtype(dtype).itemsize == 2 else dtype
    return harness.to_numpy(array.view(bits) if np.dtype(dtype).itemsize == 2
                            else array).view(bits).view(dtype)


def run_backend(harness, problem_, counted=False, grad_scale=None):
    """run(problem_, "cpu")'s states, stepped by the backend `harness` names through
    Backend.step with a Float8Velocity (counted: with step counters, which then give the
    step count and the first step; grad_scale: the gradients are multiplied by it and the
    step divides by it)."""
    engine = backend_named(harness.name)
    dtype = problem_.param.dtype
    param = _to_backend(harness, problem_.param)
    velocity = zeros_float8_velocity(engine, param.size)
    buffer = problem_.buffer
    buffer = None if buffer is None else _to_backend(harness, buffer)
    counters = None
    if counted:
        counters = harness.from_numpy(np.zeros(GROUP_SLOTS + problem_.tables[0].group_count,
                                               np.int64))
    states = []
    for step, (grad, table) in enumerate(zip(problem_.grads, problem_.tables)):
        inv = 1.0
        if grad_scale is not None:
            with np.errstate(over="ignore"):
                grad = (grad.astype(np.float32) * grad_scale).astype(dtype)
            inv = 1.0 / grad_scale
        grad = _to_backend(harness, grad)
        check_arrays(engine, param, grad, velocity, problem_.precision, buffer)
        engine.step(param, grad, velocity, device_table(engine, table, param), inv,
                    counters, precision=problem_.precision, precision_buffer=buffer,
                    seed=problem_.seed, step_count=step)
        states.append((_to_numpy(harness, param, dtype),
                       harness.to_numpy(velocity.codes), harness.to_numpy(velocity.scales),
                       None if buffer is None else _to_numpy(harness, buffer, buffer.dtype)))
    if counted:
        assert harness.to_numpy(counters)[STEP_COUNT] == len(problem_.grads)
    return states


@pytest.mark.parametrize("kind", BACKEND_KINDS, ids=[f"{p}-{m}" for p, m in BACKEND_KINDS])
@pytest.mark.parametrize("config", BACKEND_CONFIGS)
def test_every_backend_equals_the_cpu_kernels_and_the_reference(backend, config, kind):
    for size in (0, 3, 700):  # 700: two whole blocks and a partial one
        p = single_group_problem(config, size, *kind, STEPS)
        cpu = run(p, "cpu")
        assert_same_states(run(p, "reference"), cpu, f"reference, {size} elements")
        assert_same_states(cpu, run_backend(backend, p), f"{backend.name}, {size}")
        assert_same_states(cpu, run_backend(backend, p, counted=True),
                           f"{backend.name} counted, {size}")


def test_a_power_of_two_loss_scale_changes_no_bit(backend):
    p = single_group_problem(BACKEND_CONFIGS[0].values[0], 700, "bfloat16", "nearest", STEPS)
    assert_same_states(run(p, "cpu"), run_backend(backend, p, counted=True,
                                                  grad_scale=1024.0), backend.name)


@pytest.mark.parametrize("config", GROUP_CONFIGS[:2])
def test_groups_and_padding_on_every_backend(backend, config):
    if backend.simulated:
        sizes = (300, 5, 411, 1, 256, 33)
    else:
        sizes = (1023, 5, 4099, 1, 2048, 33)
    p = grouped_problem(config, sizes, "float32", "nearest", STEPS)
    cpu = run(p, "cpu")
    assert_same_states(run(p, "reference"), cpu, "reference")
    assert_same_states(cpu, run_backend(backend, p, counted=True), backend.name)


def test_a_non_finite_gradient_skips_the_step_and_changes_nothing(backend):
    engine = backend_named(backend.name)
    p = single_group_problem(BACKEND_CONFIGS[0].values[0], 700, "float32", "nearest", 2)
    param = backend.from_numpy(p.param)
    velocity = zeros_float8_velocity(engine, param.size)
    counters = backend.from_numpy(np.zeros(GROUP_SLOTS + 1, np.int64))
    table = device_table(engine, p.tables[0], param)
    engine.step(param, backend.from_numpy(p.grads[0]), velocity, table, 1.0, counters)
    before = [backend.to_numpy(a) for a in (param, velocity.codes, velocity.scales)]
    assert before[2].any()
    bad = p.grads[1].copy()
    bad[650] = np.inf
    engine.step(param, backend.from_numpy(bad), velocity, table, 1.0, counters)
    after = [backend.to_numpy(a) for a in (param, velocity.codes, velocity.scales)]
    for a, b in zip(before, after):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert backend.to_numpy(counters)[LAST_STEP_SKIPPED] == 1


@pytest.mark.parametrize("change, message", [
    (lambda v, n: Float8Velocity(v.codes[:-1], v.scales), "velocity codes"),
    (lambda v, n: Float8Velocity(v.codes, v.scales[:-1]), "velocity scales"),
    (lambda v, n: Float8Velocity(v.codes.astype(np.int8), v.scales), "velocity codes"),
    (lambda v, n: Float8Velocity(v.codes, v.scales.astype(np.float64)), "velocity scales"),
])
def test_bad_float8_arrays_are_refused(change, message):
    engine = backend_named("cpu")
    param, grad = np.ones(300, np.float32), np.ones(300, np.float32)
    velocity = change(zeros_float8_velocity(engine, 300), 300)
    with pytest.raises(TypeError, match=message):
        check_arrays(engine, param, grad, velocity)


def test_float64_params_and_float32_kahan_are_refused():
    engine = backend_named("cpu")
    param = np.ones(300)
    with pytest.raises(TypeError, match="float64 parameters cannot have a float8_e4m3fn"):
        check_arrays(engine, param, param.copy(), zeros_float8_velocity(engine, 300))
    param = np.ones(300, np.float32)
    with pytest.raises(ValueError, match="'kahan'"):
        check_arrays(engine, param, param.copy(), zeros_float8_velocity(engine, 300),
                     "kahan", np.zeros(300, np.float32))


def test_codes_overlapping_the_parameters_are_refused():
    engine = backend_named("cpu")
    memory = np.zeros(1200, np.float32)
    param, grad = memory[:300], np.ones(300, np.float32)
    velocity = Float8Velocity(memory[300:].view(np.uint8)[:300], np.zeros(2, np.float32))
    check_arrays(engine, param, grad, velocity)
    velocity = Float8Velocity(memory.view(np.uint8)[:300], np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="overlaps"):
        check_arrays(engine, param, grad, velocity)

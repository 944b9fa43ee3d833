"""The FP8 velocity through the front ends: each backend's step (the runner's launches
with a Float8Velocity) equal bit for bit to the CPU kernels and the reference, with
counters, a loss scale and skipped steps; bad FP8 arrays refused with nothing changed.
On a GPU these run first in .ci/gpu (hardware_first): numba-cuda there contracts
multiply-adds, so its states are held to FP8's rounding instead of bit for bit."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import CONFIGS, GROUP_CONFIGS
from float8_runs import assert_same_states, grouped_problem, run, single_group_problem
from gpu_momentum.backends import backend_named
from gpu_momentum.backends.contract import check_arrays, device_table
from gpu_momentum.float8_velocity import Float8Velocity, zeros_float8_velocity
from gpu_momentum.kernels.layout import (FLOAT8_BLOCK, GROUP_SLOTS, LAST_STEP_SKIPPED,
                                         STEP_COUNT)
from gpu_momentum.reference import e4m3_to_float32
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


def assert_backend_matches(harness, expected, got, what):
    """Bit for bit; on a backend that contracts multiply-adds (numba-cuda on a GPU), each
    step's velocity within two E4M3 steps of the CPU's (2**-2 of the value, plus 2**-8 of
    its block's scale near zero) and the parameters within 2**-6 of theirs (plus 1e-3):
    a fused rounding can move a code to its neighbour, which the next steps carry into
    the parameters."""
    if not harness.contracts_fma:
        assert_same_states(expected, got, what)
        return
    assert len(expected) == len(got), what
    for step, ((p, codes, scales, _), (q, their_codes, their_scales, _)) in enumerate(
            zip(expected, got)):
        velocity, theirs = (e4m3_to_float32(c) * np.repeat(s, FLOAT8_BLOCK)[:c.size]
                            for c, s in ((codes, scales), (their_codes, their_scales)))
        near = np.repeat(np.maximum(scales, their_scales), FLOAT8_BLOCK)[:codes.size]
        assert (np.abs(velocity - theirs) <= 2.0**-2 * np.abs(velocity)
                + 2.0**-8 * near).all(), f"{what}: step {step}, velocity"
        p, q = (np.asarray(x, np.float64) for x in (p, q))
        assert (np.abs(p - q) <= 2.0**-6 * np.abs(p) + 1e-3).all(), \
            f"{what}: step {step}, param"


def test_the_hardware_comparison_takes_a_neighbouring_code_and_refuses_garbage():
    """assert_backend_matches on a backend that contracts multiply-adds: a code moved to
    its neighbour passes, a wrong block scale or a wrong parameter fails."""
    fused = type("Fused", (), {"contracts_fma": True})()
    p = single_group_problem(BACKEND_CONFIGS[0].values[0], 700, "float32", "nearest", 2)
    cpu = run(p, "cpu")
    moved = [(param, codes.copy(), scales, None) for param, codes, scales, _ in cpu]
    moved[1][1][5] += 1 if moved[1][1][5] not in (0x7E, 0xFE) else -1
    assert_backend_matches(fused, cpu, moved, "neighbour")
    for change in (lambda s: (s[0], s[1], s[2] * 2, None),
                   lambda s: (s[0] + 0.1, s[1], s[2], None)):
        with pytest.raises(AssertionError):
            assert_backend_matches(fused, cpu, [cpu[0], change(cpu[1])], "garbage")
    with pytest.raises(AssertionError):
        assert_backend_matches(type("Exact", (), {"contracts_fma": False})(), cpu, moved,
                               "bit for bit")


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


@pytest.mark.hardware_first
@pytest.mark.parametrize("kind", BACKEND_KINDS, ids=[f"{p}-{m}" for p, m in BACKEND_KINDS])
@pytest.mark.parametrize("config", BACKEND_CONFIGS)
def test_every_backend_equals_the_cpu_kernels_and_the_reference(backend, config, kind):
    for size in (0, 3, 700):  # 700: two whole blocks and a partial one
        p = single_group_problem(config, size, *kind, STEPS)
        cpu = run(p, "cpu")
        assert_same_states(run(p, "reference"), cpu, f"reference, {size} elements")
        assert_backend_matches(backend, cpu, run_backend(backend, p),
                               f"{backend.name}, {size}")
        assert_backend_matches(backend, cpu, run_backend(backend, p, counted=True),
                               f"{backend.name} counted, {size}")


def test_a_power_of_two_loss_scale_changes_no_bit(backend):
    p = single_group_problem(BACKEND_CONFIGS[0].values[0], 700, "bfloat16", "nearest", STEPS)
    assert_backend_matches(backend, run(p, "cpu"), run_backend(
        backend, p, counted=True, grad_scale=1024.0), backend.name)


@pytest.mark.hardware_first
@pytest.mark.parametrize("config", GROUP_CONFIGS[:2])
def test_groups_and_padding_on_every_backend(backend, config):
    if backend.simulated:
        sizes = (300, 5, 411, 1, 256, 33)
    else:
        sizes = (1023, 5, 4099, 1, 2048, 33)
    p = grouped_problem(config, sizes, "float32", "nearest", STEPS)
    cpu = run(p, "cpu")
    assert_same_states(run(p, "reference"), cpu, "reference")
    assert_backend_matches(backend, cpu, run_backend(backend, p, counted=True), backend.name)


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


# ---- MomentumSGD(velocity_dtype="float8_e4m3fn") ----

OPTIMIZER_OPTIONS = [
    dict(style="classic", momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(style="torch", momentum=0.8, dampening=0.1, l1=0.001, maximize=True),
    dict(style="torch", momentum=0.9, weight_decay=0.05, decoupled_weight_decay=True),
]
OPTIMIZER_KINDS = BACKEND_KINDS
LRS = (0.05, 0.1, 0.02, 0.07)


def _problem_arrays(size, dtype, steps, seed=5):
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(size).astype(dtype)
    grads = [(0.5 * rng.standard_normal(size)).astype(dtype) for _ in range(steps)]
    return param, grads


def reference_run(param, grads, options, precision, seed=0, groups=None):
    """(param, codes, scales) after each step of float8_velocity_step with `options` and
    LRS (groups: [(start, end, options)] instead, each with its lr)."""
    from gpu_momentum.kernels.layout import float8_scale_count
    from gpu_momentum.reference import float8_velocity_step

    n = param.size
    codes, scales = np.zeros(n, np.uint8), np.zeros(float8_scale_count(n), np.float32)
    buffer = {"kahan": np.zeros_like(param), "master": param.astype(np.float32)}.get(
        precision)
    states = []
    for step, grad in enumerate(grads):
        ranges = [(start, end, {**o, "first_step": step == 0}) for start, end, o in
                  (groups or [(0, n, {**options, "lr": LRS[step]})])]
        param, codes, scales, new_buffer = float8_velocity_step(
            param, grad, codes, scales, ranges, precision=precision,
            compensation=buffer, master=buffer, seed=seed, step_count=step)
        buffer = new_buffer if buffer is not None else None
        states.append((param, codes, scales))
    return states


def optimizer_run(harness, param, grads, options, precision, schedule=True, **kwargs):
    """(param, codes, scales) after each MomentumSGD step on the backend `harness` names."""
    dtype = param.dtype
    flat = kwargs.pop("flat", None)
    params = flat if flat is not None else _to_backend(harness, param)
    opt = gm.MomentumSGD(params, lr=LRS[0], **options, precision=precision,
                         velocity_dtype="float8_e4m3fn", backend=harness.name, **kwargs)
    states = []
    for step, grad in enumerate(grads):
        if schedule:
            opt.lr = LRS[step]
        opt.step(_to_backend(harness, grad))
        data = flat.data if flat is not None else params
        states.append((_to_numpy(harness, data, dtype), harness.to_numpy(opt.velocity_codes),
                       harness.to_numpy(opt.velocity_scales)))
    return opt, states


def assert_same(harness, expected, got, what):
    """assert_backend_matches over (param, codes, scales) states."""
    assert_backend_matches(harness, [(*state, None) for state in expected],
                           [(*state, None) for state in got], what)


@pytest.mark.parametrize("counted", [{}, {"skip_nonfinite": True}, {"capturable": True}],
                         ids=["plain", "skip_nonfinite", "capturable"])
@pytest.mark.parametrize("kind", OPTIMIZER_KINDS, ids=[f"{p}-{m}" for p, m in
                                                       OPTIMIZER_KINDS])
@pytest.mark.parametrize("options", OPTIMIZER_OPTIONS, ids=["classic", "torch-l1", "torch-dwd"])
def test_momentum_sgd_equals_the_reference_on_every_backend(backend, options, kind,
                                                            counted):
    param_dtype, precision = kind
    param, grads = _problem_arrays(700, np.dtype(_dtype(param_dtype)), len(LRS))
    expected = reference_run(param, grads, options, precision)
    _, got = optimizer_run(backend, param, grads, options, precision, **counted)
    assert_same(backend, expected, got, backend.name)


def _dtype(name):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else name


def test_ml_dtypes_float8_names_the_same_velocity():
    import ml_dtypes

    opt = gm.MomentumSGD(np.zeros(10, np.float32), lr=0.1, backend="cpu",
                         velocity_dtype=ml_dtypes.float8_e4m3fn)
    assert opt.velocity_dtype.name == "float8_e4m3fn"
    assert opt.velocity_codes.dtype == np.uint8 and opt.velocity_codes.shape == (10,)
    assert opt.velocity_scales.dtype == np.float32 and opt.velocity_scales.shape == (1,)


def test_groups_and_padding_equal_the_reference(backend):
    sizes = (300, 5, 411, 1, 256, 33)
    param, grads = _problem_arrays(sum(sizes), np.float32, len(LRS), seed=2)
    arrays = np.split(param, np.cumsum(sizes)[:-1])
    names = [f"s{i}" for i in range(len(sizes))]
    flat = gm.FlatParams.from_arrays([_to_backend(backend, a) for a in arrays],
                                     names=names)
    options = OPTIMIZER_OPTIONS[1]
    group = {"params": ["s1", "s4"], "lr": 0.01, "momentum": 0.5, "l1": 0.0}
    host = gm.FlatParams.from_arrays(arrays, names=names)
    total = host.data.size
    full_grads = []
    for g in grads:
        padded = np.zeros(total, np.float32)
        for offset, size, piece in zip(host.offsets, host.sizes,
                                       np.split(g, np.cumsum(sizes)[:-1])):
            padded[offset:offset + size] = piece
        full_grads.append(padded)
    in_group = {1, 4}
    own = {k: v for k, v in group.items() if k != "params"}
    start_param = np.asarray(host.data, np.float32).copy()
    ranges = [[(int(o), int(o) + int(s), {**options, **(own if i in in_group else
                                                         {"lr": LRS[step]})})
               for i, (o, s) in enumerate(zip(host.offsets, host.sizes))]
              for step in range(len(LRS))]
    states = _reference_with_ranges(start_param, full_grads, ranges)
    opt, got = optimizer_run(backend, start_param, full_grads, options, "nearest",
                             flat=flat, groups=[group])
    assert_same(backend, states, got, backend.name)


def _reference_with_ranges(param, grads, ranges_per_step):
    from gpu_momentum.kernels.layout import float8_scale_count
    from gpu_momentum.reference import float8_velocity_step

    n = param.size
    codes, scales = np.zeros(n, np.uint8), np.zeros(float8_scale_count(n), np.float32)
    states = []
    for step, (grad, ranges) in enumerate(zip(grads, ranges_per_step)):
        ranges = [(a, b, {**o, "first_step": step == 0}) for a, b, o in ranges]
        param, codes, scales, _ = float8_velocity_step(param, grad, codes, scales, ranges,
                                                       seed=0, step_count=step)
        states.append((param, codes, scales))
    return states


@pytest.mark.parametrize("param_dtype, precision, velocity_dtype, error, message", [
    ("float64", "nearest", "float8_e4m3fn", ValueError,
     "velocity_dtype value: 'float8_e4m3fn' .float64 parameters cannot"),
    ("float32", "kahan", "float8_e4m3fn", ValueError, "precision value: 'kahan'"),
    ("float32", "nearest", "float8_e5m2", ValueError, "velocity_dtype value: 'float8_e5m2'"),
    ("float32", "nearest", "float9", ValueError, "velocity_dtype value: 'float9'"),
])
def test_refusals_name_the_value_and_change_nothing(param_dtype, precision,
                                                    velocity_dtype, error, message):
    param = np.linspace(-1, 1, 300).astype(param_dtype)
    before = param.copy()
    with pytest.raises(error, match=message):
        gm.MomentumSGD(param, lr=0.1, precision=precision, velocity_dtype=velocity_dtype,
                       backend="cpu")
    assert np.array_equal(param.view(np.uint8), before.view(np.uint8))


def test_dequantized_velocity_is_the_codes_times_their_scales():
    from gpu_momentum.reference import dequantize_velocity

    param, grads = _problem_arrays(600, np.float32, 2)
    opt = gm.MomentumSGD(param.reshape(20, 30), lr=0.1, velocity_dtype="float8_e4m3fn",
                         backend="cpu")
    for g in grads:
        opt.step(g.reshape(20, 30))
    velocity = opt.dequantized_velocity()
    assert velocity.shape == (20, 30) and velocity.dtype == np.float32
    assert np.array_equal(velocity.reshape(-1),
                          dequantize_velocity(opt.velocity_codes, opt.velocity_scales))
    assert np.abs(velocity).max() > 0


def test_momentum_step_takes_a_float8_velocity(backend):
    param, grads = _problem_arrays(700, np.float32, 3)
    options = OPTIMIZER_OPTIONS[0]
    expected = reference_run(param, grads, options, "stochastic", seed=9)
    engine = backend_named(backend.name)
    p = backend.from_numpy(param)
    velocity = zeros_float8_velocity(engine, 700)
    assert isinstance(velocity, gm.Float8Velocity)
    for step, grad in enumerate(grads):
        gm.momentum_step(p, backend.from_numpy(grad), velocity, **{**options,
                         "lr": LRS[step]}, first_step=step == 0, precision="stochastic",
                         seed=9, step_count=step, backend=backend.name)
        assert_same(backend, expected[step:step + 1], [(backend.to_numpy(p),
                                                        backend.to_numpy(velocity.codes),
                                                        backend.to_numpy(velocity.scales))],
                    f"step {step}")


def test_sharded_momentum_sgd_refuses_a_float8_velocity():
    """In a subprocess with MPI (as tests/test_distributed.py runs its single-rank
    checks): a clear ValueError, parameters unchanged."""
    import subprocess
    import sys

    from harness import library_env
    from mpi_launch import require_mpi

    require_mpi()
    code = """if True:
        import numpy as np
        from mpi4py import MPI
        from gpu_momentum.distributed import ShardedMomentumSGD
        params = np.ones(600, np.float32)
        try:
            ShardedMomentumSGD(params, comm=MPI.COMM_SELF, lr=0.5,
                               velocity_dtype="float8_e4m3fn")
        except ValueError as error:
            print(error, bool((params == 1).all()))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=library_env(), check=True, timeout=300).stdout
    assert "Invalid velocity_dtype value: 'float8_e4m3fn' (ShardedMomentumSGD" in out
    assert out.strip().endswith("True")


@pytest.mark.slow
def test_the_example_trains_with_both_velocities_into_the_current_folder(tmp_path):
    import pathlib
    import subprocess
    import sys

    from harness import library_env

    require("matplotlib")
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "fp8_velocity.py"),
                           "--steps", "40"], cwd=tmp_path, env=library_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fp8_velocity.png").read_bytes().startswith(b"\x89PNG")
    losses = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines()
              if "loss after" in line]
    assert len(losses) == 4
    # Each FP8 run within 5% of its float32-velocity twin after 40 steps.
    assert abs(losses[1] - losses[0]) < 0.05 * losses[0]
    assert abs(losses[3] - losses[2]) < 0.05 * losses[2]

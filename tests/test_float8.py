"""The FP8 E4M3 velocity: the reference's format against ml_dtypes, its per-step error,
and every kernel (CPU, numba-cuda in the simulator, CUDA C through the host build)
bit for bit equal to the reference and to each other after many steps."""

import numpy as np
import pytest

from configs import CONFIGS, GROUP_CONFIGS, SEGMENT_SIZES, STEPS
from float8_runs import (assert_same_states, grouped_problem, run, single_group_problem)
from gpu_momentum.kernels.layout import (FLOAT8_BLOCK, FLOAT8_MAX, FLOAT8_NAN,
                                         FLOAT8_VELOCITY, float8_scale_count)
from gpu_momentum.reference import (dequantize_velocity, e4m3_to_float32,
                                    float32_to_e4m3, float8_velocity_step,
                                    quantize_velocity, reference_step)
from harness import require

ml_dtypes = require("ml_dtypes")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
ALL_CODES = np.arange(256, dtype=np.uint8)
FINITE_CODES = ALL_CODES[(ALL_CODES & 0x7F) != 0x7F]


def _theirs(x):
    return np.asarray(x, np.float32).astype(E4M3).view(np.uint8)


def test_the_dtype_name_is_ml_dtypes_and_torchs():
    assert FLOAT8_VELOCITY == E4M3.name == "float8_e4m3fn"
    assert FLOAT8_MAX == float(ml_dtypes.finfo(E4M3).max) == 448.0


def test_every_code_decodes_as_ml_dtypes_and_round_trips():
    values = e4m3_to_float32(ALL_CODES)
    theirs = ALL_CODES.view(E4M3).astype(np.float32)
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(values), nan) and nan.sum() == 2  # 0x7f, 0xff
    assert np.array_equal(values[~nan].view(np.uint32), theirs[~nan].view(np.uint32))
    assert np.array_equal(float32_to_e4m3(values[~nan]), ALL_CODES[~nan])
    assert np.array_equal(float32_to_e4m3(values[nan]), [FLOAT8_NAN] * 2)


def test_ties_round_to_even_as_ml_dtypes():
    """The midpoint between every two neighbouring codes (exact in float32), both signs,
    and the points a float32 ulp either side of it."""
    low = e4m3_to_float32(np.arange(0, 0x7E, dtype=np.uint8)).astype(np.float64)
    high = e4m3_to_float32(np.arange(1, 0x7F, dtype=np.uint8)).astype(np.float64)
    middle = ((low + high) / 2).astype(np.float32)
    assert np.array_equal(middle.astype(np.float64), (low + high) / 2)
    near = np.concatenate([middle, np.nextafter(middle, np.float32(0)),
                           np.nextafter(middle, np.float32(np.inf))])
    for x in (near, -near):
        assert np.array_equal(float32_to_e4m3(x), _theirs(x))


def test_random_values_round_as_ml_dtypes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 7, 200_000))
    x = np.clip(x, -464, 464).astype(np.float32)  # beyond 464 ml_dtypes makes NaN
    x[:6] = [0.0, -0.0, 2.0**-10, -(2.0**-10), 1e-45, 464.0]
    assert np.array_equal(float32_to_e4m3(x), _theirs(x))


def test_finite_values_saturate_and_only_nan_and_inf_give_nan():
    x = np.array([465, -465, 1e30, -3.4e38, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    assert float32_to_e4m3(x).tolist() == [0x7E, 0xFE, 0x7E, 0xFE] + [FLOAT8_NAN] * 4
    r16 = np.full(x.size, 0xFFFF, np.uint32)  # always the farther neighbour
    assert float32_to_e4m3(x, r16).tolist() == [0x7E, 0xFE, 0x7E, 0xFE] + [FLOAT8_NAN] * 4


@pytest.mark.parametrize("x", [0.3, -0.3, 1.1, 300.0, 447.0, 2.0**-8 + 2.0**-12,
                               -(2.0**-10), 1e-6])
def test_stochastic_rounding_is_unbiased_over_all_random_bits(x):
    """Over all 2**16 values of r16 the result is one of x's two neighbouring codes, and
    its mean is x within 2**-16 of their distance (the normal path drops 4 of the 20
    dropped bits; the subnormal path compares the top 16)."""
    r16 = np.arange(2**16, dtype=np.uint32)
    codes = float32_to_e4m3(np.full(r16.size, x, np.float32), r16)
    values = e4m3_to_float32(codes).astype(np.float64)
    neighbours = np.unique(values)
    assert neighbours.size <= 2
    nearest = float(e4m3_to_float32(float32_to_e4m3(np.float32([x])))[0])
    assert nearest in neighbours
    gap = np.abs(np.diff(neighbours)).max() if neighbours.size == 2 else 1.0
    assert abs(values.mean() - np.float32(x)) <= gap * 2.0**-16 + 1e-12


def test_a_block_of_zeros_stays_zero_and_scales_map_absmax_to_448():
    v = np.zeros(3 * FLOAT8_BLOCK + 5, np.float32)
    v[FLOAT8_BLOCK + 7] = -3.0
    v[2 * FLOAT8_BLOCK:] = np.linspace(-1e-3, 2e-3, v.size - 2 * FLOAT8_BLOCK)
    codes, scales = quantize_velocity(v)
    assert scales.shape == (float8_scale_count(v.size),) == (4,)
    assert scales[0] == 0 and not codes[:FLOAT8_BLOCK].any()
    assert dequantize_velocity(codes, scales)[:FLOAT8_BLOCK].tolist() == [0.0] * 256
    assert codes[FLOAT8_BLOCK + 7] == 0xFE  # -448
    assert scales[1] == np.float32(3.0) / np.float32(448)
    assert dequantize_velocity(codes, scales)[FLOAT8_BLOCK + 7] == -3.0


def test_a_velocity_never_becomes_nan_from_finite_input():
    """Tiny blocks (subnormal absmax, where absmax / 448 underflows or loses bits), huge
    ones, and a non-finite element beside finite ones: only the non-finite one is NaN."""
    tiny = np.array([1e-45, 3e-45, 1e-42, -2e-39, 1.2e-38, 0.0], np.float32)
    huge = np.array([3.4e38, -3.4e38, 1e38, 1.0], np.float32)
    for v in (tiny, huge, np.resize(tiny, 300), np.concatenate([tiny, huge])):
        codes, scales = quantize_velocity(v)
        assert np.isfinite(dequantize_velocity(codes, scales)).all(), v
    mixed = np.array([1.0, np.nan, -2.0, np.inf, 4.0], np.float32)
    codes, scales = quantize_velocity(mixed)
    assert codes[[1, 3]].tolist() == [FLOAT8_NAN] * 2
    assert scales[0] == np.float32(4.0) / np.float32(448)
    assert np.isfinite(dequantize_velocity(codes, scales)[[0, 2, 4]]).all()


@pytest.mark.parametrize("precision, ulps", [("nearest", 0.5), ("stochastic", 1.0)])
@pytest.mark.parametrize("config", CONFIGS)
def test_each_step_is_within_fp8_rounding_of_the_exact_velocity(config, precision, ulps):
    """The new velocity of every step, dequantized, is within `ulps` E4M3 ulps (relative
    2**-3 per ulp on normal codes, 2**-9 of the scale on subnormal ones) of the velocity
    computed exactly (float64) from the previous stored one."""
    p = single_group_problem(config, 1023, "float32", precision, STEPS)
    param = p.param
    codes, scales = np.zeros(param.size, np.uint8), np.zeros(4, np.float32)
    for step, (grad, groups) in enumerate(zip(p.grads, p.groups)):
        start, end, options = groups[0]
        options = dict(options)
        first = options.pop("first_step")
        old = dequantize_velocity(codes, scales)
        _, exact = reference_step(param, grad, old, first_step=first, **options)
        param, codes, scales, _ = float8_velocity_step(
            param, grad, codes, scales, groups, precision=precision, seed=p.seed,
            step_count=step)
        got = dequantize_velocity(codes, scales).astype(np.float64)
        per_element = np.repeat(scales.astype(np.float64), FLOAT8_BLOCK)[:param.size]
        bound = ulps * np.maximum(np.abs(exact) * 2.0**-3, per_element * 2.0**-9)
        # and the float32 arithmetic before the rounding: a few ulps of the block's terms
        bound = bound * (1 + 2.0**-20) + per_element * FLOAT8_MAX * 2.0**-21
        assert (np.abs(got - exact) <= bound).all(), step


SINGLE_GROUP_KINDS = [("float32", "nearest"), ("float32", "stochastic"),
                      ("bfloat16", "nearest"), ("bfloat16", "stochastic"),
                      ("bfloat16", "kahan"), ("bfloat16", "master"),
                      ("float16", "nearest"), ("float16", "stochastic"),
                      ("float16", "kahan"), ("float16", "master")]
KIND_IDS = [f"{param}-{precision}" for param, precision in SINGLE_GROUP_KINDS]
SIZES = (0, 1, 3, 1023, 4099)  # 4099: 16 whole blocks and 3 elements


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    from host_kernel import HostKernel, build_library

    return HostKernel(build_library(tmp_path_factory.mktemp("cuda-host-float8")))


@pytest.mark.parametrize("kind", SINGLE_GROUP_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_and_cuda_c_equal_the_reference_bit_for_bit(config, kind, host):
    for size in SIZES:
        p = single_group_problem(config, size, *kind, STEPS)
        expected = run(p, "reference")
        cpu = run(p, "cpu")
        assert_same_states(expected, cpu, f"cpu, {size} elements")
        assert_same_states(cpu, run(p, "cuda-host", host), f"cuda-host, {size} elements")


@pytest.mark.parametrize("kind", SINGLE_GROUP_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("config", GROUP_CONFIGS)
def test_groups_and_padding_equal_the_reference_bit_for_bit(config, kind, host):
    p = grouped_problem(config, SEGMENT_SIZES, *kind, STEPS)
    expected = run(p, "reference")
    cpu = run(p, "cpu")
    assert_same_states(expected, cpu, "cpu")
    assert_same_states(cpu, run(p, "cuda-host", host), "cuda-host")
    assert_same_states(cpu, run(p, "cuda-host", host, max_blocks=64), "cuda-host, wide")


SIMULATED_KINDS = [("float32", "nearest"), ("float32", "stochastic"),
                   ("bfloat16", "stochastic"), ("float16", "kahan"), ("bfloat16", "master")]
SIMULATED_CONFIGS = [c for c in CONFIGS if c.id in (
    "classic-nesterov-wd-maximize", "torch-momentum-schedule",
    "torch-decoupled-wd-l1-schedule")]
SIMULATED_STEPS = 4
# The simulator runs the element maths as Python: the fast loop keeps every kind with the
# first configuration, CI runs the others too.
SIMULATED_CASES = [pytest.param(config.values[0], id=config.id,
                                marks=[] if i == 0 else [pytest.mark.slow])
                   for i, config in enumerate(SIMULATED_CONFIGS)]


@pytest.mark.parametrize("kind", SIMULATED_KINDS,
                         ids=[f"{p}-{m}" for p, m in SIMULATED_KINDS])
@pytest.mark.parametrize("config", SIMULATED_CASES)
def test_numba_cuda_equals_the_cpu_bit_for_bit(config, kind):
    require("numba.cuda")
    for size in (0, 3, 1300):  # 1300: 5 whole blocks and 20 elements over 2 warps
        p = single_group_problem(config, size, *kind, SIMULATED_STEPS)
        assert_same_states(run(p, "cpu"), run(p, "numba-cuda"),
                           f"numba-cuda, {size} elements")


@pytest.mark.parametrize("config", GROUP_CONFIGS[2:4])
def test_numba_cuda_groups_and_padding_equal_the_cpu(config):
    require("numba.cuda")
    p = grouped_problem(config, (300, 5, 411, 1, 256, 33), "bfloat16", "stochastic",
                        SIMULATED_STEPS)
    assert_same_states(run(p, "cpu"), run(p, "numba-cuda"), "numba-cuda")


@pytest.mark.parametrize("kind, offsets", [
    (("float32", "nearest"), {"param": 1, "grad": 1, "codes": 1}),
    (("float32", "stochastic"), {"codes": 2}),
    (("bfloat16", "master"), {"buffer": 1}),
    (("float16", "kahan"), {"param": 3, "grad": 3, "codes": 3, "buffer": 3})],
    ids=["float32-all-off", "float32-codes-off", "bfloat16-master-buffer-off",
         "float16-kahan-all-off"])
def test_numba_cuda_views_off_their_words_take_the_element_path_alike(kind, offsets):
    """Arrays that do not start on a word (16 bytes; the codes on a lane word's 4 or 8
    bytes): every block goes element by element, with the CPU's bits."""
    require("numba.cuda")
    p = single_group_problem(SIMULATED_CASES[0].values[0], 1300, *kind, 2)
    assert_same_states(run(p, "cpu"), run(p, "numba-cuda", offsets=offsets),
                       f"numba-cuda, offsets {offsets}")


_PTX_SCRIPT = """
import sys
from gpu_momentum.kernels.numba_cuda_fp8 import FLOAT8_KINDS, compile_float8_ptx
for param, precision in FLOAT8_KINDS:
    for cc in ((8, 0), (9, 0)):
        path = f"{sys.argv[1]}/{param}-{precision}-sm_{cc[0]}{cc[1]}.ptx"
        with open(path, "w") as f:
            f.write(compile_float8_ptx(param, cc, precision))
        print(path)
"""


@pytest.mark.slow
def test_numba_cuda_ptx_for_sm80_and_sm90_keeps_values_in_registers(tmp_path):
    """The real numba-cuda compiler (no GPU, not the simulator): every FP8 kind compiles
    for sm_80 and sm_90, calls nothing, uses no local memory (a block's eight values per
    lane stay in registers) and ptxas reports no spills."""
    import re
    import shutil
    import subprocess
    import sys

    from gpu_momentum.kernels.numba_cuda_fp8 import FLOAT8_KINDS
    from harness import library_env, missing_tool

    ptxas = shutil.which("ptxas")
    if ptxas is None:
        missing_tool("ptxas is not on PATH (install the CUDA toolkit's compiler)")
    result = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(tmp_path)],
                            env=library_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    paths = result.stdout.split()
    assert len(paths) == 2 * len(FLOAT8_KINDS)
    for path in paths:
        arch = re.search(r"sm_\d+", path).group()
        ptx = re.sub(r"//.*", "", open(path).read())
        assert f".target {arch}" in ptx and "call" not in ptx, path
        assert "ld.local" not in ptx and "st.local" not in ptx, path
        assert "atom.shared.max.u32" in ptx and "bar.sync" in ptx, path
        done = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o",
                               str(tmp_path / "kernel.cubin")], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                            done.stderr + done.stdout)
        assert spills == [("0", "0")], f"{path}: {done.stderr}"


@pytest.mark.parametrize("param_dtype, precision", [("float32", "nearest"),
                                                    ("bfloat16", "stochastic")])
def test_counted_steps_skip_nonfinite_gradients_with_a_loss_scale(param_dtype, precision,
                                                                   host):
    """A capturable, skipping optimizer's launches (counters in memory, READ_COUNTERS):
    with a loss scale of 1024 (given as 1 / scale, and in device memory to the CUDA C
    kernel), steps 0, 1, 3, 4 are taken as the reference takes them; step 2's NaN
    gradient changes nothing but the counters, and the step count keying the random bits
    counts taken steps only. The CPU and CUDA C kernels agree bit for bit."""
    from gpu_momentum.groups import update_table
    from gpu_momentum.hyperparams import Hyperparameters
    from gpu_momentum.kernels.cpu_float8 import float8_kernels
    from gpu_momentum.kernels.elementwise import storage_format
    from gpu_momentum.kernels.layout import (GROUP_SLOTS, PRECISIONS, READ_COUNTERS,
                                             SKIPPED_STEPS, STEP_COUNT)

    p = single_group_problem(CONFIGS[1].values[0], 1023, param_dtype, precision, 5)
    scale = 1024.0
    grads = [(g.astype(np.float32) * np.float32(scale)).astype(g.dtype) for g in p.grads]
    grads[2] = grads[2].copy()
    grads[2][500] = np.nan
    bits = lambda a: a.view(np.uint16) if a.dtype.itemsize == 2 else a
    _, find_nonfinite, update_unless_skipped = float8_kernels(
        storage_format(p.param.dtype), PRECISIONS[precision.upper()], parallel=False)
    states = {name: (p.param.copy(), np.zeros(1023, np.uint8), np.zeros(4, np.float32),
                     np.zeros(GROUP_SLOTS + 1, np.int64)) for name in ("cpu", "host")}
    expected = (p.param.copy(), np.zeros(1023, np.uint8), np.zeros(4, np.float32))
    taken = 0
    hyper = {k: v for k, v in p.groups[0][0][2].items() if k != "first_step"}
    for step, grad in enumerate(grads):
        table = update_table([Hyperparameters(**hyper)], [False], np.float32, size=1023)
        param, codes, scales, counters = states["cpu"]
        arguments = (bits(param), bits(grad), codes, scales, np.empty(0, np.float32),
                     *table.arrays(), np.float32(1 / scale),
                     np.uint32(table.launch_flags | READ_COUNTERS), counters,
                     np.uint64(p.seed), np.int64(0))
        find_nonfinite(*arguments)
        update_unless_skipped(*arguments)
        param, codes, scales, counters = states["host"]
        host.step_float8(param, grad, codes, scales, table, counters=counters,
                         grad_scale=np.array([scale], np.float32), precision=precision,
                         seed=p.seed)
        if step != 2:
            new_param, new_codes, new_scales, _ = float8_velocity_step(
                expected[0], grad, *expected[1:], precision=precision, seed=p.seed,
                step_count=taken,
                first_step=taken == 0, grad_scale=scale, **hyper)
            expected = (new_param, new_codes, new_scales)
            taken += 1
        for name, (param, codes, scales, counters) in states.items():
            assert_same_states([(*expected, None)], [(param, codes, scales, None)],
                               f"{name}, step {step}")
            assert counters[STEP_COUNT] == taken and counters[SKIPPED_STEPS] == (step >= 2)
            assert counters[GROUP_SLOTS] == 1


@pytest.mark.parametrize("kind", [("float32", "nearest"), ("bfloat16", "stochastic")],
                         ids=["float32-nearest", "bfloat16-stochastic"])
def test_a_velocity_left_alone_keeps_its_value_in_a_shared_block(kind, host):
    """Two torch-style groups, [0, 300) and [300, 600): from step 3 on the second has
    momentum 0 and leaves its velocity alone. Block 1 (256..511) is shared: the second
    group's velocities there keep their values, requantized with the first group's new
    ones; block 2 (512..599) is the second group's alone and keeps its bits."""
    from float8_runs import Problem
    from gpu_momentum.groups import update_table
    from gpu_momentum.hyperparams import Hyperparameters

    p = single_group_problem(CONFIGS[7].values[0], 600, *kind, 5)
    tables, groups = [], []
    for step in range(5):
        hypers = [{"style": "torch", "lr": 0.05, "momentum": 0.9},
                  {"style": "torch", "lr": 0.02, "momentum": 0.9 if step < 3 else 0.0}]
        tables.append(update_table([Hyperparameters(**h) for h in hypers],
                                   [step > 0, step > 0], np.float32,
                                   np.array([300, 600], np.int64),
                                   np.array([0, 1], np.int32)))
        groups.append([(0, 300, {**hypers[0], "first_step": step == 0}),
                       (300, 600, {**hypers[1], "first_step": step == 0})])
    grads = [np.concatenate([g[:300] * g.dtype.type(8), g[300:]]) for g in p.grads]
    p = Problem(p.param, grads, tables, groups, kind[1])  # the first group's v dominate
    expected = run(p, "reference")
    cpu = run(p, "cpu")
    assert_same_states(expected, cpu, "cpu")
    assert_same_states(cpu, run(p, "cuda-host", host), "cuda-host")
    for step in (3, 4):
        _, codes, scales, _ = expected[step - 1]
        _, new_codes, new_scales, _ = expected[step]
        assert np.array_equal(new_codes[512:], codes[512:]) and new_scales[2] == scales[2]
        assert new_scales[1] != scales[1]  # the first group's velocities moved
        kept = dequantize_velocity(codes, scales)[300:512]
        now = dequantize_velocity(new_codes, new_scales)[300:512]
        ulp = np.maximum(np.abs(kept) * 2.0**-3, new_scales[1] * 2.0**-9)  # one E4M3 ulp
        assert (np.abs(now - kept) <= ulp * (1 + 2.0**-20)).all(), step
        assert np.abs(now).max() > 0


@pytest.mark.parametrize("param_dtype", ["float32", "float16"])
def test_cuda_c_views_off_their_words_take_the_element_path_alike(param_dtype, host):
    """Params, gradients and codes that do not start on a 16-byte (or code) word: every
    block goes element by element, with the same bits as the CPU; the bytes around the
    views are not touched."""
    from host_kernel import GUARD_BYTE, view_at

    p = single_group_problem(CONFIGS[4].values[0], 1023, param_dtype, "nearest", 3)
    expected = run(p, "cpu")
    param, param_raw, (begin, end) = view_at(p.param, p.param.itemsize)
    codes, codes_raw, (codes_begin, codes_end) = view_at(np.zeros(1023, np.uint8), 1)
    scales = np.zeros(4, np.float32)
    for step, (grad, table) in enumerate(zip(p.grads, p.tables)):
        grad_view, _, _ = view_at(grad, 2 * grad.itemsize)
        host.step_float8(param, grad_view, codes, scales, table, step_count=step)
        assert_same_states([expected[step]], [(param, codes, scales, None)], f"{step}")
    for raw, (first, last) in ((param_raw, (begin, end)),
                               (codes_raw, (codes_begin, codes_end))):
        assert (raw[:first] == GUARD_BYTE).all() and (raw[last:] == GUARD_BYTE).all()

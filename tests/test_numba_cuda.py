"""The numba-cuda backend beyond the shared table: half and single precision against
same-precision models, FlatParams of Numba arrays, a step that neither allocates nor
waits, and the compiled kernel's PTX (registers, no spills) for sm_80 and sm_90.

On a machine without a GPU these run in Numba's CUDA simulator (see conftest.py), except
the PTX checks, which use the real numba-cuda compiler in a subprocess: compiling needs no
GPU.
"""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gpu_momentum as gm
from configs import CONFIGS, hyper_at, problem
from cuda_driver import cuda_device_count
from gpu_momentum.reference import reference_step
from harness import NumbaCudaHarness, library_env, missing_tool, require, usable

CCS = ((8, 0), (9, 0))


@pytest.fixture
def harness():
    return usable(NumbaCudaHarness())


def _same_precision_model(param, grads, config):
    """The kernel's arithmetic on the host: float32 maths and velocity, param stored in
    its own dtype (rounded to nearest) after every step."""
    p, v = param, np.zeros(param.size, np.float32)
    for step, grad in enumerate(grads):
        p32, v = reference_step(p, grad, v, first_step=step == 0, dtype=np.float32,
                                **hyper_at(config, step))
        p = p32.astype(param.dtype)
    return p, v


@pytest.mark.slow
@pytest.mark.parametrize("size", [1023, 278011])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("config", CONFIGS)
def test_low_precision_tracks_same_precision_model(harness, config, dtype, size):
    if harness.size_limit(size) is not None:
        pytest.skip(harness.size_limit(size))
    param64, grads64 = problem(size)
    param, grads = param64.astype(dtype), [g.astype(dtype) for g in grads64]
    p = harness.from_numpy(param)
    v = harness.from_numpy(np.zeros(size, np.float32))
    for step, grad in enumerate(grads):
        gm.momentum_step(p, harness.from_numpy(grad), v, first_step=step == 0,
                         backend="numba-cuda", **hyper_at(config, step))
    model_p, model_v = _same_precision_model(param, grads, config)
    exact_p, exact_v = param.astype(np.float64), np.zeros(size)
    for step, grad in enumerate(grads):
        exact_p, exact_v = reference_step(exact_p, grad, exact_v, first_step=step == 0,
                                          **hyper_at(config, step))
    got_p, got_v = harness.to_numpy(p), harness.to_numpy(v)
    assert got_p.dtype == dtype and got_v.dtype == np.float32
    if harness.simulated:
        # The simulator runs the Python maths with NumPy scalars: the model's exact steps.
        assert got_p.tobytes() == model_p.tobytes()
        assert got_v.tobytes() == model_v.tobytes()
    # On a GPU, contraction into FMAs may round differently: bound the error against
    # float64 by twice the model's own error (a bit of slack for all-exact cases).
    for got, model, exact in ((got_p, model_p, exact_p), (got_v, model_v, exact_v)):
        model_error = np.abs(model.astype(np.float64) - exact).max()
        got_error = np.abs(got.astype(np.float64) - exact).max()
        assert got_error <= 2 * model_error + np.finfo(dtype).eps


def test_float16_params_get_a_float32_velocity(harness):
    param, grads = problem(1023, steps=3)
    p = harness.from_numpy(param.astype(np.float16))
    opt = gm.MomentumSGD(p, lr=0.05, momentum=0.9, style="torch", backend="numba-cuda")
    assert np.dtype(opt.velocity.dtype) == np.float32
    for grad in grads:
        opt.step(harness.from_numpy(grad.astype(np.float16)))
    model_p, model_v = _same_precision_model(
        param.astype(np.float16), [g.astype(np.float16) for g in grads],
        {"lr": 0.05, "momentum": 0.9, "style": "torch"})
    np.testing.assert_array_max_ulp(harness.to_numpy(p), model_p, maxulp=1)
    # With FMAs a velocity near zero after cancellation is off by an ulp of its terms.
    atol = 4 * np.finfo(np.float32).eps * np.abs(model_v).max() if harness.contracts_fma else 0
    np.testing.assert_allclose(harness.to_numpy(opt.velocity), model_v, rtol=1e-6, atol=atol)


def test_flat_params_of_numba_arrays(harness):
    shapes = [(3, 5), (7,), (2, 2, 3)]
    rng = np.random.default_rng(1)
    layers = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    flat = gm.FlatParams.from_arrays([harness.from_numpy(a) for a in layers])
    assert gm.MomentumSGD(flat, lr=0.1).backend == "numba-cuda"
    opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9)
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    for view, grad in zip(flat.grads, grads):
        harness.assign(view, grad)
    opt.step()
    data = harness.to_numpy(flat.data)
    for offset, layer, grad in zip(flat.offsets, layers, grads):
        expected = layer + -np.float32(0.1) * grad
        np.testing.assert_array_equal(data[offset:offset + layer.size], expected.ravel())
    padding = np.ones(data.size, bool)
    for offset, layer in zip(flat.offsets, layers):
        padding[offset:offset + layer.size] = False
    assert not data[padding].any()


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_step_neither_allocates_nor_waits(harness, monkeypatch, skip_nonfinite):
    from numba import cuda

    p, g, v = (harness.from_numpy(np.full(1023, x)) for x in (1.0, 2.0, 0.0))
    opt = gm.MomentumSGD(p, lr=0.5, backend="numba-cuda", skip_nonfinite=skip_nonfinite)
    opt.step(g)  # compiles the kernel first
    # momentum_step keeps its recent hyperparameter tables on the device: warm it up too
    scratch = (harness.from_numpy(np.ones(1023)), harness.from_numpy(np.zeros(1023)))
    gm.momentum_step(scratch[0], g, scratch[1], lr=0.5, backend="numba-cuda")

    def forbidden(*args, **kwargs):
        raise AssertionError("step() allocated device memory or waited for the GPU")

    for name in ("synchronize", "to_device", "device_array", "device_array_like"):
        monkeypatch.setattr(cuda, name, forbidden)
    monkeypatch.setattr(type(cuda.default_stream()), "synchronize", forbidden)
    monkeypatch.setattr(type(cuda.current_context()), "memalloc", forbidden)
    opt.step(g)
    gm.momentum_step(p, g, v, lr=0.5, backend="numba-cuda")
    monkeypatch.undo()
    # p: 1 -> 0 (v = -1) -> -1.9 (v = 0.9 * -1 - 1) -> -2.9 (from the zero velocity v)
    np.testing.assert_allclose(harness.to_numpy(p), -2.9, rtol=1e-12)
    np.testing.assert_allclose(harness.to_numpy(opt.velocity), -1.9, rtol=1e-12)
    np.testing.assert_array_equal(harness.to_numpy(v), -1.0)


def test_launch_grid_comes_from_the_device(harness):
    from numba import cuda

    from gpu_momentum.kernels.numba_cuda import launch_config, threads_per_multiprocessor

    threads_small = launch_config(1)
    assert threads_small[0] == 1
    blocks, threads = launch_config(2**40)
    assert launch_config(2**40) == (blocks, threads)
    if harness.simulated:
        assert blocks * threads <= 64  # every simulated thread is a Python thread
    else:
        device = cuda.get_current_device()
        assert blocks * threads == (device.MULTIPROCESSOR_COUNT
                                    * threads_per_multiprocessor(device))
    assert launch_config(3 * threads + 1) == (min(blocks, 4), threads)


def _require_tool(name):
    path = shutil.which(name)
    if path is None:
        missing_tool(f"{name} is not on PATH (CUDA toolkit); it checks the kernel's spills")
    return path


# The kinds whose PTX is checked: (param, velocity, precision, kernels). Every update of
# float32, float64 and float16 (nearest), every precision of bfloat16 and a bfloat16
# velocity; each dtype's non-finite check and finish_step once.
PTX_KINDS = [
    ("float32", "float32", "nearest", ("momentum_step", "find_nonfinite", "finish_step")),
    ("float64", "float64", "nearest", ("momentum_step", "find_nonfinite")),
    ("float16", "float32", "nearest", ("momentum_step", "find_nonfinite")),
    ("bfloat16", "float32", "nearest", ("momentum_step", "find_nonfinite")),
    ("bfloat16", "float32", "stochastic", ("momentum_step",)),
    ("bfloat16", "float32", "kahan", ("momentum_step",)),
    ("bfloat16", "float32", "master", ("momentum_step",)),
    ("bfloat16", "bfloat16", "stochastic", ("momentum_step",)),
]

_PTX_SCRIPT = """
import sys
from gpu_momentum.kernels.numba_cuda import compile_ptx
out = sys.argv[1]
for param, velocity, precision, names in {kinds!r}:
    for cc in {ccs!r}:
        for kernel, ptx in compile_ptx(param, cc, velocity, precision, names).items():
            path = f"{{out}}/{{param}}-{{velocity}}-{{precision}}-{{kernel}}-sm_{{cc[0]}}{{cc[1]}}.ptx"
            with open(path, "w") as f:
                f.write(ptx)
            print(path)
"""


@pytest.fixture(scope="module")
def kernel_ptx(tmp_path_factory):
    """[PTX path], compiled by the real numba-cuda compiler, no GPU."""
    out = tmp_path_factory.mktemp("ptx")
    result = subprocess.run([sys.executable, "-c",
                             _PTX_SCRIPT.format(kinds=PTX_KINDS, ccs=CCS), str(out)],
                            env=library_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    paths = result.stdout.split()
    assert len(paths) == sum(len(kind[3]) for kind in PTX_KINDS) * len(CCS)
    return paths


@pytest.mark.slow
def test_ptx_for_sm80_and_sm90_has_no_spills(kernel_ptx, tmp_path):
    ptxas = _require_tool("ptxas")
    for path in kernel_ptx:
        arch = re.search(r"sm_\d+", path).group()
        ptx = open(path).read()
        assert f".target {arch}" in ptx
        assert "call" not in re.sub(r"//.*", "", ptx), f"{path}: the kernel calls out"
        result = subprocess.run([ptxas, "-v", f"-arch={arch}", path,
                                 "-o", str(tmp_path / "kernel.cubin")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        report = result.stderr + result.stdout
        assert re.search(r"Used \d+ registers", report), report
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spills == [("0", "0")], f"{path}: {report}"


def test_listed_only_where_a_gpu_is(tmp_path):
    """Outside the simulator, numba-cuda is available exactly when the driver sees a GPU."""
    script = ("import gpu_momentum as gm, numpy as np\n"
              "listed = 'numba-cuda' in gm.available_backends()\n"
              "print(listed)\n"
              "if not listed:\n"
              "    try:\n"
              "        gm.MomentumSGD(np.zeros(2), lr=0.1, backend='numba-cuda')\n"
              "    except gm.BackendUnavailableError as e:\n"
              "        print(e)\n")
    out = _run_as_users_do(script)
    listed = out.splitlines()[0] == "True"
    assert listed == (cuda_device_count() > 0)
    if not listed:
        assert "backend 'numba-cuda' is not available on this machine" in out


def test_a_compiler_that_cannot_compile_makes_the_backend_unavailable():
    """Outside the simulator a broken numba-cuda (seen: numba-cuda 0.30.4 with numpy 2.5)
    is reported by name and version, not found at the first step."""
    script = ("from gpu_momentum.kernels import numba_cuda\n"
              "print(numba_cuda.compiler_problem())\n"
              "def broken(*args, **kwargs):\n"
              "    raise AttributeError(\"module 'numpy' has no attribute 'row_stack'\")\n"
              "numba_cuda.cuda.compile_ptx = broken\n"
              "print(numba_cuda.compiler_problem())\n")
    working, broken = _run_as_users_do(script).splitlines()
    assert working == "None"
    assert broken.startswith("numba-cuda 0.") and "cannot compile kernels with numpy" in broken
    assert "row_stack" in broken


def _run_as_users_do(script):
    """stdout of `script` in a fresh interpreter with the real numba-cuda (no simulator)."""
    result = subprocess.run([sys.executable, "-c", script], env=library_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["nearest", "kahan", "master"])
def test_16_bit_error_on_a_gpu_is_that_of_the_same_precision(harness, precision):
    """On a GPU, NVVM contracts multiply-adds, so numba-cuda's bfloat16 results may differ
    from the float32-compute reference by a rounding: against float64, they err no more
    than twice what the reference itself does. (The simulator computes as the reference
    does: test_low_precision.py checks it bit for bit.)"""
    if harness.simulated:
        pytest.skip("the CUDA simulator computes as the reference does, bit for bit "
                    "(tests/test_low_precision.py); FMA contraction needs a GPU")
    ml_dtypes = require("ml_dtypes")
    from gpu_momentum.reference import low_precision_step

    dtype = np.dtype(ml_dtypes.bfloat16)
    param64, grads64 = problem(278011)
    param, grads = param64.astype(dtype), [g.astype(dtype) for g in grads64]
    opt = gm.MomentumSGD(harness.from_numpy(param), lr=0.05, momentum=0.9,
                         weight_decay=0.01, precision=precision, backend="numba-cuda")
    model_p, model_v = param, np.zeros(param.size, np.float32)
    buffer = {"kahan": np.zeros(param.size, dtype),
              "master": param.astype(np.float32)}.get(precision)
    exact_p, exact_v = param.astype(np.float64), np.zeros(param.size)
    for step, grad in enumerate(grads):
        opt.step(harness.from_numpy(grad))
        extra = {} if buffer is None else {
            {"kahan": "compensation", "master": "master"}[precision]: buffer}
        model_p, model_v, new = low_precision_step(
            model_p, grad, model_v, precision=precision, first_step=step == 0, lr=0.05,
            momentum=0.9, weight_decay=0.01, **extra)
        buffer = new if buffer is not None else None
        exact_p, exact_v = reference_step(exact_p, grad, exact_v, first_step=step == 0,
                                          lr=0.05, momentum=0.9, weight_decay=0.01)
    got = harness.to_numpy(opt.param).astype(np.float64)
    model_error = np.abs(model_p.astype(np.float64) - exact_p).max()
    assert 0 < model_error < 0.05
    assert np.abs(got - exact_p).max() <= 2 * model_error

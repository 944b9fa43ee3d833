"""The Numba CUDA update kernels move 128 bits per memory instruction: their PTX, compiled
without a GPU by the real numba-cuda compiler (not the simulator conftest.py switches on),
holds 16-byte global loads and stores, and assembles with ptxas without spills.

As kernels/momentum.cu: float32 as ld.global.v4.f32, float64 as ld.global.v2.f64, 16-bit
storage as ld.global.v4.u32 (or .b32), and the matching st.global.v4 / v2. With an FP8
velocity (kernels/numba_cuda_fp8.py), as momentum_step_fp8: params and gradients in the
same 128-bit words, the codes of a lane word in one 32-bit (4 float32 params) or 64-bit
(8 16-bit params) load and store.
"""

import re
import subprocess
import sys

import pytest

from gpu_momentum.kernels.cuda_toolchain import find_tool
from harness import library_env, missing_tool

# The real numba-cuda compiler and ptxas, run in a child process: tens of seconds.
pytestmark = pytest.mark.slow

CCS = ((8, 0), (9, 0))
# (param, velocity, precision): the wide formats, bfloat16 in each precision and with a
# bfloat16 velocity, float16 once.
KINDS = [("float32", "float32", "nearest"), ("float64", "float64", "nearest"),
         ("bfloat16", "float32", "nearest"), ("bfloat16", "float32", "stochastic"),
         ("bfloat16", "float32", "kahan"), ("bfloat16", "float32", "master"),
         ("bfloat16", "bfloat16", "nearest"), ("float16", "float32", "nearest")]
WORD_LOAD = {"float32": r"ld\.global(\.nc)?\.v4\.f32",
             "float64": r"ld\.global(\.nc)?\.v2\.f64",
             "bfloat16": r"ld\.global(\.nc)?\.v4\.[ub]32",
             "float16": r"ld\.global(\.nc)?\.v4\.[ub]32"}
WORD_STORE = {"float32": r"st\.global\.v4\.f32", "float64": r"st\.global\.v2\.f64",
              "bfloat16": r"st\.global\.v4\.[ub]32", "float16": r"st\.global\.v4\.[ub]32"}

_SCRIPT = """
import sys
from gpu_momentum.kernels.numba_cuda import compile_ptx
out = sys.argv[1]
for param, velocity, precision in {kinds!r}:
    for cc in {ccs!r}:
        ptx = compile_ptx(param, cc, velocity, precision,
                          ("momentum_step",))["momentum_step"]
        path = f"{{out}}/{{param}}-{{velocity}}-{{precision}}-sm_{{cc[0]}}{{cc[1]}}.ptx"
        with open(path, "w") as f:
            f.write(ptx)
        print(path)
"""


@pytest.fixture(scope="module")
def update_ptx(tmp_path_factory):
    """{(param, velocity, precision, "sm_XX"): PTX of the update kernel}."""
    out = tmp_path_factory.mktemp("numba-ptx")
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format(kinds=KINDS, ccs=CCS),
                           str(out)], env=library_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    found = {}
    for path in done.stdout.split():
        param, velocity, precision, arch = path.rsplit("/", 1)[1][:-4].split("-")
        found[param, velocity, precision, arch] = open(path).read()
    assert len(found) == len(KINDS) * len(CCS)
    return found


def _code(ptx):
    return re.sub(r"//.*", "", ptx)


def test_update_moves_params_and_grads_in_128_bit_words(update_ptx):
    for (param, velocity, precision, arch), ptx in update_ptx.items():
        code = _code(ptx)
        where = f"{param}/{velocity}/{precision} {arch}"
        assert re.search(WORD_LOAD[param], code), f"{where}: no 128-bit load of params"
        assert re.search(WORD_STORE[param], code), f"{where}: no 128-bit store of params"
        assert re.search(WORD_LOAD[velocity], code), f"{where}: no 128-bit velocity load"
        assert re.search(WORD_STORE[velocity], code), f"{where}: no 128-bit velocity store"


def test_words_beside_a_scalar_head_and_tail(update_ptx):
    """Scalar stores exist (the head and tail, and words that hold a range end), but every
    array also has a vector store: one of each kind per kernel at least."""
    for (param, velocity, precision, arch), ptx in update_ptx.items():
        code = _code(ptx)
        vector_stores = re.findall(r"st\.global\.v[24]\.\w+", code)
        stored_arrays = 3 if precision in ("kahan", "master") else 2
        # float64 words of 4 elements are two v2 stores each: at least one per array.
        assert len(vector_stores) >= stored_arrays, (param, precision, arch, vector_stores)
        assert re.search(r"st\.global\.(f32|f64|u16|b16)\b", code), \
            f"{param} {arch}: the scalar head/tail is gone"


def test_update_ptx_assembles_without_spills(update_ptx, tmp_path):
    ptxas = find_tool("ptxas")
    if ptxas is None:
        missing_tool("ptxas was not found (CUDA toolkit or the nvidia-cuda-nvcc wheel)")
    for (param, velocity, precision, arch), ptx in update_ptx.items():
        assert f".target {arch}" in ptx
        assert "call" not in _code(ptx), f"{param} {precision} {arch}: the kernel calls out"
        path = tmp_path / f"{param}-{velocity}-{precision}-{arch}.ptx"
        path.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"-arch={arch}", str(path),
                               "-o", str(tmp_path / "update.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        report = done.stderr + done.stdout
        assert re.search(r"Used \d+ registers", report), report
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spills == [("0", "0")], f"{param} {velocity} {precision} {arch}: {report}"


# FP8 velocity kinds: (param, precision).
FLOAT8_KINDS = [("float32", "nearest"), ("bfloat16", "nearest")]
CODE_WORD_LOAD = {"float32": r"ld\.global(\.nc)?\.[ub]32",
                  "bfloat16": r"ld\.global(\.nc)?\.v2\.[ub]32"}
CODE_WORD_STORE = {"float32": r"st\.global\.[ub]32", "bfloat16": r"st\.global\.v2\.[ub]32"}

_FLOAT8_SCRIPT = """
import sys
from gpu_momentum.kernels.numba_cuda_fp8 import compile_float8_ptx
out = sys.argv[1]
for param, precision in {kinds!r}:
    for cc in {ccs!r}:
        path = f"{{out}}/{{param}}-{{precision}}-sm_{{cc[0]}}{{cc[1]}}.ptx"
        with open(path, "w") as f:
            f.write(compile_float8_ptx(param, cc, precision))
        print(path)
"""


@pytest.fixture(scope="module")
def float8_ptx(tmp_path_factory):
    """{(param, precision, "sm_XX"): PTX of the FP8-velocity update kernel}."""
    out = tmp_path_factory.mktemp("numba-float8-ptx")
    done = subprocess.run([sys.executable, "-c",
                           _FLOAT8_SCRIPT.format(kinds=FLOAT8_KINDS, ccs=CCS), str(out)],
                          env=library_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    found = {}
    for path in done.stdout.split():
        param, precision, arch = path.rsplit("/", 1)[1][:-4].split("-")
        found[param, precision, arch] = open(path).read()
    assert len(found) == len(FLOAT8_KINDS) * len(CCS)
    return found


def test_float8_update_moves_whole_blocks_in_words(float8_ptx):
    """Params and gradients in 128-bit words, the codes in 32-bit (float32 params) or
    64-bit (16-bit params) words; the element path of partial blocks and views off their
    words still stores single codes and params."""
    for (param, precision, arch), ptx in float8_ptx.items():
        code = _code(ptx)
        where = f"{param}/float8/{precision} {arch}"
        assert len(re.findall(WORD_LOAD[param], code)) >= 2, \
            f"{where}: no 128-bit loads of params and gradients"
        assert re.search(WORD_STORE[param], code), f"{where}: no 128-bit store of params"
        assert re.search(CODE_WORD_LOAD[param], code), f"{where}: no code word load"
        assert re.search(CODE_WORD_STORE[param], code), f"{where}: no code word store"
        assert re.search(r"st\.global\.u8\b", code), f"{where}: the element path is gone"
        assert re.search(r"st\.global\.(f32|u16|b16)\b", code), \
            f"{where}: no element store of params"


def test_float8_update_ptx_assembles_without_spills(float8_ptx, tmp_path):
    ptxas = find_tool("ptxas")
    if ptxas is None:
        missing_tool("ptxas was not found (CUDA toolkit or the nvidia-cuda-nvcc wheel)")
    for (param, precision, arch), ptx in float8_ptx.items():
        assert f".target {arch}" in ptx
        code = _code(ptx)
        assert "call" not in code, f"{param} float8 {precision} {arch}: calls out"
        assert "ld.local" not in code and "st.local" not in code, \
            f"{param} float8 {precision} {arch}: the lane's values left registers"
        path = tmp_path / f"{param}-float8-{precision}-{arch}.ptx"
        path.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"-arch={arch}", str(path),
                               "-o", str(tmp_path / "update.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        report = done.stderr + done.stdout
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spills == [("0", "0")], f"{param} float8 {precision} {arch}: {report}"

"""The cupy backend's CUDA C module, compiled without a GPU: NVRTC, ptxas and the SASS.

Everything here compiles `module_source()` with `module_options()`, the very text and
options the cupy backend (gpu_momentum/backends/cupy.py) gives CuPy's RawModule, for sm_80 (A100) and sm_90 (H100).
"""

import re
import shutil
import subprocess

import numpy as np
import pytest

from gpu_momentum.cli import main
from gpu_momentum.backends import cupy as cupy_backend
from gpu_momentum.kernels import layout
from gpu_momentum.kernels.cuda_source import (BLOCK_SIZE, CUPY_ADDED_OPTIONS, ENTRY_POINTS,
                                              FINISH_EXPRESSION, FLOAT8_ENTRY_POINTS,
                                              FLOAT8_MIN_BLOCKS_PER_SM,
                                              FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER,
                                              MIN_BLOCKS_PER_SM,
                                              MIN_BLOCKS_PER_SM_FLOAT16_BUFFER,
                                              VECTOR_BYTES, module_options, module_source,
                                              name_expressions)
from gpu_momentum.kernels.cuda_toolchain import compile_module, find_tool, sass
from gpu_momentum.kernels.layout import COLUMNS, COUNTERS, FLAGS, PRECISIONS
from harness import missing_tool, require

ARCHS = ("sm_80", "sm_90")
REGISTERS_PER_SM = 65536  # sm_80 and sm_90


# One architecture in the fast loop: each NVRTC build takes tens of seconds; CI runs both.
@pytest.fixture(scope="module", params=[
    pytest.param(arch, marks=[] if arch == ARCHS[-1] else [pytest.mark.slow])
    for arch in ARCHS])
def module(request):
    require("cuda.bindings.nvrtc")
    return compile_module(request.param)


@pytest.fixture(scope="module")
def functions_sass():
    """{(arch, lowered name): SASS}: each module disassembled once."""
    found = {}

    def of(module, lowered_name):
        if (module.arch, lowered_name) not in found:
            for part in sass(module).split("Function : ")[1:]:
                name = part.split(None, 1)[0]
                found[module.arch, name] = f"Function : {part}"
        return found[module.arch, lowered_name]
    return of


@pytest.fixture(scope="module")
def tools():
    found = {name: find_tool(name) for name in ("cuobjdump", "nvdisasm")}
    for name, path in found.items():
        if path is None:
            missing_tool(f"{name} was not found (pip install nvidia-cuda-{name})")
    return found


def test_rawmodule_receives_the_compiled_source_and_options(monkeypatch):
    cupy = require("cupy")
    received = {}

    class Recorder:
        def __init__(self, **kwargs):
            received.update(kwargs)

    monkeypatch.setattr(cupy, "RawModule", Recorder)
    monkeypatch.setattr(cupy.cuda, "Device", lambda device_id: _NoDevice())
    cupy_backend._module.cache_clear()
    try:
        cupy_backend._module(0)
    finally:
        cupy_backend._module.cache_clear()
    assert received == {"code": module_source(), "options": module_options(),
                        "name_expressions": name_expressions()}


class _NoDevice:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_cupys_own_option_assembly_builds_the_same_code(module):
    """RawModule's compiler adds CuPy's include paths and --std=c++17 to our options
    (CuPy internals, checked here so that a CuPy upgrade that changes them is noticed);
    they must not change a byte of the cubin."""
    core = require("cupy._core.core")
    assembled = tuple(core.assemble_cupy_compiler_options(module_options()))
    assert set(module_options()) <= set(assembled)
    theirs = compile_module(module.arch, assembled + CUPY_ADDED_OPTIONS)
    assert theirs.cubin == module.cubin


def test_source_carries_the_settings_python_launches_with():
    source = module_source()
    assert f"#define GM_BLOCK_SIZE {BLOCK_SIZE}\n" in source
    assert f"#define GM_MIN_BLOCKS_PER_SM {MIN_BLOCKS_PER_SM}\n" in source
    assert f"#define GM_VECTOR_BYTES {VECTOR_BYTES}\n" in source
    body = source[source.index("// The fused momentum-SGD update in CUDA C"):]
    for name, bit in FLAGS.items():
        assert f"#define GM_FLAG_{name} {bit}u\n" in source
        assert f"GM_FLAG_{name}" in body
    assert sorted(FLAGS.values()) == [1 << i for i in range(len(FLAGS))]
    for name, slot in COUNTERS.items():
        assert f"#define GM_COUNTER_{name} {slot}\n" in source
        assert slot == getattr(layout, name)
    assert {f"GM_COUNTER_{name}" for name in COUNTERS} <= set(re.findall(r"GM_COUNTER_\w+",
                                                                          body))
    assert sorted(COLUMNS.values()) == list(range(layout.GROUP_COLUMNS))
    for name, column in COLUMNS.items():
        assert f"#define GM_COLUMN_{name} {column}\n" in source
        assert column == getattr(layout, name) and f"GM_COLUMN_{name}" in body
    assert f"#define GM_GROUP_COLUMNS {layout.GROUP_COLUMNS}\n" in source
    for name, mode in PRECISIONS.items():
        assert f"#define GM_PRECISION_{name} {mode}\n" in source
        assert any(f"GM_PRECISION_{name}>" in e for e in name_expressions())
    assert "--fmad=false" in module_options()


def test_every_entry_point_compiles_without_spills(module):
    assert set(module.kernels) == set(name_expressions())
    # an update per entry point (and per FP8 one), a check per param dtype, finish_step
    assert len(module.kernels) == len(ENTRY_POINTS) + len(FLOAT8_ENTRY_POINTS) + 4 + 1
    assert module.kernels[FINISH_EXPRESSION].registers > 0
    for expression, kernel in module.kernels.items():
        assert kernel.spill_store_bytes == kernel.spill_load_bytes == 0, (
            f"{expression} spills on {module.arch}:\n{module.log}")
        assert kernel.stack_frame_bytes == 0, f"{expression} uses local memory"
    globals_ = [int(n) for n in re.findall(r"(\d+) bytes gmem", module.log)]
    assert not any(globals_), f"the module holds global variables:\n{module.log}"


def test_registers_allow_the_resident_blocks_launch_bounds_promise(module):
    blocks = {e.update_expression: e.min_blocks_per_sm for e in ENTRY_POINTS.values()}
    assert set(blocks.values()) == {MIN_BLOCKS_PER_SM, MIN_BLOCKS_PER_SM_FLOAT16_BUFFER}
    float8 = {e.update_expression: e.min_blocks_per_sm
              for e in FLOAT8_ENTRY_POINTS.values()}
    assert set(float8.values()) == {FLOAT8_MIN_BLOCKS_PER_SM,
                                    FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER}
    blocks |= float8
    for expression, kernel in module.kernels.items():
        limit = REGISTERS_PER_SM // (BLOCK_SIZE * blocks.get(expression, MIN_BLOCKS_PER_SM))
        assert 0 < kernel.registers <= limit, (expression, kernel.registers)


def test_cupy_flush_to_zero_is_part_of_the_compile(module):
    assert CUPY_ADDED_OPTIONS == ("-ftz=true",)
    assert "mul.rn.ftz.f32" in module.ptx or "mul.ftz.f32" in module.ptx
    assert "fma.rn" not in module.ptx, "--fmad=false must keep multiplies and adds apart"


def _words(dtype_name):
    """128-bit words per vector of parameters for an array of `dtype_name` elements."""
    return 2 if dtype_name == "float32" else 1


@pytest.mark.parametrize("entry", list(ENTRY_POINTS.values()),
                         ids=lambda e: "-".join((e.param_dtype, e.velocity_dtype,
                                                 e.precision)))
def test_vector_body_uses_128_bit_loads_and_stores(module, tools, functions_sass, entry):
    """Each stream of the vector body moves whole 128-bit words: a vector is 4 float32,
    2 float64 or 8 16-bit parameters (with a float32 velocity or master copy, two words
    of those)."""
    kernel = module.kernels[entry.update_expression]
    code = functions_sass(module, kernel.lowered_name)
    assert f"Function : {kernel.lowered_name}" in code
    instructions = [line.split("*/", 1)[-1] for line in code.splitlines()]
    loads = sum("LDG.E.128" in line for line in instructions)
    stores = sum("STG.E.128" in line for line in instructions)
    sixteen_bit = entry.param_dtype in ("bfloat16", "float16")
    velocity = _words(entry.velocity_dtype) if sixteen_bit else 1
    buffer = {"kahan": 1, "master": 2}.get(entry.precision, 0)
    param_read = 0 if entry.precision == "master" else 1
    assert loads >= param_read + 1 + velocity + buffer, code  # param, grad, velocity, buffer
    assert stores >= 1 + velocity + buffer, code
    if sixteen_bit:  # no conversion instructions: the bit operations convert
        assert "F2F" not in code and "F2FP" not in code, "a hardware conversion"
    check = module.kernels[entry.check_expression]
    assert "LDG.E.128" in functions_sass(module, check.lowered_name)


@pytest.mark.parametrize("entry", list(FLOAT8_ENTRY_POINTS.values()),
                         ids=lambda e: f"{e.param_dtype}-float8-{e.precision}")
def test_float8_body_uses_128_bit_loads_and_stores(module, tools, functions_sass, entry):
    """momentum_step_fp8's whole blocks: each lane moves its 8 params and gradients (and
    compensation or master copy) as 128-bit words (two each of float32), its 8 codes as
    one coalesced word (32 bits per 4 float32 params, 64 per 8 16-bit ones), and the
    block's absmax goes round the warp by shuffles; no FP8 or 16-bit conversion
    instruction (sm_80 has none for FP8): the bit operations convert."""
    kernel = module.kernels[entry.update_expression]
    code = functions_sass(module, kernel.lowered_name)
    instructions = [line.split("*/", 1)[-1] for line in code.splitlines()]
    count = lambda pattern: sum(bool(re.search(pattern, line)) for line in instructions)
    words = 2 if entry.param_dtype == "float32" else 1  # per lane and stream
    buffer = {"kahan": words, "master": 2}.get(entry.precision, 0)
    param_read = 0 if entry.precision == "master" else words
    assert count(r"LDG\.E[.\w]*\.128") >= param_read + words + buffer, code
    assert count(r"STG\.E[.\w]*\.128") >= words + buffer, code
    if words == 1:  # the codes: the only 64-bit store
        assert count(r"STG\.E(\.\w+)*\.64\b") >= 1, code
    assert count(r"SHFL\.BFLY") >= 10, code  # absmax and "any group writes", 5 each
    assert "F2F" not in code and "F2FP" not in code, "a hardware conversion"


@pytest.mark.slow
def test_ptx_assembles_with_the_ptxas_on_path(module, tmp_path):
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        missing_tool("ptxas is not on PATH (install the CUDA toolkit's compiler)")
    ptx = tmp_path / "momentum.ptx"
    ptx.write_text(module.ptx)
    done = subprocess.run([ptxas, "-v", f"-arch={module.arch}", "-o",
                           str(tmp_path / "momentum.cubin"), str(ptx)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for kernel in module.kernels.values():
        assert f"Compiling entry function '{kernel.lowered_name}'" in done.stderr


def test_compile_command_writes_cubin_and_ptx_and_reports_spills(tmp_path, capsys, tools):
    require("cuda.bindings.nvrtc")
    assert main(["compile", "--arch", "sm_90", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    cubin = tmp_path / "out" / "momentum.sm_90.cubin"
    ptx = tmp_path / "out" / "momentum.sm_90.ptx"
    assert cubin.read_bytes() == compile_module("sm_90").cubin
    assert ".target sm_90" in ptx.read_text()
    for expression, kernel in compile_module("sm_90").kernels.items():
        line = next(line for line in out.splitlines() if line.startswith(expression + " "))
        assert line[len(expression):].split()[:4] == [str(kernel.registers), "0", "B",
                                                      "0"], line
        assert kernel.lowered_name in line
    dumped = subprocess.run([tools["cuobjdump"], "-elf", str(cubin)], capture_output=True,
                            text=True, check=True).stdout
    assert all(k.lowered_name in dumped for k in compile_module("sm_90").kernels.values())


@pytest.mark.parametrize("arch, message", [("sm_52", r"supports sm_75"),
                                           ("hopper", r"look like 'sm_90'")])
def test_compile_command_rejects_unknown_archs(tmp_path, capsys, arch, message):
    require("cuda.bindings.nvrtc")
    assert main(["compile", "--arch", arch, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"Invalid arch value: {arch!r}" in err
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())

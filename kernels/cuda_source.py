"""The CUDA C kernel as CuPy's RawModule receives it, and the same compile ahead of time.

`module_source()` and `module_options()` are exactly what `kernels.cupy_kernels` hands to
`cupy.RawModule`; `compile_module(arch)` compiles that text with NVRTC for any architecture
NVRTC supports, with no GPU present, and reports registers and spills per entry point.
`sass()` disassembles the cubin with cuobjdump. Nothing here needs a device.
"""

import dataclasses
import functools
import importlib.resources
import os
import re
import subprocess
import tempfile

import numpy as np

from . import elementwise

BLOCK_SIZE = 256  # threads per block; the kernel's __launch_bounds__
# __launch_bounds__ holds ptxas to 65536 / (256 * 5) = 51 registers (48 in practice: they
# are allocated 8 at a time): 5 resident blocks, 1280 threads per SM (62.5% of sm_80/sm_90),
# each with three 128-bit loads in flight, 60 KiB per SM, still several times what the
# memory system needs in flight. 6 blocks (40 registers) fitted before parameter groups;
# the range cursor each thread keeps (range bounds and its group's six scalars) no longer
# fits there: float64 spills on sm_90. 8 blocks (32 registers) would spill for float64
# and float16 (and float32 on sm_90).
MIN_BLOCKS_PER_SM = 5
VECTOR_BYTES = 16  # one 128-bit load or store

# Everything the kernel shares with the other backends comes from kernels.elementwise and
# is prepended to the source as #defines, so Python and CUDA C cannot disagree:
# GM_FLAG_* bits of `launch_flags` and `group_flags`,
FLAGS = dict(elementwise.FLAGS)
# GM_COUNTER_* slots of the step counters (one VELOCITY_INITIALIZED slot per group from
# GM_COUNTER_VELOCITY_INITIALIZED on),
COUNTERS = {name: getattr(elementwise, name) for name in
            ("STEP_COUNT", "SKIPPED_STEPS", "LAST_STEP_SKIPPED", "VELOCITY_INITIALIZED")}
# and GM_COLUMN_* columns of a row of the group table, GM_GROUP_COLUMNS wide.
COLUMNS = {name: getattr(elementwise, name) for name in
           ("LR", "MOMENTUM", "GRAD_COEFF", "WEIGHT_DECAY", "L1", "DECAY")}
GROUP_COLUMNS = elementwise.GROUP_COLUMNS


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """The kernels of one parameter dtype and their C types."""

    param_ctype: str
    velocity_ctype: str
    compute_ctype: str
    compute_dtype: np.dtype

    @property
    def name_expression(self):  # the update
        return f"momentum_step<{self.param_ctype}>"

    @property
    def check_expression(self):  # the non-finite gradient check
        return f"find_nonfinite<{self.param_ctype}>"


ENTRY_POINTS = {
    np.dtype(np.float32): EntryPoint("float", "float", "float", np.dtype(np.float32)),
    np.dtype(np.float64): EntryPoint("double", "double", "double", np.dtype(np.float64)),
    np.dtype(np.float16): EntryPoint("__half", "float", "float", np.dtype(np.float32)),
}
FINISH_EXPRESSION = "finish_step"  # counts a step, marks velocities existing

# What RawModule appends to the options it is given (CuPy's compiler adds -ftz=true after
# user options, and NVRTC keeps the last of repeated options). Only float32 subnormals
# (|x| < 1.2e-38) are affected: they flush to zero on the GPU.
CUPY_ADDED_OPTIONS = ("-ftz=true",)


def vector_width(dtype):
    """Elements of `dtype` per 128-bit word: the kernel's vector width."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def cuda_include_dir():
    """The CUDA headers directory (for cuda_fp16.h), or None where it cannot be found."""
    from cuda.pathfinder import find_nvidia_header_directory

    return find_nvidia_header_directory("cudart")


@functools.cache
def module_source():
    """The exact CUDA C text of the module: settings as #defines, then momentum.cu."""
    settings = [f"#define GM_BLOCK_SIZE {BLOCK_SIZE}",
                f"#define GM_MIN_BLOCKS_PER_SM {MIN_BLOCKS_PER_SM}",
                f"#define GM_VECTOR_BYTES {VECTOR_BYTES}"]
    settings += [f"#define GM_FLAG_{name} {bit}u" for name, bit in FLAGS.items()]
    settings += [f"#define GM_COUNTER_{name} {slot}" for name, slot in COUNTERS.items()]
    settings += [f"#define GM_COLUMN_{name} {column}" for name, column in COLUMNS.items()]
    settings.append(f"#define GM_GROUP_COLUMNS {GROUP_COLUMNS}")
    body = importlib.resources.files(__package__).joinpath("momentum.cu").read_text()
    return "\n".join(settings) + "\n" + body


@functools.cache
def module_options():
    """The exact NVRTC options given to RawModule.

    --fmad=false keeps every multiply and add separately rounded, as in the reference and
    the CPU kernels: the results agree bit for bit, and a memory-bound kernel loses nothing.
    """
    options = ("--std=c++17", "--fmad=false")
    include = cuda_include_dir()
    if include is not None:  # else CuPy's own CUDA include path provides cuda_fp16.h
        options += (f"-I{include}",)
    return options


def name_expressions():
    """Every kernel of the module, as RawModule's name_expressions."""
    expressions = [e.name_expression for e in ENTRY_POINTS.values()]
    expressions += [e.check_expression for e in ENTRY_POINTS.values()]
    return [*expressions, FINISH_EXPRESSION]


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """ptxas's report for one entry point."""

    lowered_name: str
    registers: int
    stack_frame_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


@dataclasses.dataclass(frozen=True)
class CompiledModule:
    arch: str
    ptx: str
    cubin: bytes
    log: str
    kernels: dict  # name expression -> KernelResources


class CompileError(RuntimeError):
    """NVRTC rejected the module source or options."""


def _nvrtc():
    # cuda-bindings rather than cupy.cuda.nvrtc: CuPy's getCUBIN drops the cubin's last byte.
    from cuda.bindings import nvrtc

    return nvrtc


def _check(result, what, program=None):
    status, *values = result
    if status != _nvrtc().nvrtcResult.NVRTC_SUCCESS:
        log = f"\n{_program_log(program)}" if program is not None else ""
        raise CompileError(f"NVRTC {what} failed: {status.name}{log}")
    return values[0] if len(values) == 1 else values


def _program_log(program):
    nvrtc = _nvrtc()
    size = _check(nvrtc.nvrtcGetProgramLogSize(program), "log size")
    log = b" " * size
    _check(nvrtc.nvrtcGetProgramLog(program, log), "log")
    return log.rstrip(b"\0").decode()


def nvrtc_version():
    return tuple(_check(_nvrtc().nvrtcVersion(), "version"))


def supported_archs():
    """The sm_XX architectures this NVRTC compiles for."""
    nvrtc = _nvrtc()
    count = _check(nvrtc.nvrtcGetNumSupportedArchs(), "architecture count")
    return [f"sm_{cc}" for cc in _check(nvrtc.nvrtcGetSupportedArchs(), "architectures")][
        :count]


@functools.cache
def compile_module(arch, options=None):
    """Compiles module_source() with module_options() for `arch` ("sm_90") with NVRTC.

    The options are RawModule's plus what CuPy adds itself (or `options`, a tuple), the
    architecture, and ptxas -v for the resource report: the code a device of that
    architecture runs.
    """
    if not isinstance(arch, str) or not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"Invalid arch value: {arch!r} (arch must look like 'sm_90')")
    if arch.rstrip("af") not in supported_archs():
        raise ValueError(f"Invalid arch value: {arch!r} (NVRTC "
                         f"{'.'.join(map(str, nvrtc_version()))} supports "
                         f"{', '.join(supported_archs())})")
    nvrtc = _nvrtc()
    if options is None:
        options = (*module_options(), *CUPY_ADDED_OPTIONS)
    options = [*options, f"--gpu-architecture={arch}", "-Xptxas=-v"]
    program = _check(nvrtc.nvrtcCreateProgram(module_source().encode(), b"momentum.cu", 0,
                                              [], []), "create program")
    try:
        for expression in name_expressions():
            _check(nvrtc.nvrtcAddNameExpression(program, expression.encode()),
                   f"name expression {expression}")
        _check(nvrtc.nvrtcCompileProgram(program, len(options),
                                         [o.encode() for o in options]),
               f"compile of momentum.cu for {arch}", program)
        log = _program_log(program)
        lowered = {e: _check(nvrtc.nvrtcGetLoweredName(program, e.encode()),
                             f"lowered name of {e}").decode()
                   for e in name_expressions()}
        ptx = b" " * _check(nvrtc.nvrtcGetPTXSize(program), "PTX size")
        _check(nvrtc.nvrtcGetPTX(program, ptx), "PTX")
        cubin = b" " * _check(nvrtc.nvrtcGetCUBINSize(program), "cubin size")
        _check(nvrtc.nvrtcGetCUBIN(program, cubin), "cubin")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    resources = _parse_ptxas_report(log)
    kernels = {}
    for expression, name in lowered.items():
        if name not in resources:
            raise CompileError(f"ptxas reported nothing for {expression} ({name}):\n{log}")
        kernels[expression] = KernelResources(name, **resources[name])
    return CompiledModule(arch, ptx.rstrip(b"\0").decode(), cubin, log, kernels)


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _parse_ptxas_report(log):
    resources, current = {}, None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = resources.setdefault(match[1], {})
        elif current is not None and (match := _FRAME.search(line)):
            current.update(stack_frame_bytes=int(match[1]), spill_store_bytes=int(match[2]),
                           spill_load_bytes=int(match[3]))
        elif current is not None and (match := _REGISTERS.search(line)):
            current["registers"] = int(match[1])
    return resources


def find_tool(name):
    """A CUDA binary utility from its nvidia-cuda-* wheel or a CUDA toolkit, or None."""
    from cuda.pathfinder import find_nvidia_binary_utility

    return find_nvidia_binary_utility(name)


def sass(module, lowered_name=None):
    """The SASS of `module`'s cubin (of one function when `lowered_name` is given).

    cuobjdump hands the disassembly to nvdisasm: both must be present.
    """
    tool, disassembler = find_tool("cuobjdump"), find_tool("nvdisasm")
    for name, path in (("cuobjdump", tool), ("nvdisasm", disassembler)):
        if path is None:
            raise FileNotFoundError(f"{name} was not found (pip install nvidia-cuda-{name})")
    with tempfile.TemporaryDirectory(prefix="gpu-momentum-sass-") as tmp:
        path = os.path.join(tmp, f"momentum.{module.arch}.cubin")
        with open(path, "wb") as f:
            f.write(module.cubin)
        command = [tool, "-sass", *(["-fun", lowered_name] if lowered_name else []), path]
        env = {**os.environ, "NVDISASM_PATH": os.path.dirname(disassembler)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 or "does not contain device code" in done.stderr:
            raise RuntimeError(f"cuobjdump failed on {path}:\n{done.stderr}")
        return done.stdout

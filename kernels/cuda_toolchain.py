"""The cupy backend's CUDA C module compiled ahead of time, with no GPU: NVRTC, ptxas's
resource report and the SASS from cuobjdump. Used by `gpu-momentum compile` and the
tests; the library's step path never imports this.

`compile_module(arch)` compiles exactly `cuda_source.module_source()` with RawModule's
options (`cuda_source.module_options()` plus what CuPy adds) for any architecture NVRTC
supports and reports registers and spills per entry point; `sass()` disassembles it.
"""

import dataclasses
import functools
import os
import re
import subprocess
import tempfile

from .cuda_source import (CUPY_ADDED_OPTIONS, module_options, module_source,
                          name_expressions)


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

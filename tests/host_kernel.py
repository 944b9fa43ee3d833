"""The CUDA C kernel compiled for the CPU and run through ctypes.

The exact text CuPy's RawModule compiles (`module_source()`) is built with g++ and
tests/cuda_host/shim.h force-included; one extern "C" launcher per name expression calls
the kernel template through the shim's sequential launcher. Launches go through
`kernels.cupy_kernels.launch_plan`, as the cupy backend's do.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from gpu_momentum._hyperparams import Hyperparameters, inverse_grad_scale
from gpu_momentum.kernels.cuda_source import (COUNTERS, ENTRY_POINTS, FINISH_EXPRESSION,
                                              cuda_include_dir, module_source)
from gpu_momentum.kernels.cupy_kernels import launch_plan
from harness import missing_tool

SHIM = Path(__file__).parent / "cuda_host" / "shim.h"
SANITIZE_DRIVER = Path(__file__).parent / "cuda_host" / "sanitize_driver.cpp"
# Every multiply and add rounded on its own, as on the GPU (--fmad=false).
CXXFLAGS = ["-std=c++17", "-ffp-contract=off", "-x", "c++"]


def toolchain():
    """(g++, CUDA include dir); skips with the reason, or fails in CI, when one is absent."""
    compiler = shutil.which("g++")
    if compiler is None:
        missing_tool("g++ is not installed (apt-get install g++)")
    include = cuda_include_dir()
    if include is None:
        missing_tool("the CUDA headers (cuda_fp16.h) were not found by cuda.pathfinder")
    return compiler, include


def write_module_source(directory):
    path = Path(directory) / "momentum_module.cu"
    path.write_text(module_source())
    return path


def launchers_source(module_path):
    """One extern "C" launcher per entry point, calling it by its name expression."""
    lines = [f'#include "{module_path}"']
    for dtype, entry in ENTRY_POINTS.items():
        t, v, c = entry.param_ctype, entry.velocity_ctype, entry.compute_ctype
        lines.append(
            f'extern "C" void gm_update_{dtype.name}(unsigned grid, unsigned block, '
            f"void* param, const void* grad, void* velocity, long long n, {c} lr, "
            f"{c} momentum, {c} grad_coeff, {c} weight_decay, {c} inv_grad_scale, "
            f"unsigned flags, const long long* counters) {{\n"
            f"    gm_host_launch(grid, block, &{entry.name_expression}, "
            f"static_cast<{t}*>(param), static_cast<const {t}*>(grad), "
            f"static_cast<{v}*>(velocity), n, lr, momentum, grad_coeff, weight_decay, "
            f"inv_grad_scale, flags, counters);\n}}")
        lines.append(
            f'extern "C" void gm_check_{dtype.name}(unsigned grid, unsigned block, '
            f"const void* grad, long long n, {c} inv_grad_scale, long long* counters) {{\n"
            f"    gm_host_launch(grid, block, &{entry.check_expression}, "
            f"static_cast<const {t}*>(grad), n, inv_grad_scale, counters);\n}}")
    lines.append(
        'extern "C" void gm_finish(long long* counters, unsigned initializes_velocity) {\n'
        f"    gm_host_launch(1, 1, &{FINISH_EXPRESSION}, counters, initializes_velocity);\n}}")
    return "\n".join(lines) + "\n"


def compile_cpp(source, output, extra_flags, directory):
    compiler, include = toolchain()
    command = [compiler, *CXXFLAGS, "-include", str(SHIM), f"-I{include}", *extra_flags,
               "-o", str(output), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=directory)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stderr}")
    return output


def build_library(directory):
    directory = Path(directory)
    launchers = directory / "launchers.cpp"
    launchers.write_text(launchers_source(write_module_source(directory)))
    return compile_cpp(launchers, directory / "momentum_host.so",
                       ["-O2", "-shared", "-fPIC"], directory)


def build_sanitized_driver(directory):
    """The standalone driver over odd sizes and misaligned views, with ASan and UBSan."""
    directory = Path(directory)
    module = write_module_source(directory)
    return compile_cpp(SANITIZE_DRIVER, directory / "sanitize_driver",
                       ["-O1", "-g", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                        f'-DGM_MODULE_SOURCE="{module}"'], directory)


class HostKernel:
    """The kernels on the CPU, over NumPy arrays, launched like the cupy backend's."""

    def __init__(self, library_path):
        self.library = ctypes.CDLL(str(library_path))
        pointer, n, flags = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_uint
        for dtype, entry in ENTRY_POINTS.items():
            scalar = ctypes.c_double if entry.compute_ctype == "double" else ctypes.c_float
            self._declare(f"gm_update_{dtype.name}", flags, flags, pointer, pointer, pointer,
                          n, scalar, scalar, scalar, scalar, scalar, flags, pointer)
            self._declare(f"gm_check_{dtype.name}", flags, flags, pointer, n, scalar,
                          pointer)
        self._declare("gm_finish", pointer, flags)

    def _declare(self, name, *argtypes):
        function = getattr(self.library, name)
        function.argtypes = argtypes
        function.restype = None

    def _plan(self, param, grad, velocity, hyper, first_step, grad_scale, max_blocks,
              counters):
        arrays = (param, grad, velocity)
        plan = launch_plan(param.dtype, param.size, [a.ctypes.data for a in arrays],
                           Hyperparameters(**hyper), first_step,
                           inverse_grad_scale(grad_scale), max_blocks, counters)
        scalars = [float(s) for s in plan.scalars[:-1]]
        return plan, [a.ctypes.data for a in arrays], scalars, int(plan.scalars[-1])

    def step(self, param, grad, velocity, *, first_step=False, grad_scale=1.0, max_blocks=4,
             **hyper):
        """In place, like momentum_step; `max_blocks` stands in for the device's limit
        (small, so that the grid-stride loops go round)."""
        plan, pointers, scalars, flags = self._plan(param, grad, velocity, hyper, first_step,
                                                    grad_scale, max_blocks, False)
        if plan.grid:
            getattr(self.library, f"gm_update_{param.dtype.name}")(
                plan.grid, plan.block, *pointers, int(plan.n), *scalars, flags, None)

    def step_skipping_nonfinite(self, param, grad, velocity, counters, *, grad_scale=1.0,
                                max_blocks=4, **hyper):
        """The cupy backend's four operations, with `counters` an int64[4] NumPy array."""
        plan, pointers, scalars, flags = self._plan(param, grad, velocity, hyper, False,
                                                    grad_scale, max_blocks, True)
        counters[COUNTERS["LAST_STEP_SKIPPED"]] = 0
        if plan.grid:
            getattr(self.library, f"gm_check_{param.dtype.name}")(
                plan.grid, plan.block, pointers[1], int(plan.n), scalars[4],
                counters.ctypes.data)
            getattr(self.library, f"gm_update_{param.dtype.name}")(
                plan.grid, plan.block, *pointers, int(plan.n), *scalars, flags,
                counters.ctypes.data)
        self.library.gm_finish(counters.ctypes.data, int(plan.initializes_velocity))


GUARD_BYTE = 0xAB


def view_at(values, byte_offset):
    """A copy of `values` starting `byte_offset` bytes past a 16-byte boundary, inside a
    buffer whose other bytes are GUARD_BYTE; returns (view, buffer, (begin, end))."""
    values = np.ascontiguousarray(values)
    pad = 64
    raw = np.full(values.nbytes + 2 * pad + 16, GUARD_BYTE, np.uint8)
    begin = (-raw.ctypes.data) % 16 + pad + byte_offset
    end = begin + values.nbytes
    view = raw[begin:end].view(values.dtype)
    view[...] = values
    return view, raw, (begin, end)

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

from gpu_momentum._hyperparams import Hyperparameters
from gpu_momentum.kernels.cuda_source import ENTRY_POINTS, cuda_include_dir, module_source
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
            f'extern "C" void gm_launch_{dtype.name}(unsigned grid, unsigned block, '
            f"void* param, const void* grad, void* velocity, long long n, {c} lr, "
            f"{c} momentum, {c} grad_coeff, {c} weight_decay, unsigned flags) {{\n"
            f"    gm_host_launch(grid, block, &{entry.name_expression}, "
            f"static_cast<{t}*>(param), static_cast<const {t}*>(grad), "
            f"static_cast<{v}*>(velocity), n, lr, momentum, grad_coeff, weight_decay, "
            f"flags);\n}}")
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
    """momentum_step<T> on the CPU, over NumPy arrays, launched like the cupy backend."""

    def __init__(self, library_path):
        self.library = ctypes.CDLL(str(library_path))
        for dtype, entry in ENTRY_POINTS.items():
            scalar = ctypes.c_double if entry.compute_ctype == "double" else ctypes.c_float
            function = getattr(self.library, f"gm_launch_{dtype.name}")
            function.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                 scalar, scalar, scalar, scalar, ctypes.c_uint]
            function.restype = None

    def step(self, param, grad, velocity, *, first_step=False, max_blocks=4, **hyper):
        """In place, like momentum_step; `max_blocks` stands in for the device's limit
        (small, so that the grid-stride loops go round)."""
        hyper = Hyperparameters(**hyper)
        arrays = (param, grad, velocity)
        plan = launch_plan(param.dtype, param.size, [a.ctypes.data for a in arrays], hyper,
                           first_step, max_blocks)
        if plan.grid:
            function = getattr(self.library, f"gm_launch_{param.dtype.name}")
            *scalars, flags = plan.scalars
            function(plan.grid, plan.block, *(a.ctypes.data for a in arrays), int(plan.n),
                     *(float(s) for s in scalars), int(flags))


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

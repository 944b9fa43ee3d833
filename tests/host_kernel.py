"""The CUDA C kernel compiled for the CPU and run through ctypes.

The exact text CuPy's RawModule compiles (`module_source()`) is built with g++ and
tests/cuda_host/shim.h force-included; one extern "C" launcher per name expression calls
the kernel template through the shim's sequential launcher. Launches go through
`kernels.cuda_launch` (launch_plan, step_launches), as the cupy backend's do, after the
checks the cupy backend's step gets (check_arrays, check_table).
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

import gpu_momentum as gm
from configs import (LR_SCHEDULE, PADDING_GRADIENTS, SEGMENT_NAMES, SEGMENT_SIZES, group_lr,
                     padding_mask, problem)
from gpu_momentum.backends import check_arrays
from gpu_momentum.backends.cupy import CupyBackend
from gpu_momentum.groups import check_table, resolve_groups, update_table
from gpu_momentum.hyperparams import Hyperparameters, inverse_grad_scale
from gpu_momentum.kernels.cuda_launch import (check_counters, float8_grid_size,
                                              launch_plan, step_launches)
from gpu_momentum.kernels.cuda_source import (ENTRY_POINTS, FINISH_EXPRESSION,
                                              FLOAT8_ENTRY_POINTS, cuda_include_dir,
                                              entry_point, float8_entry_point,
                                              module_source)
from gpu_momentum.kernels.layout import LAST_STEP_SKIPPED, float8_scale_count
from gpu_momentum.precision import compute_dtype
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
        missing_tool("the CUDA headers (vector_types.h) were not found by cuda.pathfinder")
    return compiler, include


def write_module_source(directory):
    path = Path(directory) / "momentum_module.cu"
    path.write_text(module_source())
    return path


# The kernel's own 16-bit conversions and hash, called from Python to compare them with the
# reference and the Numba element functions (tests/test_storage_bits.py).
STORAGE_HOOKS = """
extern "C" void gm_random_bits(unsigned long long seed, long long step_count,
                               const long long* index, unsigned* out, long long n) {
    const unsigned key = gm::step_key(seed, step_count);
    for (long long i = 0; i < n; ++i) out[i] = gm::element_bits(key, index[i]);
}
extern "C" void gm_round(const float* x, const unsigned* r16, unsigned short* out,
                         long long n) {
    for (long long i = 0; i < n; ++i) {
        out[4 * i] = gm::BFloat16::nearest(x[i]);
        out[4 * i + 1] = gm::BFloat16::stochastic(x[i], r16[i]);
        out[4 * i + 2] = gm::Half::nearest(x[i]);
        out[4 * i + 3] = gm::Half::stochastic(x[i], r16[i]);
    }
}
extern "C" void gm_widen(const unsigned short* h, float* out, long long n) {
    for (long long i = 0; i < n; ++i) {
        out[2 * i] = gm::BFloat16::load(h[i]);
        out[2 * i + 1] = gm::Half::load(h[i]);
    }
}
"""


def launcher_name(entry):
    """The extern "C" launcher of an EntryPoint's update kernel."""
    return f"gm_update_{entry.param_dtype}_{entry.velocity_dtype}_{entry.precision}"


def float8_launcher_name(entry):
    """The extern "C" launcher of a Float8EntryPoint's update kernel."""
    return f"gm_update_fp8_{entry.param_dtype}_{entry.precision}"


def launchers_source(module_path):
    """One extern "C" launcher per entry point, calling it by its name expression."""
    lines = [f'#include "{module_path}"']
    for entry in ENTRY_POINTS.values():
        t, v, b, c = (entry.param_ctype, entry.velocity_ctype, entry.buffer_ctype,
                      entry.compute_ctype)
        lines.append(
            f'extern "C" void {launcher_name(entry)}(unsigned grid, unsigned block, '
            f"void* param, const void* grad, void* velocity, void* precision_buffer, "
            f"long long n, const {c}* group_scalars, const unsigned* group_flags, "
            f"const long long* range_ends, const int* range_groups, int range_count, "
            f"{c} inv_grad_scale, const {c}* grad_scale, unsigned launch_flags, "
            f"const long long* counters, unsigned long long seed, long long step_count) "
            f"{{\n"
            f"    gm_host_launch(grid, block, &{entry.update_expression}, "
            f"static_cast<{t}*>(param), static_cast<const {t}*>(grad), "
            f"static_cast<{v}*>(velocity), static_cast<{b}*>(precision_buffer), n, "
            f"group_scalars, group_flags, range_ends, range_groups, range_count, "
            f"inv_grad_scale, grad_scale, launch_flags, counters, seed, step_count);\n}}")
    for entry in FLOAT8_ENTRY_POINTS.values():  # warp-synchronous: lanes as coroutines
        t, b = entry.param_ctype, entry.buffer_ctype
        lines.append(
            f'extern "C" void {float8_launcher_name(entry)}(unsigned grid, unsigned block, '
            f"void* param, const void* grad, unsigned char* codes, float* scales, "
            f"void* precision_buffer, long long n, const float* group_scalars, "
            f"const unsigned* group_flags, const long long* range_ends, "
            f"const int* range_groups, int range_count, float inv_grad_scale, "
            f"const float* grad_scale, unsigned launch_flags, const long long* counters, "
            f"unsigned long long seed, long long step_count) {{\n"
            f"    gm_host_launch_warps(grid, block, &{entry.update_expression}, "
            f"static_cast<{t}*>(param), static_cast<const {t}*>(grad), codes, scales, "
            f"static_cast<{b}*>(precision_buffer), n, group_scalars, group_flags, "
            f"range_ends, range_groups, range_count, inv_grad_scale, grad_scale, "
            f"launch_flags, counters, seed, step_count);\n}}")
    checks = {entry.param_dtype: entry for entry in ENTRY_POINTS.values()}
    for dtype, entry in checks.items():
        t, c = entry.param_ctype, entry.compute_ctype
        lines.append(
            f'extern "C" void gm_check_{dtype}(unsigned grid, unsigned block, '
            f"const void* grad, long long n, const long long* range_ends, "
            f"const int* range_groups, int range_count, {c} inv_grad_scale, "
            f"const {c}* grad_scale, long long* counters) {{\n"
            f"    gm_host_launch(grid, block, &{entry.check_expression}, "
            f"static_cast<const {t}*>(grad), n, range_ends, range_groups, range_count, "
            f"inv_grad_scale, grad_scale, counters);\n}}")
    lines.append(STORAGE_HOOKS)
    lines.append(
        'extern "C" void gm_finish(unsigned block, long long* counters, '
        "const unsigned* group_flags, int group_count) {\n"
        f"    gm_host_launch(1, block, &{FINISH_EXPRESSION}, counters, group_flags, "
        "group_count);\n}")
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


def single_group_table(dtype, n, first_step=False, **hyper):
    """The UpdateTable of one group over `n` elements of `dtype` params, from the keyword
    arguments of Hyperparameters, as momentum_step builds it."""
    return update_table([Hyperparameters(**hyper)], [not first_step],
                        compute_dtype(dtype), size=n)


class HostCupyBackend(CupyBackend):
    """The cupy backend's array checks, over the host arrays the host build runs on."""

    def owns(self, array):
        return isinstance(array, np.ndarray)


HOST_CUPY = HostCupyBackend()


class HostKernel:
    """The kernels on the CPU, over NumPy arrays, launched like the cupy backend's."""

    def __init__(self, library_path):
        self.library = ctypes.CDLL(str(library_path))
        pointer, n, unsigned, int_ = (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_uint,
                                      ctypes.c_int)
        for entry in ENTRY_POINTS.values():
            scalar = ctypes.c_double if entry.compute_ctype == "double" else ctypes.c_float
            self._declare(launcher_name(entry), unsigned, unsigned, pointer, pointer,
                          pointer, pointer, n, pointer, pointer, pointer, pointer, int_,
                          scalar, pointer, unsigned, pointer, ctypes.c_ulonglong,
                          ctypes.c_longlong)
            self._declare(f"gm_check_{entry.param_dtype}", unsigned, unsigned, pointer, n,
                          pointer, pointer, int_, scalar, pointer, pointer)
        for entry in FLOAT8_ENTRY_POINTS.values():
            self._declare(float8_launcher_name(entry), unsigned, unsigned, pointer, pointer,
                          pointer, pointer, pointer, n, pointer, pointer, pointer, pointer,
                          int_, ctypes.c_float, pointer, unsigned, pointer,
                          ctypes.c_ulonglong, ctypes.c_longlong)
        self._declare("gm_finish", unsigned, pointer, pointer, int_)
        self._declare("gm_random_bits", ctypes.c_ulonglong, ctypes.c_longlong, pointer,
                      pointer, n)
        self._declare("gm_round", pointer, pointer, pointer, n)
        self._declare("gm_widen", pointer, pointer, n)

    def random_bits(self, seed, step_count, index):
        """The kernel's element_bits(step_key(seed, step_count), i) of each index."""
        index = np.ascontiguousarray(index, np.int64)
        out = np.empty(index.size, np.uint32)
        self.library.gm_random_bits(seed, step_count, index.ctypes.data, out.ctypes.data,
                                    index.size)
        return out

    def round(self, x, r16):
        """[n, 4] uint16: bfloat16 to nearest and stochastic, float16 likewise."""
        x, r16 = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(r16, np.uint32)
        out = np.empty((x.size, 4), np.uint16)
        self.library.gm_round(x.ctypes.data, r16.ctypes.data, out.ctypes.data, x.size)
        return out

    def widen(self, bits):
        """[n, 2] float32: uint16 `bits` read as bfloat16 and as float16."""
        bits = np.ascontiguousarray(bits, np.uint16)
        out = np.empty((bits.size, 2), np.float32)
        self.library.gm_widen(bits.ctypes.data, out.ctypes.data, bits.size)
        return out

    def _declare(self, name, *argtypes):
        function = getattr(self.library, name)
        function.argtypes = argtypes
        function.restype = None

    def step(self, param, grad, velocity, table, inv_grad_scale=1.0, counters=None,
             max_blocks=4, grad_scale=None, found_inf=None, check_nonfinite=True,
             precision="nearest", precision_buffer=None, seed=0, step_count=0):
        """In place, like the cupy backend's step over a host UpdateTable (NumPy arrays);
        with `counters` (an int64[GROUP_SLOTS + groups] NumPy array) its four launches
        (without find_nonfinite: check_nonfinite=False), the first one setting
        LAST_STEP_SKIPPED to found_inf != 0 (a 0-d array) when it is given. grad_scale: a
        one-element array of the compute dtype the kernels read the loss scale from
        (inv_grad_scale is then not read). `max_blocks` stands in for the device's limit
        (small, so that the grid-stride loops go round)."""
        arrays = (param, grad, velocity)
        check_arrays(HOST_CUPY, *arrays, precision, precision_buffer)
        entry = entry_point(param.dtype, velocity.dtype, precision)
        check_table(table, param.size, entry.compute_dtype)
        if counters is not None:
            check_counters(counters, table.group_count)
        plan = launch_plan(param.dtype, param.size, table, inv_grad_scale, max_blocks,
                           counters is not None, seed, step_count)
        assert all(a.flags.c_contiguous for a in (*arrays, *table.arrays()))
        pointers = [a.ctypes.data for a in arrays]
        buffer = None if precision_buffer is None else precision_buffer.ctypes.data
        table_args = [a.ctypes.data for a in table.arrays()] + [int(plan.range_count)]
        scale, flags = float(plan.inv_grad_scale), int(plan.launch_flags)
        counters_pointer = None if counters is None else counters.ctypes.data
        scale_pointer = None if grad_scale is None else grad_scale.ctypes.data
        grid, block = plan.grid, plan.block
        update = getattr(self.library, launcher_name(entry))
        check = getattr(self.library, f"gm_check_{entry.param_dtype}")
        launches = {
            "clear": lambda: counters.__setitem__(
                LAST_STEP_SKIPPED, 0 if found_inf is None else int(found_inf != 0)),
            "find_nonfinite": lambda: check(grid, block, pointers[1], int(plan.n),
                                            *table_args[2:], scale, scale_pointer,
                                            counters_pointer),
            "update": lambda: update(grid, block, *pointers, buffer, int(plan.n),
                                     *table_args, scale, scale_pointer, flags,
                                     counters_pointer, int(plan.seed),
                                     int(plan.step_count)),
            "finish": lambda: self.library.gm_finish(plan.finish_block, counters_pointer,
                                                     table.group_flags.ctypes.data,
                                                     int(plan.group_count)),
        }
        for launch in step_launches(grid, counters is not None,
                                    check_nonfinite=check_nonfinite):
            launches[launch]()

    def step_float8(self, param, grad, codes, scales, table, inv_grad_scale=1.0,
                    counters=None, max_blocks=4, grad_scale=None, found_inf=None,
                    check_nonfinite=True, precision="nearest", precision_buffer=None,
                    seed=0, step_count=0):
        """`step` with an FP8 velocity (codes uint8[n], scales float32[ceil(n / B)]): the
        same launches, the update being momentum_step_fp8 with a grid of whole warps over
        the blocks (kernels.cuda_launch.float8_grid_size)."""
        entry = float8_entry_point(param.dtype, precision)
        n = param.size
        assert codes.dtype == np.uint8 and codes.shape == (n,)
        assert scales.dtype == np.float32 and scales.shape == (float8_scale_count(n),)
        assert param.dtype == grad.dtype and param.shape == grad.shape == (n,)
        check_table(table, n, entry.compute_dtype)
        if counters is not None:
            check_counters(counters, table.group_count)
        plan = launch_plan(param.dtype, n, table, inv_grad_scale, max_blocks,
                           counters is not None, seed, step_count)
        grid = float8_grid_size(n, max_blocks)
        table_args = [a.ctypes.data for a in table.arrays()] + [int(plan.range_count)]
        buffer = None if precision_buffer is None else precision_buffer.ctypes.data
        scale, flags = float(plan.inv_grad_scale), int(plan.launch_flags)
        counters_pointer = None if counters is None else counters.ctypes.data
        scale_pointer = None if grad_scale is None else grad_scale.ctypes.data
        update = getattr(self.library, float8_launcher_name(entry))
        check = getattr(self.library, f"gm_check_{entry.param_dtype}")
        launches = {
            "clear": lambda: counters.__setitem__(
                LAST_STEP_SKIPPED, 0 if found_inf is None else int(found_inf != 0)),
            "find_nonfinite": lambda: check(plan.grid, plan.block, grad.ctypes.data, n,
                                            *table_args[2:], scale, scale_pointer,
                                            counters_pointer),
            "update": lambda: update(grid, plan.block, param.ctypes.data, grad.ctypes.data,
                                     codes.ctypes.data, scales.ctypes.data, buffer, n,
                                     *table_args, scale, scale_pointer, flags,
                                     counters_pointer, int(plan.seed),
                                     int(plan.step_count)),
            "finish": lambda: self.library.gm_finish(plan.finish_block, counters_pointer,
                                                     table.group_flags.ctypes.data,
                                                     int(plan.group_count)),
        }
        for launch in step_launches(grid, counters is not None,
                                    check_nonfinite=check_nonfinite):
            launches[launch]()

    def step_hyper(self, param, grad, velocity, *, first_step=False, grad_scale=1.0,
                   counters=None, max_blocks=4, precision="nearest", precision_buffer=None,
                   seed=0, step_count=0, **hyper):
        """One group with these hyperparameters, like momentum_step (with `counters`: its
        first step comes from them, whatever first_step says)."""
        table = single_group_table(param.dtype, param.size, first_step, **hyper)
        self.step(param, grad, velocity, table, inverse_grad_scale(grad_scale, param.dtype),
                  counters, max_blocks, precision=precision,
                  precision_buffer=precision_buffer, seed=seed, step_count=step_count)


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


# Parameter groups, for the host and the GPU tests of the kernel.

def grouped_problem(dtype):
    """(buffer, grads, velocity, offsets, sizes) of a FlatParams of SEGMENT_SIZES, its
    buffer on a 16-byte boundary; its padding holds -3.5 in the params and the gradients
    hold every value of PADDING_GRADIENTS there, which no kernel may read or move."""
    param, _ = problem(sum(SEGMENT_SIZES))
    arrays = np.split(param, np.cumsum(SEGMENT_SIZES)[:-1])
    flat = gm.FlatParams.from_arrays([a.astype(dtype) for a in arrays],
                                     names=list(SEGMENT_NAMES))
    _, grads = problem(flat.data.size, seed=1)
    padding = padding_mask(flat.offsets, flat.sizes, flat.data.size)
    assert padding.any()
    garbage = np.resize(np.array(PADDING_GRADIENTS), flat.data.size)
    with np.errstate(over="ignore"):  # 1e300 is inf in float32 and float16
        grads = [np.where(padding, garbage, g).astype(dtype) for g in grads]
    flat.data[padding] = -3.5
    velocity = np.full(flat.data.size, np.nan, compute_dtype(dtype))
    return (view_at(flat.data, 0)[0], grads, view_at(velocity, 0)[0], flat.offsets,
            flat.sizes)


def grouped_table(config, step, initialized, offsets, sizes, total, dtype):
    """The UpdateTable of step `step` (per-group lrs as configs.group_lr says)."""
    options, groups = config["options"], config["groups"]
    defaults = Hyperparameters(**{**options, "lr": LR_SCHEDULE[step]})
    groups = [{**g, "lr": group_lr(g, step)} for g in groups]
    plan = resolve_groups(groups, defaults, offsets, sizes, total, list(SEGMENT_NAMES))
    return update_table(plan.hypers, initialized, compute_dtype(dtype), plan.range_ends,
                        plan.range_groups)

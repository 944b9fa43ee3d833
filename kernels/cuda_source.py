"""The CUDA C kernel as CuPy's RawModule receives it: the source text, the options, and
the entry points of each parameter dtype.

`module_source()` and `module_options()` are exactly what the cupy backend hands to
`cupy.RawModule`; `kernels.cuda_toolchain` compiles the same text ahead of time (no GPU
needed) and the tests build it for the CPU. Nothing here needs a device.
"""

import dataclasses
import functools
import importlib.resources

import numpy as np

from . import layout

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


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """The kernels of one parameter dtype and their C types."""

    param_ctype: str
    velocity_ctype: str
    compute_ctype: str
    compute_dtype: np.dtype

    @property
    def update_expression(self):
        return f"momentum_step<{self.param_ctype}>"

    @property
    def check_expression(self):  # the non-finite gradient check
        return f"find_nonfinite<{self.param_ctype}>"


ENTRY_POINTS = {
    np.dtype(np.float32): EntryPoint("float", "float", "float", np.dtype(np.float32)),
    np.dtype(np.float64): EntryPoint("double", "double", "double", np.dtype(np.float64)),
    np.dtype(np.float16): EntryPoint("__half", "float", "float", np.dtype(np.float32)),
}
FINISH_EXPRESSION = "finish_step"  # counts a step, marks velocities initialized

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


def defines():
    """The #defines prepended to momentum.cu: launch settings and kernels.layout."""
    settings = {"GM_BLOCK_SIZE": BLOCK_SIZE, "GM_MIN_BLOCKS_PER_SM": MIN_BLOCKS_PER_SM,
                "GM_VECTOR_BYTES": VECTOR_BYTES, "GM_GROUP_COLUMNS": layout.GROUP_COLUMNS,
                "GM_NO_GROUP": layout.NO_GROUP}
    settings |= {f"GM_FLAG_{name}": f"{bit}u" for name, bit in layout.FLAGS.items()}
    settings |= {f"GM_COUNTER_{name}": slot for name, slot in layout.COUNTERS.items()}
    settings |= {f"GM_COLUMN_{name}": column for name, column in layout.COLUMNS.items()}
    return settings


@functools.cache
def module_source():
    """The exact CUDA C text of the module: settings as #defines, then momentum.cu."""
    lines = [f"#define {name} {value}" for name, value in defines().items()]
    body = importlib.resources.files(__package__).joinpath("momentum.cu").read_text()
    return "\n".join(lines) + "\n" + body


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
    expressions = [e.update_expression for e in ENTRY_POINTS.values()]
    expressions += [e.check_expression for e in ENTRY_POINTS.values()]
    return [*expressions, FINISH_EXPRESSION]

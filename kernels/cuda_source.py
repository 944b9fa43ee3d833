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
# float16 parameters with precision "kahan" or "master": their updates hold more values
# through longer conversions (float16's exponent must be rebiased, and its subnormals are
# a fifth of its range) and spill within 48 registers; 4 blocks allow 64.
MIN_BLOCKS_PER_SM_FLOAT16_BUFFER = 4
VECTOR_BYTES = 16  # one 128-bit load or store
# The FP8-velocity update (momentum_float8.cu) keeps a block's eight new velocities per
# lane in registers until the warp knows the block's scale: 4 blocks (64 registers);
# with a compensation or master copy it spills there (sm_80 and sm_90): 3 (80).
FLOAT8_MIN_BLOCKS_PER_SM = 4
FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER = 3


# The storage formats of momentum.cu, by dtype name: (C++ struct, storage C type).
FORMATS = {"float32": ("gm::Float", "float"), "float64": ("gm::Double", "double"),
           "bfloat16": ("gm::BFloat16", "unsigned short"), "float16": ("gm::Half",
                                                                   "unsigned short")}


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """The update kernel of one combination of parameter dtype, velocity dtype and
    precision (dtype names, a name of layout.PRECISION_NAMES), and its C types."""

    param_dtype: str
    velocity_dtype: str
    precision: str

    @property
    def param_ctype(self):  # what the arrays hold: 16-bit values as their bits
        return FORMATS[self.param_dtype][1]

    @property
    def velocity_ctype(self):
        return FORMATS[self.velocity_dtype][1]

    @property
    def buffer_ctype(self):  # the precision buffer's elements
        return "float" if self.precision == "master" else self.param_ctype

    @property
    def compute_dtype(self):
        return np.dtype(layout.compute_dtype_name(self.param_dtype))

    @property
    def compute_ctype(self):
        return FORMATS[layout.compute_dtype_name(self.param_dtype)][1]

    @property
    def update_expression(self):
        mode = f"GM_PRECISION_{self.precision.upper()}"
        return (f"momentum_step<{FORMATS[self.param_dtype][0]}, "
                f"{FORMATS[self.velocity_dtype][0]}, {mode}>")

    @property
    def min_blocks_per_sm(self):  # its __launch_bounds__
        if self.param_dtype == "float16" and self.precision in ("kahan", "master"):
            return MIN_BLOCKS_PER_SM_FLOAT16_BUFFER
        return MIN_BLOCKS_PER_SM

    @property
    def check_expression(self):  # the non-finite gradient check, one per param dtype
        return f"find_nonfinite<{FORMATS[self.param_dtype][0]}>"


def _supported():
    yield EntryPoint("float32", "float32", "nearest")
    yield EntryPoint("float64", "float64", "nearest")
    for param in ("bfloat16", "float16"):
        for velocity in ("float32", param):
            for precision in layout.PRECISION_NAMES:
                yield EntryPoint(param, velocity, precision)


# Only these combinations are compiled: (param dtype, velocity dtype, precision) -> entry.
ENTRY_POINTS = {(e.param_dtype, e.velocity_dtype, e.precision): e for e in _supported()}


@dataclasses.dataclass(frozen=True)
class Float8EntryPoint:
    """The FP8-velocity update kernel (momentum_step_fp8) of one parameter dtype and
    precision: its velocity is codes (unsigned char) and scales (float)."""

    param_dtype: str
    precision: str
    velocity_dtype = layout.FLOAT8_VELOCITY

    @property
    def compute_dtype(self):  # float32: float64 params have no FP8 velocity
        return np.dtype(layout.compute_dtype_name(self.param_dtype))

    @property
    def compute_ctype(self):
        return FORMATS[layout.compute_dtype_name(self.param_dtype)][1]

    @property
    def min_blocks_per_sm(self):  # its __launch_bounds__
        if self.precision in ("kahan", "master"):
            return FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER
        return FLOAT8_MIN_BLOCKS_PER_SM

    @property
    def param_ctype(self):
        return FORMATS[self.param_dtype][1]

    @property
    def buffer_ctype(self):
        return "float" if self.precision == "master" else self.param_ctype

    @property
    def update_expression(self):
        return (f"momentum_step_fp8<{FORMATS[self.param_dtype][0]}, "
                f"GM_PRECISION_{self.precision.upper()}>")

    @property
    def check_expression(self):
        return f"find_nonfinite<{FORMATS[self.param_dtype][0]}>"


def _float8_supported():
    # float32 params: nearest, or stochastic rounding of the codes alone
    for precision in ("nearest", "stochastic"):
        yield Float8EntryPoint("float32", precision)
    for param in ("bfloat16", "float16"):
        for precision in layout.PRECISION_NAMES:
            yield Float8EntryPoint(param, precision)


# (param dtype, precision) -> the FP8-velocity update; float64 params have none.
FLOAT8_ENTRY_POINTS = {(e.param_dtype, e.precision): e for e in _float8_supported()}


def float8_entry_point(param_dtype, precision="nearest"):
    """The Float8EntryPoint of params of `param_dtype` with `precision`; TypeError naming
    them for any other."""
    param = np.dtype(param_dtype).name
    entry = FLOAT8_ENTRY_POINTS.get((param, precision))
    if entry is None:
        raise TypeError(f"the CUDA C kernel has no entry point for {param} parameters with "
                        f"a {layout.FLOAT8_VELOCITY} velocity and precision {precision!r} "
                        f"(it has {sorted(FLOAT8_ENTRY_POINTS)})")
    return entry
FINISH_EXPRESSION = "finish_step"  # counts a step, marks velocities initialized


def entry_point(param_dtype, velocity_dtype=None, precision="nearest"):
    """The EntryPoint of params of `param_dtype` with a `velocity_dtype` velocity (default:
    the compute dtype) and `precision`; TypeError naming the dtypes for any other."""
    param, velocity = np.dtype(param_dtype).name, None
    if velocity_dtype is not None:
        velocity = np.dtype(velocity_dtype).name
    else:
        velocity = layout.compute_dtype_name(param)
    entry = ENTRY_POINTS.get((param, velocity, precision))
    if entry is None:
        raise TypeError(f"the CUDA C kernel has no entry point for {param} parameters with "
                        f"a {velocity} velocity and precision {precision!r} (it has "
                        f"{sorted(ENTRY_POINTS)})")
    return entry


# What RawModule appends to the options it is given (CuPy's compiler adds -ftz=true after
# user options, and NVRTC keeps the last of repeated options). Only float32 subnormals
# (|x| < 1.2e-38) are affected: they flush to zero on the GPU.
CUPY_ADDED_OPTIONS = ("-ftz=true",)


def vector_width(dtype):
    """Elements of `dtype` per 128-bit word: the kernel's vector width (dtype: a NumPy
    dtype or its name)."""
    itemsize = 2 if isinstance(dtype, str) and dtype == "bfloat16" else \
        np.dtype(dtype).itemsize
    return VECTOR_BYTES // itemsize


def cuda_include_dir():
    """The CUDA headers directory (vector_types.h for the host build), or None where it
    cannot be found."""
    from cuda.pathfinder import find_nvidia_header_directory

    return find_nvidia_header_directory("cudart")


def defines():
    """The #defines prepended to momentum.cu: launch settings and kernels.layout."""
    settings = {"GM_BLOCK_SIZE": BLOCK_SIZE, "GM_MIN_BLOCKS_PER_SM": MIN_BLOCKS_PER_SM,
                "GM_MIN_BLOCKS_PER_SM_FLOAT16_BUFFER": MIN_BLOCKS_PER_SM_FLOAT16_BUFFER,
                "GM_VECTOR_BYTES": VECTOR_BYTES, "GM_GROUP_COLUMNS": layout.GROUP_COLUMNS,
                "GM_NO_GROUP": layout.NO_GROUP,
                "GM_FLOAT8_MIN_BLOCKS_PER_SM": FLOAT8_MIN_BLOCKS_PER_SM,
                "GM_FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER":
                    FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER,
                "GM_FLOAT8_BLOCK": layout.FLOAT8_BLOCK,
                "GM_FLOAT8_LARGEST": f"{layout.FLOAT8_MAX!r}f",
                "GM_FLOAT8_NAN": f"{layout.FLOAT8_NAN:#x}u"}
    settings |= {f"GM_FLAG_{name}": f"{bit}u" for name, bit in layout.FLAGS.items()}
    settings |= {f"GM_COUNTER_{name}": slot for name, slot in layout.COUNTERS.items()}
    settings |= {f"GM_COLUMN_{name}": column for name, column in layout.COLUMNS.items()}
    settings |= {f"GM_PRECISION_{name}": mode for name, mode in layout.PRECISIONS.items()}
    return settings


@functools.cache
def module_source():
    """The exact CUDA C text of the module: settings as #defines, then momentum.cu and
    momentum_float8.cu."""
    lines = [f"#define {name} {value}" for name, value in defines().items()]
    files = importlib.resources.files(__package__)
    body = "\n".join(files.joinpath(name).read_text()
                     for name in ("momentum.cu", "momentum_float8.cu"))
    return "\n".join(lines) + "\n" + body


@functools.cache
def module_options():
    """The exact NVRTC options given to RawModule.

    --fmad=false keeps every multiply and add separately rounded, as in the reference and
    the CPU kernels: the results agree bit for bit, and a memory-bound kernel loses nothing.
    """
    options = ("--std=c++17", "--fmad=false")
    include = cuda_include_dir()
    if include is not None:  # else CuPy's own CUDA include path
        options += (f"-I{include}",)
    return options


def name_expressions():
    """Every kernel of the module, as RawModule's name_expressions."""
    expressions = [e.update_expression for e in ENTRY_POINTS.values()]
    expressions += [e.update_expression for e in FLOAT8_ENTRY_POINTS.values()]
    expressions += list(dict.fromkeys(e.check_expression for e in ENTRY_POINTS.values()))
    return [*expressions, FINISH_EXPRESSION]

"""How 16-bit parameters are updated: the precision mode, the velocity's dtype, the seed.

bfloat16 and float16 parameters are computed in float32 and rounded back once per step;
`precision` says how (kernels.layout.PRECISIONS): "nearest" (round to nearest even, the
default), "stochastic" (unbiased random rounding, keyed by the seed, the step count and the
element's index), "kahan" (a compensation buffer of the parameter dtype carries each
rounding error into the next step) or "master" (a float32 master copy is updated; the
parameters are its rounding). float32 and float64 parameters have "nearest" only: they are
computed in their own precision.

bfloat16 is `ml_dtypes.bfloat16` (`pip install "gpu-momentum[bf16]"`); nothing here needs
ml_dtypes until a bfloat16 dtype is named.
"""

import dataclasses
import numbers

import numpy as np

from .kernels.layout import FLOAT8_BLOCK, FLOAT8_VELOCITY, PRECISION_NAMES, \
    compute_dtype_name, float8_scale_count

BFLOAT16_EXTRA = 'pip install "gpu-momentum[bf16]"'
PARAM_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
# How the kernels hold 16-bit elements: as their bits (Numba has no bfloat16, and no
# float16 on the CPU; the CUDA C kernel converts the bits itself).
BITS_DTYPE = np.dtype(np.uint16)


def is_16_bit(dtype):
    """Whether parameters of `dtype` are stored in 16 bits and computed in float32."""
    return np.dtype(dtype).itemsize == 2


def storage_dtype(dtype):
    """The dtype the kernels hold elements of `dtype` (a dtype, or its name: "bfloat16"
    needs no ml_dtypes here) as: BITS_DTYPE for 16-bit ones (bfloat16, float16), else
    `dtype` itself."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return BITS_DTYPE
    dtype = np.dtype(dtype)
    return BITS_DTYPE if is_16_bit(dtype) else dtype


def as_bits(array):
    """`array` (NumPy, CuPy or a Numba device array) as the kernels take it: 16-bit
    elements (bfloat16, float16) as their bits, a BITS_DTYPE view of the same memory;
    any other array as it is."""
    return array.view(BITS_DTYPE) if is_16_bit(array.dtype) else array


def check_precision_name(precision, name="precision"):
    """`precision`, after checking that it names a precision mode (PRECISION_NAMES):
    ValueError naming the value (and `name`, what holds it) otherwise."""
    if not isinstance(precision, str) or precision not in PRECISION_NAMES:
        raise ValueError(f"Invalid {name} value: {precision!r} ({name} must be one of "
                         f"{PRECISION_NAMES})")
    return precision


def check_same_precision(saved, precision):
    """ValueError unless a state saved with precision `saved` can load into an optimizer
    of `precision`: the two must be the same (the buffers and roundings differ)."""
    if saved != precision:
        raise ValueError(f"Invalid precision value: {saved!r} (the state was saved with "
                         f"precision {saved!r}, this optimizer uses {precision!r})")


def compute_dtype(param_dtype):
    """The dtype the update computes in (kernels.layout.compute_dtype_name): float32 for
    16-bit parameters, else the param dtype (float32, float64). A dtype the library does
    not update is returned as it is, for the messages that refuse it."""
    param_dtype = np.dtype(param_dtype)
    if param_dtype.name not in PARAM_DTYPE_NAMES:
        return param_dtype
    return np.dtype(compute_dtype_name(param_dtype.name))


def velocity_dtypes(param_dtype):
    """The velocity dtypes parameters of `param_dtype` can have, the default first:
    float32 or their own dtype for 16-bit parameters, their own dtype otherwise."""
    param_dtype = np.dtype(param_dtype)
    if is_16_bit(param_dtype):
        return (np.dtype(np.float32), param_dtype)
    return (param_dtype,)


def precision_buffer_dtype(param_dtype, precision):
    """The dtype of `precision`'s extra buffer (kahan: the compensation, of the param
    dtype; master: the float32 master copy), or None when it has none."""
    return {"kahan": np.dtype(param_dtype), "master": np.dtype(np.float32)}.get(precision)


PRECISION_BUFFER_NAMES = {"kahan": "compensation", "master": "master"}


# ---- An 8-bit velocity (FLOAT8_VELOCITY): E4M3 codes and a float32 scale per block ----

def is_float8(dtype):
    """Whether `dtype` (a dtype or its name) is the FP8 velocity's, float8_e4m3fn."""
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", None)
    return name == FLOAT8_VELOCITY


def float8_precisions(param_dtype):
    """The precision modes the FP8-velocity kernels have for parameters of `param_dtype`:
    every mode for 16-bit ones; "nearest" and "stochastic" (which then rounds the codes
    alone) for float32; none for float64."""
    param_dtype = np.dtype(param_dtype)
    if is_16_bit(param_dtype):
        return PRECISION_NAMES
    return ("nearest", "stochastic") if param_dtype == np.float32 else ()


def float8_state_shapes(elements):
    """((elements,), (blocks,)): the shapes of an FP8 velocity's codes (uint8) and scales
    (float32, one per FLOAT8_BLOCK elements of the flat buffer, the last block partial)."""
    return (int(elements),), (float8_scale_count(elements),)


def float8_state_bytes(elements):
    """Bytes an FP8 velocity over `elements` elements holds: 1 + 4 / FLOAT8_BLOCK each."""
    return int(elements) + 4 * float8_scale_count(elements)


FLOAT8_BYTES_PER_ELEMENT = 1 + 4 / FLOAT8_BLOCK


def named_dtype(name, value):
    """`value` (a dtype, a type or a name such as "bfloat16") as a NumPy dtype; TypeError
    naming `name` when it is none, or when bfloat16 is asked for without ml_dtypes."""
    if isinstance(value, str) and value in ("bfloat16", FLOAT8_VELOCITY):
        try:
            import ml_dtypes
        except ImportError as error:
            raise TypeError(f"Invalid {name} value: {value!r} ({value} needs ml_dtypes: "
                            f"{BFLOAT16_EXTRA}; {error})") from None
        return np.dtype(getattr(ml_dtypes, value))
    try:
        return np.dtype(value)
    except TypeError:
        raise TypeError(f"Invalid {name} value: {value!r} ({name} must be a dtype or "
                        f"its name, such as 'float32' or 'bfloat16')") from None


def check_key_integer(name, value, bits):
    """`value` as an int in [0, 2**bits), after checking it is one (NumPy integers too):
    TypeError for a non-integer, ValueError out of range, naming `name`."""
    why = f"({name} must be an integer in [0, 2**{bits}))"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name} value: {value!r} {why}")
    if not 0 <= value < 2**bits:
        raise ValueError(f"Invalid {name} value: {value!r} {why}")
    return int(value)


def check_seed(seed):
    """`seed` as an int in [0, 2**64) (stochastic rounding's key), after checking it."""
    return check_key_integer("seed", seed, 64)


def _velocity_dtype(value, param, allowed):
    """velocity_dtype's `value` as a dtype: a name NumPy and ml_dtypes do not know is a
    ValueError naming it and the dtypes `param` parameters can have (a known name whose
    package is missing stays named_dtype's TypeError)."""
    try:
        return named_dtype("velocity_dtype", value)
    except TypeError:
        if not isinstance(value, str) or value in ("bfloat16", FLOAT8_VELOCITY):
            raise  # not a name, or a known one whose package (ml_dtypes) is missing
        names = [d.name for d in allowed]
        if float8_precisions(param):
            names.append(FLOAT8_VELOCITY)
        raise ValueError(f"Invalid velocity_dtype value: {value!r} (not a dtype; {param} "
                         f"parameters can have {names})") from None


@dataclasses.dataclass(frozen=True)
class Precision:
    """How parameters of `param_dtype` are updated; invalid combinations cannot exist.

    velocity_dtype None means the default (float32 for 16-bit parameters, else the param
    dtype); float8_e4m3fn (ml_dtypes') is the FP8 velocity of float32 and 16-bit
    parameters, with which float32 parameters have "stochastic" too (rounding the codes
    alone)."""

    param_dtype: np.dtype
    precision: str = "nearest"
    velocity_dtype: np.dtype = None
    seed: int = 0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        param = np.dtype(self.param_dtype)
        set_("param_dtype", param)
        check_precision_name(self.precision)
        allowed = velocity_dtypes(param)
        velocity = (allowed[0] if self.velocity_dtype is None else
                    _velocity_dtype(self.velocity_dtype, param, allowed))
        if is_float8(velocity):
            modes = float8_precisions(param)
            if not modes:
                raise ValueError(f"Invalid velocity_dtype value: {velocity.name!r} ({param} "
                                 f"parameters cannot have an FP8 velocity; float32, "
                                 f"bfloat16 and float16 parameters can)")
            if self.precision not in modes:
                raise ValueError(f"Invalid precision value: {self.precision!r} ({param} "
                                 f"parameters with a {velocity.name} velocity have "
                                 f"{modes})")
            allowed = (velocity,)
        elif self.precision != "nearest" and not is_16_bit(param):
            raise ValueError(f"Invalid precision value: {self.precision!r} ({param} "
                             f"parameters are computed in their own precision: only "
                             f"'nearest' applies to them; the other modes are for "
                             f"bfloat16 and float16 parameters)")
        if velocity not in allowed:
            names = " or ".join(repr(d.name) for d in allowed)
            raise ValueError(f"Invalid velocity_dtype value: {velocity.name!r} ({param} "
                             f"parameters keep a {names} velocity)")
        set_("velocity_dtype", velocity)
        set_("seed", check_seed(self.seed))

    @property
    def float8(self):
        """Whether the velocity is an FP8 one (codes and block scales)."""
        return is_float8(self.velocity_dtype)

    @property
    def buffer_dtype(self):
        """The dtype of the mode's extra buffer, or None."""
        return precision_buffer_dtype(self.param_dtype, self.precision)

    @property
    def buffer_name(self):
        """"compensation" (kahan), "master" (master), or None."""
        return PRECISION_BUFFER_NAMES.get(self.precision)

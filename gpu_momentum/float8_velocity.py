"""An FP8 velocity as the backends take it: E4M3 codes and one float32 scale per block.

The format is reference.quantize_velocity's: element i's velocity is
e4m3_to_float32(codes[i]) * scales[i // FLOAT8_BLOCK], blocks counted from the start of
the flat buffer (segment boundaries and padding do not start new blocks; padding's
velocity is 0). Both arrays are zero at the start: every velocity 0.
"""

from typing import Any, NamedTuple

import numpy as np

from .kernels.layout import FLOAT8_VELOCITY
from .precision import float8_state_shapes


class Float8Velocity(NamedTuple):
    """The two arrays of an FP8 velocity, in one backend's memory: `codes` uint8[n] and
    `scales` float32[ceil(n / FLOAT8_BLOCK)], both updated in place by a step."""

    codes: Any
    scales: Any

    dtype_name = FLOAT8_VELOCITY

    @property
    def size(self):
        """The number of elements (velocities) it holds."""
        return self.codes.size


def zeros_float8_velocity(backend, elements):
    """A zero FP8 velocity over `elements` elements in `backend`'s memory."""
    codes_shape, scales_shape = float8_state_shapes(elements)
    return Float8Velocity(backend.zeros(codes_shape, np.uint8),
                          backend.zeros(scales_shape, np.float32))


def is_float8_velocity(velocity):
    """Whether a velocity argument is an FP8 one (a Float8Velocity)."""
    return isinstance(velocity, Float8Velocity)

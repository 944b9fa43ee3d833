"""gpu-momentum: the momentum-SGD update in one fused pass over a flat parameter buffer."""

from .backends import BackendUnavailableError, available_backends
from .checkpoint import CheckpointError
from .flat import FlatParams
from .float8_velocity import Float8Velocity
from .functional import momentum_step
from .optimizer import MomentumSGD

__version__ = "0.1.0"
__all__ = ["momentum_step", "MomentumSGD", "FlatParams", "Float8Velocity",
           "available_backends",
           "BackendUnavailableError", "CheckpointError", "__version__"]

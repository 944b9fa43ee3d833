"""One rank's shard: where it lies in the flat buffer (`shard_bounds`) and the update of
its elements alone (`ShardUpdate`), with the 16-bit settings sharding refuses."""

import numbers

from ..arrays import describe
from ..flat import aligned, vector_elements
from ..optimizer import MomentumSGD
from .agreement import abbreviated


def shard_bounds(size, ranks, itemsize):
    """[(start, stop)] of each rank's shard of a `size`-element buffer of `itemsize`-byte
    elements: contiguous and in rank order, covering [0, size); every start is a multiple
    of one 128-bit vector (16 // itemsize elements); the buffer's vectors (the last may be
    partial) are dealt as evenly as they go, rank r getting floor((r + 1) V / N) -
    floor(r V / N) of the V vectors, so sizes differ by at most one vector. On two ranks
    or more, sizes are all equal exactly when size is a multiple of ranks * (16 //
    itemsize) (NCCL's reduce-scatter and all-gather then apply)."""
    for name, value, least in (("size", size, 0), ("ranks", ranks, 1),
                               ("itemsize", itemsize, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"Invalid {name} value: {abbreviated(value)} ({name} must be "
                             f"an integer >= {least})")
    vector = vector_elements(itemsize)  # one 128-bit vector
    vectors = aligned(size, itemsize) // vector
    edges = [min(size, vector * (rank * vectors // ranks)) for rank in range(ranks + 1)]
    return [(edges[rank], edges[rank + 1]) for rank in range(ranks)]


class ShardUpdate(MomentumSGD):
    """MomentumSGD over the elements [start, stop) of its buffer alone: the update a rank
    makes of its shard, with the groups and hyperparameters of the whole buffer.

    Its public methods below are how ShardedMomentumSGD drives it; they reach
    MomentumSGD through the interface it declares for subclasses (gpu_momentum.optimizer).
    None of them talks to other ranks: the caller agrees first."""

    def __init__(self, params, window, **options):
        self._window = window
        super().__init__(params, **options)

    @property
    def array_backend(self):
        """The Backend object updating the shard (`backend` is its name)."""
        return self._backend

    @property
    def hyperparameters_version(self):
        """A number that changes with every change of the hyperparameters (a setter, a
        loaded state)."""
        return self._hypers_version

    def hyperparameters(self):
        """Every group's hyperparameters ([0]: the optimizer's own), as dicts."""
        return [hyper.as_dict() for hyper in self._hypers]

    def gradient(self, grad):
        """`grad`, or the FlatParams' gradient buffer (the whole buffer's) for None."""
        return self._gradient(grad)

    def update(self, grad, inv_grad_scale, agree=None):
        """The fused update of the shard with `grad` (the shard's gradient, of its shape)
        multiplied by `inv_grad_scale`; `agree` as in Backend.step, with skip_nonfinite.
        A step's update alone: no collectives, and none of step()'s checks of
        grad_scale."""
        self._step(grad, inv_grad_scale, agree)

    def checked_state(self, state, params=None):
        """Validates `state` and `params` (the shard's) as load_state_dict does and returns
        a function without arguments that restores them, which cannot fail."""
        return self._checked_state(state, params)


def check_sharded_precision(local):
    """ValueError for the 16-bit settings sharding does not carry: stochastic rounding
    keys its random bits by an element's index in the buffer a kernel sees (a shard's
    would differ from one process's), the compensation and master buffers and a 16-bit
    velocity are not gathered into checkpoints, and MPI has no bfloat16 sum. An FP8
    velocity's block scales would not follow a shard's edges."""
    if local.precision != "nearest":
        raise ValueError(f"Invalid precision value: {local.precision!r} "
                         f"(ShardedMomentumSGD updates with precision 'nearest' only)")
    if local.velocity_dtype.itemsize < 4:  # 16-bit or FP8
        raise ValueError(f"Invalid velocity_dtype value: {local.velocity_dtype.name!r} "
                         f"(ShardedMomentumSGD keeps a float32 or float64 velocity)")
    if describe("params", local.param).dtype.name == "bfloat16":
        raise TypeError("params has dtype bfloat16, which ShardedMomentumSGD does not "
                        "update (its collectives sum float16, float32 and float64)")

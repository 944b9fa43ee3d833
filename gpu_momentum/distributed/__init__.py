"""Past one device: ZeRO-1 sharding of the flat buffer over MPI processes.

`ShardedMomentumSGD` is `MomentumSGD` for data-parallel training over the N processes
(ranks) of an MPI communicator (mpi4py). Every rank holds the full parameters and its own
gradient, but updates only its shard of the flat buffer and keeps the velocity of that
shard alone (stage 1 of DeepSpeed's ZeRO; `torch.distributed.optim.
ZeroRedundancyOptimizer` per tensor). A step on every rank:

1. reduce-scatter of the gradients: rank r receives the sum over ranks of its shard, and
   the update divides it by N (folded into grad_scale, so inside the same fused pass);
2. the fused update of its shard (MomentumSGD's kernels, parameter groups cut at the
   shard's edges) with its shard's velocity;
3. all-gather of the parameters in place: every rank ends with identical parameters.

The collectives are one interface (`Collectives`) with two implementations sharing
everything else: `MpiCollectives` (NumPy buffers; GPU buffers too with a CUDA-aware MPI,
which waits for the stream before each call) and `NcclCollectives` (GPU buffers: CuPy's
NCCL bindings, queued on the arrays' stream with no host synchronisation).

Modules: `agreement` (every collective call first learns whether every rank can go on),
`collectives` (the transports), `shard` (the shard rule and one rank's update of its
shard, a MomentumSGD subclass), `sharded` (ShardedMomentumSGD).

Shards (`shard_bounds`) are contiguous, in rank order, start on a 16-byte (128-bit vector)
boundary and differ in size by at most one vector. Importing this module imports neither
mpi4py nor CuPy; `import gpu_momentum` does not import this package.
"""

from .collectives import (COLLECTIVES, Collectives, MpiCollectives, NcclCollectives,
                          cuda_aware_mpi_reason)
from .shard import shard_bounds
from .sharded import ShardedMomentumSGD

__all__ = ["ShardedMomentumSGD", "shard_bounds", "Collectives", "MpiCollectives",
           "NcclCollectives", "cuda_aware_mpi_reason", "COLLECTIVES"]

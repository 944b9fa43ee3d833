"""GPU checks of gpu_momentum.distributed, on every rank of one mpiexec run (started by
tests/test_distributed.py's gpu-marked tests): CuPy arrays, so the collectives are NCCL's,
through the same code path as the CPU runs; every rank on GPU 0 (one rank per GPU is the
usual launch; two ranks sharing one need NCCL_MULTI_RANK_GPU_ENABLE=1 on NCCL 2.30+).

Against MomentumSGD on the same GPU fed the sum of the gradients with grad_scale N:
bitwise on 1 and 2 ranks (a sum of two is the same in either order), over equal and
unequal shards, groups, skip_nonfinite with one rank overflowing. Prints "nccl checks
passed on N rank(s)" on rank 0.
"""

import cupy
import numpy as np
from mpi4py import MPI

import gpu_momentum as gm
from gpu_momentum.distributed import ShardedMomentumSGD

COMM = MPI.COMM_WORLD
RANK, RANKS = COMM.Get_rank(), COMM.Get_size()


def check(sizes, dtype, steps=12, **options):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(size).astype(dtype) for size in sizes]
    flat = gm.FlatParams.from_arrays([cupy.asarray(a) for a in arrays])
    reference_flat = gm.FlatParams.from_arrays([cupy.asarray(a) for a in arrays])
    sharded = ShardedMomentumSGD(flat, comm=COMM, **options)
    reference = gm.MomentumSGD(reference_flat, **options)
    assert sharded.collectives == "nccl" and sharded.backend == reference.backend
    for step in range(steps):
        grads = [np.random.default_rng([step, rank]).standard_normal(flat.data.size)
                 .astype(dtype) * (1 + rank) for rank in range(RANKS)]
        if step == 4 and options.get("skip_nonfinite"):
            grads[-1][0] = np.inf
        total = grads[0].copy()
        for grad in grads[1:]:
            total += grad
        sharded.step(cupy.asarray(grads[RANK]))
        # The sum divided inside the update, as the sharded step divides its shard's sum
        # (an average formed in float16 would round where the update's float32 does not).
        reference.step(cupy.asarray(total), grad_scale=float(RANKS))
        mine, want = cupy.asnumpy(flat.data), cupy.asnumpy(reference_flat.data)
        digests = COMM.allgather(mine.tobytes())
        assert all(d == digests[0] for d in digests), f"ranks differ after step {step}"
        start, stop = sharded.shard
        velocity = cupy.asnumpy(reference.velocity)[start:stop]
        if RANKS <= 2:
            assert mine.tobytes() == want.tobytes(), f"params differ at step {step}"
            assert cupy.asnumpy(sharded.velocity).tobytes() == velocity.tobytes()
        else:
            scale = max(np.abs(want).max(), 1e-30)
            bound = {2: 4e-3, 4: 2e-6, 8: 1e-12}[np.dtype(dtype).itemsize]
            assert np.abs(mine.astype(np.float64) - want).max() <= bound * scale
    assert sharded.step_count == reference.step_count
    assert sharded.skipped_steps == reference.skipped_steps


for dtype in (np.float32, np.float64, np.float16):
    check([1024, 3 * 1024], dtype, lr=0.05, momentum=0.9)  # equal shards
    check([1023, 5, 4099], dtype, lr=0.05, momentum=0.9, style="torch", nesterov=True,
          skip_nonfinite=True, groups=[{"params": [1, 2], "lr": 0.01, "l1": 0.001}])
if RANK == 0:
    print(f"nccl checks passed on {RANKS} rank{'s' if RANKS > 1 else ''}", flush=True)

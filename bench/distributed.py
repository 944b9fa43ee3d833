"""ShardedMomentumSGD against MomentumSGD plus an allreduce of the gradient, on the ranks
of one MPI job: `gpu-momentum bench --ranks 1 2 4` starts one job per N, or run

    mpiexec -n N python -m mpi4py -m gpu_momentum.bench.distributed [--sizes 20 24 ...]

Per size, rank 0 prints a row with the time of a whole step (the slowest rank's, the
median over samples), the update's own time on a rank, the bytes each rank sends per step
(the model of ring collectives: 2(N-1)/N of the buffer for both), against the same
buffer updated unsharded after an allreduce (sum) of the gradient. CPU runs use NumPy
buffers and MPI; `--device cuda` uses CuPy buffers and NCCL (one rank per GPU: GPU
local rank % GPU count). Nothing here is written to bench/results: the numbers depend on
the machine and its interconnect.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def _arguments(argv):
    parser = argparse.ArgumentParser(prog="gpu_momentum.bench.distributed",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 22, 24],
                        metavar="LOG2", help="buffer sizes as exponents of two")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--json", metavar="PATH", help="rank 0 writes the rows here")
    return parser.parse_args(argv)


class _Job:
    """What the timings need of the device: arrays, waiting, an allreduce."""

    def __init__(self, comm, device):
        self.comm, self.device = comm, device
        if device == "cuda":
            import cupy
            from mpi4py import MPI

            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
            cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
            self.xp = cupy
        else:
            self.xp = np

    def array(self, values):
        return self.xp.asarray(values)

    def wait(self):
        if self.device == "cuda":
            self.xp.cuda.get_current_stream().synchronize()

    def allreduce(self, sharded, grad):
        """Sums `grad` over ranks in place, through the sharded optimizer's collectives:
        MPI on the host, its NCCL communicator on a GPU."""
        sharded.collective_calls.all_reduce(grad)

    def seconds(self, call, samples):
        """Per sample, the slowest rank's time of `call()`; the median."""
        from mpi4py import MPI

        times = []
        for _ in range(samples + 2):  # two warm-up calls
            self.wait()
            self.comm.Barrier()
            start = time.perf_counter()
            call()
            self.wait()
            times.append(self.comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        return float(np.median(times[2:]))


def measure(comm, job, size, dtype, samples):
    """One row: the sharded and the unsharded step over `size` elements."""
    import gpu_momentum as gm
    from gpu_momentum.distributed import ShardedMomentumSGD

    ranks = comm.Get_size()
    values = np.random.default_rng(0).standard_normal(size).astype(dtype)
    grad = job.array(np.random.default_rng([1, comm.Get_rank()]).standard_normal(size)
                     .astype(dtype))
    sharded = ShardedMomentumSGD(job.array(values), comm=comm, lr=1e-3, momentum=0.9)
    plain = gm.MomentumSGD(job.array(values), lr=1e-3, momentum=0.9)
    scratch = grad.copy()
    local = sharded.shard_optimizer
    shard_grad = grad[slice(*sharded.shard)]

    def unsharded():
        scratch[...] = grad
        job.allreduce(sharded, scratch)
        plain.step(scratch, grad_scale=float(ranks))

    itemsize = np.dtype(dtype).itemsize
    row = {"ranks": ranks, "size": size, "dtype": str(np.dtype(dtype)),
           "device": job.device, "collectives": sharded.collectives,
           "sharded_step_s": job.seconds(lambda: sharded.step(grad), samples),
           "sharded_update_s": job.seconds(lambda: local.update(shard_grad, 1.0), samples),
           "unsharded_step_s": job.seconds(unsharded, samples),
           "unsharded_update_s": job.seconds(lambda: plain.step(grad), samples),
           "bytes_sent_per_rank": 2 * (ranks - 1) * size * itemsize // ranks,
           "velocity_bytes_per_rank": int(sharded.velocity.nbytes),
           "unsharded_velocity_bytes": int(plain.velocity.nbytes)}
    return row


def _table(rows):
    lines = [f"{'N':>3} {'size':>10} {'sharded step':>13} {'its update':>11} "
             f"{'unsharded step':>15} {'its update':>11} {'sent/rank':>10} "
             f"{'velocity/rank':>14}"]
    for row in rows:
        lines.append(f"{row['ranks']:>3} {row['size']:>10} "
                     f"{row['sharded_step_s'] * 1e3:>10.3f} ms {row['sharded_update_s'] * 1e3:>8.3f} ms "
                     f"{row['unsharded_step_s'] * 1e3:>12.3f} ms "
                     f"{row['unsharded_update_s'] * 1e3:>8.3f} ms "
                     f"{row['bytes_sent_per_rank'] / 2**20:>7.1f} MiB "
                     f"{row['velocity_bytes_per_rank'] / 2**20:>10.1f} MiB")
    return "\n".join(lines)


def main(argv=None):
    from mpi4py import MPI

    args = _arguments(argv)
    comm = MPI.COMM_WORLD
    job = _Job(comm, args.device)
    rows = [measure(comm, job, 2**exponent, np.dtype(args.dtype), args.samples)
            for exponent in args.sizes]
    if comm.Get_rank() == 0:
        print(f"{comm.Get_size()} rank(s), {args.device}, {args.dtype}, "
              f"{rows[0]['collectives'] if rows else ''}; times are medians of the slowest "
              f"rank; sent/rank is the ring collectives' model, 2(N-1)/N of the buffer, "
              f"for both steps")
        print(_table(rows), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(rows, out, indent=1)
    return 0


def launch(ranks, argv):
    """`gpu-momentum bench --ranks ...`: one mpiexec job per rank count, in turn; returns
    the first nonzero exit status, else 0."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("gpu-momentum bench --ranks needs mpiexec: pip install "
                         "'gpu-momentum[mpi]' (or a system MPI on PATH)")
    cores = len(os.sched_getaffinity(0))
    for count in ranks:
        command = [mpiexec, "-n", str(count), sys.executable, "-m", "mpi4py", "-m",
                   "gpu_momentum.bench.distributed", *argv]
        # The ranks share this machine's cores: Numba threads split between them, and
        # where ranks outnumber cores, MPICH's Bruck all-gather (its default ring then
        # runs an order of magnitude slower; other MPIs ignore the variable).
        env = {"NUMBA_NUM_THREADS": str(max(1, cores // count)), **os.environ}
        if count > cores:
            env.setdefault("MPIR_CVAR_ALLGATHERV_INTRA_ALGORITHM", "brucks")
        status = subprocess.run(command, env=env).returncode
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())

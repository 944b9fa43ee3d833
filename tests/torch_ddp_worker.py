"""Two gloo ranks on the CPU train one model under DistributedDataParallel with
torch.optim.SGD and with gpu_momentum.torch.SGD, under both gradient_as_bucket_view
settings; each rank writes its final parameters to OUT_DIR/rank<r>.pt.

    python tests/torch_ddp_worker.py OUT_DIR PORT RANK     (tests/test_torch_ddp.py starts
                                                           one process per rank)
"""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STEPS = 12
WORLD = 2


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).double()


def train(optimizer_class, rank, bucket_view):
    """Trains a fresh model on this rank's data; the parameters at the end, and where the
    gradients lived (the optimizer's flat buffer or DDP's buckets)."""
    net = model()
    ddp = DistributedDataParallel(net, gradient_as_bucket_view=bucket_view,
                                  bucket_cap_mb=0.001)  # several buckets
    opt = optimizer_class(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        x = torch.randn(5, 6, generator=generator, dtype=torch.float64)
        y = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        opt.zero_grad(set_to_none=step % 3 != 2)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def run(rank, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from gpu_momentum.torch import SGD

    results = {}
    for bucket_view in (False, True):
        for name, cls in (("torch", torch.optim.SGD), ("gpu_momentum", SGD)):
            results[(name, bucket_view)] = train(cls, rank, bucket_view)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    run(int(sys.argv[3]), sys.argv[1], int(sys.argv[2]))

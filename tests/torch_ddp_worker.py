"""Two gloo ranks on the CPU train one model under DistributedDataParallel with
torch.optim.SGD and with gpu_momentum.torch.SGD, under both gradient_as_bucket_view
settings, and with find_unused_parameters=True and a layer that one rank uses and the
other not (or neither); each rank writes its final parameters to OUT_DIR/rank<r>.pt.

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
# (gradient_as_bucket_view, find_unused_parameters)
SETTINGS = [(False, False), (True, False), (False, True), (True, True)]


class Model(torch.nn.Module):
    """Layers every rank uses, and a spare one the forward uses when told."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, 3))
        self.spare = torch.nn.Linear(6, 3)

    def forward(self, x, use_spare=True):
        out = self.body(x)
        return out + self.spare(x) if use_spare else out


def model():
    torch.manual_seed(0)
    return Model().double()


def uses_spare(find_unused, rank, step):
    """With find_unused_parameters: rank 0 uses the spare layer at most steps, rank 1 at
    every third, neither at steps 7 and 11."""
    if not find_unused:
        return True
    return (rank == 0 and step % 4 != 3) or step % 3 == 0


def train(optimizer_class, rank, bucket_view, find_unused):
    """Trains a fresh model on this rank's data; the parameters at the end, and whether
    each backward after the first left every .grad the tensor that the optimizer's
    zero_grad had left there."""
    net = model()
    ddp = DistributedDataParallel(net, gradient_as_bucket_view=bucket_view,
                                  bucket_cap_mb=0.001,  # several buckets
                                  find_unused_parameters=find_unused)
    opt = optimizer_class(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(100 + rank)
    kept = True
    for step in range(STEPS):
        x = torch.randn(5, 6, generator=generator, dtype=torch.float64)
        y = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        opt.zero_grad(set_to_none=step % 3 != 2)
        grads = [p.grad for p in net.parameters()]
        out = ddp(x, use_spare=uses_spare(find_unused, rank, step))
        torch.nn.functional.mse_loss(out, y).backward()
        if step:  # (in a process group the first backward's gradients are autograd's)
            kept &= all(p.grad is grad for p, grad in zip(net.parameters(), grads))
        opt.step()
    return [p.detach().clone() for p in net.parameters()], kept


def run(rank, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from gpu_momentum.torch import SGD

    results = {}
    for bucket_view, find_unused in SETTINGS:
        for name, cls in (("torch", torch.optim.SGD), ("gpu_momentum", SGD)):
            results[(name, bucket_view, find_unused)] = train(cls, rank, bucket_view,
                                                              find_unused)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    run(int(sys.argv[3]), sys.argv[1], int(sys.argv[2]))

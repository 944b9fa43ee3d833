"""gpu_momentum.torch.SGD under DistributedDataParallel: two gloo processes on the CPU
(tests/torch_ddp_worker.py) end with the parameters torch.optim.SGD reaches, under both
gradient_as_bucket_view settings (DDP copies its reduced buckets into our gradient views,
or hands its bucket views over as .grad)."""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import os
import socket
import subprocess
import sys

import pytest

from harness import library_env, require

torch = require("torch")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ddp_worker.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_on_two_gloo_processes_ends_where_torch_sgd_does(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip(f"torch {torch.__version__} has no gloo backend")
    from gpu_momentum.torch import SGD
    warm = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # compile the CPU
    warm.grad = torch.ones(3, dtype=torch.float64)                  # kernel once, here:
    SGD([warm], lr=0.1, momentum=0.9).step()                        # the ranks load it
    env = {**library_env(), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, WORKER, str(tmp_path), port, str(rank)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for bucket_view in (False, True):
        for rank, results in enumerate(ranks):
            theirs, ours = results[("torch", bucket_view)], results[("gpu_momentum",
                                                                      bucket_view)]
            for index, (a, b) in enumerate(zip(ours, theirs)):
                error = (a - b).abs().max().item()
                assert error <= 1e-12 * max(1.0, b.abs().max().item()), (
                    f"gradient_as_bucket_view={bucket_view}, rank {rank}, param {index}: "
                    f"{error:.3g} from torch.optim.SGD")
        for a, b in zip(ranks[0][("gpu_momentum", bucket_view)],
                        ranks[1][("gpu_momentum", bucket_view)]):
            assert torch.equal(a, b)  # the ranks agree
        start = [p.detach() for p in __import__("torch_ddp_worker").model().parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(
            ranks[0][("gpu_momentum", bucket_view)], start))  # and they trained

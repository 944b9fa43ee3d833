"""gpu_momentum.torch.SGD under DistributedDataParallel: two gloo processes on the CPU
(tests/torch_ddp_worker.py) end with the parameters torch.optim.SGD reaches, under both
gradient_as_bucket_view settings (DDP copies its reduced buckets into our gradient views,
or hands its bucket views over as .grad), also with find_unused_parameters=True and a
layer one rank does not use (DDP writes its reduced gradient into that rank's view)."""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import os
import socket
import subprocess
import sys

import pytest

from harness import library_env, require

torch = require("torch")
TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "torch_ddp_worker.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
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
    worker = __import__("torch_ddp_worker")
    start = [p.detach() for p in worker.model().parameters()]
    for bucket_view, find_unused in worker.SETTINGS:
        setting = (f"gradient_as_bucket_view={bucket_view}, "
                   f"find_unused_parameters={find_unused}")
        for rank, results in enumerate(ranks):
            theirs, _ = results[("torch", bucket_view, find_unused)]
            ours, kept = results[("gpu_momentum", bucket_view, find_unused)]
            for index, (a, b) in enumerate(zip(ours, theirs)):
                error = (a - b).abs().max().item()
                assert error <= 1e-12 * max(1.0, b.abs().max().item()), (
                    f"{setting}, rank {rank}, param {index}: {error:.3g} from "
                    f"torch.optim.SGD")
            # DDP writes its reduced gradients into the optimizer's gradient views
            # (no copy at step()), or hands over its own bucket views.
            assert kept == (not bucket_view), setting
        ours = [ranks[r][("gpu_momentum", bucket_view, find_unused)][0] for r in range(2)]
        for a, b in zip(*ours):
            assert torch.equal(a, b), setting  # the ranks agree
        assert all(not torch.equal(a, b) for a, b in zip(ours[0], start))  # they trained

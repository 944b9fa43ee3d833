"""gpu_momentum.torch.SGD under torch's distributed wrappers, beside torch.optim.SGD under
the same wrapper: two gloo processes on the CPU (tests/torch_wrappers_worker.py, started
once for the whole module) train an MLP and a small CNN in float32 and float64 under
FSDP2's fully_shard (each layer and the root, or the root only), ZeroRedundancyOptimizer
(with and without parameters_as_bucket_view) and FSDP1 (both use_orig_params settings),
and move optimizer state through torch.distributed.checkpoint under FSDP2 in every
direction between the two optimizers. Each case ends, on every rank, within rounding of
what torch.optim.SGD reaches, with the ranks in agreement, and packs its buffers at most
once: storage a wrapper owns is updated where it lives."""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import os
import socket
import subprocess
import sys

import pytest

from harness import library_env, require

torch = require("torch")
TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "torch_wrappers_worker.py")
import torch_wrappers_worker as worker  # noqa: E402  (after torch's require)

LAUNCH_TIMEOUT_S = 300
# Rounding of one step's last operation: half a unit in the last place of 1.0 (the
# parameters stay below 1 in magnitude), as under DDP.
TOLERANCE = {"float32": torch.finfo(torch.float32).eps / 2,
             "float64": torch.finfo(torch.float64).eps / 2}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every case's results on each rank, from one launch of two gloo processes."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip(f"torch {torch.__version__} has no gloo backend")
    from gpu_momentum.torch import SGD
    warm = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # compile the CPU
    warm.grad = torch.ones(3, dtype=torch.float64)                  # kernel once, here:
    SGD([warm], lr=0.1, momentum=0.9).step()                        # the ranks load it
    out_dir = tmp_path_factory.mktemp("wrappers")
    env = {**library_env(), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, WORKER, str(out_dir), port, str(rank)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for rank in range(worker.WORLD)]
    try:
        outputs = [process.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
                   for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(worker.WORLD)]


def finished(outcome, label, case, rank):
    """The parameters a run ended with (by name) and its pack count; fails with the
    run's traceback where it raised."""
    result, error, packs = outcome[label]
    assert error is None, f"{case}, rank {rank}, {label} raised:\n{error}"
    return result, packs


def assert_close(ours, theirs, dtype, what):
    assert ours.keys() == theirs.keys(), what
    tolerance = TOLERANCE[dtype]
    for key, expected in theirs.items():
        error = (ours[key] - expected).abs().max().item()
        assert error <= tolerance * max(1.0, expected.abs().max().item()), (
            f"{what}, {key}: {error:.3g} from torch.optim.SGD")


def assert_ranks_agree(states, what):
    for key in states[0]:
        assert all(torch.equal(state[key], states[0][key]) for state in states), (
            f"{what}, {key}: the ranks disagree")


def initial_state(case):
    name, dtype = case.split("-")[-2:]
    start = worker.model(name, dtype).state_dict()
    return {key: value.detach() for key, value in start.items()}


@pytest.mark.parametrize("case", worker.CASES)
def test_wrapper_trains_as_torch_sgd_does(ranks, case):
    dtype = case.split("-")[-1]
    ours_on_ranks = []
    for rank, results in enumerate(ranks):
        theirs, _ = finished(results[case], "torch", case, rank)
        ours, packs = finished(results[case], "gpu_momentum", case, rank)
        assert_close(ours, theirs, dtype, f"{case}, rank {rank}")
        assert packs <= 1, f"{case}, rank {rank}: packed {packs} times in " \
                           f"{worker.STEPS} steps"
        ours_on_ranks.append(ours)
    assert_ranks_agree(ours_on_ranks, case)
    start = initial_state(case)
    assert all(not torch.equal(ours_on_ranks[0][key], start[key]) for key in start), (
        f"{case}: a parameter never moved")


def test_checkpoint_reference_round_trips(ranks):
    """torch.optim.SGD itself through the checkpoint path: the reference of the cases
    below ran, and its momentum buffers came back."""
    for case in worker.CHECKPOINT_CASES:
        if case.startswith("dcp-torch_to_torch"):
            for rank, results in enumerate(ranks):
                state, _ = finished(results[case], "result", case, rank)
                assert any(key.startswith("momentum_buffer/") for key in state), case


@pytest.mark.parametrize("case", [
    case for case, (saved, loaded, _, _) in worker.CHECKPOINT_CASES.items()
    if (saved, loaded) != ("torch", "torch")])
def test_checkpoint_moves_state_as_torch_sgd_does(ranks, case):
    """Saved by one optimizer, loaded into the other (or the same) under FSDP2: the
    momentum buffers after the load, and the parameters after further steps, are those
    of torch.optim.SGD saving and loading its own."""
    saved, loaded, name, dtype = worker.CHECKPOINT_CASES[case]
    reference = f"dcp-torch_to_torch-{name}-{dtype}"
    states = []
    for rank, results in enumerate(ranks):
        theirs, _ = finished(results[reference], "result", reference, rank)
        ours, packs = finished(results[case], "result", case, rank)
        assert_close(ours, theirs, dtype, f"{case}, rank {rank}")
        ours_count = (saved, loaded).count("gpu_momentum")
        assert packs <= ours_count, (f"{case}, rank {rank}: packed {packs} times for "
                                     f"{ours_count} gpu_momentum.torch.SGD")
        states.append(ours)
    assert_ranks_agree(states, case)

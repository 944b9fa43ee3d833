"""The benchmark's own logic: byte counts, statistics, the candidates and what each one
updates, the options, absent peers, and real `--quick` runs (the report over given rows:
test_bench_report.py). No test asserts a timing."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from gpu_momentum.bench import candidates, command, gpu, report
from gpu_momentum.bench import data as candidates_data
from gpu_momentum.bench.measure import (Sampling, copy_bytes, measure, state_bytes,
                                        stream_bytes, summarize, update_bytes,
                                        velocity_bytes)
from gpu_momentum.kernels.layout import FLOAT8_BLOCK, FLOAT8_VELOCITY
from gpu_momentum.bench.run import (Options, groups, groups_shapes, make_problem,
                                    memory_needed, problems, run, sampling_for, set_threads,
                                    shortfall)
from gpu_momentum.reference import reference_step
from harness import library_env, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
GPU_REASON = gpu.unavailable_reason()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(GPU_REASON is not None,
                                                 reason=f"no GPU: {GPU_REASON}")]


@pytest.mark.parametrize("dtype, velocity, update, stream, copy", [
    ("float32", "float32", 20, 20, 8),
    ("float64", "float64", 40, 40, 16),
    ("float16", "float32", 14, 10, 4),  # the library keeps a float32 velocity
    ("float16", "float16", 10, 10, 4),  # torch and NumPy keep it in the param dtype
])
def test_bytes_per_element(dtype, velocity, update, stream, copy):
    assert update_bytes(dtype, velocity) == update
    assert stream_bytes(dtype) == stream
    assert copy_bytes(dtype) == copy


def test_update_bytes_defaults_to_the_param_dtype():
    assert update_bytes(np.float32) == 20


@pytest.mark.parametrize("velocity, precision, moved", [
    ("float32", "nearest", 14),  # read 2 + 2 + 4, write 2 + 4
    ("float32", "stochastic", 14),  # the random bits cost no traffic
    ("float32", "kahan", 18),  # a 16-bit compensation read and written
    ("float32", "master", 20),  # the float32 master read instead of the params
    ("bfloat16", "nearest", 10),
])
def test_bytes_per_element_of_the_precision_modes(velocity, precision, moved):
    assert update_bytes("bfloat16", velocity, precision) == moved
    assert update_bytes(np.float16, np.float16 if velocity == "bfloat16" else velocity,
                        precision) == moved


# An FP8 velocity per element: one code, and a float32 scale per FLOAT8_BLOCK elements,
# read and written once per step each.
FLOAT8_STATE = 1 + 4 / FLOAT8_BLOCK


@pytest.mark.parametrize("param, precision, moved, state", [
    ("float32", "nearest", 3 * 4 + 2 * FLOAT8_STATE, FLOAT8_STATE),  # 14.03 (20)
    ("bfloat16", "nearest", 3 * 2 + 2 * FLOAT8_STATE, FLOAT8_STATE),  # 8.03 (14)
    ("bfloat16", "stochastic", 3 * 2 + 2 * FLOAT8_STATE, FLOAT8_STATE),
    ("bfloat16", "kahan", 5 * 2 + 2 * FLOAT8_STATE, 2 + FLOAT8_STATE),
    ("float16", "master", 3 * 2 + 2 * FLOAT8_STATE + 8 - 2, 4 + FLOAT8_STATE),
])
def test_bytes_per_element_of_an_fp8_velocity(param, precision, moved, state):
    assert update_bytes(param, FLOAT8_VELOCITY, precision) == pytest.approx(moved)
    assert state_bytes(param, FLOAT8_VELOCITY, precision) == pytest.approx(state)
    assert velocity_bytes(FLOAT8_VELOCITY) == pytest.approx(FLOAT8_STATE)
    assert state_bytes(param, "float32", precision) == pytest.approx(
        state - FLOAT8_STATE + 4)
    assert update_bytes("float32", FLOAT8_VELOCITY) < 20 - 5.9
    assert update_bytes("bfloat16", FLOAT8_VELOCITY) < 14 - 5.9


def test_fp8_state_bytes_are_what_the_optimizer_holds():
    """The benchmark's state bytes per element, against the arrays of a real optimizer
    with an FP8 velocity (codes and scales) over whole blocks."""
    require("ml_dtypes")
    import gpu_momentum as gm

    n = 64 * FLOAT8_BLOCK
    opt = gm.MomentumSGD(np.zeros(n, np.float32), lr=0.1, momentum=0.9,
                         velocity_dtype=FLOAT8_VELOCITY)
    held = opt.velocity_codes.nbytes + opt.velocity_scales.nbytes
    assert held / n == pytest.approx(state_bytes("float32", FLOAT8_VELOCITY))


def test_summarize_gives_median_and_quartiles():
    assert summarize([9, 1, 5, 3, 7, 2, 8, 4, 6]) == (5.0, 3.0, 7.0)
    assert summarize([1.0, 2.0]) == (1.5, 1.25, 1.75)
    assert summarize([0.25]) == (0.25, 0.25, 0.25)


def test_summarize_rejects_no_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])


class FixedTimer:
    """Runs the calls and reports `seconds` per call, to test the sampling plan."""

    def __init__(self, seconds, log=None):
        self.seconds, self.calls, self.log = seconds, [], log

    def time(self, step, calls):
        self.calls.append(calls)
        if self.log is not None:
            self.log.append(("timed", calls))
        for _ in range(calls):
            step()
        return self.seconds


@pytest.mark.parametrize("per_call, max_time, samples, calls", [
    (1e-3, 0.01, 10, 1),  # 1 call reaches 1 ms per sample; 10 samples fill 10 ms
    (1e-4, 1.0, 25, 10),  # 10 calls per sample, samples capped at `samples`
    (0.5, 1.0, 5, 1),  # slow calls: one per sample, never under `min_samples`
])
def test_measure_plans_calls_and_samples(per_call, max_time, samples, calls):
    steps = []
    timer = FixedTimer(per_call)
    sampling = Sampling(samples=25, min_samples=5, warmup_calls=3, warmup_s=0,
                        min_sample_s=1e-3, max_time_s=max_time, rounds=1, rewarm_s=0)
    [(seconds, used)] = measure([lambda: steps.append(1)], [timer], sampling)
    assert used == calls
    assert seconds == [per_call] * samples
    assert timer.calls == [1] + [calls] * samples
    assert len(steps) == 3 + 1 + calls * samples


def test_measure_takes_turns_in_rounds():
    log = []
    fast, slow = FixedTimer(1e-4, log), FixedTimer(1e-2, log)
    sampling = Sampling(samples=7, min_samples=7, warmup_calls=1, warmup_s=0,
                        min_sample_s=1e-3, max_time_s=10, rounds=3, rewarm_s=1e-3)
    found = measure([lambda: log.append("fast"), lambda: log.append("slow")],
                    [fast, slow], sampling)
    assert found == [([1e-4] * 7, 10), ([1e-2] * 7, 1)]
    warm_up_and_estimate = ["fast", ("timed", 1), "fast", "slow", ("timed", 1), "slow"]
    assert log[:6] == warm_up_and_estimate
    owner = {"fast": "fast", ("timed", 10): "fast", "slow": "slow", ("timed", 1): "slow"}
    turns = []  # [candidate, samples in its turn, calls in its turn]
    for entry in log[6:]:
        if not turns or turns[-1][0] != owner[entry]:
            turns.append([owner[entry], 0, 0])
        turns[-1][1 if isinstance(entry, tuple) else 2] += 1
    # 7 samples over 3 rounds: 2, 2, 3; the fast step re-warms (>= 1 call) before each
    # turn, the step slower than rewarm_s does not (its only call is the timed one)
    assert [(name, n) for name, n, _ in turns] == [("fast", 2), ("slow", 2)] * 2 + [
        ("fast", 3), ("slow", 3)]
    for name, samples, calls in turns:
        if name == "fast":
            assert calls > samples * 10
        else:
            assert calls == samples


def test_fp8_rows_sit_out_the_groups_and_overhead_comparisons():
    found, _ = candidates.discover(("cpu",), ("float32", FLOAT8_VELOCITY))
    fp8 = [c for c in found if c.velocity_dtype == FLOAT8_VELOCITY]
    assert [c.name for c in fp8] == [
        "gpu-momentum cpu, FP8 velocity", "gpu-momentum cpu nearest, FP8 velocity",
        "gpu-momentum cpu stochastic, FP8 velocity", "gpu-momentum cpu kahan, FP8 velocity",
        "gpu-momentum cpu master, FP8 velocity"]
    assert fp8[0].runs("float32") and not fp8[0].runs("float64")
    assert all(c.runs("bfloat16") and not c.runs("float32") for c in fp8[1:])
    assert [c.name for c in candidates.groups_comparison(found)] == [
        "gpu-momentum cpu", "gpu-momentum cpu (100 groups)"]
    assert not any(c.velocity_dtype == FLOAT8_VELOCITY
                   for c in candidates.overhead_candidates(found))
    only, _ = candidates.discover(("cpu",), (FLOAT8_VELOCITY,))
    assert [c.name for c in only if c.kind == "backend"] == [c.name for c in fp8]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_rows_do_the_reference_update(dtype):
    """Each FP8-velocity row, two steps, bit for bit the reference's (codes, scales and
    params), at an odd size (a partial last block)."""
    from gpu_momentum.reference import float8_velocity_step

    require("ml_dtypes")
    n = 3 * FLOAT8_BLOCK + 5
    problem = make_problem(n, dtype)
    rows = [c for c in candidates.float8_candidates("cpu", candidates.HostTimer())
            if c.runs(dtype)]
    assert len(rows) == (1 if dtype == "float32" else 4)
    for candidate in rows:
        built = candidate.build(problem)
        built.step()
        built.step()
        precision = candidate.precision or "nearest"
        buffers = {"kahan": {"compensation": np.zeros(n, problem.dtype)},
                   "master": {"master": problem.p0.astype(np.float32)}}.get(precision, {})
        p = problem.p0
        codes, scales = np.zeros(n, np.uint8), np.zeros(-(-n // FLOAT8_BLOCK), np.float32)
        for step in range(2):
            p, codes, scales, new = float8_velocity_step(
                p, problem.g0, codes, scales, precision=precision, step_count=step,
                first_step=step == 0, lr=candidates.LR, momentum=candidates.MOMENTUM,
                **buffers)
            buffers = {name: new for name in buffers}
        assert built.params()[0].tobytes() == p.tobytes(), candidate.name
        assert np.any(codes != 0), "the velocity moved"


def _candidate(name, device, arrays):
    return candidates.Candidate("peer", device, None, update_bytes, None, arrays, peer=name)


def test_memory_cap_and_groups():
    host = [_candidate(f"c{i}", "cpu", arrays) for i, arrays in enumerate((4, 6, 3, 3))]
    assert shortfall(host, 2**20, "float32", {"cpu": 24 * GIB}) is None
    assert [len(g) for g in groups(host, 2**20, "float32", {"cpu": 24 * GIB})] == [4]
    # 2**28 float32 = 1 GiB per array; with the two originals: 2 + 4 + 6 = 12 GiB, then 3+3
    assert [[c.peer for c in g] for g in groups(host, 2**28, "float32", {"cpu": 16 * GIB})
            ] == [["c0", "c1"], ["c2", "c3"]]
    reason = shortfall(host[:1], 2**30, "float64", {"cpu": 24 * GIB})
    assert "needs about 48.0 GiB of cpu memory, 24.0 GiB available" in reason
    # float16 params keep a float32 velocity: arrays are counted at the wider dtype
    gpu_one = [_candidate("g", "cuda", 6)]
    need = memory_needed(gpu_one, 2**30, "float16")
    assert need == {"cpu": 2 * 4 * GIB, "cuda": 6 * 4 * GIB}
    assert "of cuda memory" in shortfall(gpu_one, 2**30, "float16",
                                         {"cpu": 64 * GIB, "cuda": 28 * GIB})


def test_more_threads_than_numba_has_is_refused():
    with pytest.raises(ValueError, match="Invalid threads value"):
        set_threads(numba.config.NUMBA_NUM_THREADS + 1)


def test_sizes_and_quick_defaults():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.log2_sizes("16:18") == [16, 17, 18]
    assert command.log2_sizes("20") == [20]
    for bad in ("x", "18:16", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="Invalid size value"):
            command.log2_sizes(bad)
    quick = command.options_from(parser.parse_args(["--quick"]))
    assert quick.sizes == tuple(2**e for e in command.QUICK["sizes"])
    assert quick.workloads == ("resnet50", "groups", "torch-resnet50")
    assert quick.sampling.samples == 5
    args = parser.parse_args(["--sizes", "20:21", "26", "--workloads"])
    full = command.options_from(args)
    assert full.sizes == (2**20, 2**21, 2**26) and full.workloads == ()
    assert full.sampling.samples == 25
    assert command.options_from(parser.parse_args([])).workloads == (
        "resnet50", "transformer", "groups", "torch-resnet50", "torch-gpt2", "torch-cnn",
        "overhead")
    torch_only = command.options_from(parser.parse_args(["--workloads", "torch"]))
    assert torch_only.workloads == ("torch-resnet50", "torch-gpt2", "torch-cnn")
    only = command.options_from(parser.parse_args(["--sizes", "18", "--workloads", "groups"]))
    assert only.workloads == ("groups",)


def test_velocity_dtypes_option():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.options_from(parser.parse_args([])).velocity_dtypes == ("float32",)
    both = parser.parse_args(["--velocity-dtypes", "float32", FLOAT8_VELOCITY, "float32"])
    assert command.options_from(both).velocity_dtypes == ("float32", FLOAT8_VELOCITY)
    with pytest.raises(SystemExit):
        parser.parse_args(["--velocity-dtypes", "float8_e5m2"])
    with pytest.raises(command.CommandError, match="--ranks .* float32 velocity only"):
        command.run_bench(parser.parse_args(["--ranks", "2", "--velocity-dtypes",
                                             FLOAT8_VELOCITY]))


def test_groups_workload_is_at_the_largest_size_up_to_2_26():
    def n(sizes):
        options = Options(sizes=tuple(2**e for e in sizes), dtypes=("float32",),
                          workloads=("groups",), devices=("cpu",), threads=1,
                          sampling=Sampling())
        [*_, (workload, _, n, shapes)] = problems(options)
        assert workload == "groups" and len(shapes) == candidates.GROUPS
        assert sum(s for (s,) in shapes) == n and len({s for (s,) in shapes[:-1]}) == 1
        return n
    assert n([16, 18, 20]) == 2**20
    assert n([16, 28]) == 2**26 == n(range(16, 29))
    assert n([2]) == candidates.GROUPS  # one element per group at least


SMALL = make_problem(1000, "float32")
TENSORS = make_problem(3 * 4 + 5 + 7 * 2, "float32", shapes=[(3, 4), (5,), (7, 2)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("problem", [SMALL, TENSORS], ids=["flat", "tensors"])
def test_every_update_candidate_does_the_same_update(problem, device):
    """Backends and peers all apply three momentum steps to the same data: none is faked."""
    p, v = problem.p0.astype(np.float64), np.zeros(problem.n)
    for _ in range(3):
        v = candidates.MOMENTUM * v - candidates.LR * problem.g0
        p = p + v
    found, _ = candidates.discover((device,))
    updates = [c for c in found if c.kind != "roofline" and c.runs("float32")]
    assert {c.kind for c in updates} == {"backend", "peer"}
    for candidate in updates:
        built = candidate.build(problem)
        for _ in range(2 if candidate.name.startswith("torch") else 3):
            built.step()  # torch's build already took its first step
        got = np.concatenate([a.reshape(-1) for a in built.params()])
        np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-6, err_msg=candidate.name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_groups_candidates_do_the_reference_update(dtype):
    """The groups comparison's candidates, two steps: one group is the optimizer's own
    hyperparameters everywhere; 100 groups give each segment its group_spec's, as
    reference_step applied per segment (odd segment sizes: padding between segments)."""
    problem = make_problem(sum(s for (s,) in groups_shapes([2**10 + 7])), dtype,
                           shapes=groups_shapes([2**10 + 7]))
    found, _ = candidates.discover(("cpu",))
    one, many = candidates.groups_comparison(found)
    assert (one.name, many.name) == ("gpu-momentum cpu", "gpu-momentum cpu (100 groups)")
    assert (many.backend, many.groups) == (one.backend, 100) and one.groups == 1
    spec = candidates.group_spec(candidates.GROUPS)
    assert len({(g["lr"], g["momentum"], g["weight_decay"]) for g in spec}) == 100
    tolerance = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for candidate, hypers in ((one, [{}] * 100), (many, spec)):
        built = candidate.build(problem)
        built.step()
        built.step()
        got = built.params()
        for i, (p, g) in enumerate(zip(problem.tensors(problem.p0),
                                       problem.tensors(problem.g0))):
            options = {"lr": candidates.LR, "momentum": candidates.MOMENTUM,
                       **{k: v for k, v in hypers[i].items() if k != "params"}}
            v = np.zeros(p.size)
            for first in (True, False):
                p, v = reference_step(p, g, v, first_step=first, **options)
            np.testing.assert_allclose(got[i], p, rtol=tolerance, atol=tolerance,
                                       err_msg=f"{candidate.name}, segment {i}")
    with pytest.raises(candidates.Unsupported, match="100 groups need a workload of 100"):
        many.build(SMALL)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_torch_workload_candidates_do_the_same_update(device, dtype):
    """gpu_momentum.torch.SGD and torch.optim.SGD's variants over the same nn.Parameters:
    three steps of torch-style momentum, equal to the classic update the others do (in
    bfloat16 within its rounding: torch rounds each operation, the library each step)."""
    require("torch")
    if dtype == "bfloat16":
        require("ml_dtypes")
    problem = TENSORS if dtype == "float32" else make_problem(
        TENSORS.n, dtype, shapes=TENSORS.shapes)
    p, v = problem.p0.astype(np.float64), np.zeros(problem.n)
    g = problem.g0.astype(np.float64)
    for _ in range(3):
        v = candidates.MOMENTUM * v - candidates.LR * g
        p = p + v
    tolerance = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}[dtype]
    found, absent = candidates.torch_workload((device,))
    assert [(c.kind, c.name) for c in found if c.kind == "backend"][:1] == [
        ("backend", f"gpu_momentum.torch.SGD ({'cpu' if device == 'cpu' else 'cupy'})")]
    assert {c.peer for c in found if c.kind == "peer"} == {
        "torch SGD for-loop", "torch SGD foreach", "torch SGD fused"}
    assert {c.name for c in found if c.schedule == "OneCycleLR"} == {
        f"gpu_momentum.torch.SGD ({'cpu' if device == 'cpu' else 'cupy'}) + OneCycleLR",
        f"torch SGD fused + OneCycleLR ({device})"}
    for candidate in found:
        assert candidate.device == device
        if candidate.schedule is not None:
            continue  # test_one_cycle_rows_follow_the_same_schedule
        built = candidate.build(problem)
        for _ in range(2):
            built.step()  # the build took the first step
        got = np.concatenate([a.reshape(-1) for a in built.params()]).astype(np.float64)
        np.testing.assert_allclose(got, p, *tolerance, err_msg=candidate.name)


def test_one_cycle_rows_follow_the_same_schedule():
    """gpu_momentum.torch.SGD and torch fused, each with OneCycleLR stepped after every
    step, take the same steps (the lr changes: the rows differ from the constant ones)."""
    require("torch")
    found, _ = candidates.torch_workload(("cpu",))
    got = {}
    for candidate in found:
        built = candidate.build(TENSORS)
        for _ in range(4):
            built.step()
        got[candidate.name] = np.concatenate([a.reshape(-1) for a in built.params()])
    ours = got["gpu_momentum.torch.SGD (cpu) + OneCycleLR"]
    np.testing.assert_allclose(ours, got["torch SGD fused + OneCycleLR (cpu)"], 1e-5, 1e-6)
    assert not np.allclose(ours, got["gpu_momentum.torch.SGD (cpu)"], 1e-5, 1e-6)


def test_scheduled_overhead_rows_change_the_lr_before_every_step():
    """Every backend, NumPy's two-line update and torch's variants get a row with the lr
    set before every step, the same lrs for all: they take the same steps."""
    require("torch")
    found, _ = candidates.discover(("cpu",))
    timed = candidates.overhead_candidates(found)
    scheduled = [c for c in timed if c.schedule == "lr each step"]
    assert {c.name for c in scheduled} >= {
        "gpu-momentum cpu + lr each step", "numpy two-line + lr each step (cpu)",
        "torch SGD fused + lr each step (cpu)"}
    assert all(type(c.timer).__name__ == "HostTimer" for c in scheduled)
    p, v = SMALL.p0.astype(np.float64), np.zeros(SMALL.n)
    for lr in candidates_data.SCHEDULED_LRS[:3]:
        v = candidates.MOMENTUM * v - lr * SMALL.g0
        p = p + v
    for candidate in scheduled:
        if candidate.peer is not None and candidate.peer.startswith("torch"):
            continue  # torch style, and its build takes a first step at LR
        if candidate.backend is not None and candidate.backend != "cpu":
            continue  # the simulator: slow; the CPU backend stands for the library
        built = candidate.build(SMALL)
        for _ in range(3):
            built.step()
        np.testing.assert_allclose(built.params()[0], p, rtol=1e-5, atol=1e-6,
                                   err_msg=candidate.name)


def test_torch_workload_without_torch_lists_the_adapter_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    found, absent = candidates.torch_workload(("cpu",))
    assert found == []
    reasons = {a.name: a.reason for a in absent}
    assert "torch is not installed" in reasons["gpu_momentum.torch.SGD (cpu)"]
    assert "torch is not installed" in reasons["torch SGD fused (cpu)"]


@pytest.mark.slow
def test_groups_run_measures_the_backends_only_and_reports_the_ratio(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    options = dataclasses.replace(_tiny_options("float32"), workloads=("groups",))
    result = report.finish(run(options), {})
    report.check_schema(result)
    compared = [r for r in result["results"] if r["workload"] == "groups"]
    assert [(r["name"], r["tensors"], r["n"]) for r in compared] == [
        ("gpu-momentum cpu", 100, 2**10), ("gpu-momentum cpu (100 groups)", 100, 2**10)]
    assert (compared[1]["backend"], compared[1]["groups"]) == ("cpu", 100)
    assert compared[1]["groups_ratio"] == pytest.approx(
        compared[1]["median_s"] / compared[0]["median_s"])
    assert "100 groups / 1 group" in report.table(result)


def _tiny_options(dtype):
    return Options(sizes=(2**10,), dtypes=(dtype,), workloads=(), devices=("cpu",),
                   threads=numba.get_num_threads(),  # leaves the process's setting alone
                   sampling=Sampling(samples=2, min_samples=2, warmup_s=0, max_time_s=0.01))


def test_absent_torch_is_listed_never_faked(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    options = _tiny_options("float32")
    result = report.finish(run(options), {})
    report.check_schema(result)
    names = {row["name"] for row in result["results"]}
    assert not any("torch" in name for name in names)
    assert {"gpu-momentum cpu", "numpy naive (cpu)", candidates.ROOFLINES["cpu"]} <= names
    absent = {a["name"]: a["reason"] for a in result["absent"]}
    for variant in ("for-loop", "foreach", "fused"):
        assert "torch is not installed" in absent[f"torch SGD {variant} (cpu)"]
    assert "torch SGD fused (cpu)" not in result["results"][0]["speedup"]


def test_gpu_peers_are_measured_or_listed_with_a_reason():
    found, absent = candidates.discover(("cpu", "cuda"))
    gpu_names = {candidates.CUPY_PEER, candidates.ROOFLINES["cuda"]}
    reason = GPU_REASON
    if reason is None:
        assert gpu_names <= {c.name for c in found}
    else:
        assert {a.name: a.reason for a in absent if a.name in gpu_names} == dict.fromkeys(
            gpu_names, reason)
        assert not any(c.device == "cuda" for c in found)


@pytest.mark.slow
def test_16_bit_dtypes_run_a_row_per_precision_mode(monkeypatch):
    """float16 (bfloat16 alike): the library's rows are the precision modes, each with
    its bytes per element and its elements/s over the float32 row; the float32 row stays
    in the float32 block, and the modes' rows in the 16-bit one."""
    monkeypatch.setitem(sys.modules, "torch", None)
    options = dataclasses.replace(_tiny_options("float32"), dtypes=("float32", "float16"))
    result = report.finish(run(options), {})
    report.check_schema(result)
    rows = {(r["name"], r["dtype"]): r for r in result["results"]}
    modes = {"nearest": 14, "stochastic": 14, "kahan": 18, "master": 20}
    for mode, moved in modes.items():
        row = rows[f"gpu-momentum cpu {mode}", "float16"]
        assert (row["precision"], row["velocity_dtype"], row["bytes_per_element"]) == (
            mode, "float32", moved)
        assert row["float32_ratio"] == pytest.approx(
            row["elements_per_s"] / rows["gpu-momentum cpu", "float32"]["elements_per_s"])
    narrow = rows["gpu-momentum cpu nearest, 16-bit velocity", "float16"]
    assert (narrow["velocity_dtype"], narrow["bytes_per_element"]) == ("float16", 10)
    assert ("gpu-momentum cpu", "float16") not in rows
    assert ("gpu-momentum cpu nearest", "float32") not in rows
    assert rows["numpy naive (cpu)", "float16"]["bytes_per_element"] == 10
    assert not result["skipped"]
    assert "elements/s against float32" in report.table(result)


@pytest.mark.slow
def test_bfloat16_rows_do_the_reference_update():
    """Each precision row of bfloat16, two steps, bit for bit the reference's; the peers
    that run bfloat16 do the same update within its precision (torch 2.13's fused CPU SGD
    in bfloat16 departs by up to 0.09 after two steps: it is held to 0.1)."""
    from gpu_momentum.reference import low_precision_step

    require("ml_dtypes")
    problem = make_problem(1000, "bfloat16")
    found, _ = candidates.discover(("cpu",))
    rows = [c for c in found if c.kind == "backend" and c.runs("bfloat16")]
    assert [c.name for c in rows] == [
        "gpu-momentum cpu nearest", "gpu-momentum cpu stochastic", "gpu-momentum cpu kahan",
        "gpu-momentum cpu master", "gpu-momentum cpu nearest, 16-bit velocity"]
    for candidate in rows:
        built = candidate.build(problem)
        built.step()
        built.step()
        velocity = (np.zeros(1000, problem.dtype) if candidate.velocity_dtype else
                    np.zeros(1000, np.float32))
        buffer = {"kahan": {"compensation": np.zeros(1000, problem.dtype)},
                  "master": {"master": problem.p0.astype(np.float32)}}.get(
                      candidate.precision, {})
        p = problem.p0
        for step in range(2):
            p, velocity, new = low_precision_step(
                p, problem.g0, velocity, precision=candidate.precision, step_count=step,
                first_step=step == 0, lr=candidates.LR, momentum=candidates.MOMENTUM,
                **buffer)
            buffer = {name: new for name in buffer}
        assert built.params()[0].tobytes() == p.tobytes(), candidate.name
    exact_p, exact_v = problem.p0.astype(np.float64), np.zeros(1000)
    for _ in range(2):
        exact_v = candidates.MOMENTUM * exact_v - candidates.LR * problem.g0.astype(float)
        exact_p = exact_p + exact_v
    for peer in (c for c in found if c.kind == "peer"):
        built = peer.build(problem)
        for _ in range(1 if peer.name.startswith("torch") else 2):
            built.step()
        got = np.concatenate([a.reshape(-1) for a in built.params()]).astype(np.float64)
        tolerance = 0.1 if peer.name == "torch SGD fused (cpu)" else 0.015
        assert np.abs(got - exact_p).max() < tolerance, peer.name


def test_python_m_bench_help():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT,
                          env=library_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--json" in done.stdout


@pytest.mark.slow
def test_quick_run_writes_valid_json_and_plot(tmp_path):
    """`gpu-momentum bench --quick` end to end, in its own process (numba before torch)."""
    require("tqdm")
    require("matplotlib")
    json_path, plot_path = tmp_path / "quick.json", tmp_path / "quick.png"
    done = subprocess.run(
        [sys.executable, "-m", "gpu_momentum", "bench", "--quick", "--no-progress",
         "--json", str(json_path), "--plot", str(plot_path), "--save", str(tmp_path / "s")],
        cwd=ROOT, env=library_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "speed-up (peer time / backend time)" in done.stdout
    result = json.loads(json_path.read_text())
    report.check_schema(result)
    assert result["options"]["quick"] is True
    assert result["machine"]["threads"]["numba"] >= 1
    assert result["versions"]["numpy"] == np.__version__
    rows = result["results"]
    assert {r["workload"] for r in rows} == {"flat", "resnet50", "groups", "torch-resnet50"}
    adapter = [r for r in rows if r["workload"] == "torch-resnet50"]
    assert {r["name"] for r in adapter} == {
        "gpu_momentum.torch.SGD (cpu)", "torch SGD for-loop (cpu)",
        "torch SGD foreach (cpu)", "torch SGD fused (cpu)",
        "gpu_momentum.torch.SGD (cpu) + OneCycleLR", "torch SGD fused + OneCycleLR (cpu)"}
    assert "torch.SGD cpu >= 0.95x torch fused, ResNet-50" in done.stdout
    measured = {r["name"] for r in rows}
    absent = {a["name"] for a in result["absent"]}
    for name in ("torch SGD for-loop (cpu)", "torch SGD foreach (cpu)",
                 "torch SGD fused (cpu)"):
        assert name in measured | absent
    for row in rows:
        if row["kind"] == "roofline" and row["name"] == row["roofline"]:
            assert row["roofline_fraction"] == 1.0
        if row["kind"] == "backend" and row["workload"] != "groups":
            peers = {r["name"] for r in rows if r["kind"] == "peer" and r["n"] == row["n"]
                     and r["workload"] == row["workload"] and r["dtype"] == row["dtype"]}
            assert set(row["speedup"]) == peers and peers
    compared = [r for r in rows if r["workload"] == "groups"]
    assert {r["kind"] for r in compared} == {"backend"} and {r["n"] for r in compared} == {
        2**22}
    assert all(r["groups_ratio"] > 0 for r in compared if r["groups"] > 1)
    assert "100 groups / 1 group" in done.stdout
    assert plot_path.read_bytes().startswith(b"\x89PNG")
    saved = tmp_path / "s" / report.result_name(result)
    assert json.loads(saved.with_suffix(".json").read_text()) == result
    assert saved.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert saved.with_suffix(".txt").read_text() in done.stdout


@pytest.mark.slow
def test_quick_fp8_run_reports_its_rows_bytes_and_ratios(tmp_path):
    """`python -m bench --quick --velocity-dtypes float32 float8_e4m3fn` end to end: every
    FP8 row beside its float32-velocity row, with the bytes per element moved and held
    computed from the format, its ratio, and the FP8 targets."""
    require("tqdm")
    require("ml_dtypes")
    json_path = tmp_path / "fp8.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-progress", "--devices", "cpu",
         "--sizes", "16", "--workloads", "none", "--dtypes", "float32", "bfloat16",
         "--velocity-dtypes", "float32", FLOAT8_VELOCITY, "--json", str(json_path)],
        cwd=ROOT, env=library_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(json_path.read_text())
    report.check_schema(result)
    assert result["options"]["velocity_dtypes"] == ["float32", FLOAT8_VELOCITY]
    backends = {(r["dtype"], r["precision"], r["velocity_dtype"]): r
                for r in result["results"] if r["kind"] == "backend"}
    modes = [("float32", "nearest")] + [("bfloat16", mode) for mode in
                                        ("nearest", "stochastic", "kahan", "master")]
    for dtype, mode in modes:
        wide = backends[dtype, mode, "float32"]
        fp8 = backends[dtype, mode, FLOAT8_VELOCITY]
        assert fp8["name"].endswith(", FP8 velocity") and fp8["n"] == 2**16
        assert fp8["bytes_per_element"] == pytest.approx(
            wide["bytes_per_element"] - 2 * (4 - FLOAT8_STATE))
        assert fp8["state_bytes_per_element"] == pytest.approx(
            wide["state_bytes_per_element"] - 4 + FLOAT8_STATE)
        assert fp8["float8_ratio"] == pytest.approx(
            fp8["elements_per_s"] / wide["elements_per_s"])
        assert fp8["gbps"] == pytest.approx(
            fp8["n"] * fp8["bytes_per_element"] / fp8["median_s"] / 1e9)
    assert backends["float32", "nearest", FLOAT8_VELOCITY]["bytes_per_element"] == \
        pytest.approx(14 + 8 / FLOAT8_BLOCK)
    assert backends["bfloat16", "nearest", FLOAT8_VELOCITY]["bytes_per_element"] == \
        pytest.approx(8 + 8 / FLOAT8_BLOCK)
    fp8_targets = [t for t in result["targets"] if "FP8" in t["target"]]
    assert [(t["dtype"], t["goal"], t["met"]) for t in fp8_targets] == [
        ("float32", 1.3, None), ("bfloat16", 1.6, None)]  # measured at 2**26 only
    assert "elements/s, FP8 velocity over float32 velocity" in done.stdout
    assert "state B/elem" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"no GPU: {GPU_REASON}")
def test_quick_gpu_run_times_every_gpu_candidate(tmp_path):
    json_path = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-progress", "--devices", "cuda",
         "--json", str(json_path)], cwd=ROOT, env=library_env(), capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(json_path.read_text())
    report.check_schema(result)
    assert result["machine"]["gpu"]["name"] == result["device"]
    rows = result["results"]
    assert rows and all(r["device"] == "cuda" for r in rows)
    roofline = candidates.ROOFLINES["cuda"]
    assert {candidates.CUPY_PEER, roofline} <= {r["name"] for r in rows}
    for row in rows:
        assert row["roofline"] == roofline and row["roofline_fraction"] is not None


@pytest.mark.parametrize("name", sorted(
    n for n in os.listdir(os.path.join(ROOT, "bench", "results")) if n.endswith(".json")))
def test_committed_results_keep_the_json_shape(name):
    with open(os.path.join(ROOT, "bench", "results", name), encoding="utf-8") as file:
        result = json.load(file)
    report.check_schema(result)
    # -groups: a run of the groups comparison alone (`--workloads groups`);
    # -bf16-torch-overhead: `--dtypes float32 bfloat16 --workloads torch overhead`;
    # -schedules: `--sizes 20 --workloads overhead torch` (the scheduled rows);
    # -fp8: `--dtypes float32 bfloat16 --velocity-dtypes float32 float8_e4m3fn` (the FP8
    # velocity's rows beside the float32 velocity's)
    assert name in {report.result_name(result) + suffix + ".json"
                    for suffix in ("", "-groups", "-bf16-torch-overhead", "-schedules",
                                   "-fp8")}


def test_the_groups_comparison_alternates_sample_by_sample():
    """5% between two runs of one kernel is finer than a shared machine's drift over a
    block of samples: the groups comparison interleaves every sample, after a long
    warm-up; the other workloads keep their blocks."""
    sampling = Sampling()
    grouped = sampling_for("groups", sampling)
    assert grouped.rounds == sampling.samples and grouped.warmup_s >= 2.0
    assert sampling_for("flat", sampling) == sampling


@pytest.mark.slow
def test_overhead_run_times_every_backend_and_peer_by_the_wall_clock(monkeypatch,
                                                                     tmp_path):
    """The overhead workload: one row per backend and peer (no roofline) at every size,
    NumPy's two-line update among them, doing the same update; the plot has its panel."""
    from gpu_momentum.bench import run as run_module

    require("matplotlib")
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(run_module, "OVERHEAD_SIZES", (2**10, 2**11))
    options = dataclasses.replace(_tiny_options("float32"), workloads=("overhead",))
    result = report.finish(run(options), {})
    report.check_schema(result)
    rows = [r for r in result["results"] if r["workload"] == "overhead"]
    names = {r["name"] for r in rows}
    assert {"gpu-momentum cpu", "numpy two-line (cpu)", "numpy naive (cpu)"} <= names
    assert all(r["kind"] != "roofline" for r in rows)
    assert sorted({r["n"] for r in rows}) == [2**10, 2**11]
    assert all(len([r for r in rows if r["name"] == name]) == 2 for name in names)
    met = {t["target"]: t["met"] for t in result["targets"]}
    assert met["cpu step() <= 2x NumPy's two-line update (overhead, 2**10)"] is not None
    assert "overhead (1 tensor), float32:" in report.table(result)
    report.plot(result, tmp_path / "overhead.png")
    assert (tmp_path / "overhead.png").read_bytes().startswith(b"\x89PNG")


def test_overhead_candidates_are_wall_clock_timed_and_do_the_update():
    found, _ = candidates.discover(("cpu",))
    timed = candidates.overhead_candidates(found)
    assert {c.kind for c in timed} == {"backend", "peer"}
    assert all(type(c.timer).__name__ == "HostTimer" for c in timed)
    two_line = next(c for c in timed if c.peer == "numpy two-line")
    built = two_line.build(SMALL)
    p, v = SMALL.p0.astype(np.float64), np.zeros(SMALL.n)
    for _ in range(3):
        built.step()
        v = candidates.MOMENTUM * v - candidates.LR * SMALL.g0
        p = p + v
    np.testing.assert_allclose(built.params()[0], p, rtol=1e-5, atol=1e-6)



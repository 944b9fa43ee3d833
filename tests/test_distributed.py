"""gpu_momentum.distributed: the shard rule, the collectives' plans, and ShardedMomentumSGD
on 3, 2 and 1 MPI ranks (mpiexec from the mpich wheel, started from here).

The MPI runs (tests/mpi_checks.py) batch every check into one launch per N, since each
launch costs seconds of Numba import and compile per rank. They run in the order 3, 2, 1:
each run loads the checkpoint the previous one saved (3 ranks to 2, 2 to 1).

Tolerances against one process fed the average gradient: bitwise with 1 and 2 ranks (the
sum of two gradients is the same in either order and halving it is exact), and with
grads_reduced on any N. With 3 ranks MPI's reduce-scatter sums in an order of its own
and 1/3 is rounded, so results differ from the single process in the last bits, then
carry through the steps; a parameter that passes near zero then has an unbounded
elementwise relative error, so the bound is on max |p - p_ref| / max |p_ref|: 1e-12 in
float64 (measured: about 4e-16), 2e-6 in float32 (16 float32 ulps; measured about
1.6e-7).
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import gpu_momentum as gm
from configs import DISTRIBUTED_ERRORS, SEGMENT_SIZES
from cuda_driver import cuda_device_count
from gpu_momentum.distributed import (NcclCollectives, ShardedMomentumSGD, agreement,
                                      shard_bounds)
from gpu_momentum.distributed.collectives import nccl_module, transport_for
from gpu_momentum.groups import resolve_groups
from gpu_momentum.hyperparams import Hyperparameters
from gpu_momentum.kernels.layout import LAST_STEP_SKIPPED, NO_GROUP
from harness import library_env, missing_tool
from mpi_launch import require_mpi, run_mpi

RANK_COUNTS = (3, 2, 1)
BOUND = {"float64": 1e-12, "float32": 2e-6}


# The shard rule.

@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_shards_are_contiguous_aligned_and_balanced(itemsize):
    vector = 16 // itemsize
    sizes = [*range(0, 300), 1023, 4099, 278011, 2**20 + 3]
    for ranks in range(1, 9):
        for size in sizes:
            bounds = shard_bounds(size, ranks, itemsize)
            assert len(bounds) == ranks
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(stop == next_start for (_, stop), (next_start, _) in
                       zip(bounds, bounds[1:]))
            counts = [stop - start for start, stop in bounds]
            assert min(counts) >= 0 and max(counts) - min(counts) <= vector
            assert all(start % vector == 0 for start, stop in bounds if stop > start)
            assert (len(set(counts)) == 1) == (ranks == 1 or size % (ranks * vector) == 0)


def test_shard_examples():
    assert shard_bounds(1000, 3, 4) == [(0, 332), (332, 664), (664, 1000)]
    assert shard_bounds(3, 3, 4) == [(0, 0), (0, 0), (0, 3)]
    assert shard_bounds(5, 4, 4) == [(0, 0), (0, 4), (4, 4), (4, 5)]  # empty ones spread
    assert shard_bounds(0, 2, 8) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("arguments, name", [((-1, 2, 4), "size"), ((5, 0, 4), "ranks"),
                                             ((5, 2, 0), "itemsize"), ((5.0, 2, 4), "size"),
                                             ((5, True, 4), "ranks")])
def test_shard_bounds_refuses_bad_arguments(arguments, name):
    with pytest.raises(ValueError, match=rf"Invalid {name} value"):
        shard_bounds(*arguments)


def test_a_window_of_a_group_plan_keeps_each_elements_group():
    flat = gm.FlatParams.from_arrays([np.zeros(size) for size in SEGMENT_SIZES])
    total = flat.data.size
    plan = resolve_groups([{"params": [1, 2]}, {"params": [4]}], Hyperparameters(lr=0.1),
                          flat.offsets, flat.sizes, total)  # padding: NO_GROUP ranges
    owner = np.repeat(plan.range_groups, np.diff(plan.range_ends, prepend=0))
    assert NO_GROUP in owner
    for start, stop in [(0, total), (0, 0), (1000, 1030), (1023, 1028), (5, 6),
                        (total - 1, total), (2000, 7000), (total, total)]:
        window = plan.window(start, stop)
        assert window.range_ends[-1] == stop - start
        assert (np.diff(window.range_ends, prepend=0) > 0).all() or stop == start
        assert window.hypers == plan.hypers
        got = np.repeat(window.range_groups, np.diff(window.range_ends, prepend=0))
        assert got.tolist() == owner[start:stop].tolist()


# NCCL's plan, on the CPU: a fake communicator records the calls of every rank, then they
# are carried out with NCCL's semantics on the ranks' NumPy buffers.

class _FakeNccl:
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT64 = 6, 7, 8, 4
    NCCL_SUM, NCCL_MAX = 0, 2

    def __init__(self):
        self.groups = []

    def groupStart(self):
        self.groups.append("start")

    def groupEnd(self):
        self.groups.append("end")


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *arguments: self.calls.append((method, *arguments))


class _Memory:
    """Addresses of the ranks' NumPy buffers, back to (array, element offset)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def view(self, address, count):
        for array in self.arrays:
            base = array.__array_interface__["data"][0]
            if base <= address and address + count * array.itemsize <= base + array.nbytes:
                start = (address - base) // array.itemsize
                return array[start:start + count]
        raise AssertionError(f"address {address:#x} ({count} elements) is in no buffer")


def _carry_out(calls, memory, nccl, stream):
    """Runs the i-th call of every rank together, as NCCL does, checking they match."""
    for together in zip(*calls):
        method = together[0][0]
        assert all(call[0] == method for call in together)
        assert all(call[-1] == stream for call in together)
        if method == "reduceScatter":
            count = together[0][3]
            sends = [memory.view(call[1], count * len(together)).copy() for call in together]
            for rank, call in enumerate(together):
                memory.view(call[2], count)[...] = sum(
                    send[rank * count:(rank + 1) * count] for send in sends)
        elif method == "reduce":
            root, count = together[0][6], together[0][3]
            assert all(call[6] == root and call[3] == count for call in together)
            total = sum(memory.view(call[1], count).copy() for call in together)
            memory.view(together[root][2], count)[...] = total
        elif method == "allGather":
            count = together[0][3]
            sends = [memory.view(call[1], count).copy() for call in together]
            for call in together:
                memory.view(call[2], count * len(together))[...] = np.concatenate(sends)
        elif method == "broadcast":
            root, count = together[0][5], together[0][3]
            value = memory.view(together[root][1], count).copy()
            for call in together:
                memory.view(call[2], count)[...] = value
        elif method == "allReduce":
            count, op = together[0][3], together[0][5]
            assert op in (nccl.NCCL_MAX, nccl.NCCL_SUM)
            reduce = np.maximum.reduce if op == nccl.NCCL_MAX else np.add.reduce
            value = reduce([memory.view(call[1], count).copy() for call in together])
            for call in together:
                memory.view(call[2], count)[...] = value
        else:
            raise AssertionError(f"unexpected NCCL call {method}")


class _Comm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 8, 37, 64])
def test_nccl_collectives_reduce_scatter_and_gather_as_mpi_does(ranks, size):
    nccl, stream = _FakeNccl(), 0x5EED
    bounds = shard_bounds(size, ranks, 8)
    recorders = [_Recorder() for _ in range(ranks)]
    collectives = [NcclCollectives(_Comm(rank, ranks), bounds, nccl, recorders[rank],
                                   lambda: stream) for rank in range(ranks)]
    grads = [np.random.default_rng([rank, size]).standard_normal(size)
             for rank in range(ranks)]
    shards = [np.full(stop - start, np.nan) for start, stop in bounds]
    params = [np.full(size, -1.0) for _ in range(ranks)]
    for rank, (start, stop) in enumerate(bounds):
        params[rank][start:stop] = rank + np.arange(stop - start)
    counters = [np.array([0, 0, rank == ranks - 1, 1], np.int64) for rank in range(ranks)]
    memory = _Memory([*grads, *shards, *params, *counters])

    for rank in range(ranks):
        collectives[rank].reduce_scatter(grads[rank], shards[rank])
        collectives[rank].all_gather(params[rank])
        collectives[rank].agree_skip(counters[rank])
    _carry_out([recorder.calls for recorder in recorders], memory, nccl, stream)

    counts = [stop - start for start, stop in bounds]
    expected_methods = ({"reduceScatter", "allGather"} if len(set(counts)) == 1 else
                        {"reduce", "broadcast"}) if size else set()
    assert {call[0] for call in recorders[0].calls} == expected_methods | {"allReduce"}
    assert [call[5] for call in recorders[0].calls if call[0] == "allReduce"] == [
        nccl.NCCL_MAX]  # agree_skip: a maximum of one counter
    for rank, (start, stop) in enumerate(bounds):
        np.testing.assert_allclose(shards[rank], sum(g[start:stop] for g in grads),
                                   rtol=1e-15)
        assert params[rank].tobytes() == params[0].tobytes()
        assert (params[rank][start:stop] == rank + np.arange(stop - start)).all()
        assert counters[rank][LAST_STEP_SKIPPED] == 1 and counters[rank][3] == 1
    assert nccl.groups.count("start") == nccl.groups.count("end")


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("size", [0, 1, 37])
def test_nccl_all_reduce_sums_every_ranks_buffer_in_place(ranks, size):
    nccl, stream = _FakeNccl(), 0x5EED
    recorders = [_Recorder() for _ in range(ranks)]
    collectives = [NcclCollectives(_Comm(rank, ranks), shard_bounds(size, ranks, 8), nccl,
                                   recorders[rank], lambda: stream) for rank in range(ranks)]
    buffers = [np.random.default_rng([rank, size, 1]).standard_normal(size)
               for rank in range(ranks)]
    total = np.add.reduce([buffer.copy() for buffer in buffers])
    for rank in range(ranks):
        collectives[rank].all_reduce(buffers[rank])
    _carry_out([recorder.calls for recorder in recorders], memory=_Memory(buffers),
               nccl=nccl, stream=stream)

    assert [call[0] for call in recorders[0].calls] == (["allReduce"] if size else [])
    assert all(call[3:6] == (size, nccl.NCCL_FLOAT64, nccl.NCCL_SUM)
               for call in recorders[0].calls)
    for buffer in buffers:
        assert buffer.tobytes() == total.tobytes()


# The agreement's digests (no MPI: they are plain functions of arrays).

def _checksum_by_definition(array):
    """checksum's formula, in Python integers: sum of mix(bits_i ^ i * golden) mod 2**64."""
    mask = 2**64 - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    words = array.reshape(-1).view(f"u{array.dtype.itemsize}")
    total = sum(mix(int(word) ^ (index * 0x9E3779B97F4A7C15 & mask))
                for index, word in enumerate(words))
    return f"{total & mask:016x}"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 7, 100])
def test_checksum_is_its_formula_across_chunks(monkeypatch, dtype, size):
    """Chunks of 16 elements make sizes 7 and 100 one partial chunk and several chunks
    with a partial last one: the formula in integers says every backend's result."""
    monkeypatch.setattr(agreement, "CHECKSUM_CHUNK", 16)
    array = np.random.default_rng(size).standard_normal(size).astype(dtype)
    assert agreement.checksum(None, array) == _checksum_by_definition(array)


def test_checksum_sees_values_moved_to_other_places():
    """Swapped equal-size segments at offsets 6k apart (every second and third element
    keeps its residue: sums over strided subsets miss them), a rotation by one, and a
    sign moved between two elements; the same bits in another array agree."""
    values = np.random.default_rng(3).standard_normal(600)
    checksum = lambda array: agreement.checksum(None, array)
    for offset in (30, 36, 300):
        swapped = values.copy()
        swapped[:30], swapped[offset:offset + 30] = values[offset:offset + 30], values[:30]
        assert not np.array_equal(swapped, values)
        assert checksum(swapped) != checksum(values), offset
    assert checksum(np.roll(values, 1)) != checksum(values)
    pair = np.abs(values[:2])
    assert checksum(pair * [1, -1]) != checksum(pair * [-1, 1])
    assert checksum(values.copy()) == checksum(values)
    assert checksum(values.reshape(20, 30)) == checksum(values)


def test_content_digest_is_of_every_value_and_array():
    state = {"format": 3, "lr": 0.1, "step_count": 4, "groups": [{"params": ["a"]}],
             "velocity": np.arange(10.0)}
    params = np.ones(10)
    digest = lambda s, p: agreement.content_digest(None, s, {"velocity": s["velocity"],
                                                              "params": p})
    same = {**state, "velocity": state["velocity"].copy()}
    assert digest(same, params.copy()) == digest(state, params) < 2**56
    velocity = state["velocity"].copy()
    velocity[-1] = np.nextafter(velocity[-1], 99.0)
    for other, other_params in [({**state, "velocity": velocity}, params),
                                ({**state, "lr": 0.2}, params),
                                ({**state, "groups": [{"params": ["b"]}]}, params),
                                (state, params * 2), (state, None)]:
        assert digest(other, other_params) != digest(state, params)


@pytest.mark.parametrize("comm", [None, 42, "COMM_WORLD", object()],
                         ids=["none", "int", "str", "object"])
def test_comm_must_be_an_mpi_communicator(comm):
    param = np.ones(5)
    with pytest.raises(TypeError, match=r"Invalid comm value: .* \(comm must be an mpi4py "
                                        r"intracommunicator"):
        ShardedMomentumSGD(param, comm=comm, lr=0.1)
    assert (param == 1).all()


def test_collectives_are_chosen_by_where_the_arrays_are():
    assert transport_for("auto", on_device=False) == "mpi"
    assert transport_for("auto", on_device=True) == "nccl"
    assert transport_for("nccl", on_device=True) == "nccl"
    with pytest.raises(ValueError, match=r"Invalid collectives value: 'nccl' \(NCCL moves "
                                         r"GPU memory"):
        transport_for("nccl", on_device=False)
    with pytest.raises(ValueError, match=r"Invalid collectives value: 'NCCL'"):
        transport_for("NCCL", on_device=True)
    # This process loaded no MPI library, so none is known to be CUDA-aware.
    with pytest.raises(gm.BackendUnavailableError, match=r"needs a CUDA-aware MPI: no MPI "
                                                          r"library is loaded"):
        transport_for("mpi", on_device=True)


def test_nccl_is_found_or_said_why_not():
    nccl, reason = nccl_module()
    assert (nccl is None) == (reason is not None)
    if reason is not None:
        assert re.search(r"CuPy cannot (be imported|load the NCCL library)", reason)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_the_mpich_wheel_is_not_taken_for_cuda_aware(runs, ranks):
    for result in runs[ranks]:
        assert re.search(r"not CUDA-aware|no MPIX_Query_cuda_support",
                         result["cuda_aware_mpi_reason"])


def test_importing_the_library_imports_no_mpi():
    code = ("import sys, gpu_momentum, gpu_momentum.distributed; "
            "print(sorted(m for m in sys.modules if m.startswith(('mpi4py', 'cupy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=library_env(), check=True, timeout=120).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_16_bit_settings_sharding_does_not_carry_are_refused():
    """One process (COMM_SELF, in a child: this one never initialises MPI): stochastic,
    kahan and master rounding, a 16-bit velocity and bfloat16 parameters are refused
    naming the argument, and leave the parameters as they were; float16 with "nearest"
    and a float32 velocity is updated."""
    require_mpi()
    code = """if True:
        import ml_dtypes, numpy as np
        from mpi4py import MPI
        from gpu_momentum.distributed import ShardedMomentumSGD
        cases = [({"precision": "kahan"}, np.float16), ({"precision": "stochastic"},
                 np.float16), ({"velocity_dtype": "float16"}, np.float16),
                 ({}, ml_dtypes.bfloat16)]
        for options, dtype in cases:
            params = np.ones(8, dtype)
            try:
                ShardedMomentumSGD(params, comm=MPI.COMM_SELF, lr=0.5, **options)
            except (TypeError, ValueError) as error:
                print(type(error).__name__, error, bool((params == 1).all()))
        opt = ShardedMomentumSGD(np.ones(8, np.float16), comm=MPI.COMM_SELF, lr=0.5)
        opt.step(np.ones(8, np.float16))
        print(opt.param.tolist())
    """
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=library_env(), check=True, timeout=300).stdout.splitlines()
    assert re.match(r"ValueError Invalid precision value: 'kahan' .* True$", lines[0])
    assert re.match(r"ValueError Invalid precision value: 'stochastic' .* True$", lines[1])
    assert re.match(r"ValueError Invalid velocity_dtype value: 'float16' .* True$",
                    lines[2])
    assert re.match(r"TypeError params has dtype bfloat16, .* True$", lines[3])
    assert lines[4] == str([0.5] * 8)


# ShardedMomentumSGD on 3, 2 and 1 ranks.

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{ranks: [each rank's results]} of tests/mpi_checks.py on 3, 2 then 1 ranks."""
    require_mpi()
    # Compile the CPU kernels once here, into the session's Numba cache that every rank
    # then loads (three ranks compiling at once on two cores take much longer).
    for dtype in (np.float64, np.float32):
        for skip in (False, True):
            gm.MomentumSGD(np.zeros(3, dtype), lr=0.1, skip_nonfinite=skip).step(
                np.zeros(3, dtype))
    results, checkpoint = {}, None
    for ranks in RANK_COUNTS:
        out = tmp_path_factory.mktemp(f"ranks{ranks}")
        run_mpi(ranks, "mpi_checks.py", out, *([checkpoint] if checkpoint else []))
        results[ranks] = [json.loads((out / f"rank{rank}.json").read_text())
                          for rank in range(ranks)]
        checkpoint = out / "sharded.npz"
    return results


def _cases(results):
    """{case: [each rank's result]} of the runs that compare against one process."""
    cases = {name: [rank[name] for rank in results] for name, value in results[0].items()
             if isinstance(value, dict) and "digests" in value}
    for name, value in results[0]["checkpoints"].items():
        cases[f"checkpoint-{name}"] = [rank["checkpoints"][name] for rank in results]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_parameters_match_one_process_fed_the_average_gradient(runs, ranks):
    cases = _cases(runs[ranks])
    assert len(cases) >= 13
    assert len({b - a for a, b in cases["equal-shards"][0]["shards"]}) == 1
    for name, per_rank in cases.items():
        bound = BOUND["float32" if "float32" in name else "float64"]
        exact = ranks <= 2 or name == "grads-reduced"
        for rank, result in enumerate(per_rank):
            where = f"{name} on rank {rank} of {ranks}"
            assert result["error"] <= bound, where
            assert result["velocity_error"] <= bound, where
            assert result["bitwise"] or not exact, f"{where}: not bitwise"
            assert result["step_count"] == result["reference_step_count"], where
            assert result["skipped_steps"] == result["reference_skipped_steps"], where


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_every_rank_holds_identical_parameters_after_every_step(runs, ranks):
    for name, per_rank in _cases(runs[ranks]).items():
        assert len(per_rank[0]["digests"]) >= 4, name
        for rank, result in enumerate(per_rank[1:], 1):
            assert result["digests"] == per_rank[0]["digests"], f"{name}: rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_each_rank_keeps_its_shard_of_the_velocity(runs, ranks):
    for name, per_rank in _cases(runs[ranks]).items():
        shards = per_rank[0]["shards"]
        total = shards[-1][1]
        vector = 4 if "float32" in name else 2
        counts = [stop - start for start, stop in shards]
        assert max(counts) - min(counts) <= vector, name
        for rank, result in enumerate(per_rank):
            assert result["shard"] == shards[rank] and result["shards"] == shards
            assert result["velocity_size"] == counts[rank], f"{name}: rank {rank}"
            assert abs(result["velocity_size"] - total / ranks) <= vector, name


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_one_rank_overflowing_makes_every_rank_skip(runs, ranks):
    expected = [step in (0, 4) for step in range(12)]
    for rank, result in enumerate(runs[ranks]):
        assert result["skipping"]["skipped"] == expected, f"rank {rank}"
        assert result["skipping"]["skipped_steps"] == 2
        assert result["skipping"]["step_count"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_checkpoints_reload_on_other_rank_counts_and_into_plain_optimizers(runs, ranks):
    for rank, result in enumerate(runs[ranks]):
        checkpoints = result["checkpoints"]
        assert checkpoints["plain-to-sharded"]["step_count"] == 8
        assert checkpoints["sharded-to-plain"]["step_count"] == 11
        assert checkpoints["sharded-to-plain"]["resumed_lr"] == 0.03
        if ranks == 3:
            assert "resharded" not in checkpoints  # the first run has nothing to load
        else:  # from the run on ranks + 1, saved after 8 steps
            assert checkpoints["resharded"]["loaded_step_count"] == 8
            assert checkpoints["resharded"]["step_count"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
@pytest.mark.parametrize("case, kind, failing, pattern, others, needs_two", DISTRIBUTED_ERRORS,
                         ids=[row[0] for row in DISTRIBUTED_ERRORS])
def test_a_check_failing_on_one_rank_makes_every_rank_raise(runs, ranks, case, kind, failing,
                                                             pattern, others, needs_two):
    last = ranks - 1
    fill = lambda text: text.format(last=last, ranks=ranks)
    for rank, result in enumerate(runs[ranks]):
        outcome = result["errors"][case]
        if needs_two and ranks == 1:  # nothing to differ from: it runs
            assert outcome["type"] is None, outcome
            continue
        assert outcome["unchanged"], f"{case}: rank {rank} changed something"
        fails_itself = failing == "all" or rank == (last if failing == "last" else failing)
        expected = pattern if fails_itself or others is None else others
        assert outcome["type"] == kind, (rank, outcome)
        assert re.search(fill(expected), outcome["message"]), (rank, outcome["message"])
    for result in runs[ranks]:
        assert result["errors"]["still-steps"]["type"] is None
        # The steps that passed: 4, and on one rank the 3 steps that cannot differ.
        assert result["errors"]["step_count_after"] == (7 if ranks == 1 else 4)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_ranks_that_agree_change_capturable_hyperparameters_and_load_copies(runs, ranks):
    """The agreeing peers of the disagreements in the error table: a capturable
    hyperparameter changed on every rank, every rank loading its own copy of one
    checkpoint, and one state given to every rank."""
    first = runs[ranks][0]["agreements"]
    # The steps that passed: 3, and on one rank the 2 with a change that cannot differ.
    steps = 3 if ranks > 1 else 5
    assert first["capturable-lr-everywhere"]["step_count"] == steps
    assert first["capturable-lr-everywhere"]["lr"] == 0.05
    assert first["load-own-copies"]["step_count"] == steps + 1  # checkpoint B's
    assert first["load-state-everywhere"] == first["load-own-copies"]
    for rank, result in enumerate(runs[ranks][1:], 1):
        assert result["agreements"] == first, f"rank {rank}"


@pytest.mark.slow
def test_the_readme_example_runs_on_two_ranks(tmp_path):
    require_mpi()
    from test_readme import MPI_EXAMPLES

    (example,) = MPI_EXAMPLES
    (tmp_path / "train.py").write_text(example)
    (tmp_path / "each_rank_prints_to_a_file.py").write_text(
        "import runpy, sys\nfrom mpi4py import MPI\n"
        "sys.stdout = open(f'printed{MPI.COMM_WORLD.Get_rank()}.txt', 'w')\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    run_mpi(2, tmp_path / "each_rank_prints_to_a_file.py", cwd=tmp_path)
    size = 256 * 784 + 256
    assert (tmp_path / "printed0.txt").read_text() == f"0 (0, {size // 2}) {size // 2}\n"
    assert (tmp_path / "printed1.txt").read_text() == \
        f"1 ({size // 2}, {size}) {size - size // 2}\n"
    plain = gm.MomentumSGD(gm.FlatParams.from_arrays([np.zeros((256, 784)), np.zeros(256)]),
                           lr=0.5, style="torch")
    plain.load(tmp_path / "run.ckpt.npz")
    assert plain.step_count == 3 and plain.lr == 0.01


@pytest.mark.slow
def test_bench_ranks_runs_a_job_per_rank_count():
    require_mpi()
    from mpi_launch import run_command

    out = run_command([sys.executable, "-m", "gpu_momentum.cli", "bench", "--ranks", "1",
                       "2", "--sizes", "10", "--samples", "2"]).stdout
    for ranks in (1, 2):
        assert f"{ranks} rank(s), cpu, float32, mpi" in out, out
        assert re.search(rf"^\s+{ranks}\s+1024\s+[\d.]+ ms", out, re.M), out


# GPU: NCCL through the same code path, when a GPU is lent.

def _gpu_run(ranks, **env):
    if cuda_device_count() == 0:
        pytest.skip("needs a CUDA GPU")
    require_mpi()
    reason = nccl_module()[1]
    if reason is not None:
        missing_tool(f"NCCL is not usable here: {reason}")
    from mpi_launch import rank_env
    return run_mpi(ranks, "mpi_gpu_checks.py", timeout=240, env=rank_env(**env))


@pytest.mark.gpu
def test_nccl_on_one_rank_matches_momentum_sgd_bitwise():
    out = _gpu_run(1).stdout
    assert "nccl checks passed on 1 rank" in out, out


@pytest.mark.gpu
def test_nccl_two_ranks_sharing_one_gpu():
    if cuda_device_count() == 0:
        pytest.skip("needs a CUDA GPU")
    try:
        out = _gpu_run(2, NCCL_MULTI_RANK_GPU_ENABLE="1", NCCL_MAX_CTAS="4").stdout
    except AssertionError as failure:
        text = str(failure)
        # NCCL reports two ranks of one communicator on one GPU as invalid usage (its
        # "Duplicate GPU detected" shows only with NCCL_DEBUG=WARN), as cupy-cuda13x's
        # NCCL did on an H200.
        if any(refusal in text for refusal in ("Duplicate GPU detected", "same GPU",
                                               "NCCL_ERROR_INVALID_USAGE")):
            pytest.skip(f"this NCCL refuses two ranks on one GPU: {text[-300:]}")
        raise
    assert "nccl checks passed on 2 ranks" in out, out

"""The Numba CUDA update's paths as kernels/momentum.cu lays them out: a scalar head up to
the first element where every array starts a 16-byte word, whole words from there (split
per element where a word holds a range end), a scalar tail; every element scalar when the
arrays are misaligned against each other. Each path, bit for bit against the cpu backend,
in the CUDA simulator (on a GPU numba-cuda contracts multiply-adds, the cpu backend does
not; tests/test_numba_ptx.py shows the words are 128-bit loads and stores there)."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import storage_dtype
from gpu_momentum.kernels import numba_cuda
from gpu_momentum.kernels.vector_memory import VECTOR_BYTES
from harness import CpuHarness, NumbaCudaHarness, usable

SIZE = 203  # words and a ragged tail at every width, several grid-stride rounds
BUFFER = {"kahan": "compensation", "master": "master"}


@pytest.fixture(scope="module")
def numba_cuda_harness():
    harness = usable(NumbaCudaHarness())
    if not harness.simulated:
        pytest.skip("on a GPU numba-cuda contracts multiply-adds: not bit for bit")
    return harness


def _arrays(harness, dtype, velocity_dtype, precision, offsets):
    """param, grad, velocity (and the precision buffer) as views `offsets` elements into
    larger device arrays, with their host values."""
    rng = np.random.default_rng(11)
    wide = np.float64 if dtype == np.float64 else np.float32
    values = {"param": rng.standard_normal(SIZE).astype(wide).astype(dtype),
              "grad": rng.standard_normal(SIZE).astype(wide).astype(dtype),
              "velocity": rng.standard_normal(SIZE).astype(wide).astype(velocity_dtype)}
    if precision == "kahan":
        values["compensation"] = (rng.standard_normal(SIZE) * 1e-3).astype(
            np.float32).astype(dtype)
    elif precision == "master":
        values["master"] = values["param"].astype(np.float32)
    views = {}
    for name, host in values.items():
        offset = offsets.get(name, 0)
        padded = np.zeros(SIZE + 16, host.dtype)
        padded[offset:offset + SIZE] = host
        views[name] = harness.from_numpy(padded)[offset:offset + SIZE]
    return views


def _step_both(dtype, velocity_dtype, precision, offsets, harness):
    cpu = CpuHarness()
    results = []
    for each in (harness, cpu):
        arrays = _arrays(each, dtype, velocity_dtype, precision, offsets)
        buffers = {k: arrays[k] for k in BUFFER.values() if k in arrays}
        for step in range(2):
            grad = arrays["grad"]
            gm.momentum_step(arrays["param"], grad, arrays["velocity"], lr=0.05,
                             momentum=0.9, weight_decay=0.01, style="torch",
                             nesterov=True, first_step=step == 0, precision=precision,
                             seed=7, step_count=step, backend=each.name, **buffers)
        results.append({k: each.to_numpy(v).tobytes() for k, v in arrays.items()})
    return results


@pytest.mark.parametrize("dtype_name, velocity_name, precision", [
    ("float32", "float32", "nearest"), ("float64", "float64", "nearest"),
    ("bfloat16", "float32", "nearest"), ("bfloat16", "bfloat16", "stochastic"),
    ("bfloat16", "float32", "kahan"), ("float16", "float32", "master")])
@pytest.mark.parametrize("offsets", [
    {}, {"param": 1, "grad": 1, "velocity": 1, "compensation": 1, "master": 1},
    {"param": 3, "grad": 3, "velocity": 3, "compensation": 3, "master": 3},
    {"param": 1}, {"velocity": 1}],
    ids=["aligned", "head-1", "head-3", "param-misaligned", "velocity-misaligned"])
def test_head_words_and_tail_match_the_cpu_backend(numba_cuda_harness, dtype_name,
                                                   velocity_name, precision, offsets):
    dtype, velocity_dtype = storage_dtype(dtype_name), storage_dtype(velocity_name)
    simulated, cpu = _step_both(dtype, velocity_dtype, precision, offsets,
                                numba_cuda_harness)
    assert simulated == cpu


def test_words_holding_a_range_end_take_each_element_with_its_own_group(
        numba_cuda_harness):
    """Segments of 5, 7 and 9 float32 elements starting off words (FlatParams views
    shifted by one element): words that hold a range end, padding or another group."""
    sizes = (5, 7, 9, 33)
    groups = [{"params": [1], "lr": 0.2, "momentum": 0.5},
              {"params": [2], "lr": 0.01, "momentum": 0.0, "weight_decay": 0.1}]
    found = []
    for harness in (numba_cuda_harness, CpuHarness()):
        arrays = [harness.from_numpy(np.linspace(-1, 1, n).astype(np.float32) * (k + 1))
                  for k, n in enumerate(sizes)]
        flat = gm.FlatParams.from_arrays(arrays)
        opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9, groups=groups,
                             backend=harness.name)
        rng = np.random.default_rng(2)
        for _ in range(3):
            for view in flat.grads:
                harness.assign(view, rng.standard_normal(view.size).astype(np.float32))
            opt.step()
        found.append((harness.to_numpy(opt.param).tobytes(),
                      harness.to_numpy(opt.velocity).tobytes()))
    assert found[0] == found[1]


@pytest.mark.parametrize("itemsize, offset, start", [
    (4, 0, 0), (4, 1, 3), (4, 3, 1), (8, 1, 1), (2, 1, 7), (2, 7, 1)])
def test_the_head_ends_where_the_params_start_a_word(numba_cuda_harness, itemsize, offset,
                                                     start):
    dtype = {2: np.uint16, 4: np.float32, 8: np.float64}[itemsize]
    base = numba_cuda_harness.from_numpy(np.zeros(64, dtype))
    assert numba_cuda.VECTORS.address(base) % VECTOR_BYTES == 0
    view = base[offset:offset + 40]
    assert numba_cuda.VECTORS.address(view) == (numba_cuda.VECTORS.address(base)
                                                + offset * itemsize)
    vector_start = numba_cuda.vector_start_function(False)
    assert vector_start(view, view, view, view, view.size) == start
    other = numba_cuda_harness.from_numpy(np.zeros(64, dtype))[offset + 1:offset + 41]
    assert vector_start(view, other, view, view, view.size) == view.size  # all scalar
    assert vector_start(view, view, view, other, view.size) == start  # no buffer read
    with_buffer = numba_cuda.vector_start_function(True)
    assert with_buffer(view, view, view, other, view.size) == view.size


def test_each_thread_looks_a_range_up_once_per_range_it_enters(numba_cuda_harness,
                                                               monkeypatch):
    """The group lookup is a cursor, as in kernels/momentum.cu: a thread's indices only
    grow, and it calls seek_range only when an index passes its range's end, so at most
    once per range it enters, never once per element or word."""
    lookups = []
    seek_range = numba_cuda.seek_range_cuda

    def counted(range_ends, i, r):
        lookups.append(range_ends.size)
        return seek_range(range_ends, i, r)

    monkeypatch.setattr(numba_cuda, "seek_range_cuda", counted)
    sizes = (1000, 1200, 900)
    arrays = [numba_cuda_harness.from_numpy(np.full(n, 1.0, np.float32)) for n in sizes]
    flat = gm.FlatParams.from_arrays(arrays)
    groups = [{"params": [k], "lr": 0.1 * (k + 1)} for k in range(len(sizes))]
    opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9, groups=groups, backend="numba-cuda")
    numba_cuda_harness.assign(flat.grad, np.ones(flat.grad.size, np.float32))
    lookups.clear()  # the warm-up's launches over no elements
    opt.step()
    threads = numba_cuda.SIMULATOR_BLOCKS * numba_cuda.SIMULATOR_THREADS_PER_BLOCK
    ranges = lookups[0]
    assert threads <= len(lookups) <= threads * ranges
    assert len(lookups) * 4 < flat.data.size // 4  # a lookup per word: 775
    for k, view in enumerate(flat.params):  # and each group's own lr
        np.testing.assert_allclose(numba_cuda_harness.to_numpy(view), 1 - 0.1 * (k + 1),
                                   rtol=1e-6)

"""The 16-bit conversions, stochastic rounding and the counter-based hash.

One specification (gpu_momentum.reference: ml_dtypes' and NumPy's casts, its stochastic
rounding and random_bits) and four implementations that must agree with it bit for bit:
the element functions of kernels/elementwise.py compiled for the CPU, the same run by
numba-cuda (in the CUDA simulator where there is no GPU), and the CUDA C kernel's own
functions built for the host (tests/host_kernel.py). Then the statistics of stochastic
rounding: unbiased, reproducible for a seed, different across seeds and steps, and random
bits without a pattern between neighbouring elements.
"""

import numba
import numpy as np
import pytest
from numba import cuda

from gpu_momentum.kernels import cpu as cpu_kernels
from gpu_momentum.kernels import numba_cuda
from gpu_momentum.reference import random_bits, round_nearest, round_stochastic
from harness import require
from host_kernel import HostKernel, build_library

ml_dtypes = require("ml_dtypes")
BFLOAT16, FLOAT16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
F = cpu_kernels.STORAGE  # the CPU's compiled element functions
f32_from_bits, bits_from_f32 = F.f32_from_bits, F.bits_from_f32
bf16_to_f32, f16_to_f32 = F.bf16_to_f32, F.f16_to_f32
f32_to_bf16_rn, f32_to_bf16_sr = F.f32_to_bf16_rn, F.f32_to_bf16_sr
f32_to_f16_rn, f32_to_f16_sr = F.f32_to_f16_rn, F.f32_to_f16_sr
step_key, block_key, element_bits = F.step_key, F.block_key, F.element_bits


@numba.njit
def _round_cpu(bits, r16, out):
    for i in range(bits.size):
        x = f32_from_bits(bits[i])
        out[i, 0] = f32_to_bf16_rn(x)
        out[i, 1] = f32_to_bf16_sr(x, r16[i])
        out[i, 2] = f32_to_f16_rn(x)
        out[i, 3] = f32_to_f16_sr(x, r16[i])


@numba.njit
def _widen_cpu(bits, out):
    for i in range(bits.size):
        out[i, 0] = bits_from_f32(bf16_to_f32(bits[i]))
        out[i, 1] = bits_from_f32(f16_to_f32(bits[i]))


@numba.njit
def _random_bits_cpu(seed, step_count, index, out):
    key = step_key(seed, step_count)
    for i in range(index.size):
        out[i] = element_bits(block_key(key, index[i]), index[i])


G = numba_cuda.STORAGE  # the same functions as numba-cuda device functions


@cuda.jit
def _numba_cuda_kernel(seed, step_count, index, hashed, bits, r16, rounded, halves,
                       widened):
    key = G.step_key(seed, step_count)
    for i in range(cuda.grid(1), index.size, cuda.gridsize(1)):
        hashed[i] = G.element_bits(G.block_key(key, index[i]), index[i])
    for i in range(cuda.grid(1), bits.size, cuda.gridsize(1)):
        x = G.f32_from_bits(bits[i])
        rounded[i, 0] = G.f32_to_bf16_rn(x)
        rounded[i, 1] = G.f32_to_bf16_sr(x, r16[i])
        rounded[i, 2] = G.f32_to_f16_rn(x)
        rounded[i, 3] = G.f32_to_f16_sr(x, r16[i])
    for i in range(cuda.grid(1), halves.size, cuda.gridsize(1)):
        widened[i, 0] = G.bits_from_f32(G.bf16_to_f32(halves[i]))
        widened[i, 1] = G.bits_from_f32(G.f16_to_f32(halves[i]))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return HostKernel(build_library(tmp_path_factory.mktemp("storage-bits")))


def float32_patterns(rng, random=1 << 20):
    """float32 bit patterns where rounding to 16 bits goes wrong most easily: every upper
    half with the lower halves around a bfloat16 tie; float16's 13 dropped bits around
    its ties over its whole range (subnormals, normals, overflow) and below it; and
    random ones. NaNs and infinities of every kind are among them."""
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    lower = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    exponents = np.arange(90, 146, dtype=np.uint32)  # 2**-37 .. 2**18
    low13 = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF], np.uint32)
    mantissa_high = rng.integers(0, 1 << 10, 16).astype(np.uint32) << 13
    float16 = ((exponents[:, None, None] << 23) | mantissa_high[None, :, None]
               | low13[None, None, :]).ravel()
    float16 = np.concatenate([float16, float16 | np.uint32(0x80000000)])
    return np.concatenate([(upper[:, None] | lower).ravel(), float16,
                           rng.integers(0, 2**32, random, dtype=np.uint64).astype(
                               np.uint32)])


def reference_rounding(bits, r16):
    """[n, 4]: the specification of what _round_cpu computes."""
    x = bits.view(np.float32)
    with np.errstate(over="ignore"):
        return np.stack([round_nearest(x, BFLOAT16).view(np.uint16),
                         round_stochastic(x, BFLOAT16, r16).view(np.uint16),
                         round_nearest(x, FLOAT16).view(np.uint16),
                         round_stochastic(x, FLOAT16, r16).view(np.uint16)], axis=1)


def _mismatches(actual, expected, bits):
    bad = np.flatnonzero((actual != expected).any(axis=1))
    return [f"{bits[i]:#010x}: {actual[i].tolist()} != {expected[i].tolist()}"
            for i in bad[:5]]


def test_rounding_is_the_specifications_on_the_cpu_and_in_the_cuda_c_build(host):
    rng = np.random.default_rng(0)
    bits = float32_patterns(rng)
    r16 = rng.integers(0, 1 << 16, bits.size).astype(np.uint32)
    expected = reference_rounding(bits, r16)
    cpu = np.empty_like(expected)
    _round_cpu(bits, r16, cpu)
    assert not _mismatches(cpu, expected, bits), _mismatches(cpu, expected, bits)
    c = host.round(bits.view(np.float32), r16)
    assert not _mismatches(c, expected, bits), _mismatches(c, expected, bits)


def test_widening_every_16_bit_pattern_is_exact():
    """bfloat16 -> float32 as ml_dtypes, float16 -> float32 as NumPy: NaN payloads kept."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    cpu = np.empty((patterns.size, 2), np.uint32)
    _widen_cpu(patterns, cpu)
    assert (cpu[:, 0] == patterns.view(BFLOAT16).astype(np.float32).view(np.uint32)).all()
    assert (cpu[:, 1] == patterns.view(FLOAT16).astype(np.float32).view(np.uint32)).all()


def test_widening_in_the_cuda_c_build(host):
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    c = host.widen(patterns).view(np.uint32)
    assert (c[:, 0] == patterns.view(BFLOAT16).astype(np.float32).view(np.uint32)).all()
    assert (c[:, 1] == patterns.view(FLOAT16).astype(np.float32).view(np.uint32)).all()


# Indices across 2**32 and 2**33 (the hash keys each 2**32 block apart), seeds and step
# counts past 32 bits.
INDICES = np.concatenate([np.arange(5000), 2**32 - 3 + np.arange(6),
                          3 * 2**32 + 17 + np.arange(4), [2**62 + 12345]]).astype(np.int64)
KEYS = [(0, 0), (20240611, 7), (2**63 + 5, 2**33 + 1), (2**64 - 1, 2**63 - 1)]


@pytest.mark.parametrize("seed, step_count", KEYS)
def test_the_hash_is_one_function_on_the_cpu_and_in_the_cuda_c_build(host, seed,
                                                                       step_count):
    expected = random_bits(seed, step_count, INDICES)
    cpu = np.empty(INDICES.size, np.uint32)
    _random_bits_cpu(np.uint64(seed), np.int64(step_count), INDICES, cpu)
    assert (cpu == expected).all()
    assert (host.random_bits(seed, step_count, INDICES) == expected).all()


def test_numba_cuda_runs_the_same_functions():
    """numba-cuda's device functions (the simulator here, the GPU where there is one):
    the hash over INDICES, conversions over a sample of the patterns."""

    rng = np.random.default_rng(1)
    bits = rng.choice(float32_patterns(rng, random=0), 1500)
    bits = np.concatenate([bits, np.array([0x7F800001, 0xFFC00000, 0x7F7F8000, 0x477FF000,
                                           0x33000001, 0x00000001], np.uint32)])
    r16 = rng.integers(0, 1 << 16, bits.size).astype(np.uint32)
    halves = rng.integers(0, 1 << 16, 1000).astype(np.uint16)
    index = INDICES[-300:]
    seed, step_count = KEYS[2]
    out = [np.zeros(index.size, np.uint32), np.zeros((bits.size, 4), np.uint16),
           np.zeros((halves.size, 2), np.uint32)]
    device = [cuda.to_device(a) for a in out]
    _numba_cuda_kernel[2, 32](np.uint64(seed), np.int64(step_count), cuda.to_device(index),
                  device[0], cuda.to_device(bits), cuda.to_device(r16), device[1],
                  cuda.to_device(halves), device[2])
    hashed, rounded, widened = (d.copy_to_host() for d in device)
    assert (hashed == random_bits(seed, step_count, index)).all()
    expected = reference_rounding(bits, r16)
    assert not _mismatches(rounded, expected, bits), _mismatches(rounded, expected, bits)
    assert (widened[:, 0] == halves.view(BFLOAT16).astype(np.float32).view(np.uint32)).all()
    assert (widened[:, 1] == halves.view(FLOAT16).astype(np.float32).view(np.uint32)).all()


# ---- statistics of stochastic rounding ----

N = 10**5


def _rounded_mean(x, dtype, seed=3, step_count=11):
    """(mean of x stochastically rounded in N elements, standard error of that mean)."""
    x32 = np.full(N, x, np.float32)
    r16 = random_bits(seed, step_count, np.arange(N)) >> np.uint32(16)
    rounded = round_stochastic(x32, dtype, r16).astype(np.float64)
    low, high = np.sort(np.unique(rounded))[[0, -1]]
    p = (float(x32[0]) - low) / (high - low) if high > low else 0.0
    return rounded.mean(), (high - low) * np.sqrt(p * (1 - p) / N)


def _between(dtype, low, fraction):
    """The float32 value `fraction` of the way from `low` (rounded to `dtype`) to its
    neighbour away from zero (the next bit pattern of a finite 16-bit value)."""
    low = np.array([low], np.float32).astype(dtype)
    away = (low.view(np.uint16) + np.uint16(1)).view(dtype)
    return np.float32(float(low[0]) + fraction * (float(away[0]) - float(low[0])))


@pytest.mark.parametrize("dtype, low, fraction", [
    (BFLOAT16, 1.0, 0.3), (BFLOAT16, -1.0, 0.77), (BFLOAT16, 3e-3, 0.5),
    (BFLOAT16, 1.9921875, 0.999), (BFLOAT16, 1e-40, 0.25), (BFLOAT16, 1e38, 0.6),
    (FLOAT16, 1.0, 0.3), (FLOAT16, -0.01, 0.123), (FLOAT16, 1000.0, 0.9),
    (FLOAT16, 3 * 2.0**-24, 0.41), (FLOAT16, -2.0**-14, 0.05),
], ids=lambda v: str(v))
def test_stochastic_rounding_is_unbiased(dtype, low, fraction):
    """The mean of N roundings of x between two neighbours is x, within 4 standard
    errors (float16 subnormals: plus the 2**-16 ulp its 16 random bits may miss)."""
    x = _between(dtype, low, fraction)
    mean, error = _rounded_mean(x, dtype)
    assert error > 0
    assert abs(mean - float(x)) <= 4 * error + 2.0**-40


def test_stochastic_rounding_is_reproducible_and_differs_across_seeds_and_steps():
    x = np.full(N, _between(BFLOAT16, 1.0, 0.5), np.float32)
    index = np.arange(N)

    def rounded(seed, step_count):
        return round_stochastic(x, BFLOAT16, random_bits(seed, step_count, index)
                                >> np.uint32(16)).view(np.uint16)

    first = rounded(1, 0)
    assert (first == rounded(1, 0)).all()
    for other in (rounded(2, 0), rounded(1, 1), rounded(2**32 + 1, 0), rounded(1, 2**32)):
        assert 0.48 < (first != other).mean() < 0.52  # independent halves: 1/2


def _chi_square_z(counts):
    """The chi-square statistic of uniform `counts`, as a z score."""
    expected = counts.sum() / counts.size
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = counts.size - 1
    return (chi2 - dof) / np.sqrt(2 * dof)


@pytest.mark.parametrize("seed, step_count", [(0, 0), (7, 123456)])
def test_random_bits_are_uniform_and_neighbours_independent(seed, step_count):
    """The top and the bottom 16 bits are each uniform; element i's bits say nothing of
    element i + d's (joint counts of their top 4 bits), for distances that a hash of
    i ^ key alone fails."""
    bits = random_bits(seed, step_count, np.arange(1 << 20))
    for part in (bits >> np.uint32(24), bits & np.uint32(0xFF)):
        assert abs(_chi_square_z(np.bincount(part, minlength=256))) < 5
    top = (bits >> np.uint32(28)).astype(np.int64)
    for distance in (1, 2, 256, 4096):
        joint = np.bincount(top[:-distance] * 16 + top[distance:], minlength=256)
        assert abs(_chi_square_z(joint)) < 5, distance

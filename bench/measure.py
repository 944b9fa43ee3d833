"""Timing and accounting: bytes moved per element, the sampling loop, summary statistics."""

import dataclasses
import math
import time

import numpy as np

from gpu_momentum.kernels.layout import FLOAT8_BLOCK, FLOAT8_VELOCITY


def update_bytes(param_dtype, velocity_dtype=None, precision="nearest"):
    """Bytes a momentum update moves per element: read param, grad, velocity; write param,
    velocity (grad has the param's dtype). float32: 3*4 + 2*4 = 20. 16-bit params with a
    float32 velocity: 14 ("nearest", "stochastic"), 10 with a 16-bit velocity; "kahan"
    reads and writes a compensation of the param dtype too (18); "master" reads the
    float32 master copy instead of the params and writes both (20). An FP8 velocity
    ("float8_e4m3fn") moves its code and its share of the block's scale each way
    (`velocity_bytes`): 14 + 8/B for float32 params, 8 + 8/B for 16-bit ones."""
    param = _itemsize(param_dtype)
    moved = 3 * param + 2 * velocity_bytes(velocity_dtype or param_dtype)
    if precision == "kahan":
        moved += 2 * param
    elif precision == "master":
        moved += 2 * 4 - param
    return moved


def velocity_bytes(velocity_dtype):
    """Bytes of velocity per element: its itemsize, or for an FP8 velocity one code and
    a float32 scale shared by a block of FLOAT8_BLOCK elements: 1 + 4/B (B = 256: 1.016)."""
    if isinstance(velocity_dtype, str) and velocity_dtype == FLOAT8_VELOCITY:
        return 1 + np.dtype(np.float32).itemsize / FLOAT8_BLOCK
    return _itemsize(velocity_dtype)


def state_bytes(param_dtype, velocity_dtype=None, precision="nearest"):
    """Bytes of optimizer state per element: the velocity (`velocity_bytes`), plus the
    compensation of the param dtype ("kahan") or the float32 master copy ("master")."""
    extra = {"kahan": _itemsize(param_dtype), "master": 4}.get(precision, 0)
    return velocity_bytes(velocity_dtype or param_dtype) + extra


def _itemsize(dtype):
    return 2 if isinstance(dtype, str) and dtype == "bfloat16" else np.dtype(dtype).itemsize


def stream_bytes(dtype):
    """The CPU roofline kernel: read three arrays, write two (float32: 20)."""
    return 5 * np.dtype(dtype).itemsize


def copy_bytes(dtype):
    """A copy reads one array and writes another (float32: 8)."""
    return 2 * np.dtype(dtype).itemsize


def summarize(seconds):
    """(median, 25th percentile, 75th percentile) of per-call times, linear interpolation."""
    if len(seconds) == 0:
        raise ValueError("summarize needs at least one sample, got none")
    p25, median, p75 = np.percentile(np.asarray(seconds, dtype=np.float64), [25, 50, 75])
    return float(median), float(p25), float(p75)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How long to measure each candidate at one size.

    Warm-up runs at least `warmup_calls` calls and `warmup_s` seconds (compilation, page
    faults, caches, GPU clocks). One sample times enough back-to-back calls to last
    `min_sample_s`, so that timer resolution and per-sample overhead vanish at small sizes.
    Up to `samples` samples are taken, fewer (never under `min_samples`) when that would
    exceed `max_time_s` per candidate. The samples are spread over `rounds` turns (see
    `measure`), each turn starting with `rewarm_s` of untimed calls.
    """
    samples: int = 25
    min_samples: int = 5
    warmup_calls: int = 3
    warmup_s: float = 0.2
    min_sample_s: float = 2e-3
    max_time_s: float = 3.0
    rounds: int = 5
    rewarm_s: float = 0.03


class HostTimer:
    """Wall clock around calls, then `synchronize` (a no-op for host work)."""

    def __init__(self, synchronize=lambda: None):
        self.synchronize = synchronize

    def time(self, step, calls):
        self.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        self.synchronize()
        return (time.perf_counter() - start) / calls


def measure(steps, timers, sampling):
    """Per-call seconds of each `steps[i]()` timed by `timers[i]`, one value per sample,
    and the calls per sample: [(seconds, calls), ...].

    The candidates take turns, a block of samples each, for `sampling.rounds` rounds: a
    slow drift of the machine (other tenants' memory traffic, clocks) then touches them
    all alike and their ratios hold. Each turn starts with `rewarm_s` of untimed calls
    (none for calls slower than that): caches refill, and the idle threads of the previous
    candidate's runtime (Numba's and torch's OpenMP pools spin for milliseconds after each
    parallel region) stop competing for the cores.
    """
    plans = []
    for step, timer in zip(steps, timers):
        run_for(step, sampling.warmup_s, sampling.warmup_calls)
        estimate = max(timer.time(step, 1), 1e-9)
        plans.append((max(1, math.ceil(sampling.min_sample_s / estimate)), estimate))
    per_round = sum(calls * estimate for calls, estimate in plans)
    count = int(sampling.max_time_s * len(plans) / per_round) if plans else 0
    count = min(sampling.samples, max(sampling.min_samples, count))
    rounds = max(1, min(sampling.rounds, count))
    seconds = [[] for _ in plans]
    for turn in range(rounds):
        block = count * (turn + 1) // rounds - count * turn // rounds
        for (calls, estimate), step, timer, found in zip(plans, steps, timers, seconds):
            if estimate < sampling.rewarm_s:
                run_for(step, sampling.rewarm_s, 1)
            found += [timer.time(step, calls) for _ in range(block)]
    return [(found, calls) for found, (calls, _) in zip(seconds, plans)]


def run_for(step, seconds, min_calls):
    """Untimed calls of `step` for at least `seconds` and `min_calls` calls."""
    start, calls = time.perf_counter(), 0
    while calls < min_calls or time.perf_counter() - start < seconds:
        step()
        calls += 1

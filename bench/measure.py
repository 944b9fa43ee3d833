"""Timing and accounting: bytes moved per element, the sampling loop, summary statistics."""

import dataclasses
import math
import time

import numpy as np


def update_bytes(param_dtype, velocity_dtype=None):
    """Bytes a momentum update moves per element: read param, grad, velocity; write param,
    velocity (grad has the param's dtype). float32: 3*4 + 2*4 = 20."""
    param = np.dtype(param_dtype).itemsize
    velocity = np.dtype(velocity_dtype or param_dtype).itemsize
    return 3 * param + 2 * velocity


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
    """How long to measure one candidate at one size.

    Warm-up runs at least `warmup_calls` calls and `warmup_s` seconds (compilation, page
    faults, caches, GPU clocks). One sample times enough back-to-back calls to last
    `min_sample_s`, so that timer resolution and per-sample overhead vanish at small sizes.
    Up to `samples` samples are taken, fewer (never under `min_samples`) when that would
    exceed `max_time_s`.
    """
    samples: int = 25
    min_samples: int = 5
    warmup_calls: int = 3
    warmup_s: float = 0.2
    min_sample_s: float = 2e-3
    max_time_s: float = 3.0


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


def measure(step, timer, sampling):
    """Per-call seconds of `step()`, one value per sample, and the calls per sample."""
    start, calls = time.perf_counter(), 0
    while calls < sampling.warmup_calls or time.perf_counter() - start < sampling.warmup_s:
        step()
        calls += 1
    estimate = max(timer.time(step, 1), 1e-9)
    calls = max(1, math.ceil(sampling.min_sample_s / estimate))
    count = int(sampling.max_time_s / (estimate * calls))
    count = min(sampling.samples, max(sampling.min_samples, count))
    return [timer.time(step, calls) for _ in range(count)], calls

"""The sweep: every candidate at every size, dtype and workload, in one process."""

import dataclasses
import gc
import importlib.metadata
import os
import platform
import sys

import numba
import numpy as np

from gpu_momentum import __version__
from gpu_momentum._arrays import state_dtype
from gpu_momentum.shapes import resnet50_shapes, transformer_shapes

from .candidates import Problem, Unsupported, discover
from .measure import Sampling, measure, summarize

WORKLOADS = {
    "resnet50": resnet50_shapes,
    "transformer": transformer_shapes,
}
# Peak arrays of one size alive at once: the two host originals, plus the hungriest
# candidate (a naive NumPy/CuPy update holds params, grads, velocity and three temporaries).
HOST_ARRAYS, DEVICE_ARRAYS, HEADROOM = 8, 6, 0.8
# Settings that change how the threaded runtimes behave, recorded with the results.
THREADING_VARIABLES = ("OMP_", "GOMP_", "KMP_", "MKL_", "NUMBA_", "CUDA_")


@dataclasses.dataclass(frozen=True)
class Options:
    sizes: tuple  # element counts of the flat sweep
    dtypes: tuple  # numpy dtype names
    workloads: tuple  # names in WORKLOADS
    devices: tuple  # "cpu", "cuda"
    threads: int
    sampling: Sampling


def available_host_bytes():
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def array_bytes(n, dtype):
    """Bytes of one array of the problem, counting the wider of param and velocity."""
    dtype = np.dtype(dtype)
    return n * max(dtype.itemsize, state_dtype(dtype).itemsize)


def make_problem(n, dtype, shapes=None, seed=0):
    rng = np.random.default_rng(seed)
    wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    p0 = rng.standard_normal(n, dtype=wide).astype(dtype, copy=False)
    g0 = rng.standard_normal(n, dtype=wide).astype(dtype, copy=False)
    return Problem(p0, g0, shapes)


def set_threads(threads):
    """Numba and torch (when present) both use `threads` threads; returns what they use."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"Invalid threads value: {threads} (Numba started with "
                         f"{numba.config.NUMBA_NUM_THREADS}; set NUMBA_NUM_THREADS to "
                         f"allow more)")
    numba.set_num_threads(threads)
    used = {"numba": numba.get_num_threads()}
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        used["torch"] = torch.get_num_threads()
    return used


def cpu_usage():
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process), or None
    where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(t) for t in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    own = os.times()
    return (own.elapsed, (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system)


def other_processes_cpu(before, after):
    """Share of the machine's CPU time that other processes used during the run: their
    work competes with the benchmark's threads and skews CPU timings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    wall, busy, own = (b - a for a, b in zip(before, after))
    return round(max(0.0, busy - own) / (wall * os.cpu_count()), 3)


def threading_layer():
    """Numba's threading layer ("omp", "tbb", "workqueue"), once a parallel kernel ran."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    """Installed versions of the library and every peer (None: not installed)."""
    found = {"gpu_momentum": __version__, "python": platform.python_version()}
    distributions = importlib.metadata.packages_distributions()
    for module in ("numpy", "numba", "numba_cuda", "torch", "cupy", "tqdm", "matplotlib"):
        names = distributions.get(module, [])
        found[module] = importlib.metadata.version(names[0]) if names else None
    return found


def problems(options):
    """(workload, dtype, n, shapes) of every measurement, flat sweep first."""
    for dtype in options.dtypes:
        for n in options.sizes:
            yield "flat", dtype, n, None
        for workload in options.workloads:
            shapes = WORKLOADS[workload]()
            n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
            yield workload, dtype, n, shapes


def fits(device, n, dtype, limits):
    """None when `n` elements of `dtype` fit the device's memory, else why not."""
    count = HOST_ARRAYS if device == "cpu" else DEVICE_ARRAYS
    need = count * array_bytes(n, dtype)
    have = limits[device]
    if need <= HEADROOM * have:
        return None
    return (f"needs about {need / 2**30:.1f} GiB ({count} arrays), {device} has "
            f"{have / 2**30:.1f} GiB available (using at most {HEADROOM:.0%})")


def run(options, progress=None):
    """Measures everything; returns the result dict (rows without derived ratios)."""
    usage_before = cpu_usage()
    candidates, absent = discover(options.devices)
    threads = set_threads(options.threads)
    gpu_used = any(c.device == "cuda" for c in candidates)
    limits = {"cpu": available_host_bytes()}
    if gpu_used:
        from . import gpu
        limits["cuda"] = gpu.free_bytes()

    todo = list(problems(options))
    rows, skipped = [], []
    if progress is not None:
        progress.reset(total=len(todo) * len(candidates))
    for workload, dtype, n, shapes in todo:
        tensors = 1 if shapes is None else len(shapes)
        reason = fits("cpu", n, dtype, limits)
        problem = None if reason else make_problem(n, dtype, shapes)
        for candidate in candidates:
            if progress is not None:
                progress.set_postfix_str(f"{workload} {dtype} n={n:,} {candidate.name}")
            why = reason or (fits(candidate.device, n, dtype, limits)
                             if candidate.device != "cpu" else None)
            row = {"name": candidate.name, "kind": candidate.kind,
                   "device": candidate.device, "workload": workload, "tensors": tensors,
                   "dtype": str(np.dtype(dtype)), "n": n}
            if why is None:
                try:
                    built = candidate.build(problem)
                except Unsupported as error:
                    why = str(error)
            if why is not None:
                skipped.append({**row, "reason": why})
            else:
                seconds, calls = measure(built.step, candidate.timer, options.sampling)
                del built
                rows.append(summary_row(row, candidate, seconds, calls))
            gc.collect()
            if candidate.device == "cuda":
                gpu.release_memory()
            if progress is not None:
                progress.update()
        del problem
        gc.collect()

    machine = {"platform": platform.platform(), "processor": cpu_model(),
               "cores": os.cpu_count(), "threads": threads,
               "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                   / 2**30, 1),
               "threading_layer": threading_layer(),
               "other_processes_cpu": other_processes_cpu(usage_before, cpu_usage()),
               "environment": {k: v for k, v in sorted(os.environ.items())
                               if k.startswith(THREADING_VARIABLES)},
               "gpu": gpu.describe() if gpu_used else None}
    device = (machine["gpu"]["name"] if gpu_used
              else f"cpu: {machine['processor']} ({threads['numba']} threads)")
    return {"machine": machine, "device": device, "versions": versions(),
            "results": rows, "absent": [dataclasses.asdict(a) for a in absent],
            "skipped": skipped}


def summary_row(row, candidate, seconds, calls):
    median, p25, p75 = summarize(seconds)
    per_element = candidate.bytes_per_element(np.dtype(row["dtype"]))
    return {**row, "median_s": median, "p25_s": p25, "p75_s": p75,
            "samples": len(seconds), "calls_per_sample": calls,
            "bytes_per_element": per_element,
            "elements_per_s": row["n"] / median,
            "gbps": row["n"] * per_element / median / 1e9,
            "roofline": candidate.roofline}

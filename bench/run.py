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
from gpu_momentum.arrays import compute_dtype
from gpu_momentum.precision import named_dtype
from gpu_momentum.shapes import resnet50_shapes, small_cnn_shapes, transformer_shapes

from .candidates import (discover, groups_comparison, overhead_candidates,
                         torch_workload)
from .data import (FLOAT32_VELOCITY, GROUPS, OVERHEAD, OVERHEAD_SIZES, Problem,
                   Unsupported)
from .measure import Sampling, measure, summarize

GROUPS_N = 2**26  # the size at which the issue compares 1 and GROUPS parameter groups


def groups_shapes(sizes):
    """The groups comparison's GROUPS segments over the sweep's largest size (at most
    GROUPS_N), of n // GROUPS elements each, the last taking the rest."""
    n = max(GROUPS, min(max(sizes), GROUPS_N))
    size = n // GROUPS
    return [(size,)] * (GROUPS - 1) + [(n - size * (GROUPS - 1),)]


# Each many-tensor workload's shapes, given the sweep's sizes.
WORKLOADS = {
    "resnet50": lambda sizes: resnet50_shapes(),
    "transformer": lambda sizes: transformer_shapes(),
    "groups": groups_shapes,
    # gpu_momentum.torch.SGD against torch.optim.SGD over nn.Parameters of these shapes
    "torch-resnet50": lambda sizes: resnet50_shapes(),
    "torch-gpt2": lambda sizes: transformer_shapes(),
    "torch-cnn": lambda sizes: small_cnn_shapes(),
}
TORCH_WORKLOADS = ("torch-resnet50", "torch-gpt2", "torch-cnn")
# p0 and g0 stay on the host while a problem's candidates run; 20% of free memory is left
# for everything else.
HOST_ORIGINALS, HEADROOM = 2, 0.8
# Settings that change how the threaded runtimes behave, recorded with the results.
THREADING_VARIABLES = ("OMP_", "GOMP_", "KMP_", "MKL_", "NUMBA_", "CUDA_")


@dataclasses.dataclass(frozen=True)
class Options:
    sizes: tuple  # element counts of the flat sweep
    dtypes: tuple  # numpy dtype names
    workloads: tuple  # names in WORKLOADS ("groups": the groups comparison), or OVERHEAD
    devices: tuple  # "cpu", "cuda"
    threads: int
    sampling: Sampling
    velocity_dtypes: tuple = (FLOAT32_VELOCITY,)  # the library's rows, VELOCITY_DTYPES


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
    dtype = named_dtype("dtypes", dtype)
    return n * max(dtype.itemsize, compute_dtype(dtype).itemsize)


def make_problem(n, dtype, shapes=None, seed=0):
    """Params and gradients of `dtype` (a dtype or its name: "bfloat16" needs ml_dtypes,
    `pip install "gpu-momentum[bf16]"`)."""
    rng = np.random.default_rng(seed)
    dtype = named_dtype("dtypes", dtype)
    wide = np.float64 if dtype == np.float64 else np.float32
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
            if workload == OVERHEAD:
                yield from ((OVERHEAD, dtype, n, None) for n in OVERHEAD_SIZES)
                continue
            shapes = WORKLOADS[workload](options.sizes)
            n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
            yield workload, dtype, n, shapes


def memory_needed(group, n, dtype):
    """Bytes per device while every candidate of `group` holds its buffers at once."""
    per_array = array_bytes(n, dtype)
    need = {"cpu": HOST_ORIGINALS * per_array}
    for candidate in group:
        need[candidate.device] = need.get(candidate.device, 0) + candidate.arrays * per_array
    return need


def shortfall(group, n, dtype, limits):
    """None when `group` fits in free memory at once, else why not."""
    for device, need in memory_needed(group, n, dtype).items():
        if need > HEADROOM * limits[device]:
            return (f"needs about {need / 2**30:.1f} GiB of {device} memory, "
                    f"{limits[device] / 2**30:.1f} GiB available (using at most "
                    f"{HEADROOM:.0%})")
    return None


def groups(candidates, n, dtype, limits):
    """The candidates in order, cut into runs that fit in memory together (each alone
    fits): a group is measured in turns, and the fewer groups the better ratios hold."""
    found = []
    for candidate in candidates:
        if found and shortfall(found[-1] + [candidate], n, dtype, limits) is None:
            found[-1].append(candidate)
        else:
            found.append([candidate])
    return found


def run(options, progress=None):
    """Measures everything; returns the result dict (rows without derived ratios)."""
    usage_before = cpu_usage()
    candidates, absent = discover(options.devices, options.velocity_dtypes)
    torch_found = []
    if set(options.workloads) & set(TORCH_WORKLOADS):
        torch_found, torch_absent = torch_workload(options.devices)
        absent += [a for a in torch_absent if a.name not in {b.name for b in absent}]
    threads = set_threads(options.threads)
    gpu_used = any(c.device == "cuda" for c in candidates + torch_found)
    limits = {"cpu": available_host_bytes()}
    if gpu_used:
        from . import gpu
        limits["cuda"] = gpu.free_bytes()

    todo = list(problems(options))
    compared = groups_comparison(candidates)
    overhead = overhead_candidates(candidates)

    def measured_in(workload):
        if workload in TORCH_WORKLOADS:
            return torch_found
        return {"groups": compared, OVERHEAD: overhead}.get(workload, candidates)

    rows, skipped = [], []

    def runnable_at(workload, dtype):
        # The precision modes' rows run 16-bit dtypes only: elsewhere they are no row at
        # all (not a skip).
        return [c for c in measured_in(workload) if c.runs(dtype)]

    if progress is not None:
        progress.reset(total=sum(len(runnable_at(p[0], p[1])) for p in todo))

    def skip(candidate, point, reason):
        skipped.append({**describe(candidate, *point), "reason": reason})
        if progress is not None:
            progress.update()

    for workload, dtype, n, shapes in todo:
        point = (workload, 1 if shapes is None else len(shapes),
                 named_dtype("dtypes", dtype).name, n)
        runnable = []
        for candidate in runnable_at(workload, dtype):
            reason = shortfall([candidate], n, dtype, limits)
            if reason is None:
                runnable.append(candidate)
            else:
                skip(candidate, point, reason)
        problem = make_problem(n, dtype, shapes) if runnable else None
        for group in groups(runnable, n, dtype, limits):
            built = []
            for candidate in group:
                try:
                    built.append((candidate, candidate.build(problem)))
                except Unsupported as error:
                    skip(candidate, point, str(error))
            if progress is not None:
                progress.set_postfix_str(f"{workload} {dtype} n={n:,}: "
                                         f"{len(built)} candidates in turn")
            measured = measure([b.step for _, b in built], [c.timer for c, _ in built],
                               sampling_for(workload, options.sampling))
            for (candidate, _), (seconds, calls) in zip(built, measured):
                rows.append(summary_row(describe(candidate, *point), candidate, seconds,
                                        calls))
                if progress is not None:
                    progress.update()
            del built, measured
            gc.collect()
            if any(c.device == "cuda" for c in group):
                gpu.release_memory()
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


def sampling_for(workload, sampling):
    """The groups comparison asks for 5% between two runs of the same kernel: its two
    candidates take turns sample by sample (not in a few blocks), so that the machine's
    drift, which on a shared 2-core machine is larger than that, touches both alike."""
    if workload != "groups":
        return sampling
    return dataclasses.replace(sampling, rounds=sampling.samples,
                               warmup_s=max(sampling.warmup_s, 2.0))


def describe(candidate, workload, tensors, dtype, n):
    """A row's identity: what it is (by fields: backend, peer, groups) and where."""
    row = {"name": candidate.name, "kind": candidate.kind, "device": candidate.device,
           "backend": candidate.backend, "peer": candidate.peer,
           "groups": candidate.groups, "api": candidate.api, "launch": candidate.launch,
           "schedule": candidate.schedule,
           "workload": workload, "tensors": tensors, "dtype": dtype, "n": n}
    if candidate.kind == "backend":  # the precision of 16-bit rows; float32 has nearest
        row["precision"] = candidate.precision or "nearest"
        row["velocity_dtype"] = {
            None: compute_dtype(named_dtype("dtypes", dtype)).name, "param": dtype}.get(
                candidate.velocity_dtype, candidate.velocity_dtype)
    return row


def summary_row(row, candidate, seconds, calls):
    median, p25, p75 = summarize(seconds)
    dtype = named_dtype("dtypes", row["dtype"])
    per_element = candidate.bytes_per_element(dtype)
    state = None if candidate.state_bytes is None else candidate.state_bytes(dtype)
    return {**row, "median_s": median, "p25_s": p25, "p75_s": p75,
            "samples": len(seconds), "calls_per_sample": calls,
            "bytes_per_element": per_element, "state_bytes_per_element": state,
            "elements_per_s": row["n"] / median,
            "gbps": row["n"] * per_element / median / 1e9,
            "roofline": candidate.roofline}

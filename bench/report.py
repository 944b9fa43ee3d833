"""What a run yields: ratios between rows, the issue's targets, the table, JSON and plot."""

import json
import re

from .data import (COPY_ROOFLINE, FLOAT8_VELOCITY, GRAPH_GPU_TIME, GRAPH_REPLAY, KINDS,
                   LR_EACH_STEP, NUMPY_TWO_LINE, ONE_CYCLE, OVERHEAD, OVERHEAD_SIZES,
                   SIXTEEN_BIT, backend_name)

TARGET_N = 2**26
FLAT = ("flat", "float32", TARGET_N)
TORCH_CPU_FUSED = {"peer": "torch SGD fused", "device": "cpu"}
TORCH_CPU_LOOP = {"peer": "torch SGD for-loop", "device": "cpu"}
TORCH_GPU_FUSED = {"peer": "torch SGD fused", "device": "cuda"}
# (what, the library's backend, compared with, goal, where). Compared with a row matching
# those fields at the same point: the ratio is its time over the backend's; "roofline":
# the backend's fraction of the memory roofline (on the GPU the SM stream kernel's).
# where: (workload, dtype, n) of the rows, n None for a many-tensor workload (it has one
# size). In the torch workloads the backend row is gpu_momentum.torch.SGD's.
TARGETS = (
    ("cpu >= 4x NumPy as users write it", "cpu",
     {"peer": "numpy naive", "device": "cpu"}, 4.0, FLAT),
    ("cpu >= torch fused SGD on the CPU", "cpu", TORCH_CPU_FUSED, 1.0, FLAT),
    ("cupy >= 95% of the SM stream roofline", "cupy", "roofline", 0.95, FLAT),
    ("cupy >= torch fused SGD on the GPU", "cupy", TORCH_GPU_FUSED, 1.0, FLAT),
    ("numba-cuda within 10% of cupy", "numba-cuda", {"backend": "cupy", "groups": 1}, 0.9,
     FLAT),
    ("torch.SGD cpu >= 0.95x torch fused, ResNet-50", "cpu", TORCH_CPU_FUSED, 0.95,
     ("torch-resnet50", "float32", None)),
    ("torch.SGD cpu >= 1.5x torch for-loop, ResNet-50", "cpu", TORCH_CPU_LOOP, 1.5,
     ("torch-resnet50", "float32", None)),
    ("torch.SGD cpu >= 0.95x torch fused, GPT-2", "cpu", TORCH_CPU_FUSED, 0.95,
     ("torch-gpt2", "float32", None)),
    ("torch.SGD cpu >= 1.5x torch for-loop, GPT-2", "cpu", TORCH_CPU_LOOP, 1.5,
     ("torch-gpt2", "float32", None)),
    ("torch.SGD cupy >= 2x torch fused, ResNet-50", "cupy", TORCH_GPU_FUSED, 2.0,
     ("torch-resnet50", "float32", None)),
    ("torch.SGD cupy >= 1.2x torch fused, GPT-2", "cupy", TORCH_GPU_FUSED, 1.2,
     ("torch-gpt2", "float32", None)),
)
# TARGETS of the scheduled rows: the backend's and the peer's rows both follow `schedule`.
SCHEDULED_TARGETS = tuple(
    (f"torch.SGD cpu + OneCycleLR >= torch fused + OneCycleLR, {shapes}", "cpu",
     TORCH_CPU_FUSED, 1.0, (workload, "float32", None), ONE_CYCLE)
    for shapes, workload in (("small CNN", "torch-cnn"), ("ResNet-50", "torch-resnet50")))
# The overhead workload's targets, as TARGETS but each at its sizes (float32), met when
# the worst ratio over them reaches the goal.
OVERHEAD_TARGETS = (
    ("cpu step() <= 2x NumPy's two-line update", "cpu",
     {"peer": NUMPY_TWO_LINE, "device": "cpu"}, 0.5, (2**10,)),
    *(("cpu >= torch fused SGD on the CPU", "cpu",
       {"peer": "torch SGD fused", "device": "cpu"}, 1.0, (n,)) for n in (2**10, 2**16, 2**20)),
    *((f"{backend} >= torch fused SGD on the GPU, every size", backend,
       {"peer": "torch SGD fused", "device": "cuda"}, 1.0, tuple(2**e for e in range(16, 21)))
      for backend in ("cupy", "numba-cuda")),
)
# OVERHEAD_TARGETS of the scheduled rows (the lr set before every step, LR_EACH_STEP):
# the backend's and the peer's rows both change their lr.
OVERHEAD_SCHEDULED_TARGETS = (
    ("cpu step() + lr each step <= 2x NumPy's two-line update + lr each step", "cpu",
     {"peer": NUMPY_TWO_LINE, "device": "cpu"}, 0.5, (2**10,)),
    *(("cpu + lr each step >= torch fused SGD + lr each step", "cpu",
       {"peer": "torch SGD fused", "device": "cpu"}, 1.0, (n,)) for n in (2**10, 2**16, 2**20)),
)
# The cupy backend's graph replay: at most this much longer per step than the GPU's own
# time for the step's kernels, at every size of the overhead workload.
GRAPH_REPLAY_WITHIN_S = 5e-6
# On the GPU backends, a step with the lr set before it: at most this much longer than
# the constant-lr step, at every size of the overhead workload.
SCHEDULED_WITHIN_BACKENDS, SCHEDULED_WITHIN_S = ("cupy", "numba-cuda"), 2e-6
# bfloat16 at TARGET_N on the GPU, per mode: (what, precision, compared with, goal).
# "float32": elements per second over the same backend's float32 row; "nearest": over the
# nearest row's; "roofline": the fraction of the memory roofline at the row's own bytes
# per element.
PRECISION_TARGETS = (
    ("bfloat16 nearest >= 1.35x float32 elements/s", "nearest", "float32", 1.35),
    ("bfloat16 stochastic within 5% of nearest", "stochastic", "nearest", 0.95),
    *((f"bfloat16 {mode} >= 90% of the SM stream roofline", mode, "roofline", 0.9)
      for mode in ("nearest", "stochastic", "kahan", "master")),
)
PRECISION_TARGET_BACKEND = "cupy"
# An FP8 velocity at TARGET_N, flat, for each backend measured: (param dtype, goal) of
# the elements per second with an FP8 velocity over those with a float32 velocity (the
# same backend, param dtype and precision mode: "nearest"), from the same run. The goals
# are the GPU's; the CPU's ratios are held to them too, as measured.
FLOAT8_TARGETS = (("float32", 1.3), ("bfloat16", 1.6))
# The groups comparison: 100 groups and 1 group run within 5% of each other.
GROUPS_WITHIN = 0.05
REQUIRED_ROW_KEYS = ("name", "kind", "backend", "peer", "groups", "dtype", "n", "median_s",
                     "p25_s", "p75_s", "bytes_per_element", "gbps", "roofline_fraction")


def _point(row):
    return row["workload"], row["dtype"], row["n"]


def _find(rows, **fields):
    """The first row whose fields have these values, or None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in fields.items())), None)


def add_ratios(result):
    """Sets each row's roofline_fraction and, on backend rows, the speed-up over each peer
    (peer time / backend time) measured at the same workload, dtype and size; on the
    groups comparison's many-group rows, groups_ratio: their time over the time of the
    same backend with one group (None where that was not measured). GPU rows also get
    copy_fraction (of the D2D copy's GB/s at the same point) and peak_fraction (of the
    device's theoretical peak, machine.gpu.peak_gbps), None where not known. Rows with an
    FP8 velocity get float8_ratio: their elements per second over the row with a float32
    velocity at the same point (the same backend, groups, precision and schedule; None
    where that was not measured)."""
    by_point = {}
    for row in result["results"]:
        by_point.setdefault(_point(row), []).append(row)
    peak = (result["machine"].get("gpu") or {}).get("peak_gbps")
    for row in result["results"]:
        same = by_point[_point(row)]
        roofline = _find(same, name=row["roofline"])
        row["roofline_fraction"] = row["gbps"] / roofline["gbps"] if roofline else None
        if row.get("device") == "cuda":
            copy = _find(same, name=COPY_ROOFLINE)
            row["copy_fraction"] = row["gbps"] / copy["gbps"] if copy else None
            row["peak_fraction"] = row["gbps"] / peak if peak else None
        if row["kind"] == "backend":
            row["speedup"] = {peer["name"]: peer["median_s"] / row["median_s"]
                              for peer in same if peer["kind"] == "peer"}
        if row["groups"] > 1:
            one = _find(same, kind="backend", backend=row["backend"], groups=1)
            row["groups_ratio"] = row["median_s"] / one["median_s"] if one else None
        if row["kind"] == "backend" and row["dtype"] in SIXTEEN_BIT:
            base = _find(_wide_velocity(by_point.get((row["workload"], "float32", row["n"]),
                                                     [])),
                         kind="backend", backend=row["backend"], groups=1)
            row["float32_ratio"] = (row["elements_per_s"] / base["elements_per_s"]
                                    if base else None)
        if row["kind"] == "backend" and row.get("velocity_dtype") == FLOAT8_VELOCITY:
            base = _find(same, kind="backend", backend=row["backend"], api=row.get("api"),
                         groups=row["groups"], precision=row.get("precision"),
                         schedule=row.get("schedule"), velocity_dtype="float32")
            row["float8_ratio"] = (row["elements_per_s"] / base["elements_per_s"]
                                   if base else None)
    return result


def _wide_velocity(rows):
    """`rows` without those of an FP8 velocity: the rows other rows and the targets are
    measured against."""
    return [r for r in rows if r.get("velocity_dtype") != FLOAT8_VELOCITY]


def targets(result):
    """The project's performance targets, as measured (each at its TARGETS point)."""
    found = []
    for what, backend, other, goal, (workload, dtype, n), schedule in (
            *(target + (None,) for target in TARGETS), *SCHEDULED_TARGETS):
        rows = [r for r in _wide_velocity(result["results"]) if r["workload"] == workload
                and r["dtype"] == dtype and (n is None or r["n"] == n)
                and r.get("schedule") == schedule]
        row = _find(rows, kind="backend", backend=backend, groups=1)
        value = None
        if row is not None and other == "roofline":
            value = row["roofline_fraction"]
        elif row is not None:
            peer = _find(rows, **other)
            value = peer["median_s"] / row["median_s"] if peer else None
        found.append({"target": what, "workload": workload,
                      "n": row["n"] if n is None and row is not None else n,
                      "dtype": dtype, "goal": goal, "value": value,
                      "met": None if value is None else value >= goal})
    return found + overhead_targets(result)


def overhead_targets(result):
    """OVERHEAD_TARGETS as measured: each one's worst ratio over its sizes (None where a
    size lacks the backend's or the peer's row)."""
    rows = [r for r in _wide_velocity(result["results"])
            if (r["workload"], r["dtype"]) == (OVERHEAD, "float32")]
    eager = [r for r in rows if r.get("launch", "eager") == "eager"]
    found = []
    for what, backend, other, goal, sizes, schedule in (
            *(target + (None,) for target in OVERHEAD_TARGETS),
            *(target + (LR_EACH_STEP,) for target in OVERHEAD_SCHEDULED_TARGETS)):
        ratios = []
        for n in sizes:
            row = _find(eager, kind="backend", backend=backend, n=n, schedule=schedule)
            peer = _find(eager, n=n, schedule=schedule, **other)
            ratios.append(None if row is None or peer is None
                          else peer["median_s"] / row["median_s"])
        value = None if None in ratios else min(ratios)
        where = size_label(sizes[0]) if len(sizes) == 1 else \
            f"{size_label(sizes[0])}..{size_label(sizes[-1])}"
        found.append({"target": f"{what} ({OVERHEAD}, {where})", "workload": OVERHEAD,
                      "n": list(sizes), "dtype": "float32", "goal": goal, "value": value,
                      "met": None if value is None else value >= goal})
    return (found + [graph_replay_target(rows), graph_replay_target(rows, LR_EACH_STEP)]
            + scheduled_step_targets(rows))


def graph_replay_target(rows, schedule=None):
    """The cupy backend's graph replay (with the lr changed between replays as `schedule`
    says) against the GPU's own time for its kernels: the largest difference per step
    over the overhead workload's sizes, in microseconds (None unless both rows exist at
    every size)."""
    gaps = []
    for n in OVERHEAD_SIZES:
        replay = _find(rows, backend="cupy", launch=GRAPH_REPLAY, n=n, schedule=schedule)
        kernels = _find(rows, backend="cupy", launch=GRAPH_GPU_TIME, n=n)
        gaps.append(None if replay is None or kernels is None
                    else (replay["median_s"] - kernels["median_s"]) * 1e6)
    changed = "" if schedule is None else f", {schedule}"
    return _within_target(f"cupy graph replay{changed} within "
                          f"{GRAPH_REPLAY_WITHIN_S * 1e6:g} us of its kernels' GPU time",
                          gaps, GRAPH_REPLAY_WITHIN_S)


def scheduled_step_targets(rows):
    """Each GPU backend's eager step with the lr set before it against its constant-lr
    step: the largest difference per step over the overhead workload's sizes."""
    found = []
    for backend in SCHEDULED_WITHIN_BACKENDS:
        gaps = []
        for n in OVERHEAD_SIZES:
            constant, changed = (_find(rows, kind="backend", backend=backend, n=n,
                                       launch="eager", schedule=schedule)
                                 for schedule in (None, LR_EACH_STEP))
            gaps.append(None if constant is None or changed is None
                        else (changed["median_s"] - constant["median_s"]) * 1e6)
        found.append(_within_target(
            f"{backend} step() + {LR_EACH_STEP} within {SCHEDULED_WITHIN_S * 1e6:g} us of "
            f"its constant-lr step", gaps, SCHEDULED_WITHIN_S))
    return found


def _within_target(what, gaps_us, within_s):
    """A target met when the largest of `gaps_us` (microseconds per step, one per size of
    the overhead workload) is at most `within_s`."""
    value = None if None in gaps_us else max(gaps_us)
    within = within_s * 1e6
    return {"target": f"{what} ({OVERHEAD}, every size)", "workload": OVERHEAD,
            "n": list(OVERHEAD_SIZES), "dtype": "float32", "goal": within, "at_most": True,
            "unit": "us", "value": value, "met": None if value is None else value <= within}


def precision_targets(result):
    """The issue's bfloat16 targets on the GPU at 2**26 elements, as measured."""
    rows = [r for r in result["results"]
            if (r["workload"], r["dtype"], r["n"]) == ("flat", "bfloat16", TARGET_N)]
    backend = PRECISION_TARGET_BACKEND
    mode = lambda precision: _find(rows, kind="backend", backend=backend, groups=1,
                                   precision=precision, velocity_dtype="float32")
    found = []
    for what, precision, other, goal in PRECISION_TARGETS:
        row, value = mode(precision), None
        if row is not None and other == "roofline":
            value = row["roofline_fraction"]
        elif row is not None and other == "float32":
            value = row.get("float32_ratio")
        elif row is not None and mode(other) is not None:
            value = row["elements_per_s"] / mode(other)["elements_per_s"]
        found.append({"target": f"{backend} {what}", "n": TARGET_N, "dtype": "bfloat16",
                      "goal": goal, "value": value,
                      "met": None if value is None else value >= goal})
    return found


def float8_targets(result):
    """FLOAT8_TARGETS as measured, for each backend with a row in the run."""
    rows = [r for r in result["results"] if (r["workload"], r["n"]) == ("flat", TARGET_N)]
    found = []
    for backend in dict.fromkeys(r["backend"] for r in result["results"]
                                 if r["kind"] == "backend"
                                 and r.get("api", "MomentumSGD") == "MomentumSGD"):
        for dtype, goal in FLOAT8_TARGETS:
            row = _find(rows, kind="backend", backend=backend, groups=1, dtype=dtype,
                        precision="nearest", velocity_dtype=FLOAT8_VELOCITY)
            value = None if row is None else row.get("float8_ratio")
            what = dtype if dtype == "float32" else f"{dtype} nearest"
            found.append({"target": f"{backend} {what} + FP8 velocity >= {goal:g}x "
                                    f"{what} + float32 velocity elements/s",
                          "n": TARGET_N, "dtype": dtype, "goal": goal, "value": value,
                          "met": None if value is None else value >= goal})
    return found


def finish(result, options):
    """The complete result: rows with ratios, the targets, and the options used."""
    add_ratios(result)
    result["options"] = options
    result["targets"] = targets(result)
    if any(r["dtype"] == "bfloat16" for r in result["results"]):
        result["targets"] += precision_targets(result)
    if any(r.get("velocity_dtype") == FLOAT8_VELOCITY for r in result["results"]):
        result["targets"] += float8_targets(result)
    return result


def write_json(result, path):
    with open(path, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)
        out.write("\n")


def check_schema(result):
    """Raises ValueError naming the first part of `result` that breaks the JSON shape."""
    for key in ("machine", "device", "versions", "results"):
        if key not in result:
            raise ValueError(f"result lacks {key!r}")
    for i, row in enumerate(result["results"]):
        missing = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"results[{i}] lacks {missing}")
        if row["kind"] not in KINDS:
            raise ValueError(f"results[{i}] has kind {row['kind']!r}, not one of {KINDS}")
        if not row["p25_s"] <= row["median_s"] <= row["p75_s"]:
            raise ValueError(f"results[{i}] percentiles are out of order")


def slug(device):
    """A file name part from a device description: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-
    80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def result_name(result):
    if result["machine"].get("gpu"):
        return "gpu-" + slug(result["device"])
    machine = result["machine"]
    name = f"cpu-{slug(machine['processor'])}-{machine['cores']}cores"
    threads = machine["threads"]["numba"]
    return name if threads == machine["cores"] else f"{name}-{threads}threads"


# ---- the table ----

def size_label(n):
    return f"2**{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n / 1e6:.1f}M"


def seconds_label(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _columns(header, lines):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(c) for c in lines]


def table(result):
    """The readable summary: one block per workload and dtype."""
    machine = result["machine"]
    out = [f"gpu-momentum bench on {result['device']}  (threads: {machine['threads']})"]
    others = machine.get("other_processes_cpu")
    if others is not None and others > 0.05:
        out.append(f"note: other processes used {others:.0%} of the CPU time during the "
                   f"run; CPU timings are skewed")
    out.append("")
    blocks = {}
    for row in result["results"]:
        blocks.setdefault((row["workload"], row["dtype"]), []).append(row)
    for (workload, dtype), rows in blocks.items():
        tensors = rows[0]["tensors"]
        out.append(f"{workload} ({tensors} tensor{'s' * (tensors > 1)}), {dtype}:")
        lines = []
        for row in rows:
            fraction = row["roofline_fraction"]
            state = row.get("state_bytes_per_element")
            lines.append([size_label(row["n"]), row["name"],
                          seconds_label(row["median_s"]),
                          f"{seconds_label(row['p25_s'])} .. {seconds_label(row['p75_s'])}",
                          f"{row['elements_per_s'] / 1e9:.2f}", f"{row['gbps']:.1f}",
                          f"{row['bytes_per_element']:.4g}",
                          "-" if fraction is None else f"{fraction:.0%}",
                          "-" if state is None else f"{state:.4g}"])
        out += _columns(["n", "name", "median", "p25 .. p75", "Gelem/s", "GB/s", "B/elem",
                         "of roofline", "state B/elem"], lines)
        out += ([""] + speedup_lines(rows) + groups_lines(rows) + float32_lines(rows) +
                float8_lines(rows) + gpu_roofline_lines(rows) + [""])
    out += target_lines(result)
    not_run = [f"  {a['name']}: {a['reason']}" for a in result["absent"]]
    reasons = {}
    for s in result["skipped"]:
        reasons.setdefault((s["name"], s["reason"]), []).append(
            f"{s['workload']} {s['dtype']} {size_label(s['n'])}")
    not_run += [f"  {name} at {', '.join(where)}: {reason}"
                for (name, reason), where in reasons.items()]
    if not_run:
        out += ["", "Not measured:"] + not_run
    return "\n".join(out)


def gpu_roofline_lines(rows):
    """Each GPU backend row's fraction of the three GPU rooflines: the SM stream kernel
    (the roofline of record), the D2D copy and the theoretical peak."""
    percent = lambda value: "-" if value is None else f"{value:.0%}"
    lines = [[size_label(row["n"]), row["name"], percent(row["roofline_fraction"]),
              percent(row.get("copy_fraction")), percent(row.get("peak_fraction"))]
             for row in rows if row["kind"] == "backend" and row.get("device") == "cuda"]
    if not lines:
        return []
    return ["GPU rooflines (fraction of each):"] + _columns(
        ["n", "name", "SM stream", "D2D copy", "peak"], lines)


def speedup_lines(rows):
    """Speed-up of each backend over each peer, one line per pair, one column per size."""
    sizes = sorted({row["n"] for row in rows})
    pairs = {}
    for row in rows:
        for peer, ratio in row.get("speedup", {}).items():
            pairs.setdefault((row["name"], peer), {})[row["n"]] = f"{ratio:.2f}x"
    if not pairs:
        return []
    lines = [[backend, f"vs {peer}"] + [ratios.get(n, "-") for n in sizes]
             for (backend, peer), ratios in pairs.items()]
    return (["speed-up (peer time / backend time):"]
            + _columns(["backend", "peer"] + [size_label(n) for n in sizes], lines))


def groups_lines(rows):
    """The groups comparison: time with many parameter groups over time with one group,
    per backend (each segment of the workload is its own group)."""
    lines = []
    for row in rows:
        if row["groups"] == 1:
            continue
        ratio = row.get("groups_ratio")
        verdict = ("not measured" if ratio is None else
                   "met" if max(ratio, 1 / ratio) <= 1 + GROUPS_WITHIN else "MISSED")
        lines.append([backend_name(row["backend"]), size_label(row["n"]),
                      "-" if ratio is None else f"{ratio:.3f}", verdict])
    if not lines:
        return []
    many = rows[0]["tensors"]
    return ([f"{many} groups / 1 group (time ratio over the same {many} segments; goal: "
             f"within {GROUPS_WITHIN:.0%}):"]
            + _columns(["backend", "n", "ratio", ""], lines))


def float32_lines(rows):
    """16-bit rows: elements per second over the same backend's float32 row at the same
    size (each mode's bytes per element are in the table above)."""
    sizes = sorted({row["n"] for row in rows})
    ratios = {}
    for row in rows:
        if row.get("float32_ratio") is not None:
            ratios.setdefault(row["name"], {})[row["n"]] = f"{row['float32_ratio']:.2f}x"
    if not ratios:
        return []
    lines = [[name] + [found.get(n, "-") for n in sizes] for name, found in ratios.items()]
    return (["elements/s against float32 (the same backend and size):"]
            + _columns(["row"] + [size_label(n) for n in sizes], lines))


def float8_lines(rows):
    """FP8-velocity rows: elements per second over the same backend's float32-velocity row
    (the same param dtype, precision and size; bytes per element moved and of state are in
    the table above)."""
    sizes = sorted({row["n"] for row in rows})
    ratios = {}
    for row in rows:
        if row.get("float8_ratio") is not None:
            ratios.setdefault(row["name"], {})[row["n"]] = f"{row['float8_ratio']:.2f}x"
    if not ratios:
        return []
    lines = [[name] + [found.get(n, "-") for n in sizes] for name, found in ratios.items()]
    return (["elements/s, FP8 velocity over float32 velocity (the same backend, mode and "
             "size):"] + _columns(["row"] + [size_label(n) for n in sizes], lines))


def target_lines(result):
    lines = [[t["target"], f"{t['value']:.2f}" if t["value"] is not None else "-",
              _goal(t), {True: "met", False: "MISSED", None: "not measured"}[t["met"]]]
             for t in result["targets"]]
    return [f"Targets (ratios; float32 unless named; flat: at {size_label(TARGET_N)} "
            f"elements):"] + _columns(["target", "measured", "goal", ""], lines)


def _goal(target):
    """">= 4" for a ratio, "<= 5 us" for a target with a unit that is a bound."""
    unit = f" {target['unit']}" if target.get("unit") else ""
    return f"{'<=' if target.get('at_most') else '>='} {target['goal']:g}{unit}"


# ---- the plot ----

def plot(result, path):
    """GB/s against size per dtype (one line per backend/peer, rooflines dashed), the
    many-tensor workloads as bars, and the overhead workload's time per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    dtypes = sorted({r["dtype"] for r in rows}) or ["float32"]
    kinds = {r["name"]: r["kind"] for r in rows}
    names = sorted(kinds, key=lambda name: (KINDS.index(kinds[name]), name))
    lines = [n for n in names if kinds[n] != "roofline"]
    rooflines = [n for n in names if kinds[n] == "roofline"]
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    of_record = {r["roofline"] for r in rows}
    colors = {**dict(zip(lines, palette)),
              **{n: "black" if n in of_record else "gray" for n in rooflines}}
    both_devices = len({r["device"] for r in rows}) > 1
    many = sorted({r["workload"] for r in rows} - {"flat", OVERHEAD})
    panels = ["sweep", *(["bars"] * bool(many)),
              *(["overhead"] * any(r["workload"] == OVERHEAD for r in rows))]
    widths = {"sweep": 8, "bars": 5, "overhead": 6}
    figure, axes = plt.subplots(len(dtypes), len(panels), squeeze=False,
                                figsize=(sum(widths[p] for p in panels), 5.5 * len(dtypes)),
                                gridspec_kw={"width_ratios": [widths[p] for p in panels]})
    for i, dtype in enumerate(dtypes):
        sweep = axes[i][0]
        for name in names:
            line = sorted((r for r in rows if r["name"] == name and r["dtype"] == dtype
                           and r["workload"] == "flat"), key=lambda r: r["n"])
            if not line:
                continue
            kind = line[0]["kind"]
            dashed = kind == "roofline"
            sweep.plot([r["n"] for r in line], [r["gbps"] for r in line],
                       linestyle="--" if dashed else "-", marker="" if dashed else "o",
                       markersize=3, linewidth=2.2 if kind == "backend" else 1.4,
                       zorder=3 if kind == "backend" else 2,
                       color=colors[name], label=name)
        sweep.set_xscale("log", base=2)
        if both_devices:  # GPU and CPU bandwidths differ a hundredfold
            sweep.set_yscale("log")
        sweep.set_xlabel("elements in the buffer")
        sweep.set_ylabel("GB/s (bytes each row moves per element)")
        sweep.set_title(f"one flat buffer, {dtype}")
        sweep.grid(True, which="major", alpha=0.3)
        sweep.legend(fontsize=7, loc="best")
        if many:
            _bars(axes[i][panels.index("bars")], [r for r in rows if r["dtype"] == dtype
                                                  and r["workload"] in many], many, colors)
        if "overhead" in panels:
            _overhead(axes[i][panels.index("overhead")],
                      [r for r in rows if r["dtype"] == dtype and r["workload"] == OVERHEAD],
                      colors)
    figure.suptitle(f"gpu-momentum bench: {result['device']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _overhead(ax, rows, colors):
    """Time per step against size, log-log: the per-step cost where the data is small."""
    for name in dict.fromkeys(r["name"] for r in rows):
        line = sorted((r for r in rows if r["name"] == name), key=lambda r: r["n"])
        backend = line[0]["kind"] == "backend"
        ax.plot([r["n"] for r in line], [r["median_s"] * 1e6 for r in line], marker="o",
                markersize=3, linewidth=2.2 if backend else 1.4, zorder=3 if backend else 2,
                color=colors[name], label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("elements in the buffer")
    ax.set_ylabel("us per step (wall clock, one sync per loop)")
    ax.set_title("overhead: time per step")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _bars(ax, rows, workloads, colors):
    labels, values, shades, hatches = [], [], [], []
    for workload in workloads:
        for row in sorted((r for r in rows if r["workload"] == workload),
                          key=lambda r: r["gbps"]):
            labels.append(f"{workload}: {row['name']}")
            values.append(row["gbps"])
            shades.append(colors[row["name"]])
            hatches.append("//" if row["kind"] == "roofline" else "")
    bars = ax.barh(range(len(values)), values, color=shades)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.set_xlabel("GB/s")
    ax.set_title("many tensors: one flat buffer vs per tensor")
    ax.grid(True, axis="x", alpha=0.3)

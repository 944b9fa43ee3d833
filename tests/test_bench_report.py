"""The benchmark's report: ratios at the same point, the targets as measured (met, missed,
not measured), the FP8, schedule, overhead and graph-replay targets, the JSON schema, the
table and the plot, over rows written here. No test asserts a timing."""

import pytest

from bench_rows import result_of as _result, row as _row
from gpu_momentum.bench import candidates, report
from gpu_momentum.bench import data as candidates_data
from gpu_momentum.kernels.layout import FLOAT8_VELOCITY
from harness import require


def test_ratios_compare_rows_at_the_same_point_only():
    result = _result([
        _row("gpu-momentum cpu", "backend", 0.05),
        _row("numpy naive (cpu)", "peer", 0.25),
        _row("torch SGD fused (cpu)", "peer", 0.04),
        _row("R", "roofline", 0.04),
        _row("numpy copyto (cpu)", "roofline", 0.01, bytes_per_element=8),
        _row("numpy naive (cpu)", "peer", 1.0, n=2**20),  # another size: not compared
    ])
    report.add_ratios(result)
    backend, naive, fused, roofline, copy, other = result["results"]
    assert backend["speedup"] == pytest.approx({"numpy naive (cpu)": 5.0,
                                                "torch SGD fused (cpu)": 0.8})
    assert backend["roofline_fraction"] == pytest.approx(0.8)
    assert roofline["roofline_fraction"] == 1.0
    assert copy["roofline_fraction"] == pytest.approx(8 / 0.01 / (20 / 0.04))
    assert "speedup" not in naive
    assert other["roofline_fraction"] is None  # no roofline measured at 2**20


def test_targets_report_met_missed_and_unmeasured():
    result = _result([
        _row("gpu-momentum cpu", "backend", 0.05),
        _row("numpy naive (cpu)", "peer", 0.25),
        _row("torch SGD fused (cpu)", "peer", 0.04),
        _row("R", "roofline", 0.04),
    ])
    report.add_ratios(result)
    found = {t["target"]: t for t in report.targets(result)}
    assert found["cpu >= 4x NumPy as users write it"]["value"] == pytest.approx(5.0)
    assert found["cpu >= 4x NumPy as users write it"]["met"] is True
    assert found["cpu >= torch fused SGD on the CPU"]["met"] is False
    assert found["numba-cuda within 10% of cupy"]["met"] is None
    assert "MISSED" in report.table({**result, "targets": report.targets(result)})


def test_groups_ratio_and_its_lines():
    """The groups comparison: the 100-group row's time over its 1-group row's, at the same
    point only, shown with whether it is within 5%."""
    result = _result([
        {**_row("gpu-momentum cpu", "backend", 0.040), "workload": "groups", "tensors": 100},
        {**_row("gpu-momentum cpu (100 groups)", "backend", 0.041), "workload": "groups",
         "tensors": 100},
        {**_row("gpu-momentum cupy (100 groups)", "backend", 0.001), "workload": "groups",
         "tensors": 100},
        _row("gpu-momentum cpu", "backend", 0.030),  # the flat sweep: not compared
    ])
    report.add_ratios(result)
    one, many, alone, flat = result["results"]
    assert many["groups_ratio"] == pytest.approx(1.025)
    assert alone["groups_ratio"] is None and "groups_ratio" not in one | flat
    table = report.table({**result, "targets": report.targets(result)})
    assert "100 groups / 1 group (time ratio over the same 100 segments; goal: within 5%)" \
        in table
    lines = table.splitlines()
    assert any(line.split() == ["gpu-momentum", "cpu", "2**26", "1.025", "met"]
               for line in lines)
    assert any(line.split() == ["gpu-momentum", "cupy", "2**26", "-", "not", "measured"]
               for line in lines)
    many["median_s"] = 0.0375  # faster by more than 5% is out of the goal too
    report.add_ratios(result)
    assert ["gpu-momentum", "cpu", "2**26", "0.938", "MISSED"] in [
        line.split() for line in report.table({**result, "targets": []}).splitlines()]


def _float8_rows(backend="cpu", device="cpu"):
    """float32 and bfloat16 rows of `backend` at 2**26, each with a float32 and an FP8
    velocity ("nearest"), and a "kahan" pair in bfloat16."""
    rows = []
    for dtype, precision, wide_s, narrow_s, wide_b, narrow_b in (
            ("float32", "nearest", 0.060, 0.040, 20, 14.03),
            ("bfloat16", "nearest", 0.045, 0.030, 14, 8.03),
            ("bfloat16", "kahan", 0.050, 0.050, 18, 12.03)):
        for velocity, seconds, moved in (("float32", wide_s, wide_b),
                                         (FLOAT8_VELOCITY, narrow_s, narrow_b)):
            mode = "" if dtype == "float32" else f" {precision}"
            label = ", FP8 velocity" if velocity == FLOAT8_VELOCITY else ""
            rows.append({**_row(f"gpu-momentum {backend}{mode}{label}", "backend", seconds,
                                bytes_per_element=moved),
                         "dtype": dtype, "device": device, "api": "MomentumSGD",
                         "precision": precision, "velocity_dtype": velocity,
                         "schedule": None})
    return rows


def test_fp8_ratios_compare_the_same_backend_dtype_and_mode():
    rows = _float8_rows()
    rows.append({**rows[1], "n": 2**20, "median_s": 0.001})  # no float32 velocity here
    result = report.finish(_result(rows), {})
    by_name = {(r["name"], r["n"]): r for r in result["results"]}
    assert by_name["gpu-momentum cpu, FP8 velocity", 2**26]["float8_ratio"] == \
        pytest.approx(0.060 / 0.040)
    assert by_name["gpu-momentum cpu nearest, FP8 velocity", 2**26]["float8_ratio"] == \
        pytest.approx(0.045 / 0.030)
    assert by_name["gpu-momentum cpu kahan, FP8 velocity", 2**26]["float8_ratio"] == \
        pytest.approx(1.0)
    assert by_name["gpu-momentum cpu, FP8 velocity", 2**20]["float8_ratio"] is None
    assert "float8_ratio" not in by_name["gpu-momentum cpu", 2**26]
    # the float32 targets and 16-bit ratios keep comparing float32-velocity rows
    fp8_bf16 = by_name["gpu-momentum cpu nearest, FP8 velocity", 2**26]
    assert fp8_bf16["float32_ratio"] == pytest.approx(0.060 / 0.030)
    found = {t["target"]: t for t in result["targets"]}
    f32 = found["cpu float32 + FP8 velocity >= 1.3x float32 + float32 velocity elements/s"]
    assert (f32["value"], f32["met"]) == (pytest.approx(1.5), True)
    bf16 = found["cpu bfloat16 nearest + FP8 velocity >= 1.6x bfloat16 nearest + float32 "
                 "velocity elements/s"]
    assert (bf16["value"], bf16["met"]) == (pytest.approx(1.5), False)
    assert not any(t["target"].startswith("cupy") and "FP8" in t["target"]
                   for t in result["targets"])  # no cupy rows: no cupy FP8 targets
    table = report.table(result)
    assert "elements/s, FP8 velocity over float32 velocity" in table
    assert ["gpu-momentum", "cpu", "nearest,", "FP8", "velocity", "1.50x"] in [
        line.split() for line in table.splitlines()]


def test_fp8_targets_are_not_measured_without_their_rows():
    rows = [r for r in _float8_rows("cupy", "cuda") if r["dtype"] == "float32"]
    for row, seconds in zip(rows, (0.0006, 0.0005)):  # FP8 1.2x the float32 velocity
        row.update(median_s=seconds, elements_per_s=row["n"] / seconds)
    result = report.finish(_result(rows), {})
    found = {t["target"]: t for t in result["targets"] if "FP8" in t["target"]}
    assert found["cupy float32 + FP8 velocity >= 1.3x float32 + float32 velocity "
                 "elements/s"]["met"] is False
    assert found["cupy bfloat16 nearest + FP8 velocity >= 1.6x bfloat16 nearest + float32 "
                 "velocity elements/s"]["met"] is None
    plain = report.finish(_result([_row("gpu-momentum cpu", "backend", 0.05)]), {})
    assert not any("FP8" in t["target"] for t in plain["targets"])


def test_check_schema_rejects_broken_results():
    good = report.add_ratios(_result([_row("R", "roofline", 0.04)]))
    report.check_schema(good)
    with pytest.raises(ValueError, match="lacks 'versions'"):
        report.check_schema({k: v for k, v in good.items() if k != "versions"})
    with pytest.raises(ValueError, match=r"results\[0\] lacks \['gbps'\]"):
        report.check_schema({**good, "results": [
            {k: v for k, v in good["results"][0].items() if k != "gbps"}]})
    with pytest.raises(ValueError, match="kind 'other'"):
        report.check_schema({**good, "results": [{**good["results"][0], "kind": "other"}]})


def test_plot_writes_a_png(tmp_path):
    require("matplotlib")
    rows = []
    for n in (2**16, 2**18, 2**20):
        rows += [_row("gpu-momentum cpu", "backend", 1e-9 * n, n=n),
                 _row("numpy naive (cpu)", "peer", 5e-9 * n, n=n),
                 _row("R", "roofline", 0.9e-9 * n, n=n)]
    rows += [{**_row("gpu-momentum cpu", "backend", 0.02, n=25_557_032),
              "workload": "resnet50", "tensors": 161}]
    result = report.add_ratios(_result(rows))
    path = tmp_path / "bench.png"
    report.plot(result, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_result_names_carry_the_device():
    result = _result([])
    assert report.result_name(result) == "cpu-test-cpu-2cores"
    result["machine"]["threads"]["numba"] = 1
    assert report.result_name(result) == "cpu-test-cpu-2cores-1threads"
    result["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3"}
    result["device"] = "NVIDIA H100 80GB HBM3"
    assert report.result_name(result) == "gpu-nvidia-h100-80gb-hbm3"


def test_scheduled_targets_compare_scheduled_rows_only():
    def overhead(name, kind, median, n, schedule):
        plain = name.replace(" + lr each step", "")  # the fields of the constant row
        return {**_row(plain, kind, median, n=n, workload="overhead"), "name": name,
                "schedule": schedule}

    rows = []
    for n in (2**10, 2**16, 2**20):
        rows += [overhead("gpu-momentum cpu", "backend", 1e-6, n, None),
                 overhead("gpu-momentum cpu + lr each step", "backend", 5e-6, n,
                          "lr each step"),
                 overhead("numpy two-line (cpu)", "peer", 3e-6, n, None),
                 overhead("numpy two-line + lr each step (cpu)", "peer", 2e-6, n,
                          "lr each step"),
                 overhead("torch SGD fused (cpu)", "peer", 4e-6, n, None),
                 overhead("torch SGD fused + lr each step (cpu)", "peer", 6e-6, n,
                          "lr each step")]
    found = {t["target"]: t for t in report.targets(_result(rows))}
    two_line = found["cpu step() + lr each step <= 2x NumPy's two-line update + lr each "
                     "step (overhead, 2**10)"]
    assert two_line["value"] == pytest.approx(0.4) and two_line["met"] is False
    fused = found["cpu + lr each step >= torch fused SGD + lr each step (overhead, 2**16)"]
    assert fused["value"] == pytest.approx(1.2) and fused["met"] is True
    constant = found["cpu step() <= 2x NumPy's two-line update (overhead, 2**10)"]
    assert constant["value"] == pytest.approx(3.0)  # the constant rows, never scheduled
    cycle = found["torch.SGD cpu + OneCycleLR >= torch fused + OneCycleLR, small CNN"]
    assert cycle["met"] is None  # not measured


def test_torch_targets_compare_the_adapter_with_torch_at_its_workload():
    rows = [{**_row(name, "peer", median, n=25_557_032), "kind": kind,
             "workload": "torch-resnet50", "tensors": 161, **fields}
            for name, kind, median, fields in (
                ("gpu_momentum.torch.SGD (cpu)", "backend", 0.02,
                 {"backend": "cpu", "peer": None, "groups": 1, "api": candidates.TORCH_API}),
                ("torch SGD fused (cpu)", "peer", 0.021,
                 {"backend": None, "peer": "torch SGD fused", "groups": 1}),
                ("torch SGD for-loop (cpu)", "peer", 0.025,
                 {"backend": None, "peer": "torch SGD for-loop", "groups": 1}))]
    result = report.add_ratios(_result(rows))
    found = {t["target"]: t for t in report.targets(result)}
    fused = found["torch.SGD cpu >= 0.95x torch fused, ResNet-50"]
    assert fused["value"] == pytest.approx(1.05) and fused["met"] is True
    assert fused["n"] == 25_557_032 and fused["workload"] == "torch-resnet50"
    loop = found["torch.SGD cpu >= 1.5x torch for-loop, ResNet-50"]
    assert loop["value"] == pytest.approx(1.25) and loop["met"] is False
    assert found["torch.SGD cpu >= 0.95x torch fused, GPT-2"]["met"] is None
    assert found["cpu >= torch fused SGD on the CPU"]["met"] is None  # flat: not measured


def test_precision_targets_compare_the_bfloat16_rows():
    n, gpu = 2**26, {"device": "cuda", "backend": "cupy", "groups": 1}
    rows = [
        {**_row("gpu-momentum cupy", "backend", 0.0004, n=n), **gpu},
        {**_row("D2D", "roofline", 0.0001, n=n, bytes_per_element=8), "device": "cuda"},
        {**_row("D2D", "roofline", 0.00005, n=n, bytes_per_element=4), "device": "cuda",
         "dtype": "bfloat16"},
    ]
    for mode, seconds, moved in (("nearest", 0.00028, 14), ("stochastic", 0.00031, 14),
                                 ("kahan", 0.0004, 18), ("master", 0.0004, 20)):
        rows.append({**_row(f"gpu-momentum cupy {mode}", "backend", seconds, n=n,
                            bytes_per_element=moved), **gpu, "dtype": "bfloat16",
                     "precision": mode, "velocity_dtype": "float32"})
    for row in rows:
        row["roofline"] = "D2D"
    result = report.finish(_result(rows), {})
    found = {t["target"]: t for t in result["targets"]}
    ratio = found["cupy bfloat16 nearest >= 1.35x float32 elements/s"]
    assert ratio["value"] == pytest.approx(0.0004 / 0.00028) and ratio["met"] is True
    within = found["cupy bfloat16 stochastic within 5% of nearest"]
    assert within["value"] == pytest.approx(0.00028 / 0.00031) and within["met"] is False
    kahan = found["cupy bfloat16 kahan >= 90% of the SM stream roofline"]
    assert kahan["value"] == pytest.approx((18 / 0.0004) / (4 / 0.00005))


def test_overhead_targets_take_the_worst_ratio_over_their_sizes():
    rows = []
    for n, ours, two_line, fused in ((2**10, 4e-6, 3e-6, 5e-6), (2**16, 3e-5, 3e-5, 2.9e-5),
                                     (2**20, 1e-3, 2e-3, 1e-3)):
        rows += [_row("gpu-momentum cpu", "backend", ours, n=n, workload="overhead"),
                 _row("numpy two-line (cpu)", "peer", two_line, n=n, workload="overhead"),
                 _row("torch SGD fused (cpu)", "peer", fused, n=n, workload="overhead")]
    found = {t["target"]: t for t in report.targets(_result(rows))}
    two_line = found["cpu step() <= 2x NumPy's two-line update (overhead, 2**10)"]
    assert (two_line["value"], two_line["met"]) == (pytest.approx(0.75), True)
    fused = [found[f"cpu >= torch fused SGD on the CPU (overhead, {size})"]
             for size in ("2**10", "2**16", "2**20")]
    assert [t["met"] for t in fused] == [True, False, True]
    assert fused[1]["value"] == pytest.approx(2.9e-5 / 3e-5)
    gpu = found["cupy >= torch fused SGD on the GPU, every size (overhead, 2**16..2**20)"]
    assert gpu["met"] is None and gpu["n"] == [2**e for e in range(16, 21)]
    # a flat row at the same size is another workload: never compared
    flat = report.targets(_result([_row("gpu-momentum cpu", "backend", 1, n=2**10),
                                   _row("numpy two-line (cpu)", "peer", 1, n=2**10)]))
    assert all(t["value"] is None for t in flat if t.get("workload") == "overhead")


def test_graph_replay_target_is_the_largest_gap_to_the_kernels_gpu_time():
    def graph_row(launch, median, n):
        name = f"gpu-momentum cupy ({launch})"
        return {**_row("gpu-momentum cupy", "backend", median, n=n, workload="overhead"),
                "name": name, "device": "cuda", "launch": launch}

    sizes = candidates_data.OVERHEAD_SIZES
    rows = [graph_row("graph replay", 9e-6 + n * 1e-12, n) for n in sizes]
    rows += [graph_row("graph replay, GPU time", 6e-6 + n * 1e-12, n) for n in sizes]
    rows[len(sizes) - 1]["median_s"] += 3e-6  # one size 6 us over its kernels
    rows.append(_row("gpu-momentum cupy", "backend", 1e-3, n=2**16, workload="overhead"))
    found = {t["target"]: t for t in report.targets(_result(rows))}
    target = found["cupy graph replay within 5 us of its kernels' GPU time (overhead, "
                   "every size)"]
    assert target["value"] == pytest.approx(6.0) and target["met"] is False
    # the eager row is what the eager targets compare, never a graph row
    eager = found["cupy >= torch fused SGD on the GPU, every size (overhead, 2**16..2**20)"]
    assert eager["value"] is None
    table = report.table(report.finish(_result(rows), {}))
    assert "<= 5 us" in table and "MISSED" in table
    missing = report.targets(_result(rows[:3]))
    assert missing[-1]["met"] is None
    assert candidates_data.Candidate(
        "backend", "cuda", None, None, None, 4, backend="cupy",
        launch="graph replay").name == "gpu-momentum cupy (graph replay)"


def test_gpu_schedule_targets_are_the_largest_gap_to_the_constant_lr_rows():
    """On the GPU: the eager step with the lr set before it within 2 us of the constant-lr
    step, and the graph replay with the lr set between replays within 5 us of the
    kernels' GPU time, at every size of the overhead workload."""
    def gpu_row(backend, median, n, launch="eager", schedule=None):
        return {**_row(f"gpu-momentum {backend}", "backend", median, n=n,
                       workload="overhead"),
                "device": "cuda", "launch": launch, "schedule": schedule}

    sizes = candidates_data.OVERHEAD_SIZES
    scheduled = candidates_data.LR_EACH_STEP
    rows = []
    for n in sizes:
        rows += [gpu_row("cupy", 20e-6, n), gpu_row("cupy", 21e-6, n, schedule=scheduled),
                 gpu_row("numba-cuda", 30e-6, n),
                 gpu_row("numba-cuda", 30.5e-6, n, schedule=scheduled),
                 gpu_row("cupy", 8e-6, n, "graph replay, GPU time"),
                 gpu_row("cupy", 10e-6, n, "graph replay"),
                 gpu_row("cupy", 12e-6, n, "graph replay", scheduled)]
    rows[-4]["median_s"] = 33.5e-6  # the last size: numba-cuda 3.5 us over its constant lr
    found = {t["target"]: t for t in report.targets(_result(rows))}
    every = " (overhead, every size)"
    cupy = found["cupy step() + lr each step within 2 us of its constant-lr step" + every]
    numba = found["numba-cuda step() + lr each step within 2 us of its constant-lr step"
                  + every]
    replay = found["cupy graph replay, lr each step within 5 us of its kernels' GPU time"
                   + every]
    assert (cupy["value"], cupy["met"]) == (pytest.approx(1.0), True)
    assert (numba["value"], numba["met"]) == (pytest.approx(3.5), False)
    assert (replay["value"], replay["met"]) == (pytest.approx(4.0), True)
    constant = found["cupy graph replay within 5 us of its kernels' GPU time" + every]
    assert constant["value"] == pytest.approx(2.0)
    alone = {t["target"]: t for t in report.targets(_result(rows[:-7]))}
    assert alone["cupy step() + lr each step within 2 us of its constant-lr step"
                 + every]["met"] is None  # a size without its rows: not measured

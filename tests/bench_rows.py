"""Benchmark result rows as `gpu-momentum bench` writes them, for the tests of the report
(ratios, targets, tables) and the runs."""

import re


def row(name, kind, median, n=2**26, bytes_per_element=20, roofline="R", **extra):
    """A row as the benchmark writes it; its backend, peer and groups fields from `name`
    ("gpu-momentum cpu (100 groups)", "torch SGD fused (cpu)")."""
    if kind == "backend":
        backend, groups = re.fullmatch(r"gpu-momentum ([a-z0-9-]+),?(?: [A-Za-z0-9, -]+)?"
                                       r"(?: \((\d+) groups\))?", name).groups()
        fields = {"backend": backend, "peer": None, "groups": int(groups or 1)}
    else:
        fields = {"backend": None, "peer": name.split(" (")[0], "groups": 1}
    return {"name": name, "kind": kind, "device": "cpu", **fields, "workload": "flat",
            "tensors": 1,
            "dtype": "float32", "n": n, "median_s": median, "p25_s": median * 0.9,
            "p75_s": median * 1.1, "bytes_per_element": bytes_per_element,
            "gbps": n * bytes_per_element / median / 1e9, "elements_per_s": n / median,
            "samples": 5, "calls_per_sample": 1, "roofline": roofline, **extra}


def result_of(rows):
    return {"machine": {"processor": "Test CPU", "cores": 2, "threads": {"numba": 2},
                        "gpu": None},
            "device": "cpu: Test CPU (2 threads)", "versions": {}, "results": rows,
            "absent": [], "skipped": []}

"""The GPU rooflines without a GPU: the SM stream kernel (kernels/stream.cu) compiled by
NVRTC for sm_80 and sm_90 with 128-bit accesses and no spills, and run on the CPU through
the host shim; the theoretical peak from (fake) device attributes; the report's fields."""

import ctypes
import re

import numpy as np
import pytest

from bench import report
from bench.data import COPY_ROOFLINE, ROOFLINES
from gpu_momentum.bench import gpu
from harness import require
from host_kernel import compile_cpp

ARCHS = ("sm_80", "sm_90")


def _nvrtc_compile(source, arch):
    """(PTX, ptxas log) of `source` compiled by NVRTC for `arch`."""
    nvrtc = require("cuda.bindings.nvrtc")
    _, program = nvrtc.nvrtcCreateProgram(source.encode(), b"stream.cu", 0, [], [])
    options = [f"--gpu-architecture={arch}".encode(), b"-Xptxas=-v"]
    try:
        status, = nvrtc.nvrtcCompileProgram(program, len(options), options)
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(program, log)
        assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode()
        _, size = nvrtc.nvrtcGetPTXSize(program)
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(program, ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return ptx.rstrip(b"\0").decode(), log.decode()


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_kernel_moves_128_bit_words_without_spills(arch):
    ptx, log = _nvrtc_compile(gpu.stream_source(), arch)
    code = re.sub(r"//.*", "", ptx)
    assert f".target {arch}" in code
    # Three 128-bit loads (two arrays read and written, one read-only), two stores, and
    # no narrower global access.
    loads = re.findall(r"ld\.global(?:\.nc)?\.v4\.u32", code)
    stores = re.findall(r"st\.global\.v4\.u32", code)
    assert len(loads) == 3 and len(stores) == 2, (loads, stores)
    assert not re.search(r"(ld|st)\.global(\.nc)?\.(u|b|s|f)(8|16|32|64)\b", code)
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", log), log
    assert gpu.STREAM_KERNEL in code


def test_stream_kernel_on_the_host_adds_the_third_array_to_the_first_two(tmp_path):
    """The kernel's body run on the CPU through the host shim: a[i] += c[i], b[i] += c[i]
    over every 32-bit lane of every word, for a grid smaller than the words (the stride
    loop) and one larger."""
    source = tmp_path / "stream_host.cpp"
    source.write_text(
        gpu.stream_source() +
        '\nextern "C" void stream_host(unsigned grid, unsigned block, uint4* a, uint4* b,'
        " const uint4* c, long long words) {\n"
        "    gm_host_launch(grid, block, stream_read3_write2, a, b, c, words);\n}\n")
    library = ctypes.CDLL(str(compile_cpp(source, tmp_path / "stream_host.so",
                                          ["-O1", "-shared", "-fPIC"], tmp_path)))
    rng = np.random.default_rng(3)
    for words, grid, block in ((37, 2, 8), (5, 4, 32)):
        a, b, c = (rng.integers(0, 2**32, 4 * words, dtype=np.uint32) for _ in range(3))
        want_a, want_b = a + c, b + c  # wraps, as the kernel's unsigned adds do
        pointers = [x.ctypes.data_as(ctypes.c_void_p) for x in (a, b, c)]
        library.stream_host(ctypes.c_uint(grid), ctypes.c_uint(block), *pointers,
                            ctypes.c_longlong(words))
        np.testing.assert_array_equal(a, want_a)
        np.testing.assert_array_equal(b, want_b)


def test_stream_blocks_fill_the_device_once_and_cover_small_arrays():
    # H200: 132 SMs of 2048 threads, 256 per block: 8 blocks per SM.
    assert gpu.stream_blocks(132, 2048, 2**30) == 132 * 8
    assert gpu.stream_blocks(132, 2048, 1000) == 4  # ceil(1000 / 256)
    assert gpu.stream_blocks(132, 2048, 1) == 1


def test_theoretical_peak_is_clock_times_bus_width_twice_per_clock():
    # H200: 3201 MHz memory clock (nvidia-smi's clocks.mem), 6144-bit HBM3e bus.
    assert gpu.theoretical_peak_gbps(3_201_000, 6144) == pytest.approx(4916.736)
    # H100 SXM: 2619 MHz, 5120 bits: 3.35 TB/s.
    assert gpu.theoretical_peak_gbps(2_619_000, 5120) == pytest.approx(3352.32)
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match="memory_clock_khz"):
            gpu.theoretical_peak_gbps(bad, 6144)
        with pytest.raises(ValueError, match="bus_width_bits"):
            gpu.theoretical_peak_gbps(3_201_000, bad)


def test_memory_attributes_read_the_clock_and_bus_width_attributes():
    asked = []

    def fake_get_attribute(attribute, device_id):
        asked.append((attribute, device_id))
        return {gpu.MEMORY_CLOCK_RATE_ATTRIBUTE: 3_201_000,
                gpu.GLOBAL_MEMORY_BUS_WIDTH_ATTRIBUTE: 6144}[attribute]

    found = gpu.memory_attributes(fake_get_attribute, 2)
    assert found == {"memory_clock_khz": 3_201_000, "memory_bus_bits": 6144,
                     "peak_gbps": pytest.approx(4916.736)}
    # cudaDevAttrMemoryClockRate and cudaDevAttrGlobalMemoryBusWidth (driver_types.h).
    assert sorted(asked) == [(36, 2), (37, 2)]


def _gpu_row(name, kind, median, bytes_per_element, **fields):
    n = 2**26
    return {"name": name, "kind": kind, "device": "cuda", "backend": None, "peer": None,
            "groups": 1, "workload": "flat", "tensors": 1, "dtype": "float32", "n": n,
            "median_s": median, "p25_s": median * 0.9, "p75_s": median * 1.1,
            "bytes_per_element": bytes_per_element, "elements_per_s": n / median,
            "gbps": n * bytes_per_element / median / 1e9, "samples": 5,
            "calls_per_sample": 1, "roofline": ROOFLINES["cuda"], **fields}


def test_gpu_rows_report_their_fraction_of_each_roofline():
    n = 2**26
    stream_gbps, copy_gbps, peak_gbps = 4400.0, 4000.0, 4916.736
    rows = [
        _gpu_row("gpu-momentum cupy", "backend", n * 20 / 4200e9, 20, backend="cupy",
                 precision="nearest", velocity_dtype="float32"),
        _gpu_row(ROOFLINES["cuda"], "roofline", n * 20 / (stream_gbps * 1e9), 20,
                 peer="roofline: stream 3R+2W"),
        _gpu_row(COPY_ROOFLINE, "roofline", n * 8 / (copy_gbps * 1e9), 8,
                 peer="roofline: D2D copy"),
    ]
    result = {"machine": {"processor": "x", "cores": 16, "threads": {"numba": 16},
                          "gpu": {"name": "NVIDIA H200", "peak_gbps": peak_gbps}},
              "device": "NVIDIA H200", "versions": {}, "results": rows, "absent": [],
              "skipped": []}
    result = report.finish(result, {})
    report.check_schema(result)
    backend = result["results"][0]
    assert backend["roofline_fraction"] == pytest.approx(4200 / stream_gbps)
    assert backend["copy_fraction"] == pytest.approx(4200 / copy_gbps)
    assert backend["peak_fraction"] == pytest.approx(4200 / peak_gbps)
    target = next(t for t in result["targets"] if t["target"].startswith("cupy >= 95%"))
    assert target["target"] == "cupy >= 95% of the SM stream roofline"
    assert target["value"] == pytest.approx(4200 / stream_gbps) and target["met"] is True
    text = report.table(result)
    assert "GPU rooflines (fraction of each):" in text
    line = next(l for l in text.splitlines() if l.startswith("2**26  gpu-momentum cupy")
                and "%" in l and "us" not in l)
    assert line.split()[-3:] == ["95%", "105%", "85%"]


def test_without_a_peak_or_copy_the_fractions_are_none():
    rows = [_gpu_row("gpu-momentum cupy", "backend", 0.0003, 20, backend="cupy")]
    result = {"machine": {"gpu": {"name": "G"}}, "device": "G", "versions": {},
              "results": rows, "absent": [], "skipped": []}
    report.add_ratios(result)
    assert rows[0]["copy_fraction"] is None and rows[0]["peak_fraction"] is None

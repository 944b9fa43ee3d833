"""The GPU side of the benchmark: CUDA-event timers, the CuPy peer, the D2D copy roofline.

Only imported when the benchmark looks for a GPU; nothing here runs on a CPU-only machine
beyond `unavailable_reason`.
"""

import sys

from .candidates import (CUPY_PEER, NAIVE_ARRAYS, ROOFLINES, Built, Candidate,
                         naive_builder)
from .measure import copy_bytes, update_bytes


def unavailable_reason():
    """None when CuPy sees a CUDA device, else why GPU runs are not possible here."""
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return f"no usable CUDA device ({error})"
    return None if count > 0 else "no CUDA device"


class CupyEventTimer:
    """CUDA events recorded on CuPy's current stream around the calls.

    The library's GPU backends launch on the current stream (the legacy default stream
    unless the caller set another), so the events bracket exactly the queued work.
    """

    def __init__(self):
        import cupy
        self._cuda = cupy.cuda

    def time(self, step, calls):
        stream = self._cuda.get_current_stream()
        start, end = self._cuda.Event(), self._cuda.Event()
        start.record(stream)
        for _ in range(calls):
            step()
        end.record(stream)
        end.synchronize()
        return self._cuda.get_elapsed_time(start, end) / 1e3 / calls


class TorchEventTimer:
    """CUDA events on torch's current stream, for the torch peers."""

    def __init__(self, torch):
        self._cuda = torch.cuda

    def time(self, step, calls):
        start = self._cuda.Event(enable_timing=True)
        end = self._cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


def d2d_copy_builder(problem):
    """cudaMemcpyAsync device to device on the current stream: the GPU memory roofline."""
    import cupy

    src = cupy.asarray(problem.p0)
    dst = cupy.empty_like(src)

    def step():
        dst.data.copy_from_device_async(src.data, src.nbytes,
                                        stream=cupy.cuda.get_current_stream())
    return Built(step, lambda: [cupy.asnumpy(dst)])


def candidates():
    import cupy

    return [
        Candidate(CUPY_PEER, "peer", "cuda", naive_builder(cupy.asarray, cupy.asnumpy),
                  update_bytes, CupyEventTimer(), arrays=NAIVE_ARRAYS),
        Candidate(ROOFLINES["cuda"], "roofline", "cuda", d2d_copy_builder, copy_bytes,
                  CupyEventTimer(), arrays=2),
    ]


def release_memory():
    """Returns the memory pools' cached blocks, so the next candidate finds it free."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_bytes():
    import cupy

    release_memory()
    return cupy.cuda.Device().mem_info[0]


def describe():
    """The device's name and properties, for the JSON and the file names."""
    import cupy

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": device.compute_capability,
            "memory_gib": round(device.mem_info[1] / 2**30, 1),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion()}

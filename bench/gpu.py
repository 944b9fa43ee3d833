"""The GPU side of the benchmark: CUDA-event timers, the CuPy peer, the rooflines.

Three GPU rooflines: the SM stream kernel (kernels/stream.cu: the update's traffic in
128-bit accesses; the roofline of record), the device-to-device copy (cudaMemcpyAsync) and
the theoretical peak from the device's attributes (`theoretical_peak_gbps`, no row: a
number in the run's machine description).

Only imported when the benchmark looks for a GPU; nothing here runs on a CPU-only machine
beyond `unavailable_reason`.
"""

import dataclasses
import functools
import importlib.resources
import itertools
import sys

import numpy as np

from gpu_momentum.backends import unavailable_reason as backend_unavailable_reason

from .data import (COPY_ROOFLINE_PEER, CUPY_EXPRESSIONS, GRAPH_GPU_TIME, GRAPH_REPLAY, LR,
                   LR_EACH_STEP, MOMENTUM, NAIVE_ARRAYS, ROOFLINE_PEERS, SCHEDULED_LRS, Built,
                   Candidate, Unsupported)
from .measure import HostTimer, copy_bytes, stream_bytes, update_bytes
from .peers import naive_builder


def unavailable_reason():
    """None when CuPy sees a CUDA device, else why GPU runs are not possible here: the
    cupy backend's reason (GPU runs are timed with CuPy events)."""
    return backend_unavailable_reason("cupy")


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


@functools.cache
def graph_stream():
    """The stream the graph replay candidates capture on and replay on (capture needs a
    stream other than the legacy default stream)."""
    import cupy

    return cupy.cuda.Stream(non_blocking=True)


def graph_replay_builder(problem, schedule=None):
    """The cupy backend's step (a capturable MomentumSGD, classic style as the library's
    other rows) captured once in a CUDA graph; each call launches the graph: the step
    without its per-step Python. schedule=LR_EACH_STEP: `opt.lr` set from SCHEDULED_LRS
    before each launch, on the graph's stream (the table row's copy is queued on the
    current stream, ahead of the replay that reads it)."""
    import cupy

    from gpu_momentum import MomentumSGD

    if problem.shapes is not None:
        raise Unsupported("graph replay rows run on one flat buffer (the overhead workload)")
    stream = graph_stream()
    with stream:
        param, grad = cupy.asarray(problem.p0), cupy.asarray(problem.g0)
        opt = MomentumSGD(param, lr=LR, momentum=MOMENTUM, capturable=True,
                          backend="cupy")
        stream.begin_capture()
        opt.step(grad)
        graph = stream.end_capture()
    stream.synchronize()
    # The graph holds opt's device addresses (velocity, table, counters), not opt itself:
    # the step keeps opt alive for as long as the graph can be launched.
    if schedule == LR_EACH_STEP:
        lrs = itertools.cycle(SCHEDULED_LRS)

        def replay_at_next_lr(opt=opt):
            with stream:
                opt.lr = next(lrs)
            graph.launch(stream)
        return Built(replay_at_next_lr, lambda: [cupy.asnumpy(param)])
    return Built(lambda opt=opt: graph.launch(stream),
                 lambda: [cupy.asnumpy(param)])


class ReplayEventTimer:
    """CUDA events recorded on the graph stream around each call: the GPU's own time for
    what the call launched, whatever the host's pace (the GPU waits between calls)."""

    def time(self, step, calls):
        import cupy

        stream = graph_stream()
        pairs = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(calls)]
        for start, end in pairs:
            start.record(stream)
            step()
            end.record(stream)
        pairs[-1][1].synchronize()
        return sum(cupy.cuda.get_elapsed_time(start, end)
                   for start, end in pairs) / 1e3 / calls


def graph_candidates():
    """The cupy backend's graph replay rows: by the wall clock (one synchronisation per
    loop of replays) and by CUDA events (the kernels' own time), and by the wall clock
    with the lr changed between replays (LR_EACH_STEP)."""
    from gpu_momentum.arrays import compute_dtype

    library = lambda launch, timer: Candidate(
        "backend", "cuda", graph_replay_builder,
        lambda dtype: update_bytes(dtype, compute_dtype(dtype)), timer, arrays=4,
        backend="cupy", launch=launch)
    scheduled = dataclasses.replace(
        library(GRAPH_REPLAY, HostTimer(synchronize_device)),
        build=functools.partial(graph_replay_builder, schedule=LR_EACH_STEP),
        schedule=LR_EACH_STEP)
    return [library(GRAPH_REPLAY, HostTimer(synchronize_device)),
            library(GRAPH_GPU_TIME, ReplayEventTimer()), scheduled]


def synchronize_device():
    """Waits for all work on the current device, whichever stream queued it (CuPy's,
    Numba's, torch's)."""
    import cupy

    cupy.cuda.runtime.deviceSynchronize()


def d2d_copy_builder(problem):
    """cudaMemcpyAsync device to device on the current stream: the GPU memory roofline."""
    import cupy

    src = cupy.asarray(problem.p0)
    dst = cupy.empty_like(src)

    def step():
        dst.data.copy_from_device_async(src.data, src.nbytes,
                                        stream=cupy.cuda.get_current_stream())
    return Built(step, lambda: [cupy.asnumpy(dst)])


STREAM_KERNEL = "stream_read3_write2"
STREAM_WORD_BYTES = 16  # one uint4 per thread and array per iteration
STREAM_THREADS = 256


def stream_source():
    """kernels/stream.cu, as installed with the package."""
    return importlib.resources.files("gpu_momentum.kernels").joinpath(
        "stream.cu").read_text()


@functools.cache
def _stream_kernel(device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=stream_source()).get_function(STREAM_KERNEL)


def stream_blocks(multiprocessors, threads_per_multiprocessor, words):
    """Blocks of STREAM_THREADS that fill the device once (more would only queue), and no
    more than the words need; at least 1."""
    filling = multiprocessors * (threads_per_multiprocessor // STREAM_THREADS)
    return max(1, min(filling, -(-words // STREAM_THREADS)))


def stream_builder(problem):
    """The SM stream kernel over three arrays of the problem's dtype (param, velocity and
    grad, each viewed as 16-byte words): a[i] += c[i]; b[i] += c[i], the update's traffic
    (stream_bytes: 5 * itemsize per element) at 128 bits per access."""
    import cupy

    nbytes = problem.p0.nbytes
    if nbytes % STREAM_WORD_BYTES:
        raise Unsupported(f"the stream kernel moves 16-byte words: {nbytes} bytes is not "
                          f"a multiple of {STREAM_WORD_BYTES}")
    a = cupy.asarray(problem.p0.view(np.uint8)).view(np.uint32)
    b = cupy.asarray(problem.p0.view(np.uint8)).view(np.uint32)
    c = cupy.asarray(problem.g0.view(np.uint8)).view(np.uint32)
    words = nbytes // STREAM_WORD_BYTES
    device = cupy.cuda.Device()
    attributes = device.attributes
    blocks = stream_blocks(attributes["MultiProcessorCount"],
                           attributes["MaxThreadsPerMultiProcessor"], words)
    kernel = _stream_kernel(device.id)

    def step():
        kernel((blocks,), (STREAM_THREADS,), (a, b, c, np.int64(words)),
               stream=cupy.cuda.get_current_stream())
    return Built(step, lambda: [cupy.asnumpy(a)])


# cudaDeviceAttr numbers (driver_types.h): the memory clock in kHz and the bus width in
# bits. CUDA 13 dropped cudaDeviceProp.memoryClockRate; the attributes stay.
MEMORY_CLOCK_RATE_ATTRIBUTE = 36
GLOBAL_MEMORY_BUS_WIDTH_ATTRIBUTE = 37


def theoretical_peak_gbps(memory_clock_khz, bus_width_bits):
    """The memory's theoretical bandwidth in GB/s (1e9 bytes per second): the memory clock
    times the bus width, twice per clock (DDR; the attribute reports HBM's and GDDR's
    clocks so that this holds), over 8 bits per byte. An H200 (3201 MHz x 6144 bits)
    gives 4917 GB/s, against NVIDIA's 4.8 TB/s."""
    for name, value in (("memory_clock_khz", memory_clock_khz),
                        ("bus_width_bits", bus_width_bits)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"Invalid {name} value: {value!r} ({name} must be a "
                             f"positive integer)")
    return memory_clock_khz * 1e3 * 2 * bus_width_bits / 8 / 1e9


def memory_attributes(get_attribute, device_id):
    """{memory_clock_khz, memory_bus_bits, peak_gbps} of a device, read through
    `get_attribute(attribute, device_id)` (cupy.cuda.runtime.deviceGetAttribute)."""
    clock = int(get_attribute(MEMORY_CLOCK_RATE_ATTRIBUTE, device_id))
    bus = int(get_attribute(GLOBAL_MEMORY_BUS_WIDTH_ATTRIBUTE, device_id))
    return {"memory_clock_khz": clock, "memory_bus_bits": bus,
            "peak_gbps": theoretical_peak_gbps(clock, bus)}


def candidates():
    import cupy

    return [
        Candidate("peer", "cuda", naive_builder(cupy.asarray, cupy.asnumpy), update_bytes,
                  CupyEventTimer(), arrays=NAIVE_ARRAYS, peer=CUPY_EXPRESSIONS),
        Candidate("roofline", "cuda", stream_builder, stream_bytes, CupyEventTimer(),
                  arrays=3, peer=ROOFLINE_PEERS["cuda"]),
        Candidate("roofline", "cuda", d2d_copy_builder, copy_bytes, CupyEventTimer(),
                  arrays=2, peer=COPY_ROOFLINE_PEER),
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
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
            **memory_attributes(cupy.cuda.runtime.deviceGetAttribute, device.id)}

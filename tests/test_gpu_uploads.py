"""A changed hyperparameter's rows reach a GPU's update table as asynchronous copies from
pinned staging slots on the step's stream (backends.staging): the ring of slots over a
simulated device whose copies read their slot only when the stream runs (so a slot
rewritten too early shows), the CuPy backend's upload_into over fakes of exactly the
CuPy calls it may make (anything else fails: no pool allocation, no synchronisation),
numba-cuda's in the CUDA simulator, and on a GPU behind a busy stream."""

import contextlib
import ctypes
import sys
import types

import numpy as np
import pytest

import gpu_momentum as gm
from gpu_momentum.backends import cupy as cupy_backend
from gpu_momentum.backends import numba_cuda as numba_backend
from gpu_momentum.backends.staging import MIN_SLOT_BYTES, StagingRing
from gpu_momentum.kernels.layout import GROUP_COLUMNS


class FakeStream:
    """A stream whose queued work (copies, event records) runs only at run()."""

    def __init__(self):
        self.queued = []

    def run(self, count=None):
        """Runs the first `count` queued operations (all: None)."""
        count = len(self.queued) if count is None else count
        for operation in self.queued[:count]:
            operation()
        del self.queued[:count]

    def synchronize(self):
        raise AssertionError("an upload waited for the stream")


class FakeEvent:
    def __init__(self):
        self.pending = 0  # records queued and not yet reached
        self.queries = 0

    def record(self, stream):
        self.pending += 1
        stream.queued.append(self._reached)

    def _reached(self):
        self.pending -= 1

    @property
    def done(self):
        self.queries += 1
        return self.pending == 0

    def synchronize(self):
        raise AssertionError("an upload waited for an event")


class FakeDeviceArray:
    """Device memory (a NumPy array standing for it) as CuPy shows it to upload_into:
    a row slice is a view at an offset; its pointer's async copy from the host runs on
    the fake stream, reading the host memory when the stream gets there."""

    def __init__(self, memory):
        self.memory = memory
        self.size, self.dtype, self.shape = memory.size, memory.dtype, memory.shape
        self.strides, self.flags = memory.strides, memory.flags
        self.data = types.SimpleNamespace(copy_from_host_async=self._copy_from_host_async)
        self.copies = []  # (bytes, stream) of each copy queued into this view

    def __getitem__(self, index):
        return FakeDeviceArray(self.memory[index])

    def _copy_from_host_async(self, mem, size, stream):
        assert size <= self.memory.nbytes, "the copy runs past the target's rows"
        address = mem if isinstance(mem, int) else mem.value
        destination = self.memory.ctypes.data
        self.copies.append((size, stream))
        stream.queued.append(lambda: ctypes.memmove(destination, address, size))


class FakeMemory:
    """StagingMemory over FakeStream: the copies read the pinned slot at run()."""

    def __init__(self):
        self.buffers, self.events = [], []

    def pinned(self, nbytes):
        self.buffers.append(np.empty(nbytes, np.uint8))
        return self.buffers[-1]

    def new_event(self):
        self.events.append(FakeEvent())
        return self.events[-1]

    def record(self, event, stream):
        event.record(stream)

    def completed(self, event):
        return event.done

    def copy(self, target, host, address, stream):
        assert host.ctypes.data == address and host.dtype == target.dtype
        target.data.copy_from_host_async(address, host.nbytes, stream)


def _table(groups=4, dtype=np.float32):
    return FakeDeviceArray(np.zeros((groups, GROUP_COLUMNS), dtype))


def _row(value, dtype=np.float32):
    return np.full((1, GROUP_COLUMNS), value, dtype)


def test_copies_queued_ahead_of_the_device_each_keep_their_slot():
    """The stream runs nothing while four rows are uploaded (the last one rewritten in
    the host array at once): each copy reads its own slot, so each row gets its value;
    the ring grew one slot per copy in flight, asking each event, never waiting."""
    memory, stream, table = FakeMemory(), FakeStream(), _table()
    ring = StagingRing(memory)
    host = _row(0.0)
    for group in range(4):
        host[...] = group + 1
        ring.copy(table[group:group + 1], host, stream)
    host[...] = -1  # the caller may rewrite its row as soon as upload returns
    assert (ring.slot_count, ring.allocations) == (4, 4)
    assert not table.memory.any()  # nothing ran yet: the copies are queued
    stream.run()
    assert table.memory.tolist() == [[group + 1.0] * GROUP_COLUMNS for group in range(4)]
    assert sum(event.queries for event in memory.events) == 3  # the one slot, each time


def test_a_device_that_keeps_up_reuses_one_slot():
    memory, stream, table = FakeMemory(), FakeStream(), _table()
    ring = StagingRing(memory)
    for step in range(100):
        ring.copy(table[1:2], _row(step), stream)
        stream.run()  # the step's launch ran: its copy too
    assert (ring.slot_count, ring.allocations, len(memory.events)) == (1, 1, 1)
    assert table.memory[1].tolist() == [99.0] * GROUP_COLUMNS
    assert not table.memory[[0, 2, 3]].any()


def test_a_device_some_steps_behind_grows_the_ring_once():
    """The host runs three copies ahead of the stream: four slots, then reuse."""
    memory, stream, table = FakeMemory(), FakeStream(), _table()
    ring = StagingRing(memory)
    for step in range(50):
        ring.copy(table[step % 4:step % 4 + 1], _row(step), stream)
        if step >= 3:
            stream.run(2)  # the oldest copy and its event record
    assert (ring.slot_count, ring.allocations) == (4, 4)
    stream.run()
    assert table.memory[:, 0].tolist() == [48.0, 49.0, 46.0, 47.0]


def test_a_slot_too_small_is_replaced_when_free_and_the_ring_keeps_its_size():
    memory, stream = FakeMemory(), FakeStream()
    ring = StagingRing(memory)
    small = _table(1)
    ring.copy(small, _row(1), stream)
    stream.run()
    assert [b.nbytes for b in memory.buffers] == [MIN_SLOT_BYTES]
    large = _table(64, np.float64)  # 64 rows of float64: more than the slot holds
    rows = np.arange(64 * GROUP_COLUMNS, dtype=np.float64).reshape(64, GROUP_COLUMNS)
    ring.copy(large, rows, stream)
    stream.run()
    assert large.memory.tobytes() == rows.tobytes()
    assert rows.nbytes == 3072 > MIN_SLOT_BYTES  # a slot of the next power of two
    assert [b.nbytes for b in memory.buffers] == [MIN_SLOT_BYTES, 4096]
    assert (ring.slot_count, len(memory.events)) == (1, 1)  # the slot and event kept
    ring.copy(small, _row(2), stream)  # the large slot takes a small copy: no allocation
    stream.run()
    assert ring.allocations == 2 and small.memory[0, 0] == 2


def test_an_empty_copy_queues_nothing():
    memory, stream = FakeMemory(), FakeStream()
    ring = StagingRing(memory)
    ring.copy(FakeDeviceArray(np.zeros((0, GROUP_COLUMNS), np.float32)),
              np.zeros((0, GROUP_COLUMNS), np.float32), stream)
    assert (stream.queued, ring.allocations) == ([], 0)


# ---- the CuPy backend's upload_into, over fakes of the CuPy calls it makes -------------

@pytest.fixture
def fake_cupy(monkeypatch):
    """`cupy` and `cupyx` modules with only what upload_into may call: the current
    device and stream, events, pinned arrays. Everything else (asarray, copyto, the
    memory pool, synchronize) is missing, so a call of it fails the test."""
    stream = FakeStream()
    made = {"pinned": 0, "events": []}

    def empty_pinned(nbytes, dtype):
        assert dtype == np.uint8
        made["pinned"] += 1
        return np.empty(nbytes, np.uint8)

    def event(disable_timing=False):
        assert disable_timing  # a synchronisation event: no timing to record
        made["events"].append(FakeEvent())
        return made["events"][-1]

    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0),
        get_current_stream=lambda: stream, Event=event)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupyx",
                        types.SimpleNamespace(empty_pinned=empty_pinned))
    cupy_backend.staging_ring.cache_clear()  # no ring of a real device in the fakes
    yield stream, made
    cupy_backend.staging_ring.cache_clear()


def test_cupy_upload_into_copies_changed_rows_on_the_current_stream(fake_cupy):
    """The rows MomentumSGD writes (scalars[group:group + 1], group_flags likewise): one
    asynchronous copy each, of their bytes, into their offset of the device table, on
    CuPy's current stream; warm-up makes a pinned slot and an event for each of a
    step's two copies, and a thousand steps whose copies the device ran make nothing
    more."""
    stream, made = fake_cupy
    backend = gm.backends.REGISTRY["cupy"]  # (backend_named asks for a device)
    scalars, flags = _table(3), FakeDeviceArray(np.zeros(3, np.uint32))
    param = object()  # unread: CuPy's steps launch on its current stream
    host_scalars = np.zeros((3, GROUP_COLUMNS), np.float32)
    host_flags = np.zeros(3, np.uint32)
    for step in range(1000):
        group = step % 3
        host_scalars[group] = step
        host_flags[group] = step
        target = scalars[group:group + 1]
        backend.upload_into(target, host_scalars[group:group + 1], param)
        flag = flags[group:group + 1]
        backend.upload_into(flag, host_flags[group:group + 1], param)
        assert target.copies == [(GROUP_COLUMNS * 4, stream)] and \
            flag.copies == [(4, stream)]
        stream.run()
    assert scalars.memory.tobytes() == host_scalars.tobytes()
    assert flags.memory.tolist() == [999, 997, 998]
    assert made["pinned"] == 2 and len(made["events"]) == 2


def test_cupy_upload_into_behind_a_busy_stream_grows_and_never_waits(fake_cupy):
    stream, made = fake_cupy
    backend = gm.backends.REGISTRY["cupy"]  # (backend_named asks for a device)
    scalars = _table(8)
    for group in range(8):
        backend.upload_into(scalars[group:group + 1], _row(group + 10), None)
    assert made["pinned"] == 8 and not scalars.memory.any()
    stream.run()
    assert scalars.memory[:, 0].tolist() == [g + 10.0 for g in range(8)]
    for group in range(8):  # the device caught up: the eight slots are reused
        backend.upload_into(scalars[group:group + 1], _row(group), None)
        stream.run()
    assert made["pinned"] == 8 and scalars.memory[:, -1].tolist() == list(range(8))


def test_cupy_upload_into_refuses_rows_that_are_not_contiguous(fake_cupy):
    stream, _ = fake_cupy
    backend = gm.backends.REGISTRY["cupy"]  # (backend_named asks for a device)
    columns = _table(3)[:, :2]
    with pytest.raises(ValueError, match="not contiguous"):
        backend.upload_into(columns, np.ones((3, 2), np.float32), None)
    assert stream.queued == []


# ---- numba-cuda: the real upload_into in the CUDA simulator ----------------------------

def _numba_simulated():
    from harness import HARNESSES, usable

    harness = usable(next(h for h in HARNESSES if h.name == "numba-cuda"))
    if not harness.simulated:
        pytest.skip("the CUDA simulator is off (a GPU is present): the gpu test below "
                    "runs this on hardware")
    return harness


@pytest.mark.parametrize("bound", [False, True], ids=["default-stream", "own-stream"])
def test_numba_upload_into_copies_from_a_pinned_slot_on_params_stream(monkeypatch, bound):
    """Each row copied with copy_to_device from the ring's pinned slot, on the stream the
    step launches on: param's (given, so the copy is asynchronous: stream 0 would make
    numba-cuda copy synchronously), the default stream's object for an array bound to
    none; after warm-up no slot or event is made."""
    from numba import cuda

    _numba_simulated()
    backend = gm.backends.backend_named("numba-cuda")
    stream = cuda.stream() if bound else 0
    param = cuda.to_device(np.zeros(16, np.float32)).bind(stream)  # launches on stream
    table = cuda.to_device(np.zeros((3, GROUP_COLUMNS), np.float32))
    memory_type = numba_backend.NumbaStagingMemory
    made, copies = [], []
    for name in ("pinned", "new_event"):
        method = getattr(memory_type, name)
        monkeypatch.setattr(memory_type, name, lambda self, *a, _m=method, _n=name: (
            made.append(_n), _m(self, *a))[1])
    copy = memory_type.copy
    monkeypatch.setattr(memory_type, "copy", lambda self, target, host, address, s: (
        copies.append((host.ctypes.data == address, self.stream(s))),
        copy(self, target, host, address, s))[1])
    backend.upload_into(table[0:1], _row(1.0), param)  # warm-up (a slot, if none yet)
    made.clear()
    for step in range(20):
        backend.upload_into(table[step % 3:step % 3 + 1], _row(step), param)
    assert made == []
    assert table.copy_to_host()[:, 0].tolist() == [18.0, 19.0, 17.0]
    want = stream if bound else cuda.default_stream()
    assert all(pinned and s and type(s) is type(want) for pinned, s in copies)
    if bound:
        assert all(s is stream for _, s in copies)


def test_numba_schedule_reuses_the_ring_after_warm_up(monkeypatch):
    """MomentumSGD on numba-cuda with its lr and its group's lr changed before every
    step: every row goes through the staging ring, which makes nothing after warm-up."""
    harness = _numba_simulated()
    flat = gm.FlatParams.from_arrays([harness.from_numpy(np.ones(n, np.float32))
                                      for n in (37, 64)])
    opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9, groups=[{"params": [1]}],
                         backend="numba-cuda")
    for _ in range(2):
        opt.step()
    memory_type = numba_backend.NumbaStagingMemory
    calls = {"pinned": 0, "new_event": 0, "copy": 0}
    for name in calls:
        method = getattr(memory_type, name)
        monkeypatch.setattr(memory_type, name, lambda self, *a, _m=method, _n=name: (
            calls.__setitem__(_n, calls[_n] + 1), _m(self, *a))[1])
    for step in range(6):
        opt.lr = 0.1 / (step + 2)
        opt.param_groups[0]["lr"] = 0.05 * (step + 1)
        opt.step()
    assert calls == {"pinned": 0, "new_event": 0, "copy": 12}


# ---- on a GPU: behind a busy stream, nothing waits -------------------------------------

SPIN_SOURCE = r"""
extern "C" __global__ void spin(unsigned long long nanoseconds) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < nanoseconds);
}
"""


def _cupy_device(seconds):
    """(stream, context, to_device, to_host, ring, busy, done) of the cupy backend."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    spin = cupy.RawKernel(SPIN_SOURCE, "spin")

    def busy():
        with stream:
            spin((1,), (1,), (np.uint64(seconds * 1e9),))

    def done():
        event = cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        return event.done

    return (stream, lambda: stream, cupy.asarray, cupy.asnumpy,
            lambda: cupy_backend.staging_ring(cupy.cuda.runtime.getDevice()), busy, done)


def _numba_device(seconds):
    from numba import cuda
    from numba.core import config

    if config.ENABLE_CUDASIM:
        pytest.skip("needs a CUDA GPU: the simulator runs every copy at once")
    stream = cuda.stream()

    @cuda.jit
    def sleep(milliseconds):
        for _ in range(milliseconds):
            cuda.nanosleep(1000000)

    def done():
        event = cuda.event(timing=False)
        event.record(stream)
        return event.query()

    return (stream, contextlib.nullcontext, lambda a: cuda.to_device(a, stream=stream),
            lambda a: a.copy_to_host(),
            lambda: numba_backend.staging_ring(cuda.get_current_device().id),
            lambda: sleep[1, 1, stream](int(seconds * 1000)), done)


@pytest.mark.hardware_first
@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cupy", "numba-cuda"])
def test_lr_changes_behind_a_busy_stream_do_not_wait(backend_name):
    """With a second of work queued on the step's stream, ten steps each after an lr
    change return while that work still runs (no upload waited for the stream), each
    copy in flight holding a slot of its own, and the parameters equal, bit for bit, the
    same schedule taken with the stream drained before every change. Then, the device
    keeping up, ten more changes allocate nothing."""
    if backend_name not in gm.available_backends():
        from gpu_momentum.backends import unavailable_reason
        pytest.skip(f"backend {backend_name!r} is not available: "
                    f"{unavailable_reason(backend_name)}")
    stream, context, to_device, to_host, ring, busy, done = (
        _cupy_device if backend_name == "cupy" else _numba_device)(1.0)
    rng = np.random.default_rng(11)
    start = rng.standard_normal(4099).astype(np.float32)
    grad = rng.standard_normal(4099).astype(np.float32)
    schedule = [0.1 * 0.8 ** step for step in range(10)]
    results = {}
    for run in ("drained", "busy"):
        with context():
            param, g = to_device(start), to_device(grad)
            opt = gm.MomentumSGD(param, lr=0.1, momentum=0.9, style="torch",
                                 backend=backend_name)
            opt.step(g)
            opt.step(g)  # warm-up: the first step's flags written, launches prepared
            stream.synchronize()
            if run == "busy":
                busy()
            for lr in schedule:
                if run == "drained":
                    stream.synchronize()
                opt.lr = lr
                opt.step(g)
            if run == "busy":
                assert not done(), "a step with a changed lr waited for the stream"
                assert ring().slot_count >= len(schedule)
            stream.synchronize()
            results[run] = to_host(param).tobytes()
            allocations = ring().allocations
            for lr in schedule:
                opt.lr = lr
                opt.step(g)
                stream.synchronize()
            assert ring().allocations == allocations
    assert results["busy"] == results["drained"]

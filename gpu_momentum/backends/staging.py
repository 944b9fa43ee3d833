"""Host rows copied into device memory on a stream without waiting for it: the GPU
backends' `upload_into`, through a ring of pinned (page-locked) staging slots.

A changed hyperparameter reaches a device table as one small asynchronous copy queued on
the stream the step launches on, so the next launch reads it in stream order. A copy from
pageable host memory would wait for the stream (or stage through the device pool); a copy
from pinned memory does not wait, but reads the slot only when the stream reaches it. So a
slot is never rewritten while a copy queued from it may still read it: each slot carries
an event recorded on the copy's stream right after the copy, and the next copy takes the
slot the ring points at only when that event has completed, which is asked (an event
query), never waited for. A slot still in flight gets a new slot put in before it (the
ring grows: an allocation of pinned memory, which is rare and bounded: the ring holds as
many slots as copies the host queued ahead of the device at most, and keeps them); a slot
too small for a copy is replaced by one of twice the size, at least. In the steady state
of a training loop, whose device keeps up with the host at some depth, every copy reuses
a slot: no allocation and no synchronisation.

A copy queued from pinned memory while the stream is being captured into a CUDA graph
would be captured reading its slot at each replay, long after the slot was reused: the
callers (the optimizers) refuse hyperparameter changes inside a capture and write them
between replays, as plain copies that a later replay reads the results of.
"""

import threading
from typing import Protocol

import numpy as np

MIN_SLOT_BYTES = 256  # a few table rows (GROUP_COLUMNS scalars each)


class StagingMemory(Protocol):
    """The CUDA calls of one backend that a StagingRing makes, on one device."""

    def pinned(self, nbytes: int) -> np.ndarray:
        """A new uint8 array of `nbytes` in pinned host memory."""

    def new_event(self):
        """A new event (no timing), never recorded yet."""

    def record(self, event, stream) -> None:
        """Records `event` on `stream` after the work queued there."""

    def completed(self, event) -> bool:
        """Whether the work before `event`'s last record has completed, without waiting."""

    def copy(self, target, host: np.ndarray, address: int, stream) -> None:
        """Queues the copy of `host` (pinned, at `address`; target's dtype and shape) into
        the device array `target` on `stream`, without waiting."""


class _Slot:
    __slots__ = ("buffer", "address", "event", "recorded")

    def __init__(self, buffer, event):
        self.buffer, self.event, self.recorded = buffer, event, False
        self.address = buffer.ctypes.data

    def holds(self, nbytes):
        return self.buffer.nbytes >= nbytes


class StagingRing:
    """The pinned staging slots of one device, reused in turn (see the module docstring).
    `slot_count` and `allocations` (pinned buffers made so far) say how far it grew."""

    def __init__(self, memory: StagingMemory):
        self._memory = memory
        self._slots = []
        self._next = 0
        self._lock = threading.Lock()  # optimizers on other threads share the device's
        self.allocations = 0

    @property
    def slot_count(self):
        return len(self._slots)

    def copy(self, target, array, stream):
        """The host `array` copied into the contiguous device array `target` (as
        numpy.copyto writes target's dtype and shape from it), queued on `stream` without
        waiting: `array` may be rewritten as soon as this returns."""
        nbytes = target.size * target.dtype.itemsize
        if nbytes == 0:
            return
        with self._lock:
            slot = self._free_slot(nbytes)
            host = slot.buffer[:nbytes].view(target.dtype).reshape(target.shape)
            np.copyto(host, array, casting="same_kind")
            self._memory.copy(target, host, slot.address, stream)
            self._memory.record(slot.event, stream)
            slot.recorded = True

    def _free_slot(self, nbytes):
        """The slot the ring points at when no copy may still read it and it holds
        `nbytes` (a free one too small is replaced); else a new slot put in before it.
        The ring then points past the slot returned."""
        memory, slots = self._memory, self._slots
        slot = slots[self._next] if slots else None
        if slot is not None and (not slot.recorded or memory.completed(slot.event)):
            if not slot.holds(nbytes):
                slot.buffer = self._pinned(max(nbytes, 2 * slot.buffer.nbytes))
                slot.address = slot.buffer.ctypes.data
        else:  # none yet, or its copy may still be read: the ring grows
            slot = _Slot(self._pinned(nbytes), memory.new_event())
            slots.insert(self._next, slot)
        self._next = (self._next + 1) % len(slots)
        return slot

    def _pinned(self, nbytes):
        self.allocations += 1
        return self._memory.pinned(max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length()))

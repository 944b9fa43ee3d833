"""The collectives of a sharded step: one interface (`Collectives`) with two
implementations sharing everything else: `MpiCollectives` (NumPy buffers; GPU buffers too
with a CUDA-aware MPI, which waits for the stream before each call) and `NcclCollectives`
(GPU buffers: CuPy's NCCL bindings, queued on the arrays' stream with no host
synchronisation). `transport_for` picks one for the arrays' memory, `make_collectives`
sets it up. Importing this module imports neither mpi4py nor CuPy.
"""

import os
import warnings

import numpy as np

from ..arrays import describe
from ..backends import BackendUnavailableError
from ..kernels.layout import LAST_STEP_SKIPPED
from .agreement import abbreviated, agree, mpi_module

COLLECTIVES = ("auto", "mpi", "nccl")


class Collectives:
    """The collectives of a sharded step over the shards `bounds` of one buffer; every
    rank calls each of them, in the same order. Implementations: MpiCollectives and
    NcclCollectives, which share everything but how a call is made."""

    transport = None  # "mpi" or "nccl"

    def __init__(self, comm, bounds):
        self.comm, self.bounds = comm, list(bounds)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.counts = [stop - start for start, stop in self.bounds]
        self.starts = [start for start, _ in self.bounds]
        self.equal_counts = len(set(self.counts)) == 1

    def reduce_scatter(self, grad, shard):
        """shard (this rank's count of elements) = the sum over ranks of their `grad`'s
        elements of this rank's shard. grad: the whole 1-D buffer."""
        raise NotImplementedError

    def all_gather(self, param):
        """Every rank's param[start:stop] of rank r's shard = rank r's, in place (1-D)."""
        raise NotImplementedError

    def agree_skip(self, counters):
        """counters[LAST_STEP_SKIPPED] = its maximum over ranks, in place: all ranks skip
        a step that one rank's gradient makes non-finite (Backend.step's `agree`)."""
        raise NotImplementedError

    def all_reduce(self, buffer):
        """buffer = the sum over ranks of every rank's `buffer`, in place (1-D, any
        size): not a step's collective, but the allreduce that data parallelism without
        sharding makes of its gradient (the benchmark's peer)."""
        raise NotImplementedError


class MpiCollectives(Collectives):
    """MPI collectives through mpi4py on NumPy buffers, or on GPU buffers with a
    CUDA-aware MPI (`wait` then waits for the arrays' stream before each call: MPI takes
    no stream). Equal shards use the block forms (MPI_Reduce_scatter_block, in-place
    MPI_Allgather), which MPICH runs faster than the vector forms of unequal ones."""

    transport = "mpi"

    def __init__(self, comm, bounds, wait=None):
        super().__init__(comm, bounds)
        self._wait = wait or (lambda: None)

    def reduce_scatter(self, grad, shard):
        MPI = mpi_module()
        self._wait()
        if self.equal_counts:
            self.comm.Reduce_scatter_block(grad, shard, op=MPI.SUM)
        else:
            self.comm.Reduce_scatter(grad, shard, recvcounts=self.counts, op=MPI.SUM)

    def all_gather(self, param):
        from mpi4py.util.dtlib import from_numpy_dtype

        MPI = mpi_module()
        self._wait()
        if self.equal_counts:
            self.comm.Allgather(MPI.IN_PLACE, param)
            return
        kind = from_numpy_dtype(describe("param", param).dtype)
        self.comm.Allgatherv(MPI.IN_PLACE, [param, self.counts, self.starts, kind])

    def agree_skip(self, counters):
        MPI = mpi_module()
        self._wait()
        flag_slot = counters[LAST_STEP_SKIPPED:LAST_STEP_SKIPPED + 1]
        self.comm.Allreduce(MPI.IN_PLACE, flag_slot, op=MPI.MAX)

    def all_reduce(self, buffer):
        MPI = mpi_module()
        self._wait()
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)


class NcclCollectives(Collectives):
    """NCCL collectives (CuPy's `cupy.cuda.nccl`) on GPU buffers, queued on the stream
    `stream()` names (the one the update runs on), with no host synchronisation.

    Equal shards use ncclReduceScatter and an in-place ncclAllGather; unequal ones (NCCL's
    reduce-scatter takes one count) one ncclReduce and one ncclBroadcast per nonempty
    shard, rooted at its owner, inside one group call (as PyTorch's ProcessGroupNCCL does
    for uneven shards). Sums use ncclSum: the update divides by N, as on MPI (ncclAvg
    premultiplies each input, rounding differently)."""

    transport = "nccl"

    def __init__(self, comm, bounds, nccl, communicator, stream):
        super().__init__(comm, bounds)
        self._nccl, self._communicator, self._stream = nccl, communicator, stream
        self._types = {np.dtype(np.float16): nccl.NCCL_FLOAT16,
                       np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int64): nccl.NCCL_INT64}

    def _buffer(self, name, array):
        info = describe(name, array)
        return info.address, info.dtype.itemsize, self._types[info.dtype]

    def _run(self, calls):
        """Makes `calls` ((method name, *arguments)) of the communicator, on the stream,
        as one group when there are several."""
        stream = self._stream()
        grouped = len(calls) > 1
        if grouped:
            self._nccl.groupStart()
        try:
            for method, *arguments in calls:
                getattr(self._communicator, method)(*arguments, stream)
        finally:
            if grouped:
                self._nccl.groupEnd()

    def reduce_scatter(self, grad, shard):
        base, itemsize, kind = self._buffer("grad", grad)
        target = describe("shard", shard).address
        total = self._nccl.NCCL_SUM
        if self.equal_counts:
            calls = [("reduceScatter", base, target, self.counts[0], kind, total)]
        else:
            calls = [("reduce", base + start * itemsize,
                      target if root == self.rank else base + start * itemsize, count,
                      kind, total, root)
                     for root, (start, count) in enumerate(zip(self.starts, self.counts))]
        self._run([call for call in calls if call[3]])

    def all_gather(self, param):
        base, itemsize, kind = self._buffer("param", param)
        if self.equal_counts:
            own = base + self.starts[self.rank] * itemsize
            calls = [("allGather", own, base, self.counts[0], kind)]
        else:
            calls = [("broadcast", base + start * itemsize, base + start * itemsize, count,
                      kind, root)
                     for root, (start, count) in enumerate(zip(self.starts, self.counts))]
        self._run([call for call in calls if call[3]])

    def agree_skip(self, counters):
        base, itemsize, kind = self._buffer("counters", counters)
        slot = base + LAST_STEP_SKIPPED * itemsize
        self._run([("allReduce", slot, slot, 1, kind, self._nccl.NCCL_MAX)])

    def all_reduce(self, buffer):
        address, _, kind = self._buffer("buffer", buffer)
        count = describe("buffer", buffer).shape[0]
        if count:
            self._run([("allReduce", address, address, count, kind, self._nccl.NCCL_SUM)])


def nccl_module():
    """(cupy.cuda.nccl, None), or (None, why NCCL cannot be used here)."""
    try:
        with warnings.catch_warnings():  # CuPy warns on import when libnccl is missing
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
    except ImportError as error:
        return None, f"CuPy cannot be imported ({error})"
    if not nccl.available:
        return None, ("CuPy cannot load the NCCL library (pip install "
                      "\"nvidia-nccl-cu13>=2.27.7,<3\" or nvidia-nccl-cu12)")
    return nccl, None


def cuda_aware_mpi_reason():
    """None when the MPI library this process loaded says it is CUDA-aware
    (MPIX_Query_cuda_support, in MPICH and Open MPI), else why not. mpi4py hands device
    pointers to any MPI without asking; a library that is not CUDA-aware reads them as
    host memory and crashes."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps
                         if os.path.basename(line.split()[-1]).startswith("libmpi")}
    except OSError as error:
        return f"the loaded MPI library cannot be found ({error})"
    if not libraries:
        return "no MPI library is loaded in this process"
    for path in sorted(libraries):
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        query = getattr(library, "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            if query() == 1:
                return None
            return f"the MPI library {path} is not CUDA-aware (MPIX_Query_cuda_support)"
    return "the MPI library has no MPIX_Query_cuda_support, so it is not known CUDA-aware"


def transport_for(collectives, on_device):
    """The transport `collectives` ("auto", "mpi", "nccl") names for arrays in device or
    host memory; raises ValueError when it cannot move them."""
    if not isinstance(collectives, str) or collectives not in COLLECTIVES:
        raise ValueError(f"Invalid collectives value: {abbreviated(collectives)} "
                         f"(collectives must be one of {COLLECTIVES})")
    if collectives == "auto":
        return "nccl" if on_device else "mpi"
    if collectives == "nccl" and not on_device:
        raise ValueError("Invalid collectives value: 'nccl' (NCCL moves GPU memory; these "
                         "parameters are in host memory: use 'mpi' or 'auto')")
    if collectives == "mpi" and on_device:
        reason = cuda_aware_mpi_reason()
        if reason is not None:
            raise BackendUnavailableError(f"collectives 'mpi' over GPU memory needs a "
                                          f"CUDA-aware MPI: {reason}; use 'nccl' or "
                                          f"'auto'")
    return collectives


def make_collectives(comm, bounds, transport, backend, param):
    """The Collectives of `transport`; collective (NCCL's setup agrees on every rank)."""
    if transport == "mpi":
        wait = backend.synchronize if describe("params", param).on_device else None
        return MpiCollectives(comm, bounds, wait)
    nccl, reason = nccl_module()
    agree(comm, None if reason is None else BackendUnavailableError(
        f"collectives 'nccl' cannot run: {reason}"))
    device, _ = backend.place(param)
    unique_id = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    import cupy

    with cupy.cuda.Device(device):
        communicator = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())
    return NcclCollectives(comm, bounds, nccl, communicator,
                           lambda: backend.place(param)[1])

"""Past one device: ZeRO-1 sharding of the flat buffer over MPI processes.

`ShardedMomentumSGD` is `MomentumSGD` for data-parallel training over the N processes
(ranks) of an MPI communicator (mpi4py). Every rank holds the full parameters and its own
gradient, but updates only its shard of the flat buffer and keeps the velocity of that
shard alone (stage 1 of DeepSpeed's ZeRO; `torch.distributed.optim.
ZeroRedundancyOptimizer` per tensor). A step on every rank:

1. reduce-scatter of the gradients: rank r receives the sum over ranks of its shard, and
   the update divides it by N (folded into grad_scale, so inside the same fused pass);
2. the fused update of its shard (MomentumSGD's kernels, parameter groups cut at the
   shard's edges) with its shard's velocity;
3. all-gather of the parameters in place: every rank ends with identical parameters.

The collectives are one interface (`Collectives`) with two implementations sharing
everything else: `MpiCollectives` (NumPy buffers; GPU buffers too with a CUDA-aware MPI,
which waits for the stream before each call) and `NcclCollectives` (GPU buffers: CuPy's
NCCL bindings, queued on the arrays' stream with no host synchronisation).

Shards (`shard_bounds`) are contiguous, in rank order, start on a 16-byte (128-bit vector)
boundary and differ in size by at most one vector. Importing this module imports neither
mpi4py nor CuPy; `import gpu_momentum` does not import this module.
"""

import hashlib
import numbers
import os
import reprlib
import sys
import warnings

import numpy as np

from .arrays import describe, type_name
from .backends import BackendUnavailableError, check_arrays
from .checkpoint import CheckpointError
from .flat import SEGMENT_ALIGNMENT_BYTES, FlatParams
from .groups import GROUP_OPTIONS
from .hyperparams import flag, inverse_grad_scale
from .kernels.layout import LAST_STEP_SKIPPED
from .optimizer import MomentumSGD

COLLECTIVES = ("auto", "mpi", "nccl")

__all__ = ["ShardedMomentumSGD", "shard_bounds", "Collectives", "MpiCollectives",
           "NcclCollectives", "cuda_aware_mpi_reason", "COLLECTIVES"]


def shard_bounds(size, ranks, itemsize):
    """[(start, stop)] of each rank's shard of a `size`-element buffer of `itemsize`-byte
    elements: contiguous and in rank order, covering [0, size); every start is a multiple
    of one 128-bit vector (16 // itemsize elements); the buffer's vectors (the last may be
    partial) are dealt as evenly as they go, rank r getting floor((r + 1) V / N) -
    floor(r V / N) of the V vectors, so sizes differ by at most one vector. On two ranks
    or more, sizes are all equal exactly when size is a multiple of ranks * (16 //
    itemsize) (NCCL's reduce-scatter and all-gather then apply)."""
    for name, value, least in (("size", size, 0), ("ranks", ranks, 1),
                               ("itemsize", itemsize, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"Invalid {name} value: {_REPR.repr(value)} ({name} must be an "
                             f"integer >= {least})")
    vector = max(1, SEGMENT_ALIGNMENT_BYTES // itemsize)  # one 128-bit vector
    vectors = -(-size // vector)
    edges = [min(size, vector * (rank * vectors // ranks)) for rank in range(ranks + 1)]
    return [(edges[rank], edges[rank + 1]) for rank in range(ranks)]


# Agreement: every collective call first learns whether every rank can go on.

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


def _mpi():
    from mpi4py import MPI  # imported only once a communicator exists
    return MPI


def _check_comm(comm):
    """`comm`, after checking that it is an mpi4py intracommunicator (checked on this
    rank alone: without one there is no one to tell)."""
    MPI = sys.modules.get("mpi4py.MPI")  # a communicator means mpi4py.MPI is imported
    if (MPI is None or not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL):
        raise TypeError(f"Invalid comm value: {_REPR.repr(comm)} (comm must be an mpi4py "
                        f"intracommunicator, such as mpi4py.MPI.COMM_WORLD; got "
                        f"{type_name(comm)})")
    return comm


# Exceptions a rank re-raises for another rank's failed check, by name; others become
# RuntimeError. The failing rank raises its own exception.
_SHARED_EXCEPTIONS = {cls.__name__: cls for cls in (
    TypeError, ValueError, CheckpointError, BackendUnavailableError, OSError,
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)}


def _agree(comm, error, values=None):
    """Every rank's verdict on one collective call, in one host allreduce of a few int64:
    raises on every rank when `error` (an exception, or None) is set on any rank (the
    failing rank its own, the others one naming it), or when `values` ({name: (number,
    show)}: numbers in [0, 2**63), `show()` what a message shows of it) differ between
    ranks. Nothing waits for a device."""
    values = values or {}
    numbers = [number for number, _ in values.values()]
    verdict = np.array([error is not None, *numbers, *(-n for n in numbers)], np.int64)
    comm.Allreduce(_mpi().IN_PLACE, verdict, op=_mpi().MAX)
    if verdict[0]:
        reports = comm.allgather(None if error is None else (type(error).__name__,
                                                             str(error)))
        if error is not None:
            raise error
        rank, (name, message) = next((r, report) for r, report in enumerate(reports)
                                     if report is not None)
        raise _SHARED_EXCEPTIONS.get(name, RuntimeError)(
            f"rank {rank} of {comm.Get_size()} failed: {message}")
    count = len(numbers)
    for index, (name, (number, show)) in enumerate(values.items()):
        if verdict[1 + index] != -verdict[1 + count + index]:
            everyone = comm.allgather((number, show()))
            rank = next(r for r, theirs in enumerate(everyone)
                        if theirs[0] != everyone[0][0])
            where, theirs, first = _difference(everyone[rank][1], everyone[0][1], name)
            raise ValueError(f"{name} differs between ranks: rank {rank} has {where} = "
                             f"{_REPR.repr(theirs)}, rank 0 has {_REPR.repr(first)} (every "
                             f"rank must have the same)")


def _difference(a, b, where):
    """(where, a's part, b's part) of the first place where nested lists and dicts `a`
    and `b` differ, as `where[1]['lr']`."""
    if type(a) is type(b) and isinstance(a, (list, tuple)) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _difference(x, y, f"{where}[{index}]")
    if type(a) is type(b) and isinstance(a, dict) and a.keys() == b.keys():
        for key in a:
            if a[key] != b[key]:
                return _difference(a[key], b[key], f"{where}[{key!r}]")
    return where, a, b


def _first_difference(comm, description):
    """Raises ValueError on every rank when the ranks' `description`s (dicts of
    picklable values, same keys) differ, naming the first rank that differs from rank 0
    and what differs."""
    everyone = comm.allgather(description)
    for rank, theirs in enumerate(everyone):
        for key, value in theirs.items():
            if value != everyone[0][key]:
                where, mine, first = _difference(value, everyone[0][key], key)
                raise ValueError(f"rank {rank} differs from rank 0 in {where}: "
                                 f"{_REPR.repr(mine)} against {_REPR.repr(first)} (every "
                                 f"rank must pass the same layout, options and initial "
                                 f"parameters)")


def _checksum(backend, param):
    """Wrapping sums of param's bit patterns (all words, every second, every third: most
    swaps show), in hex: integers, so equal on every rank holding the same bits, in any
    summation order; one pass in param's memory (a host copy where CuPy is absent)."""
    info = describe("params", param)
    xp, array = np, param
    if info.on_device:
        try:
            import cupy as xp
            array = xp.asarray(param)
        except ImportError:
            xp, array = np, backend.to_numpy(param)
    words = array.reshape(-1).view(f"u{info.dtype.itemsize}")
    return "-".join(f"{int(xp.sum(words[start::stride], dtype=xp.uint64)):016x}"
                    for start, stride in ((0, 1), (0, 2), (1, 3)))


# The collectives.

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
        MPI = _mpi()
        self._wait()
        if self.equal_counts:
            self.comm.Reduce_scatter_block(grad, shard, op=MPI.SUM)
        else:
            self.comm.Reduce_scatter(grad, shard, recvcounts=self.counts, op=MPI.SUM)

    def all_gather(self, param):
        from mpi4py.util.dtlib import from_numpy_dtype

        MPI = _mpi()
        self._wait()
        if self.equal_counts:
            self.comm.Allgather(MPI.IN_PLACE, param)
            return
        kind = from_numpy_dtype(describe("param", param).dtype)
        self.comm.Allgatherv(MPI.IN_PLACE, [param, self.counts, self.starts, kind])

    def agree_skip(self, counters):
        MPI = _mpi()
        self._wait()
        flag_slot = counters[LAST_STEP_SKIPPED:LAST_STEP_SKIPPED + 1]
        self.comm.Allreduce(MPI.IN_PLACE, flag_slot, op=MPI.MAX)


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


def _nccl_module():
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


def _transport(collectives, on_device):
    """The transport `collectives` ("auto", "mpi", "nccl") names for arrays in device or
    host memory; raises ValueError when it cannot move them."""
    if not isinstance(collectives, str) or collectives not in COLLECTIVES:
        raise ValueError(f"Invalid collectives value: {_REPR.repr(collectives)} "
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


def _make_collectives(comm, bounds, transport, backend, param):
    """The Collectives of `transport`; collective (NCCL's setup agrees on every rank)."""
    if transport == "mpi":
        wait = backend.synchronize if describe("params", param).on_device else None
        return MpiCollectives(comm, bounds, wait)
    nccl, reason = _nccl_module()
    _agree(comm, None if reason is None else BackendUnavailableError(
        f"collectives 'nccl' cannot run: {reason}"))
    device, _ = backend.place(param)
    unique_id = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    import cupy

    with cupy.cuda.Device(device):
        communicator = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())
    return NcclCollectives(comm, bounds, nccl, communicator,
                           lambda: backend.place(param)[1])


# The optimizer.

class _Whole:
    """A ShardedMomentumSGD as gpu_momentum.checkpoint sees an optimizer: the whole
    buffer's state in host memory. To save, it holds the gathered state; to load, the
    state read goes through the sharded optimizer's checks, and `restore` waits until
    every rank agreed."""

    backend = "cpu"  # what it hands over is in host memory
    precision = "nearest"  # the only one sharding takes (_check_sharded_precision)

    def __init__(self, sharded, state=None):
        self._sharded, self._state, self.restore = sharded, state, None
        self.flat = sharded.flat
        self.velocity_dtype = sharded._local.velocity_dtype
        if state is None:  # to load: what the reader expects, without a whole velocity
            self.param = sharded.param
            self.velocity = np.broadcast_to(np.zeros((), sharded.velocity.dtype),
                                            describe("param", sharded.param).shape)
        else:
            self.param = sharded._local._backend.to_numpy(sharded.param)
            self.velocity = state["velocity"]

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state, params=None):
        self.restore = self._sharded._checked_state(state, params)


class _ShardUpdate(MomentumSGD):
    """MomentumSGD over the elements [start, stop) of its buffer alone: the update a rank
    makes of its shard, with the groups and hyperparameters of the whole buffer."""

    def __init__(self, params, window, **options):
        self._window = window
        super().__init__(params, **options)


def _check_sharded_precision(local):
    """ValueError for the 16-bit settings sharding does not carry: stochastic rounding
    keys its random bits by an element's index in the buffer a kernel sees (a shard's
    would differ from one process's), the compensation and master buffers and a 16-bit
    velocity are not gathered into checkpoints, and MPI has no bfloat16 sum."""
    if local.precision != "nearest":
        raise ValueError(f"Invalid precision value: {local.precision!r} "
                         f"(ShardedMomentumSGD updates with precision 'nearest' only)")
    if local.velocity_dtype.itemsize == 2:
        raise ValueError(f"Invalid velocity_dtype value: {local.velocity_dtype.name!r} "
                         f"(ShardedMomentumSGD keeps a float32 or float64 velocity)")
    if describe("params", local.param).dtype.name == "bfloat16":
        raise TypeError("params has dtype bfloat16, which ShardedMomentumSGD does not "
                        "update (its collectives sum float16, float32 and float64)")


def _forward(name, settable=False):
    """A property of the rank's shard optimizer, as MomentumSGD has it."""
    doc = getattr(MomentumSGD, name).__doc__ if isinstance(
        getattr(MomentumSGD, name, None), property) else None
    setter = (lambda self, value: setattr(self._local, name, value)) if settable else None
    return property(lambda self: getattr(self._local, name), setter, doc=doc)


class ShardedMomentumSGD:
    """MomentumSGD over the ranks of an MPI communicator, each updating its shard of the
    flat buffer (ZeRO stage 1): identical results to one process fed the average gradient,
    the velocity (the optimizer's memory) and the update's memory traffic divided by N.

    params: a FlatParams (or one contiguous array) of the same layout and the same initial
    values on every rank; the constructor compares layouts and options across ranks and
    the values by a checksum, and refuses a mismatch with an error naming the first rank
    that differs. comm: an mpi4py intracommunicator (mpi4py.MPI.COMM_WORLD). Every other
    keyword is MomentumSGD's (lr, momentum, dampening, weight_decay, l1, nesterov,
    maximize, style, decoupled_weight_decay, groups, skip_nonfinite, backend; formulas,
    first steps and groups as there) and must be the same on every rank. collectives: "auto" (NCCL for GPU arrays, MPI for host arrays),
    "nccl", or "mpi" (on GPU arrays only with a CUDA-aware MPI; each collective then waits
    for the stream).

    `velocity` is this rank's shard of the velocity, `shard` its (start, stop) in the flat
    buffer, `shards` every rank's. The constructor, `step`, `state_dict`,
    `load_state_dict`, `save` and `load` are collective: every rank calls them, in the
    same order. Each first checks its arguments on every rank and agrees on the outcome
    (one small host allreduce, never waiting for a device): when a rank's check fails,
    every rank raises and nothing changes anywhere.
    """

    def __init__(self, params, *, comm, collectives="auto", **options):
        # **options: exactly MomentumSGD's keyword arguments (lr, momentum, ..., groups,
        # skip_nonfinite, backend), checked by it, so that every option it has or gains
        # works here too.
        self.comm = _check_comm(comm)
        rank, ranks = comm.Get_rank(), comm.Get_size()
        error = description = None
        try:
            buffer = params.data if isinstance(params, FlatParams) else params
            info = describe("params", buffer)
            size = int(np.prod(info.shape, dtype=np.int64))
            self.shards = shard_bounds(size, ranks, info.dtype.itemsize)
            self._local = _ShardUpdate(params, self.shards[rank], **options)
            _check_sharded_precision(self._local)
            transport = _transport(collectives, info.on_device)
            description = self._description(params, info, transport)
        except Exception as failure:  # every rank must hear of it
            error = failure
        _agree(comm, error)
        _first_difference(comm, description)
        self.flat = self._local.flat
        self.param = buffer  # the whole buffer, as given
        self._whole = buffer.reshape(size)  # the same, 1-D: what the collectives move
        self._collectives = _make_collectives(comm, self.shards, transport,
                                              self._local._backend, self._whole)
        self._scratch = self._local._backend.zeros(self._local.velocity.shape, info.dtype)
        self._fingerprint = None  # of the hyperparameters, for the steps' agreement

    def _description(self, params, info, transport):
        """What must be the same on every rank (compared in this order)."""
        flat = params if isinstance(params, FlatParams) else None
        local = self._local
        return {"dtype": str(info.dtype), "shape": tuple(info.shape),
                "segment shapes": None if flat is None else flat.shapes,
                "segment offsets": None if flat is None else flat.offsets,
                "segment names": None if flat is None else flat.names,
                "backend": local.backend, "collectives": transport,
                "hyperparameters": self._hyperparameters(),
                "groups": [group["params"] for group in local.param_groups],
                "skip_nonfinite": local.skip_nonfinite,
                "initial parameter values (checksum)": _checksum(local._backend, params.data if flat
                                                else params)}

    @property
    def velocity(self):
        """This rank's shard of the velocity (elements `shard` of the flat buffer)."""
        return self._local.velocity

    @property
    def shard(self):
        """(start, stop) of this rank's shard in the flat buffer."""
        return self.shards[self._collectives.rank]

    @property
    def collectives(self):
        """The transport of the collectives: "mpi" or "nccl"."""
        return self._collectives.transport

    def _hyperparameters(self):
        """Every group's hyperparameters ([0]: the optimizer's own), as dicts."""
        return [hyper.as_dict() for hyper in self._local._hypers]

    def _hyperparameter_fingerprint(self):
        """A 56-bit digest of every group's hyperparameters, recomputed after a change."""
        if self._fingerprint is None or self._local._table_stale:
            text = repr(self._hyperparameters()).encode()
            self._fingerprint = int.from_bytes(hashlib.blake2b(text, digest_size=7)
                                               .digest(), "little")
        return self._fingerprint

    def step(self, grad=None, *, grad_scale=1.0, grads_reduced=False):
        """One collective step: reduce-scatter this rank's `grad` (default: the
        FlatParams' gradient buffer; the whole buffer's gradient) so that the rank gets
        the average of its shard over ranks, update the shard (divided by `grad_scale`, as
        MomentumSGD.step), all-gather the parameters.

        grads_reduced=True: `grad` is already the average over ranks, the same on every
        rank (DDP's): no reduce-scatter. Every rank must pass the same grad_scale and
        grads_reduced, and have the same hyperparameters; a difference is refused before
        anything moves. With skip_nonfinite, a NaN or inf in any rank's gradient makes
        every rank skip the step."""
        error = None
        try:
            grads_reduced = flag("grads_reduced", grads_reduced)
            inv_grad_scale = self._inverse_grad_scale(grad_scale, grads_reduced)
            grad = self._local._gradient(grad)
            check_arrays(self._local._backend, self.param, grad, None)
        except Exception as failure:  # every rank must hear of it
            error = failure
            grads_reduced, grad_scale = False, 1.0
        scale = float(grad_scale)
        _agree(self.comm, error, {
            "grads_reduced": (int(grads_reduced), lambda: grads_reduced),
            "grad_scale": (int(np.float64(scale).view(np.int64)), lambda: scale),
            "hyperparameters": (self._hyperparameter_fingerprint(),
                                self._hyperparameters)})
        start, stop = self.shard
        grad = grad.reshape(self._whole.shape)
        if grads_reduced:
            shard_grad = grad[start:stop]
        else:
            self._collectives.reduce_scatter(grad, self._scratch)
            shard_grad = self._scratch
        agree = self._collectives.agree_skip if self.skip_nonfinite else None
        self._local._step(shard_grad, inv_grad_scale, agree)
        self._collectives.all_gather(self._whole)

    def _inverse_grad_scale(self, grad_scale, grads_reduced):
        """What the update multiplies the shard's gradient by: 1 / grad_scale, and 1 / N
        more for a sum over N ranks; checked as MomentumSGD checks grad_scale, that
        product included."""
        dtype = describe("param", self.param).dtype
        inverse = inverse_grad_scale(grad_scale, dtype)
        ranks = self.comm.Get_size()
        if grads_reduced or ranks == 1:
            return inverse
        try:
            inverse_grad_scale(float(grad_scale) * ranks, dtype)
        except ValueError as error:
            raise ValueError(f"Invalid grad_scale value: {grad_scale!r} (the update divides "
                             f"the sum over {ranks} ranks by {ranks} * grad_scale, which "
                             f"must pass the same check: {error})") from None
        return inverse / ranks

    def state_dict(self):
        """Collective: the whole optimizer's state, as `MomentumSGD.state_dict()` gives it
        (any MomentumSGD or ShardedMomentumSGD of this layout loads it), with the velocity
        gathered from every rank's shard into host memory on every rank."""
        state = self._local.state_dict()
        state["velocity"] = self._gathered_velocity(root=None)
        return state

    def _gathered_velocity(self, root):
        """The whole velocity in host memory: on every rank (root None), else on `root`
        alone (None elsewhere)."""
        from mpi4py.util.dtlib import from_numpy_dtype

        shard = np.ascontiguousarray(self._local._backend.to_numpy(self.velocity))
        collectives = self._collectives
        whole = (np.empty(self.param.shape, shard.dtype)
                 if root is None or root == collectives.rank else None)
        target = None if whole is None else [whole, collectives.counts, collectives.starts,
                                             from_numpy_dtype(shard.dtype)]
        if root is None:
            self.comm.Allgatherv(shard, target)
        else:
            self.comm.Gatherv(shard, target, root=root)
        return whole

    def load_state_dict(self, state, params=None):
        """Collective: restores a whole optimizer's state (`state_dict()` of a MomentumSGD
        or ShardedMomentumSGD of this layout, on any number of ranks) and, given `params`
        (the whole flat buffer), the parameters. Each rank keeps its shard of the
        velocity. Checked on every rank first: when one rank's check fails, every rank
        raises and nothing changes anywhere."""
        error = restore = None
        try:
            restore = self._checked_state(state, params)
        except Exception as failure:  # every rank must hear of it
            error = failure
        _agree(self.comm, error)
        restore()

    def _checked_state(self, state, params):
        """Checks a whole state (and params) on this rank alone; returns the collective
        function that restores them (every rank calls it once all ranks agreed)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type_name(state)}")
        shard_state = dict(state)
        if "velocity" in state:
            shard_state["velocity"] = self._shard_of("velocity", state["velocity"])
        shard_params = None if params is None else self._shard_of("params", params)
        restore_shard = self._local._checked_state(shard_state, shard_params)

        def restore():
            restore_shard()
            if params is not None:
                self._collectives.all_gather(self._whole)
            self._fingerprint = None

        return restore

    def save(self, path):
        """Collective: writes a checkpoint of the whole optimizer and parameters, in
        gpu_momentum.checkpoint's format: the very file a MomentumSGD writes, so that
        `MomentumSGD.load` and `ShardedMomentumSGD.load` on any number of ranks read it.
        Rank 0 gathers the velocity into its host memory and writes the file, atomically
        (temporary file, fsync, rename); when that fails, every rank raises. Ranks
        loading it on other machines need a filesystem shared with rank 0."""
        from .checkpoint import save_checkpoint

        state = self._local.state_dict()
        state["velocity"] = self._gathered_velocity(root=0)
        error = None
        if self._collectives.rank == 0:
            try:
                save_checkpoint(_Whole(self, state), path)
            except Exception as failure:  # every rank must hear of it
                error = failure
        _agree(self.comm, error)

    def load(self, path):
        """Collective: restores params and state from a checkpoint of a MomentumSGD or of
        a ShardedMomentumSGD on any number of ranks, resharded: every rank reads the file
        (into host memory), checks it as MomentumSGD.load does and keeps its shard; when
        one rank's check fails, every rank raises and nothing changes anywhere."""
        from .checkpoint import load_checkpoint

        error = whole = None
        try:
            whole = _Whole(self)
            load_checkpoint(whole, path)
        except Exception as failure:  # every rank must hear of it
            error = failure
        _agree(self.comm, error)
        whole.restore()

    def _shard_of(self, name, array):
        """This rank's shard of `array`, a whole buffer of the flat buffer's shape."""
        info, want = describe(name, array), describe("param", self.param)
        if info.shape != want.shape or not info.contiguous:
            raise ValueError(f"{name} has shape {info.shape}; this optimizer's state covers "
                             f"the whole buffer, of shape {want.shape} (contiguous)")
        size = self._whole.shape[0]
        start, stop = self.shard
        return array.reshape(size)[start:stop]

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self._local._hypers[0].as_dict().items())
        return (f"ShardedMomentumSGD({fields}, rank={self._collectives.rank} of "
                f"{self._collectives.size}, shard={self.shard}, backend={self.backend!r}, "
                f"collectives={self.collectives!r}, step_count={self.step_count})")


# What a MomentumSGD has, of this rank's shard optimizer: the hyperparameters, settable
# between steps (the same on every rank), and what it reports.
for _name in (*GROUP_OPTIONS, "maximize"):
    setattr(ShardedMomentumSGD, _name, _forward(_name, settable=True))
for _name in ("style", "decoupled_weight_decay", "param_groups", "step_count",
              "skipped_steps", "last_step_skipped", "velocity_initialized",
              "skip_nonfinite", "backend"):
    setattr(ShardedMomentumSGD, _name, _forward(_name))
del _name

"""Agreement: before each collective call, every rank learns whether every rank can go on.

A check that fails on one rank must raise on every rank, and nothing may change anywhere:
`agree` settles that in one small host allreduce (never waiting for a device), and
`first_difference`, `checksum` and `content_digest` compare what must be the same on every
rank.
"""

import hashlib
import json
import reprlib
import sys

import numpy as np

from ..arrays import describe, type_name
from ..backends import BackendUnavailableError
from ..checkpoint import CheckpointError

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


def abbreviated(value):
    """repr(value), cut to about 120 characters: what an error message shows of it."""
    return _REPR.repr(value)


def mpi_module():
    """mpi4py.MPI, imported only once a communicator exists."""
    from mpi4py import MPI
    return MPI


def check_comm(comm):
    """`comm`, after checking that it is an mpi4py intracommunicator (checked on this
    rank alone: without one there is no one to tell)."""
    MPI = sys.modules.get("mpi4py.MPI")  # a communicator means mpi4py.MPI is imported
    if (MPI is None or not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL):
        raise TypeError(f"Invalid comm value: {abbreviated(comm)} (comm must be an mpi4py "
                        f"intracommunicator, such as mpi4py.MPI.COMM_WORLD; got "
                        f"{type_name(comm)})")
    return comm


# Exceptions a rank re-raises for another rank's failed check, by name; others become
# RuntimeError. The failing rank raises its own exception.
SHARED_EXCEPTIONS = {cls.__name__: cls for cls in (
    TypeError, ValueError, CheckpointError, BackendUnavailableError, OSError,
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)}


def agree(comm, error, values=None):
    """Every rank's verdict on one collective call, in one host allreduce of a few int64:
    raises on every rank when `error` (an exception, or None) is set on any rank (the
    failing rank its own, the others one naming it), or when `values` ({name: (number,
    show)}: numbers in [0, 2**63), `show()` what a message shows of it) differ between
    ranks. Nothing waits for a device."""
    values = values or {}
    numbers = [number for number, _ in values.values()]
    verdict = np.array([error is not None, *numbers, *(-n for n in numbers)], np.int64)
    comm.Allreduce(mpi_module().IN_PLACE, verdict, op=mpi_module().MAX)
    if verdict[0]:
        reports = comm.allgather(None if error is None else (type(error).__name__,
                                                             str(error)))
        if error is not None:
            raise error
        rank, (name, message) = next((r, report) for r, report in enumerate(reports)
                                     if report is not None)
        raise SHARED_EXCEPTIONS.get(name, RuntimeError)(
            f"rank {rank} of {comm.Get_size()} failed: {message}")
    count = len(numbers)
    for index, (name, (number, show)) in enumerate(values.items()):
        if verdict[1 + index] != -verdict[1 + count + index]:
            everyone = comm.allgather((number, show()))
            rank = next(r for r, theirs in enumerate(everyone)
                        if theirs[0] != everyone[0][0])
            where, theirs, first = _difference(everyone[rank][1], everyone[0][1], name)
            raise ValueError(f"{name} differs between ranks: rank {rank} has {where} = "
                             f"{abbreviated(theirs)}, rank 0 has {abbreviated(first)} "
                             f"(every rank must have the same)")


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


def first_difference(comm, description):
    """Raises ValueError on every rank when the ranks' `description`s (dicts of
    picklable values, same keys) differ, naming the first rank that differs from rank 0
    and what differs."""
    everyone = comm.allgather(description)
    for rank, theirs in enumerate(everyone):
        for key, value in theirs.items():
            if value != everyone[0][key]:
                where, mine, first = _difference(value, everyone[0][key], key)
                raise ValueError(f"rank {rank} differs from rank 0 in {where}: "
                                 f"{abbreviated(mine)} against {abbreviated(first)} "
                                 f"(every rank must pass the same layout, options and "
                                 f"initial parameters)")


# splitmix64's finaliser (Steele, Lea and Flood 2014; Vigna's constants): a bijection of
# 64-bit words whose every output bit depends on every input bit.
_GOLDEN = 0x9E3779B97F4A7C15  # odd: i -> i * _GOLDEN is a bijection modulo 2**64
_MIX_STEPS = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB))
_LAST_SHIFT = 31
CHECKSUM_CHUNK = 1 << 16  # elements mixed at a time: the temporaries stay in cache


def checksum(backend, param):
    """A position-sensitive checksum of param's bits, as 16 hex digits: the sum modulo
    2**64 over its elements i (in C order) of mix(bits_i XOR i * 0x9E3779B97F4A7C15),
    mix splitmix64's finaliser and bits_i the element's bit pattern widened to 64 bits.
    Integers only, so every rank holding the same bits gets the same number on any
    backend and in any summation order; the index in each term makes moving values to
    other places show, whatever the distance (swapped segments, a shift). One pass in
    param's memory, CHECKSUM_CHUNK elements at a time (a host copy where CuPy is
    absent)."""
    info = describe("params", param)
    xp, array = np, param
    if info.on_device:
        try:
            import cupy as xp
            array = xp.asarray(param)
        except ImportError:
            xp, array = np, backend.to_numpy(param)
    words = array.reshape(-1).view(f"u{info.dtype.itemsize}")
    size = words.shape[0]
    u64 = xp.uint64
    weights = xp.arange(min(size, CHECKSUM_CHUNK), dtype=u64) * u64(_GOLDEN)
    mixed, shifted = xp.empty_like(weights), xp.empty_like(weights)
    total = xp.zeros((), u64)
    for start in range(0, size, CHECKSUM_CHUNK):
        stop = min(size, start + CHECKSUM_CHUNK)
        x, t = mixed[:stop - start], shifted[:stop - start]
        # (start + k) * _GOLDEN, wrapping: the weights of this chunk's indices.
        xp.add(weights[:stop - start], u64(start * _GOLDEN % 2**64), out=x)
        xp.bitwise_xor(x, words[start:stop].astype(u64), out=x)
        for shift, factor in _MIX_STEPS:
            xp.right_shift(x, u64(shift), out=t)
            xp.bitwise_xor(x, t, out=x)
            xp.multiply(x, u64(factor), out=x)
        xp.right_shift(x, u64(_LAST_SHIFT), out=t)
        xp.bitwise_xor(x, t, out=x)
        total += x.sum(dtype=u64)
    return f"{int(total):016x}"


def content_digest(backend, state, arrays):
    """A 56-bit digest of a state dict and of `arrays` (name: array or None): of the
    state's entries that are not arrays (as sorted JSON) and of each array's `checksum`;
    equal on ranks that hold the same values, in any memory."""
    plain = {key: value for key, value in state.items() if key not in arrays}
    parts = [json.dumps(plain, sort_keys=True, default=repr)]
    parts += [f"{name}:{None if array is None else checksum(backend, array)}"
              for name, array in sorted(arrays.items())]
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")

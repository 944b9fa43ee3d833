"""Checkpoints of a MomentumSGD: one `.npz` file, written atomically, read without trust.

Format version 4 is NumPy's `.npz` (a zip of `.npy` arrays, stored uncompressed) holding
four or five arrays:

- `param`, `velocity`: the flat buffers, in host memory, of the optimizer's dtypes;
- with precision "kahan" `compensation` (of the param dtype), with "master" `master`
  (float32): the precision buffer;
- `meta`: UTF-8 JSON as uint8 bytes: `format` ("gpu-momentum checkpoint"), `version` (4),
  `state` (the `state_dict()` without its arrays: hyperparameters, precision, velocity
  dtype and seed, parameter groups, style, step and skip counts, whether each group's
  velocity is initialised), `layout` (segment `shapes`, `offsets` and `names` of the
  FlatParams, or null for a single array), `dtypes` (the dtype name of each array) and
  `sha256` of each array's data bytes;
- `meta_sha256`: the SHA-256 of `meta`'s bytes, as 64 ASCII hex digits (uint8).

bfloat16 arrays are stored as their bits, uint16 (`.npy` has no bfloat16); `dtypes` says
so. Versions 3 (before precision modes: no precision buffer, no `dtypes`, a state without
precision, velocity_dtype and seed) and 2 (version 3 without `meta_sha256`: its metadata
carries no digest, so an edit of it that stays valid goes unnoticed) are still read, as
precision "nearest" with seed 0. The digests detect corruption and careless edits, not
forgery: they are not keyed. A checkpoint saved with another precision than the
optimizer's is refused, naming both.

Reading trusts nothing in the file and never calls `np.load` or unpickles:

- `zipfile` parses the zip's central directory through a file that hands out at most
  DIRECTORY_LIMIT bytes a read; the members must be exactly those of version 2, 3 or 4
  (with one precision buffer at most), each stored or deflated, unencrypted, needing at
  most zip 4.5 (zip64) to extract;
- each member's declared size is checked against what this optimizer's layout allows
  before it is read; its `.npy` header (at most NPY_HEADER_LIMIT bytes) is parsed and its
  shape and dtype are checked before its array is allocated; its bytes are read or
  inflated in chunks of CHUNK bytes, never past the declared size, and a member whose
  stream holds more or fewer bytes, or whose CRC-32 differs, is refused;
- the metadata is at most META_LIMIT bytes plus four times the size of this optimizer's
  layout in JSON, its digest is checked before it is parsed (versions 3 and 4), and it
  must fit a strict schema (keys, types, integer ranges, list lengths) before anything
  uses it; then its precision must be the optimizer's, and the members its version's
  and precision's.

A load that fails for any reason the file gives raises CheckpointError and changes
nothing; a file that cannot be opened raises the OSError of the attempt. A load takes the
memory of the arrays the layout allows and of the metadata, plus a few MiB.

Writing goes through one temporary file per checkpoint path, `.<name>.tmp` in the same
folder, locked with flock while it is written (two saves of one path take turns), then
flushed, fsynced and renamed over the checkpoint; the folder is fsynced after. A crash
leaves the previous checkpoint intact and at most that one temporary file, which the next
save of the path reuses; an exception removes it.
"""

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import reprlib
import stat
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
from numpy.lib import format as npy_format

from .arrays import describe
from .backends import backend_named
from .groups import GROUP_OPTIONS
from .kernels.layout import PRECISION_NAMES
from .precision import PRECISION_BUFFER_NAMES, Precision, precision_buffer_dtype


# The optimizer as checkpoints see it: every use of a MomentumSGD is in these three.

def _expected(optimizer):
    """What a checkpoint of `optimizer` holds, found without copying any array."""
    flat = optimizer.flat
    layout = None if flat is None else {"shapes": [list(s) for s in flat.shapes],
                                        "offsets": list(flat.offsets), "names": flat.names}
    param = describe("param", optimizer.param)
    segments = 1 if flat is None else len(flat.shapes)
    precision = Precision(param.dtype, optimizer.precision, optimizer.velocity_dtype)
    # Every array a checkpoint of this layout may hold, with its shape and dtype: the
    # buffers of the other precisions too, so that their sizes are bounded as well.
    arrays = {"param": (param.shape, param.dtype),
              "velocity": (param.shape, precision.velocity_dtype)}
    for mode, name in PRECISION_BUFFER_NAMES.items():
        arrays[name] = (param.shape, precision_buffer_dtype(param.dtype, mode))
    return _Expected(json.loads(json.dumps(layout)), segments, arrays,
                     optimizer.precision)


def _host_state(optimizer):
    """(arrays, state): `arrays` the param, velocity and precision buffer as host NumPy
    arrays, by member name (on the cpu backend param is the live buffer, not a copy),
    `state` the state_dict() without its arrays."""
    state = optimizer.state_dict()
    to_numpy = backend_named(optimizer.backend).to_numpy
    arrays = {"param": to_numpy(optimizer.param), "velocity": to_numpy(state.pop("velocity"))}
    buffer = PRECISION_BUFFER_NAMES.get(optimizer.precision)
    if buffer is not None:
        arrays[buffer] = to_numpy(state.pop(buffer))
    return arrays, state


def _restore(optimizer, state, arrays):
    """Restores a state_dict()-like `state` and its `arrays` (host arrays by member name:
    param, velocity, the precision buffer), all or nothing; ValueError or TypeError when
    they do not fit."""
    state = {**state, **{name: a for name, a in arrays.items() if name != "param"}}
    optimizer.load_state_dict(state, params=arrays["param"])


FORMAT_NAME = "gpu-momentum checkpoint"
# 2: groups, l1, decoupled weight decay, names; 3: meta_sha256; 4: precision, velocity
# dtype, seed, the precision buffer, dtypes
FORMAT_VERSION = 4
MEMBERS = {2: ("param", "velocity", "meta"),
           3: ("param", "velocity", "meta", "meta_sha256"),
           4: ("param", "velocity", "meta", "meta_sha256")}  # each a .npy
BUFFER_MEMBERS = tuple(PRECISION_BUFFER_NAMES.values())  # version 4: one at most

CHUNK = 1 << 20  # bytes read, inflated and hashed at a time
DIRECTORY_LIMIT = 1 << 20  # the most zipfile may read at once while parsing the directory
NPY_HEADER_LIMIT = 4096  # a .npy header of these arrays takes about 120 bytes
META_LIMIT = 1 << 20  # plus 4x this optimizer's layout in JSON (names may repeat in groups)
ZIP_VERSION_LIMIT = 45  # zip 4.5 (zip64); more means features a checkpoint never uses
ZIP_FLAGS = 0x080E  # deflate options, data descriptor, UTF-8 names; not encryption

_NPY_MAGIC = b"\x93NUMPY"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name and extra lengths
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not fit the optimizer."""


class _Expected(NamedTuple):
    layout: object  # as it reads back from JSON
    segments: int
    arrays: dict  # member name -> (shape, dtype) of what this layout may hold
    precision: str

    @property
    def meta_limit(self):
        return META_LIMIT + 4 * len(json.dumps(self.layout))

    def stored(self, name):
        """(shape, dtype in the file) of array member `name`."""
        shape, dtype = self.arrays[name]
        return shape, _stored_dtype(dtype)


def _stored_dtype(dtype):
    """The dtype an array of `dtype` has in the file: bfloat16 as its bits, uint16."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 4, 8, 8
_REPR.maxstring = _REPR.maxother = 80


def _brief(value):
    """A repr of an untrusted value for messages, bounded in length and depth."""
    return _REPR.repr(value)


def _short(text):
    return text if len(text) <= 80 else f"{text[:76]}..."


def _sha256(array):
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.sha256(data).hexdigest()


# Writing.

def save_checkpoint(optimizer, path):
    """Writes `optimizer`'s params and state to `path`; a crash leaves the old file
    intact."""
    arrays, state = _host_state(optimizer)
    stored = {name: a.view(_stored_dtype(a.dtype)) for name, a in arrays.items()}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "state": state,
            "layout": _expected(optimizer).layout,
            "dtypes": {name: np.dtype(a.dtype).name for name, a in arrays.items()},
            "sha256": {name: _sha256(a) for name, a in stored.items()}}
    meta = json.dumps(meta, allow_nan=False).encode()
    digest = hashlib.sha256(meta).hexdigest().encode()
    members = {**stored, "meta": np.frombuffer(meta, np.uint8),
               "meta_sha256": np.frombuffer(digest, np.uint8)}
    _replace(path, lambda file: np.savez(file, **members))


def _temporary_name(name):
    """The one temporary file name of checkpoint `name`, in the same folder."""
    temporary = f".{name}.tmp"
    if len(os.fsencode(temporary)) <= 255:
        return temporary
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()}.tmp"  # NAME_MAX is 255


def _replace(path, write):
    """Replaces `path` atomically with what `write(file)` writes, through its temporary."""
    given = os.fsdecode(os.fspath(path))
    path = os.path.abspath(given)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, _temporary_name(name))
    try:
        handle = _open_locked(temporary)
    except OSError as error:  # the temporary file is ours: name the caller's path
        raise type(error)(error.errno, error.strerror, given) from error
    with os.fdopen(handle, "wb") as file:
        try:
            os.ftruncate(handle, 0)  # a crashed save may have left it half written
            write(file)
            file.flush()
            os.fsync(handle)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):  # still ours: no other save has it
                if os.path.samestat(os.stat(temporary, follow_symlinks=False),
                                    os.fstat(handle)):
                    os.unlink(temporary)
            raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def _open_locked(temporary):
    """A descriptor of `temporary`, created if missing and locked for this save alone.

    Another save of the same path may have renamed or removed the file while this one
    waited for the lock: then the name no longer leads to the locked file, and this one
    opens it again. On filesystems without flock it goes on unlocked."""
    import fcntl  # POSIX; imported here so that Windows can still import the package

    while True:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o666)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as error:
                if error.errno not in _NO_FLOCK:
                    raise
                return handle
            if os.path.samestat(os.fstat(handle),
                                os.stat(temporary, follow_symlinks=False)):
                return handle
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(handle)
            raise
        os.close(handle)


# Reading.

def load_checkpoint(optimizer, path):
    """Restores params and state saved by `save_checkpoint`, all or nothing."""
    expected = _expected(optimizer)
    state, arrays = _read(path, expected)
    try:
        _restore(optimizer, state, arrays)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path!s} does not fit this optimizer: "
                              f"{error}") from error


# What parsing a malformed zip or .npy header can raise, besides CheckpointError.
_MALFORMED = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
              NotImplementedError, RuntimeError, struct.error, zlib.error, OverflowError,
              RecursionError, SyntaxError)


def _read(path, expected):
    """(state, arrays) of the checkpoint at `path`, checked against `expected`: arrays by
    member name, in the optimizer's dtypes."""
    handle = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(handle, "rb", buffering=0) as file:
        try:
            return _read_file(file, path, expected)
        except CheckpointError:
            raise
        except _MALFORMED as error:
            raise CheckpointError(f"checkpoint {path!s} is truncated, corrupted or not a "
                                  f"gpu-momentum checkpoint ({type(error).__name__}: "
                                  f"{error})") from error


def _read_file(file, path, expected):
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        raise CheckpointError(f"checkpoint {path!s} is not a regular file")
    if _read_exactly(file, len(_NPY_MAGIC)) == _NPY_MAGIC:
        raise CheckpointError(f"checkpoint {path!s} is a .npy file (one array), not a "
                              f"gpu-momentum checkpoint (.npz)")
    with zipfile.ZipFile(_DirectoryReader(file, path)) as directory:
        members = _members(directory.infolist(), path, expected)
    digested = "meta_sha256" in members  # versions 3 and 4

    meta = _read_array(file, members["meta"], path, np.uint8, None, expected.meta_limit)
    meta = meta.tobytes()
    if digested:
        digest = _read_array(file, members["meta_sha256"], path, np.uint8, (64,))
        if hashlib.sha256(meta).hexdigest().encode() != digest.tobytes():
            raise CheckpointError(f"checkpoint {path!s} is corrupted: the checksum of "
                                  f"meta does not match (meta_sha256)")
    meta = _parse(meta, path)
    version = _check_meta(meta, digested, path, expected)
    precision = meta["state"]["precision"] if version >= 4 else "nearest"
    if precision != expected.precision:
        raise CheckpointError(f"checkpoint {path!s} was saved with precision "
                              f"{precision!r}; this optimizer uses precision "
                              f"{expected.precision!r}")
    names = ["param", "velocity", *((PRECISION_BUFFER_NAMES[precision],)
                                    if precision in PRECISION_BUFFER_NAMES else ())]
    unexpected = sorted(set(members) - {"meta", "meta_sha256", *names})
    if unexpected or any(name not in members for name in names):
        raise CheckpointError(f"checkpoint {path!s} is corrupted: precision {precision!r} "
                              f"has the arrays {names}, the file "
                              f"{sorted(set(members) - {'meta', 'meta_sha256'})}")
    if version >= 4:
        dtypes = {name: np.dtype(expected.arrays[name][1]).name for name in names}
        if meta["dtypes"] != dtypes:
            raise CheckpointError(f"checkpoint {path!s} holds arrays of dtypes "
                                  f"{_brief(meta['dtypes'])}; this optimizer needs {dtypes}")
    arrays = {}
    for name in names:
        shape, stored = expected.stored(name)
        array = _read_array(file, members[name], path, stored, shape,
                            sha256=meta["sha256"][name])
        arrays[name] = array.view(expected.arrays[name][1])
    return meta["state"], arrays


def _read_exactly(file, size):
    data = bytearray()
    while len(data) < size:
        more = file.read(size - len(data))
        if not more:
            break
        data += more
    return bytes(data)


class _DirectoryReader:
    """The checkpoint file as zipfile reads its central directory: no read over
    DIRECTORY_LIMIT bytes, so a directory that claims millions of entries costs nothing."""

    def __init__(self, file, path):
        self._file, self._path = file, path
        self.seek, self.tell = file.seek, file.tell

    def seekable(self):
        return True

    def read(self, size=-1):
        if size is None or size < 0:
            size = max(0, os.fstat(self._file.fileno()).st_size - self._file.tell())
        if size > DIRECTORY_LIMIT:
            raise CheckpointError(f"checkpoint {self._path!s} is corrupted or not a "
                                  f"gpu-momentum checkpoint: its zip directory takes "
                                  f"{size} bytes (at most {DIRECTORY_LIMIT})")
        return _read_exactly(self._file, size)


def _members(infos, path, expected):
    """{name: ZipInfo} of the members of one format version (version 4: with at most one
    precision buffer), checked before any is read."""
    names = [info.orig_filename for info in infos]
    files = lambda members: sorted(f"{name}.npy" for name in members)
    allowed = [files(members) for members in MEMBERS.values()]
    allowed += [files((*MEMBERS[4], buffer)) for buffer in BUFFER_MEMBERS]
    if sorted(names) not in allowed:
        raise CheckpointError(
            f"checkpoint {path!s} is corrupted or not a gpu-momentum checkpoint: it holds "
            f"the members {_brief(sorted(names))}; a checkpoint holds "
            f"{files(MEMBERS[4])} and, with precision 'kahan' or 'master', "
            f"{' or '.join(f'{b}.npy' for b in BUFFER_MEMBERS)} (version 4), "
            f"{files(MEMBERS[3])} (version 3) or {files(MEMBERS[2])} (version 2)")
    prefix = len(_NPY_MAGIC) + 2 + 4 + NPY_HEADER_LIMIT  # magic, version, length, header
    limits = {name: _nbytes(*expected.stored(name)) for name in expected.arrays}
    limits |= {"meta": expected.meta_limit, "meta_sha256": 64}
    members = {}
    for info in infos:
        name = info.orig_filename[:-len(".npy")]
        where = f"checkpoint {path!s}: {info.orig_filename}"
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{where} is encrypted; checkpoints never are")
        if info.flag_bits & ~ZIP_FLAGS:
            raise CheckpointError(f"{where} uses zip features a checkpoint never uses "
                                  f"(flag bits {info.flag_bits:#06x})")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{where} has compression method {info.compress_type}; "
                                  f"a checkpoint is stored (0) or deflated (8)")
        if info.extract_version > ZIP_VERSION_LIMIT:
            raise CheckpointError(f"{where} needs zip version {info.extract_version / 10} "
                                  f"to extract; a checkpoint needs at most "
                                  f"{ZIP_VERSION_LIMIT / 10}")
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.compress_size != info.file_size:
            raise CheckpointError(f"{where} is stored but declares {info.compress_size} "
                                  f"bytes stored and {info.file_size} bytes of content")
        if info.file_size > prefix + limits[name]:
            raise CheckpointError(f"{where} declares {info.file_size} bytes; at most "
                                  f"{prefix + limits[name]} fit this optimizer")
        members[name] = info
    return members


def _nbytes(shape, dtype):
    return math.prod(shape) * np.dtype(dtype).itemsize


def _read_array(file, info, path, dtype, shape, most=None, sha256=None):
    """The array of member `info`: of `dtype` and `shape` (or 1-D of at most `most`
    elements when shape is None), its header checked before its array is allocated, its
    data checked against the member's size, CRC-32 and `sha256` when given."""
    name = info.orig_filename[:-len(".npy")]
    member = _Member(file, info, path)
    header = member.read(len(_NPY_MAGIC) + 4)
    if header[:len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: {info.orig_filename} is "
                              f"not a .npy array")
    if header[6:8] == b"\x02\x00":
        header += member.read(2)
        length = struct.unpack("<I", header[8:12])[0]
    elif header[6:8] == b"\x01\x00":
        length = struct.unpack("<H", header[8:10])[0]
    else:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: {info.orig_filename} has "
                              f".npy format version {header[6]}.{header[7]} (1.0 or 2.0)")
    if length > NPY_HEADER_LIMIT:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: the .npy header of "
                              f"{info.orig_filename} takes {length} bytes (at most "
                              f"{NPY_HEADER_LIMIT})")
    header = io.BytesIO(header + member.read(length))
    version = npy_format.read_magic(header)
    read_header = (npy_format.read_array_header_1_0 if version == (1, 0) else
                   npy_format.read_array_header_2_0)
    try:
        have_shape, fortran_order, have_dtype = read_header(header)
    except Exception as error:  # NumPy's parser of at most NPY_HEADER_LIMIT bytes of text
        raise CheckpointError(f"checkpoint {path!s} is corrupted: the .npy header of "
                              f"{info.orig_filename} does not parse "
                              f"({type(error).__name__}: {error})") from error
    if shape is None and len(have_shape) == 1 and 0 <= have_shape[0] <= most:
        shape = have_shape
    if (have_shape, have_dtype, fortran_order) != (shape, np.dtype(dtype), False):
        want = (f"shape {shape}" if shape is not None else
                f"1-D shape of at most {most} elements")
        raise CheckpointError(
            f"checkpoint {path!s} holds {name} of shape {_brief(have_shape)} and dtype "
            f"{_short(str(have_dtype))}{', Fortran order' if fortran_order else ''}; this "
            f"optimizer needs {want}, dtype {np.dtype(dtype)}")
    array = np.empty(shape, dtype)
    data = memoryview(array.reshape(-1).view(np.uint8))
    if member.left != len(data):
        raise CheckpointError(f"checkpoint {path!s} is corrupted: {info.orig_filename} "
                              f"declares {member.left} bytes of data for {len(data)}")
    digest = hashlib.sha256()
    for start in range(0, len(data), CHUNK):
        chunk = data[start:start + CHUNK]
        member.readinto(chunk)
        digest.update(chunk)
    member.finish()
    if sha256 is not None and digest.hexdigest() != sha256:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: the checksum of {name} "
                              f"does not match")
    return array


class _Member:
    """The content of one zip member, read from the file or inflated CHUNK bytes at a
    time, never past its declared size; `finish` checks its end and CRC-32."""

    def __init__(self, file, info, path):
        self._file, self._info = file, info
        self._where = f"checkpoint {path!s}: {info.orig_filename}"
        file.seek(info.header_offset)
        header = _read_exactly(file, _LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self._where} has no local header where the zip "
                                  f"directory says (corrupted)")
        _, _, flags, method, _, _, _, _, _, name_length, extra_length = \
            _LOCAL_HEADER.unpack(header)
        if (_read_exactly(file, name_length) != os.fsencode(info.orig_filename)
                or method != info.compress_type or flags & 0x1):
            raise CheckpointError(f"{self._where}: its local header does not match the zip "
                                  f"directory (corrupted)")
        file.seek(extra_length, os.SEEK_CUR)
        self.left = info.file_size
        self._compressed_left = info.compress_size
        self._crc = 0
        self._inflater = (zlib.decompressobj(-zlib.MAX_WBITS)
                          if method == zipfile.ZIP_DEFLATED else None)
        self._pending = b""  # compressed bytes read but not yet inflated

    def read(self, size):
        data = bytearray(min(size, self.left))
        self.readinto(memoryview(data))
        return bytes(data)

    def readinto(self, view):
        """Fills `view` (at most `left` bytes) with the next bytes of the content."""
        if len(view) > self.left:
            raise CheckpointError(f"{self._where} is shorter than its array (corrupted)")
        done = 0
        while done < len(view):
            want = min(CHUNK, len(view) - done)
            if self._inflater is None:
                got = self._file.readinto(view[done:done + want])
                self._compressed_left -= got
            else:
                data = self._inflate(want)
                got = len(data)
                view[done:done + got] = data
            if not got:
                raise CheckpointError(f"{self._where} ends before its declared "
                                      f"{self._info.file_size} bytes (truncated)")
            self._crc = zlib.crc32(view[done:done + got], self._crc)
            done += got
        self.left -= done

    def _inflate(self, size):
        """Up to `size` (> 0) inflated bytes; b"" at the end of the deflate stream or of
        the member's compressed bytes."""
        while True:
            if not self._pending:
                if self._inflater.eof or self._compressed_left <= 0:
                    return b""
                self._pending = self._file.read(min(CHUNK, self._compressed_left))
                if not self._pending:
                    return b""
                self._compressed_left -= len(self._pending)
            data = self._inflater.decompress(self._pending, size)
            self._pending = self._inflater.unconsumed_tail
            if data or self._inflater.eof:
                return data

    def finish(self):
        if self._inflater is not None:
            if self._inflate(1):
                raise CheckpointError(f"{self._where} inflates to more than its declared "
                                      f"{self._info.file_size} bytes")
            if (not self._inflater.eof or self._inflater.unused_data or self._pending
                    or self._compressed_left):
                raise CheckpointError(f"{self._where}: its deflate stream does not end "
                                      f"where the member does (corrupted)")
        if self._crc != self._info.CRC:
            raise CheckpointError(f"{self._where} is corrupted: its CRC-32 does not match")


def _parse(meta, path):
    """The metadata's JSON, parsed without NaN, infinities or repeated keys."""
    def constant(name):
        raise ValueError(f"{name} is not a number a checkpoint holds")

    def pairs(items):
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"an object repeats a key: {_brief(keys)}")
        return dict(items)

    try:
        text = meta.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: its metadata is not "
                              f"UTF-8 ({error})") from None
    try:
        return json.loads(text, parse_constant=constant, object_pairs_hook=pairs)
    except RecursionError:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: its metadata nests too "
                              f"deeply") from None
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path!s} is corrupted: its metadata is not "
                              f"valid JSON ({error})") from None


class _Invalid(Exception):
    """A metadata value that does not fit the schema (a message, without the path)."""


def _check_meta(meta, digested, path, expected):
    """Checks the metadata against the schema of its version, before anything uses it,
    and returns the version; `digested`: the file holds meta_sha256 (versions 3 and 4)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path!s} is not a gpu-momentum checkpoint")
    said = meta.get("version")
    if type(said) is not int or said not in MEMBERS:
        raise CheckpointError(f"checkpoint {path!s} has format version {_brief(said)}; "
                              f"this version of gpu-momentum reads versions "
                              f"{', '.join(map(str, MEMBERS))}")
    if digested != (said >= 3):
        held = "3 or 4" if digested else "2"
        raise CheckpointError(f"checkpoint {path!s} says format version {said} but holds "
                              f"the members of version {held} (corrupted)")
    try:
        keys = ("format", "version", "state", "layout", "sha256")
        _keys("the metadata", meta, (*keys, "dtypes") if said >= 4 else keys)
        _check_state(meta["state"], expected.segments, said)
        arrays = ["param", "velocity"]
        if said >= 4 and meta["state"]["precision"] in PRECISION_BUFFER_NAMES:
            arrays.append(PRECISION_BUFFER_NAMES[meta["state"]["precision"]])
        sha256 = meta["sha256"]
        _keys("sha256", sha256, arrays)
        for name, digest in sha256.items():
            if not (type(digest) is str and len(digest) == 64
                    and set(digest) <= set("0123456789abcdef")):
                raise _Invalid(f"Invalid sha256[{name!r}] value: {_brief(digest)} (64 "
                               f"lowercase hex digits)")
        if said >= 4:
            _keys("dtypes", meta["dtypes"], arrays)
            for name, dtype in meta["dtypes"].items():
                _text(f"dtypes[{name!r}]", dtype)
    except _Invalid as error:
        raise CheckpointError(f"checkpoint {path!s} has invalid metadata: "
                              f"{error}") from None
    if not _same(meta["layout"], expected.layout):
        raise CheckpointError(f"checkpoint {path!s} has layout {_brief(meta['layout'])}, "
                              f"this optimizer has {_brief(expected.layout)}")
    return said


def _keys(where, value, keys):
    if type(value) is not dict:
        raise _Invalid(f"{where} must be an object, got {_brief(value)}")
    missing = [key for key in keys if key not in value]
    unknown = [key for key in value if key not in keys]
    if missing or unknown:
        wrong = [f"{kind} {_brief(keys)}" for kind, keys in (("missing", missing),
                                                              ("unknown", unknown)) if keys]
        raise _Invalid(f"{where} has keys {_brief(sorted(value))}: {', '.join(wrong)}")


def _real(name, value):
    # Beyond 2**53 an int is no longer exact as a float; 10**400 is no float at all.
    if not ((type(value) is float and math.isfinite(value))
            or (type(value) is int and abs(value) <= 2**53)):
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (a finite number)")


def _flag(name, value):
    if type(value) is not bool:
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (true or false)")


def _count(name, value):
    if not (type(value) is int and 0 <= value < 2**63):  # the counters are int64
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (an integer in [0, 2**63))")


def _small_int(name, value):
    if not (type(value) is int and abs(value) < 2**31):
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (an integer)")


def _text(name, value):
    if not (type(value) is str and len(value) <= 64):
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (a short string)")


def _precision(name, value):
    if not (type(value) is str and value in PRECISION_NAMES):
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (one of {PRECISION_NAMES})")


def _seed(name, value):
    if not (type(value) is int and 0 <= value < 2**64):
        raise _Invalid(f"Invalid {name} value: {_brief(value)} (an integer in [0, 2**64))")


_STATE = {"format": _small_int, "lr": _real, "momentum": _real, "dampening": _real,
          "weight_decay": _real, "nesterov": _flag, "maximize": _flag, "style": _text,
          "l1": _real, "decoupled_weight_decay": _flag, "groups": None,
          "step_count": _count, "velocity_initialized": None, "skipped_steps": _count}
# What version 4's state adds (the state_dict of format 3).
_PRECISION_STATE = {"precision": _precision, "velocity_dtype": _text, "seed": _seed}


def _check_state(state, segments, version):
    """Types, ranges and lengths of the state of a checkpoint of `version`; its values are
    the optimizer's to judge."""
    schema = {**_STATE, **_PRECISION_STATE} if version >= 4 else _STATE
    _keys("state", state, schema)
    for key, check in schema.items():
        if check is not None:
            check(key, state[key])
    groups = state["groups"]
    if type(groups) is not list or len(groups) > segments:
        raise _Invalid(f"Invalid groups value: {_brief(groups)} (a list of at most "
                       f"{segments} groups, one segment each at least)")
    for number, group in enumerate(groups):
        where = f"groups[{number}]"
        if type(group) is not dict or "params" not in group:
            raise _Invalid(f"{where} must be an object with 'params', got {_brief(group)}")
        for key, value in group.items():
            if key == "params":
                if not (type(value) is list and 1 <= len(value) <= segments and all(
                        type(item) is str or (type(item) is int and 0 <= item < segments)
                        for item in value)):
                    raise _Invalid(f"Invalid params value in {where}: {_brief(value)} (a "
                                   f"list of 1 to {segments} segment names or indices in "
                                   f"[0, {segments}))")
            elif key in GROUP_OPTIONS:
                _STATE[key](f"{key} in {where}", value)
            else:
                raise _Invalid(f"{where} has unknown option {_brief(key)}")
    flags = state["velocity_initialized"]
    if not (type(flags) is list and len(flags) == 1 + len(groups)
            and all(type(flag) is bool for flag in flags)):
        raise _Invalid(f"Invalid velocity_initialized value: {_brief(flags)} (a list of "
                       f"{1 + len(groups)} bools: the optimizer's, then each group's)")


def _same(a, b):
    """Whether JSON values `a` and `b` are equal, types included (1 is not 1.0 or true)."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return a == b

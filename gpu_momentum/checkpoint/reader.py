"""Reading a checkpoint without trusting it: a hardened zip and .npy reader.

It never calls `np.load` or unpickles; see gpu_momentum.checkpoint for every limit it
keeps. Each member's size, header, data and checksums are checked before its array is
used, and the metadata against gpu_momentum.checkpoint.format's schema.
"""

import hashlib
import io
import math
import os
import stat
import struct
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

from ..state_format import (CHECKPOINT_MEMBERS, FLOAT8_CHECKPOINT_MEMBERS,
                            PRECISION_BUFFER_MEMBERS, STATE_VERSION, checkpoint_arrays)
from .format import (CheckpointError, brief, check_meta, expected_contents, parse_meta,
                     restore, saved_precision, saved_velocity_dtype, short)

CHUNK = 1 << 20  # bytes read, inflated and hashed at a time
DIRECTORY_LIMIT = 1 << 20  # the most zipfile may read at once while parsing the directory
NPY_HEADER_LIMIT = 4096  # a .npy header of these arrays takes about 120 bytes
ZIP_VERSION_LIMIT = 45  # zip 4.5 (zip64); more means features a checkpoint never uses
ZIP_FLAGS = 0x080E  # deflate options, data descriptor, UTF-8 names; not encryption

_NPY_MAGIC = b"\x93NUMPY"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name and extra lengths


def load_checkpoint(optimizer, path):
    """Restores params and state saved by `save_checkpoint`, all or nothing."""
    expected = expected_contents(optimizer)
    state, arrays = _read(path, expected)
    try:
        restore(optimizer, state, arrays)
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
    meta = parse_meta(meta, path)
    version = check_meta(meta, digested, path, expected)
    precision = saved_precision(meta["state"], version)
    if precision != expected.precision:
        raise CheckpointError(f"checkpoint {path!s} was saved with precision "
                              f"{precision!r}; this optimizer uses precision "
                              f"{expected.precision!r}")
    names = list(checkpoint_arrays(version, precision,
                                   saved_velocity_dtype(meta["state"], version)))
    unexpected = sorted(set(members) - {"meta", "meta_sha256", *names})
    if unexpected or any(name not in members for name in names):
        raise CheckpointError(f"checkpoint {path!s} is corrupted: precision {precision!r} "
                              f"has the arrays {names}, the file "
                              f"{sorted(set(members) - {'meta', 'meta_sha256'})}")
    if version >= 4:
        dtypes = {name: np.dtype(expected.arrays[name][1]).name for name in names}
        if meta["dtypes"] != dtypes:
            raise CheckpointError(f"checkpoint {path!s} holds arrays of dtypes "
                                  f"{brief(meta['dtypes'])}; this optimizer needs {dtypes}")
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
    allowed = [files(members) for members in CHECKPOINT_MEMBERS.values()]
    allowed += [files((*members, buffer)) for buffer in PRECISION_BUFFER_MEMBERS
                for members in (CHECKPOINT_MEMBERS[STATE_VERSION],
                                FLOAT8_CHECKPOINT_MEMBERS)]
    allowed.append(files(FLOAT8_CHECKPOINT_MEMBERS))
    if sorted(names) not in allowed:
        raise CheckpointError(
            f"checkpoint {path!s} is corrupted or not a gpu-momentum checkpoint: it holds "
            f"the members {brief(sorted(names))}; a checkpoint holds "
            f"{files(CHECKPOINT_MEMBERS[4])} and, with precision 'kahan' or 'master', "
            f"{' or '.join(f'{b}.npy' for b in PRECISION_BUFFER_MEMBERS)}, with an FP8 "
            f"velocity velocity_codes.npy and velocity_scales.npy for velocity.npy "
            f"(version 4), "
            f"{files(CHECKPOINT_MEMBERS[3])} (version 3) or "
            f"{files(CHECKPOINT_MEMBERS[2])} (version 2)")
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
            f"checkpoint {path!s} holds {name} of shape {brief(have_shape)} and dtype "
            f"{short(str(have_dtype))}{', Fortran order' if fortran_order else ''}; this "
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

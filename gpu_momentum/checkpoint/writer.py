"""Writing a checkpoint atomically: one temporary file per checkpoint path, locked,
flushed, fsynced and renamed over the checkpoint (see gpu_momentum.checkpoint)."""

import contextlib
import errno
import hashlib
import json
import os

import numpy as np

from ..state_format import STATE_VERSION
from .format import FORMAT_NAME, array_sha256, expected_contents, host_state, stored_dtype

_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def save_checkpoint(optimizer, path):
    """Writes `optimizer`'s params and state to `path`; a crash leaves the old file
    intact."""
    arrays, state = host_state(optimizer)
    stored = {name: a.view(stored_dtype(a.dtype)) for name, a in arrays.items()}
    meta = {"format": FORMAT_NAME, "version": STATE_VERSION, "state": state,
            "layout": expected_contents(optimizer).layout,
            "dtypes": {name: np.dtype(a.dtype).name for name, a in arrays.items()},
            "sha256": {name: array_sha256(a) for name, a in stored.items()}}
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

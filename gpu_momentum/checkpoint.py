"""Checkpoints of a MomentumSGD: one `.npz` file, written atomically, read without pickle.

The file is NumPy's `.npz` (a zip of `.npy` arrays) holding three arrays:

- `param`, `velocity`: the flat buffers, in host memory, of the optimizer's dtypes;
- `meta`: UTF-8 JSON as uint8 bytes: `format` ("gpu-momentum checkpoint"), `version` (2),
  `state` (the `state_dict()` without its velocity: hyperparameters, parameter groups,
  style, step count, whether each group's velocity is initialised), `layout` (segment
  `shapes`, `offsets` and `names` of the FlatParams, or null for a single array) and
  `sha256` of each array's bytes.

Loading uses `allow_pickle=False`: a checkpoint can never execute code. Any backend loads
what any backend saved.

Writing goes through one temporary file per checkpoint path, `.<name>.tmp` in the same
folder, locked with flock while it is written (two saves of one path take turns), then
flushed, fsynced and renamed over the checkpoint; the folder is fsynced after. A crash
leaves the previous checkpoint intact and at most that one temporary file, which the next
save of the path reuses; an exception removes it.
"""

import contextlib
import errno
import hashlib
import json
import os
import zipfile

import numpy as np

FORMAT_NAME = "gpu-momentum checkpoint"
FORMAT_VERSION = 2  # 2: parameter groups, l1, decoupled weight decay, names


_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not fit the optimizer."""


def _sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _layout(optimizer):
    flat = optimizer.flat
    if flat is None:
        return None
    return {"shapes": [list(s) for s in flat.shapes], "offsets": flat.offsets,
            "names": flat.names}


def save_checkpoint(optimizer, path):
    """Writes `optimizer`'s params and state to `path`; a crash leaves the old file intact."""
    backend = optimizer._backend
    state = optimizer.state_dict()
    arrays = {"param": backend.to_numpy(optimizer.param),
              "velocity": backend.to_numpy(state.pop("velocity"))}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "state": state,
            "layout": _layout(optimizer),
            "sha256": {name: _sha256(a) for name, a in arrays.items()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    _replace(path, lambda file: np.savez(file, **arrays))


def _temporary_name(name):
    """The one temporary file name of checkpoint `name`, in the same folder."""
    temporary = f".{name}.tmp"
    if len(os.fsencode(temporary)) <= 255:
        return temporary
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()}.tmp"  # NAME_MAX is 255


def _replace(path, write):
    """Replaces `path` atomically with what `write(file)` writes, through its temporary."""
    path = os.path.abspath(os.fsdecode(os.fspath(path)))
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, _temporary_name(name))
    handle = _open_locked(temporary)
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


def _read(path):
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {name: file[name] for name in file.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile,
            UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {path!s} is truncated, corrupted or not a "
                              f"gpu-momentum checkpoint ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path!s} is not a gpu-momentum checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!s} has format version "
                              f"{meta.get('version')!r}; this version of gpu-momentum "
                              f"reads version {FORMAT_VERSION}")
    if set(arrays) != set(meta.get("sha256", {})):
        raise CheckpointError(f"checkpoint {path!s} holds arrays {sorted(arrays)}, its "
                              f"header lists {sorted(meta.get('sha256', {}))}")
    for name, array in arrays.items():
        if _sha256(array) != meta["sha256"][name]:
            raise CheckpointError(f"checkpoint {path!s} is corrupted: the checksum of "
                                  f"{name} does not match")
    return meta, arrays


def load_checkpoint(optimizer, path):
    """Restores params and state saved by `save_checkpoint`, all or nothing."""
    meta, arrays = _read(path)
    if meta["layout"] != _layout(optimizer):
        raise CheckpointError(f"checkpoint {path!s} has layout {meta['layout']}, this "
                              f"optimizer has {_layout(optimizer)}")
    state = {**meta["state"], "velocity": arrays["velocity"]}
    try:
        optimizer._restore(state, param=arrays["param"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path!s} does not fit this optimizer: "
                              f"{error}") from error

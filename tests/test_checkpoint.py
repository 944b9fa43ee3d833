"""Checkpoints: bitwise continuation, portability, atomic writes, all-or-nothing loads.

BAD_FILES is the table of damaged and crafted files: each must raise CheckpointError and
change nothing, on every backend (tests/test_checkpoint_attacks.py also loads each in a
subprocess to bound its memory).
"""

import errno
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest

import gpu_momentum as gm
from configs import problem
from harness import CpuHarness

SHAPES = [(4, 3), (5,), (2, 2, 2)]


NAMES = ["conv", "bias", "head"]
# The head trains with its own lr, momentum and l1; conv and bias use the defaults.
GROUPS = [{"params": ["head"], "lr": 0.01, "momentum": 0.5, "l1": 0.001}]


def _model(backend, seed=0, shapes=SHAPES, dtype=np.float64, **hyper):
    rng = np.random.default_rng(seed)
    flat = gm.FlatParams.from_arrays(
        [backend.from_numpy(rng.standard_normal(s).astype(dtype)) for s in shapes],
        names=NAMES[:len(shapes)])
    hyper = {"lr": 0.05, "momentum": 0.9, "style": "torch", "dampening": 0.1,
             "groups": GROUPS, **hyper}
    return flat, gm.MomentumSGD(flat, backend=backend.name, **hyper)


def _train(backend, flat, opt, grads):
    for grad in grads:
        backend.assign(flat.grad, grad)
        opt.step()


def _grads(flat_size, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(flat_size) for _ in range(steps)]


def _bits(backend, *arrays):
    return [backend.to_numpy(a).tobytes() for a in arrays]


def _snapshot(backend, flat, opt):
    """Params, velocity and the rest of the state, to compare bit for bit."""
    state = opt.state_dict()
    return _bits(backend, flat.data, state.pop("velocity")), state


def test_continuing_from_a_checkpoint_is_bitwise_identical(backend, tmp_path):
    flat, opt = _model(backend)
    grads = _grads(flat.data.size, 10)
    _train(backend, flat, opt, grads[:5])
    opt.lr = 0.02  # a schedule's changes must be saved too
    opt.param_groups[0]["lr"] = 0.004
    opt.save(tmp_path / "ckpt.npz")
    _train(backend, flat, opt, grads[5:])

    resumed_flat, resumed = _model(backend, seed=99)  # other params: load replaces them
    resumed.load(tmp_path / "ckpt.npz")
    assert resumed.step_count == 5 and resumed.lr == 0.02
    assert resumed.param_groups[0]["lr"] == 0.004
    _train(backend, resumed_flat, resumed, grads[5:])
    assert _bits(backend, resumed_flat.data, resumed.velocity) == \
        _bits(backend, flat.data, opt.velocity)
    assert resumed.step_count == opt.step_count == 10


def test_checkpoints_move_between_backends(backend, tmp_path):
    cpu = CpuHarness()
    for source, target in ((backend, cpu), (cpu, backend)):
        flat, opt = _model(source)
        grads = _grads(flat.data.size, 6)
        _train(source, flat, opt, grads[:3])
        opt.save(tmp_path / "ckpt.npz")
        _train(source, flat, opt, grads[3:])
        moved_flat, moved = _model(target, seed=5)
        moved.load(tmp_path / "ckpt.npz")
        _train(target, moved_flat, moved, grads[3:])
        np.testing.assert_allclose(target.to_numpy(moved_flat.data),
                                   source.to_numpy(flat.data), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(target.to_numpy(moved.velocity),
                                   source.to_numpy(opt.velocity), rtol=1e-12, atol=1e-15)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    flat, opt = _model(CpuHarness())
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    before = path.read_bytes()

    def crash(file, **arrays):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    _train(CpuHarness(), flat, opt, _grads(flat.data.size, 1))
    with pytest.raises(KeyboardInterrupt):
        opt.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"], "no temporary file may be left behind"


def test_a_crashed_saves_temporary_file_is_reused(tmp_path):
    flat, opt = _model(CpuHarness())
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    # What a kill -9 during a save leaves: the path's one temporary file, half written.
    (tmp_path / ".ckpt.npz.tmp").write_bytes(b"half a checkpoint" * 1000)
    opt.load(path)  # load reads the path it is given, never the temporary file
    _train(CpuHarness(), flat, opt, _grads(flat.data.size, 1))
    opt.save(path)
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    _, other = _model(CpuHarness(), seed=4)
    other.load(path)
    assert other.step_count == 1


def test_a_link_in_place_of_the_temporary_file_is_refused(tmp_path):
    _, opt = _model(CpuHarness())
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / ".ckpt.npz.tmp")
    with pytest.raises(OSError) as error:
        opt.save(tmp_path / "ckpt.npz")
    assert error.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "ckpt.npz").exists()


def test_saving_where_flock_is_unsupported(tmp_path, monkeypatch):
    import fcntl

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre without -o flock

    monkeypatch.setattr(fcntl, "flock", no_flock)
    flat, opt = _model(CpuHarness())
    opt.save(tmp_path / "ckpt.npz")
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    _, other = _model(CpuHarness(), seed=4)
    other.load(tmp_path / "ckpt.npz")
    assert other.param.tobytes() == flat.data.tobytes()


def test_a_very_long_name_gets_a_short_temporary_file(tmp_path):
    _, opt = _model(CpuHarness())
    name = "c" * 250 + ".npz"  # ".<name>.tmp" would pass NAME_MAX (255 bytes)
    opt.save(tmp_path / name)
    opt.load(tmp_path / name)
    assert os.listdir(tmp_path) == [name]


def _digest(meta_bytes):
    return np.frombuffer(hashlib.sha256(meta_bytes).hexdigest().encode(), np.uint8)


def _rewrite(path, edit_meta=None, *, digest=True, **replace):
    """Rewrites a checkpoint with valid zip CRCs after editing its parsed metadata and
    replacing arrays (a value, or a function of the old array); digest=True recomputes
    meta_sha256, as a writer of well-formed but wrong checkpoints would."""
    with np.load(path) as file:
        arrays = {name: file[name] for name in file.files}
    meta = json.loads(arrays["meta"].tobytes())
    if edit_meta:
        edit_meta(meta)
    arrays.update({name: new(arrays[name]) if callable(new) else new
                   for name, new in replace.items()})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    if digest and "meta_sha256" in arrays:
        arrays["meta_sha256"] = _digest(arrays["meta"].tobytes())
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _members(path):
    """{name: content} of a checkpoint's zip members, in order."""
    with zipfile.ZipFile(path) as file:
        return {name: file.read(name) for name in file.namelist()}


def _zip(path, members, method=zipfile.ZIP_STORED):
    """Writes `members` ({name: content}) as a zip with valid CRCs."""
    with zipfile.ZipFile(path, "w", method) as file:
        for name, content in members.items():
            file.writestr(name, content)


def _npy(array):
    file = io.BytesIO()
    np.save(file, array, allow_pickle=True)
    return file.getvalue()


def _npy_header(shape, descr):
    """A .npy 1.0 header declaring `shape` and `descr`, whatever follows it."""
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _edit_members(edit):
    """A damage that edits {name: content} of the members and zips them again."""
    def damage(path):
        members = _members(path)
        edit(members)
        _zip(path, members)
    return damage


def _edit_meta_bytes(edit, digest=True):
    """A damage that edits the metadata's bytes (and recomputes its digest)."""
    def edit_members(members):
        meta = edit(np.load(io.BytesIO(members["meta.npy"])).tobytes())
        members["meta.npy"] = _npy(np.frombuffer(meta, np.uint8))
        if digest:
            members["meta_sha256.npy"] = _npy(_digest(meta))
    return _edit_members(edit_members)


def _replace_param_header(shape, descr="<f8"):
    """A damage that gives param.npy another header over the same data."""
    def edit(members):
        data = members["param.npy"]
        header = len(_npy_header((26,), "<f8"))
        members["param.npy"] = _npy_header(shape, descr) + data[header:]
    return _edit_members(edit)


def _patch_directory(member, offset, value):
    """A damage that writes the 16-bit `value` at `offset` into `member`'s entry of the
    zip's central directory; the CRCs stay valid (they cover the contents only)."""
    def damage(path):
        data = bytearray(path.read_bytes())
        entry = data.index(b"PK\x01\x02")  # the first entry
        while data[entry + 46:entry + 46 + len(member)] != member.encode():
            entry = data.index(b"PK\x01\x02", entry + 1)
        data[entry + offset:entry + offset + 2] = struct.pack("<H", value)
        path.write_bytes(bytes(data))
    return damage


def _deflated(prefix, mib):
    """A raw deflate stream of `prefix` then `mib` MiB of zeros, in about mib KiB, built
    without compressing the zeros mib times (one full-flushed MiB, repeated)."""
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = block.compress(bytes(1 << 20)) + block.flush(zlib.Z_FULL_FLUSH)
    return (head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH) + zeros * mib
            + zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush())


def _raw_zip(path, entries):
    """Writes a zip of (name, stored bytes, method, declared size, declared CRC) entries
    exactly as given, true or not."""
    out, directory = bytearray(), bytearray()
    for name, data, method, size, crc in entries:
        name = name.encode()
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21,
                                 crc, len(data), size, len(name), 0, 0, 0, 0, 0, len(out))
        directory += name
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc,
                           len(data), size, len(name), 0) + name + data
    out += directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries),
                                   len(entries), len(directory), len(out), 0)
    path.write_bytes(bytes(out))


BOMB_MIB = 1536  # 1.5 GiB of zeros in 1.5 MiB


def _bomb(kind):
    """Zip bombs: an extra member of 1.5 GiB of zeros; param.npy declaring them; param.npy
    declaring its true size and CRC but inflating to 1.5 GiB more."""
    def damage(path):
        members = _members(path)
        entries = [(name, content, 0, len(content), zlib.crc32(content))
                   for name, content in members.items()]
        param = members["param.npy"]
        if kind == "extra-member":
            header = _npy_header((BOMB_MIB << 20,), "|u1")
            entries.append(("zeros.npy", _deflated(header, BOMB_MIB), 8,
                            len(header) + (BOMB_MIB << 20), 0))
        else:
            header = (param if kind == "lying-size" else
                      _npy_header((BOMB_MIB << 17,), "<f8"))
            size = len(param) if kind == "lying-size" else len(header) + (BOMB_MIB << 20)
            entries = [("param.npy", _deflated(header, BOMB_MIB), 8, size,
                        zlib.crc32(param)) if name == "param.npy" else
                       (name, data, method, declared, crc)
                       for name, data, method, declared, crc in entries]
        _raw_zip(path, entries)
    return damage


def _duplicate_param(path):
    members = _members(path)
    entries = [(name, content, 0, len(content), zlib.crc32(content))
               for name, content in members.items()]
    _raw_zip(path, entries + [entries[0]])


def _save_npy(path):
    with open(path, "wb") as file:  # np.save(path) would append ".npy" to the name
        np.save(file, np.zeros(26))


def _state(key, value):
    return lambda meta: meta["state"].__setitem__(key, value)


def _delete(where, key):
    return lambda meta: (meta[where] if where else meta).pop(key)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_a_param_byte(path):
    data = bytearray(path.read_bytes())
    data[data.index(b"param.npy") + 200] ^= 0xFF
    path.write_bytes(bytes(data))


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


BAD_FILES = [
    ("truncated", _truncate, r"truncated"),
    ("corrupted", _flip_a_param_byte, r"corrupted"),
    ("checksum", lambda p: _rewrite(p, param=np.zeros_like), r"checksum of param"),
    ("version", lambda p: _rewrite(p, _set("version", 1)), r"version 1"),
    ("not-ours", lambda p: _rewrite(p, _set("format", "other")), r"not a gpu-momentum"),
    ("text", lambda p: p.write_text("hello"), r"corrupted"),
    ("pickle", lambda p: np.savez(p, meta=np.array([{"code": 1}], dtype=object)),
     r"corrupted|pickle"),
    ("layout", lambda p: _rewrite(p, lambda m: m["layout"]["shapes"].__setitem__(0, [3, 4])),
     r"layout"),
    ("style", lambda p: _rewrite(p, lambda m: m["state"].__setitem__("style", "classic")),
     r"style"),
    ("lr", lambda p: _rewrite(p, lambda m: m["state"].__setitem__("lr", -1)), r"lr.*-1"),
    ("group-lr", lambda p: _rewrite(p, lambda m: m["state"]["groups"][0].__setitem__(
        "lr", -1)), r"groups\[0\]: Invalid lr value: -1"),
    ("group-params", lambda p: _rewrite(p, lambda m: m["state"]["groups"][0].__setitem__(
        "params", ["bias"])), r"groups.*cover segments"),
    ("names", lambda p: _rewrite(p, lambda m: m["layout"].__setitem__(
        "names", ["a", "b", "c"])), r"layout"),
    ("velocity-initialized", lambda p: _rewrite(p, lambda m: m["state"].__setitem__(
        "velocity_initialized", [True])), r"velocity_initialized"),
    # The metadata is covered by its own SHA-256 (format 3), as the arrays are.
    ("tampered-lr", lambda p: _rewrite(p, _state("lr", 0.5), digest=False),
     r"checksum of meta"),
    ("tampered-step-count", lambda p: _rewrite(p, _state("step_count", 1000),
                                               digest=False), r"checksum of meta"),
    ("tampered-digest", _edit_members(lambda m: m.__setitem__(
        "meta_sha256.npy", _npy(_digest(b"other")))), r"checksum of meta"),
    ("digest-removed", _edit_members(lambda m: m.pop("meta_sha256.npy")),
     r"says format version 4 but holds the members of version 2"),
    # Not a checkpoint, or a zip that is not one.
    ("npy", _save_npy, r"\.npy file"),
    ("empty", lambda p: p.write_bytes(b""), r"corrupted"),
    ("extra-member", _edit_members(lambda m: m.__setitem__("notes.npy", _npy(np.ones(2)))),
     r"members .*notes\.npy"),
    ("missing-member", _edit_members(lambda m: m.pop("velocity.npy")), r"members"),
    ("duplicate-member", _duplicate_param, r"members"),
    ("huge-directory", lambda p: _raw_zip(p, [(f"{i}.npy", b"", 0, 0, 0)
                                              for i in range(30000)]),
     r"zip directory takes \d+ bytes \(at most 1048576\)"),
    ("encrypted", _patch_directory("param.npy", 8, 0x1), r"encrypted"),
    ("strong-encryption", _patch_directory("param.npy", 8, 0x41), r"encrypted"),
    ("flag-bits", _patch_directory("param.npy", 8, 0x40), r"flag bits 0x0040"),
    ("compression-99", _patch_directory("param.npy", 10, 99), r"compression method 99"),
    ("compression-bzip2", _patch_directory("meta.npy", 10, 12), r"compression method 12"),
    ("version-needed-99", _patch_directory("velocity.npy", 6, 99), r"version 9\.9"),
    ("version-needed-51", _patch_directory("velocity.npy", 6, 51), r"version 5\.1"),
    # Sizes are checked against the layout before anything is allocated or inflated.
    ("bomb-extra-member", _bomb("extra-member"), r"members .*zeros\.npy"),
    ("bomb-member", _bomb("member"), r"param\.npy declares \d+ bytes; at most \d+"),
    ("bomb-lying-size", _bomb("lying-size"), r"param\.npy inflates to more than"),
    ("huge-shape", _replace_param_header((1 << 40,)), r"param of shape \(1099511627776,\)"),
    ("overflowing-shape", _replace_param_header((1 << 62, 1 << 62)), r"param of shape"),
    ("negative-shape", _replace_param_header((-1,)), r"param of shape \(-1,\)"),
    ("huge-meta-shape", _edit_members(lambda m: m.__setitem__(
        "meta.npy", _npy_header((1 << 40,), "|u1") + b"{}")), r"meta of shape"),
    ("object-array", lambda p: _rewrite(p, param=lambda a: a.astype(object)),
     r"param of shape .* dtype object"),
    ("object-meta", lambda p: _rewrite(p, digest=False,
                                       meta_sha256=np.array([{"x": 1}], dtype=object)),
     r"meta_sha256 of shape .*dtype object"),
    ("big-endian", lambda p: _rewrite(p, param=lambda a: a.astype(">f8")), r"dtype >f8"),
    ("float32", lambda p: _rewrite(p, velocity=lambda a: a.astype(np.float32)),
     r"velocity of shape .* dtype float32"),
    ("npy-header-too-long", _edit_members(lambda m: m.__setitem__(
        "param.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 30) + bytes(300))),
     r"header of param\.npy takes 1073741824 bytes"),
    ("npy-version-3", _edit_members(lambda m: m.__setitem__(
        "param.npy", b"\x93NUMPY\x03\x00" + m["param.npy"][8:])), r"format version 3\.0"),
    ("meta-too-large", _edit_meta_bytes(lambda t: t + b" " * (2 << 20)),
     r"meta\.npy declares \d+ bytes; at most"),
    # Metadata that is not valid JSON, or does not fit the schema.
    ("not-utf8", _edit_meta_bytes(lambda t: t.replace(b'"style"', b'"st\xffle"')),
     r"not UTF-8"),
    ("not-json", _edit_meta_bytes(lambda t: t[:-1]), r"not valid JSON"),
    ("deep-nesting", _edit_meta_bytes(lambda t: b"[" * 100000 + b"]" * 100000),
     r"nests too deeply"),
    ("deep-in-state", lambda p: _rewrite(p, _state("groups",
                                                   json.loads("[" * 500 + "]" * 500))),
     r"groups\[0\] must be an object"),
    ("duplicate-key", _edit_meta_bytes(lambda t: t.replace(b'"lr": 0.05',
                                                           b'"lr": 0.05, "lr": 0.5')),
     r"repeats a key"),
    ("nan", lambda p: _rewrite(p, _state("lr", float("nan"))), r"NaN"),
    ("infinity", lambda p: _rewrite(p, _state("momentum", float("inf"))), r"Infinity"),
    ("float-overflow", _edit_meta_bytes(lambda t: t.replace(b'"lr": 0.05', b'"lr": 1e999')),
     r"Invalid lr value: inf"),
    ("huge-int-lr", lambda p: _rewrite(p, _state("lr", 10**400)),
     r"Invalid lr value: 1000"),
    ("huge-int-count", lambda p: _rewrite(p, _state("step_count", 10**400)),
     r"Invalid step_count value"),
    ("int64-overflow", lambda p: _rewrite(p, _state("skipped_steps", 2**63)),
     r"Invalid skipped_steps value: 9223372036854775808"),
    ("negative-count", lambda p: _rewrite(p, _state("skipped_steps", -1)),
     r"Invalid skipped_steps value: -1"),
    ("many-digits", _edit_meta_bytes(lambda t: t.replace(b'"lr": 0.05',
                                                         b'"lr": ' + b"9" * 5000)),
     r"not valid JSON"),
    ("missing-state-key", lambda p: _rewrite(p, _delete("state", "step_count")),
     r"missing \['step_count'\]"),
    ("missing-layout", lambda p: _rewrite(p, _delete(None, "layout")),
     r"missing \['layout'\]"),
    ("missing-sha256", lambda p: _rewrite(p, lambda m: m["sha256"].pop("velocity")),
     r"sha256 has keys"),
    ("unknown-key", lambda p: _rewrite(p, _state("eps", 1e-8)), r"unknown \['eps'\]"),
    ("meta-not-object", lambda p: _rewrite(p, lambda m: m.__setitem__("state", [1, 2])),
     r"state must be an object"),
    ("groups-not-list", lambda p: _rewrite(p, _state("groups", "head")),
     r"Invalid groups value"),
    ("too-many-groups", lambda p: _rewrite(p, _state("groups", [{"params": [0]}] * 4)),
     r"Invalid groups value"),
    ("group-option-type", lambda p: _rewrite(
        p, lambda m: m["state"]["groups"][0].__setitem__("lr", "0.1")),
     r"Invalid lr in groups\[0\] value: '0.1'"),
    ("group-unknown-option", lambda p: _rewrite(
        p, lambda m: m["state"]["groups"][0].__setitem__("eps", 0.1)),
     r"groups\[0\] has unknown option 'eps'"),
    ("group-huge-segment", lambda p: _rewrite(
        p, lambda m: m["state"]["groups"][0].__setitem__("params", [10**400])),
     r"Invalid params value in groups\[0\]: \[1000.*\(a list of 1 to 3"),
    ("flag-type", lambda p: _rewrite(p, _state("nesterov", "yes")),
     r"Invalid nesterov value: 'yes'"),
    ("int-flags", lambda p: _rewrite(p, _state("velocity_initialized", [1, 0])),
     r"velocity_initialized"),
    ("version-type", lambda p: _rewrite(p, _set("version", "3")), r"version '3'"),
    ("version-true", lambda p: _rewrite(p, _set("version", True)), r"version True"),
    ("sha256-type", lambda p: _rewrite(p, lambda m: m["sha256"].__setitem__("param", 5)),
     r"Invalid sha256\['param'\] value: 5"),
    ("layout-types", lambda p: _rewrite(p, lambda m: m["layout"]["offsets"].__setitem__(
        0, 0.0)), r"layout"),
]


@pytest.mark.parametrize("name, damage, pattern", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_checkpoint_changes_nothing(backend, tmp_path, name, damage, pattern):
    flat, opt = _model(backend)
    _train(backend, flat, opt, _grads(flat.data.size, 2))
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    damage(path)
    _train(backend, flat, opt, _grads(flat.data.size, 1, seed=3))
    before = _snapshot(backend, flat, opt)
    with pytest.raises(gm.CheckpointError, match=pattern):
        opt.load(path)
    assert _snapshot(backend, flat, opt) == before
    assert opt.lr == 0.05


def _before_precision(version):
    """A metadata edit to a checkpoint of `version` (2 or 3) of a "nearest" optimizer with
    seed 0: no dtypes, and the state_dict of format 2."""
    def edit(meta):
        meta["version"] = version
        del meta["dtypes"]
        state = meta["state"]
        assert (state.pop("precision"), state.pop("seed")) == ("nearest", 0)
        state.pop("velocity_dtype")
        state["format"] = 2
    return edit


def _as_version_3(path):
    """Rewrites a checkpoint as gpu-momentum wrote format 3."""
    _rewrite(path, _before_precision(3))


def _as_version_4_of_format_3(path):
    """Rewrites a checkpoint as gpu-momentum wrote version 4 before the state dicts shared
    its version number: the state's format 3."""
    def edit(meta):
        assert meta["state"]["format"] == 4
        meta["state"]["format"] = 3
    _rewrite(path, edit)


def _as_version_2(path):
    """Rewrites a checkpoint as gpu-momentum wrote format 2: no meta_sha256 either."""
    _rewrite(path, _before_precision(2), meta_sha256=None)
    members = _members(path)
    del members["meta_sha256.npy"]
    _zip(path, members)


@pytest.mark.parametrize("rewrite", [
    pytest.param(lambda p: None, id="version-4"),
    pytest.param(_as_version_4_of_format_3, id="version-4-format-3"),
    pytest.param(_as_version_3, id="version-3"),
    pytest.param(_as_version_2, id="version-2"),
    pytest.param(lambda p: _zip(p, _members(p), zipfile.ZIP_DEFLATED), id="deflated"),
])
def test_what_loads(backend, tmp_path, rewrite):
    flat, opt = _model(backend)
    _train(backend, flat, opt, _grads(flat.data.size, 2))
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    saved = _snapshot(backend, flat, opt)
    rewrite(path)
    _train(backend, flat, opt, _grads(flat.data.size, 1, seed=3))
    opt.load(path)
    assert _snapshot(backend, flat, opt) == saved


def test_the_format(tmp_path):
    _, opt = _model(CpuHarness())
    opt.save(tmp_path / "ckpt.npz")
    with np.load(tmp_path / "ckpt.npz") as file:  # still an ordinary .npz
        assert sorted(file.files) == ["meta", "meta_sha256", "param", "velocity"]
        meta = file["meta"].tobytes()
        assert file["meta_sha256"].tobytes() == hashlib.sha256(meta).hexdigest().encode()
    meta = json.loads(meta)
    assert (meta["format"], meta["version"]) == ("gpu-momentum checkpoint", 4)
    assert sorted(meta) == ["dtypes", "format", "layout", "sha256", "state", "version"]
    assert meta["dtypes"] == {"param": "float64", "velocity": "float64"}
    assert {k: meta["state"][k] for k in ("precision", "velocity_dtype", "seed")} == {
        "precision": "nearest", "velocity_dtype": "float64", "seed": 0}


@pytest.mark.parametrize("other", [
    pytest.param({"shapes": [(4, 3), (5,), (2, 2, 3)]}, id="size"),
    pytest.param({"dtype": np.float32}, id="dtype"),
    pytest.param({"shapes": [(3, 4), (5,), (2, 2, 2)]}, id="layout"),
])
def test_a_checkpoint_of_another_model_changes_nothing(tmp_path, other):
    cpu = CpuHarness()
    _, source = _model(cpu)
    source.save(tmp_path / "ckpt.npz")
    flat, opt = _model(cpu, seed=2, **other)
    before = _bits(cpu, flat.data, opt.velocity)
    with pytest.raises(gm.CheckpointError, match=r"layout|shape|dtype"):
        opt.load(tmp_path / "ckpt.npz")
    assert _bits(cpu, flat.data, opt.velocity) == before


def test_single_array_checkpoint(tmp_path):
    param, grads = problem(33, steps=4)
    opt = gm.MomentumSGD(param, lr=0.1)
    opt.step(grads[0])
    opt.save(tmp_path / "a.npz")
    other = gm.MomentumSGD(np.zeros(33), lr=0.5)
    other.load(tmp_path / "a.npz")
    for grad in grads[1:]:
        opt.step(grad)
        other.step(grad)
    assert other.param.tobytes() == param.tobytes()
    assert other.lr == 0.1

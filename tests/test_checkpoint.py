"""Checkpoints: bitwise continuation, portability, atomic writes, all-or-nothing loads."""

import errno
import json
import os

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


def _rewrite(path, edit_meta=None, **replace):
    with np.load(path) as file:
        arrays = {name: file[name] for name in file.files}
    meta = json.loads(arrays["meta"].tobytes())
    if edit_meta:
        edit_meta(meta)
    arrays.update(replace)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


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
    ("checksum", lambda p: _rewrite(p, param=np.zeros(32)), r"checksum of param"),
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
]


@pytest.mark.parametrize("name, damage, pattern", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_checkpoint_changes_nothing(backend, tmp_path, name, damage, pattern):
    flat, opt = _model(backend)
    _train(backend, flat, opt, _grads(flat.data.size, 2))
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    damage(path)
    _train(backend, flat, opt, _grads(flat.data.size, 1, seed=3))
    before = _bits(backend, flat.data, opt.velocity), opt.state_dict()["step_count"]
    with pytest.raises(gm.CheckpointError, match=pattern):
        opt.load(path)
    assert (_bits(backend, flat.data, opt.velocity), opt.step_count) == before
    assert opt.lr == 0.05


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

"""Checkpoints under attack: bounded memory for crafted files, a byte-flip fuzz over a whole
checkpoint, kill -9 in the middle of saves, and concurrent saves of one path."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

import gpu_momentum as gm
from harness import CpuHarness, library_env
from test_checkpoint import BAD_FILES, _grads, _model, _snapshot, _train

TESTS = os.path.dirname(os.path.abspath(__file__))

# A load may take this much memory above the interpreter's after one good load: the
# crafted files include 1.5 GiB zip bombs, and the model's arrays are a few hundred bytes.
MEMORY_BOUND_MIB = 64

MEASURE = f"""
import json, resource, sys
sys.path.insert(0, {TESTS!r})
import gpu_momentum as gm
from harness import CpuHarness
from test_checkpoint import _model

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

files = json.loads(sys.argv[1])
_, opt = _model(CpuHarness())
opt.load(files.pop("good"))  # every import and first-use allocation of a load
base, rows = peak_mib(), {{}}
for name, path in files.items():
    try:
        opt.load(path)
        outcome = "loaded"
    except gm.CheckpointError:
        outcome = "CheckpointError"
    except BaseException as error:
        outcome = f"{{type(error).__name__}}: {{error}}"[:300]
    rows[name] = [outcome, peak_mib() - base]
print(json.dumps({{"base_mib": base, "rows": rows}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="ru_maxrss is in KiB on Linux only")
def test_crafted_files_are_refused_in_bounded_memory(tmp_path):
    files = {}
    for name, damage, _ in BAD_FILES:
        _, opt = _model(CpuHarness())
        files[name] = str(tmp_path / f"{name}.npz")
        opt.save(files[name])
        damage(tmp_path / f"{name}.npz")
    files["good"] = str(tmp_path / "good.npz")
    opt.save(files["good"])
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(files)],
                          env=library_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert {name: outcome for name, (outcome, _) in rows.items()
            if outcome != "CheckpointError"} == {}
    # Peak memory only grows: the last row's growth is the largest of any row.
    grown = {name: round(mib, 1) for name, (_, mib) in rows.items()}
    assert max(grown.values()) < MEMORY_BOUND_MIB, grown


def _contents(data):
    """The offsets of each zip member's content (its .npy bytes) in a checkpoint."""
    with zipfile.ZipFile(io.BytesIO(data)) as file:
        infos = file.infolist()
    for info in infos:
        lengths = data[info.header_offset + 26:info.header_offset + 30]
        start = info.header_offset + 30 + sum(struct.unpack("<2H", lengths))
        yield range(start, start + info.compress_size)


def test_flipping_any_byte_never_loads_other_state(backend, tmp_path):
    """Each byte of a small checkpoint XORed with a seeded random non-zero byte: every
    load either raises CheckpointError and changes nothing, or loads exactly the saved
    state (a byte no reader needs, such as a timestamp or a size the directory repeats)."""
    flat, opt = _model(backend)
    _train(backend, flat, opt, _grads(flat.data.size, 2))
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    saved, data = _snapshot(backend, flat, opt), path.read_bytes()
    _train(backend, flat, opt, _grads(flat.data.size, 1, seed=3))
    before, state, param = (_snapshot(backend, flat, opt), opt.state_dict(),
                            backend.to_numpy(flat.data))
    masks = np.random.default_rng(13).integers(1, 256, size=len(data))
    loaded = []
    with open(path, "r+b") as file:  # flips in place: a new file per try costs more
        for offset, mask in enumerate(masks):
            os.pwrite(file.fileno(), bytes([data[offset] ^ mask]), offset)
            try:
                opt.load(path)
            except gm.CheckpointError:
                assert _snapshot(backend, flat, opt) == before, f"offset {offset}"
                continue
            except Exception as error:
                pytest.fail(f"offset {offset} (^{mask:#04x}): {type(error).__name__}: "
                            f"{error}")
            finally:
                os.pwrite(file.fileno(), data[offset:offset + 1], offset)
            assert _snapshot(backend, flat, opt) == saved, f"offset {offset}"
            loaded.append(offset)
            opt.load_state_dict(state)
            backend.assign(flat.data, param)
    assert 1000 < len(data) < 8192
    checked = [offset for content in _contents(data) for offset in content]
    assert sorted(set(loaded) & set(checked)) == [], "a flip inside a member went unseen"


SAVER_SIZE = 1 << 20  # float64 elements: 8 MiB params, a 16 MiB file

# Imports once, then forks a saver for each line it reads: a fresh interpreter per kill
# would spend its time importing. Each saver saves start + 1, start + 2, ... and reports
# each save once it returned.
SAVER = f"""
import os, sys
import numpy as np
import gpu_momentum as gm

flat = gm.FlatParams.from_arrays([np.zeros({SAVER_SIZE})])
opt = gm.MomentumSGD(flat, lr=0.1)
print("ready", flush=True)
for line in iter(sys.stdin.readline, ""):
    pid = os.fork()
    if pid == 0:
        value = int(line)
        while True:
            value += 1
            flat.data[:] = value
            opt.save(sys.argv[1])
            os.write(1, b"saved %d\\n" % value)
    print("saver", pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the saver loop forks (POSIX)")
def test_kill_9_during_saves_always_leaves_a_checkpoint(tmp_path):
    """30 savers killed with SIGKILL at seeded random moments: after each, the checkpoint
    is the last one a save returned from or the one after, whole, and the folder holds it
    and at most its one temporary file."""
    path = tmp_path / "ckpt.npz"
    flat = gm.FlatParams.from_arrays([np.zeros(SAVER_SIZE)])
    opt = gm.MomentumSGD(flat, lr=0.1)
    opt.save(path)
    rng = np.random.default_rng(9)
    value, left_temporary = 0, 0
    with subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=library_env(),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          bufsize=1) as zygote:
        try:
            assert zygote.stdout.readline() == "ready\n"
            for kill in range(30):
                zygote.stdin.write(f"{value}\n")
                zygote.stdin.flush()
                last = value
                line = zygote.stdout.readline()
                while not line.startswith("saver"):
                    last = int(line.split()[1])
                    line = zygote.stdout.readline()
                time.sleep(rng.uniform(0.0, 0.25))
                os.kill(int(line.split()[1]), signal.SIGKILL)
                for line in iter(zygote.stdout.readline, "reaped\n"):
                    assert line.startswith("saved"), line
                    last = int(line.split()[1])
                names = sorted(os.listdir(tmp_path))
                assert names in (["ckpt.npz"], [".ckpt.npz.tmp", "ckpt.npz"]), names
                left_temporary += len(names) - 1
                opt.load(path)
                value = int(flat.data[0])
                assert value in (last, last + 1), (kill, value, last)
                assert (flat.data == value).all()
        finally:
            zygote.stdin.close()
            zygote.kill()
    print(f"{left_temporary} of 30 kills left the temporary file")
    assert left_temporary > 0, "no kill landed during a save: the test tested nothing"
    opt.save(path)  # the next save reuses the temporary file and leaves none
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_concurrent_saves_of_one_path_take_turns(tmp_path):
    """Two threads saving different states to one path while a third loads it: every
    load gets one whole state; no temporary file remains."""
    path = tmp_path / "ckpt.npz"
    savers = []
    for value in (1.0, 2.0):
        flat = gm.FlatParams.from_arrays([np.full(1 << 18, value)])
        savers.append(gm.MomentumSGD(flat, lr=value / 10))
    savers[0].save(path)
    reader = gm.MomentumSGD(gm.FlatParams.from_arrays([np.zeros(1 << 18)]), lr=0.5)
    errors, seen, stop = [], set(), threading.Event()

    def save(opt):
        try:
            for _ in range(15):
                opt.save(path)
        except BaseException as error:
            errors.append(error)

    def load():
        while not stop.is_set():
            try:
                reader.load(path)
                data = reader.param
                assert (data == data[0]).all() and reader.lr == data[0] / 10, "mixed"
                seen.add(float(data[0]))
            except BaseException as error:
                errors.append(error)
                return

    threads = [threading.Thread(target=save, args=(opt,)) for opt in savers]
    loading = threading.Thread(target=load)
    loading.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    loading.join()
    assert errors == [], errors
    assert seen <= {1.0, 2.0} and seen
    assert os.listdir(tmp_path) == ["ckpt.npz"]

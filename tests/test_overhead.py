"""Per-step overhead: what a step does once it is warm, counted through the Backend
interface (never timed: timings live in the benchmark), the checks it still makes on
arrays that changed, and the CPU's serial kernel for small buffers."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import problem
from gpu_momentum.groups import update_table
from gpu_momentum.hyperparams import Hyperparameters
from gpu_momentum.kernels import cpu as cpu_kernels
from gpu_momentum.kernels.elementwise import NATIVE
from gpu_momentum.kernels.layout import GROUP_SLOTS, LAST_STEP_SKIPPED, NEAREST
from gpu_momentum.reference import reference_step

# What moves data between host and device memory, or allocates, on a backend.
TRANSFERS = ("zeros", "copy", "asarray", "assign", "to_numpy", "upload", "upload_into")
GROUPS = [{"params": [1], "lr": 0.05, "momentum": 0.5}]


def _count_calls(monkeypatch, backend, names):
    """Counts the calls of the backend's methods `names` from now on: {name: count}."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        method = getattr(backend, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(backend, name, counted)
    return calls


def _flat(harness, sizes=(37, 64)):
    arrays = [harness.from_numpy(np.full(size, 1.0 + k)) for k, size in enumerate(sizes)]
    return gm.FlatParams.from_arrays(arrays)


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["host-counters",
                                                                "device-counters"])
def test_warm_steps_copy_allocate_and_prepare_nothing(backend, monkeypatch, skip_nonfinite):
    """After warm-up, steps make no host-device copy, no allocation and prepare no launch
    again; a hyperparameter change rewrites its group's row of the table in place (one
    copy of that row into a device table, none into the CPU's, which is host memory; no
    allocation) and keeps the prepared launch."""
    flat = _flat(backend)
    backend.assign(flat.grad, np.linspace(-1, 1, flat.grad.size))
    opt = gm.MomentumSGD(flat, lr=0.1, style="torch", groups=GROUPS,
                         skip_nonfinite=skip_nonfinite, backend=backend.name)
    for _ in range(2):  # the first step is every group's first: its flags change after
        opt.step()
    engine = gm.backends.backend_named(backend.name)
    probe = np.zeros(1)
    row_copies = 0 if engine.upload(probe, flat.data) is probe else 2  # one per group
    calls = _count_calls(monkeypatch, engine, TRANSFERS + ("step_function",))
    for _ in range(3):
        opt.step()
        opt.step(flat.grad, grad_scale=4.0)
    assert calls == dict.fromkeys(calls, 0)

    opt.lr = 0.2
    opt.param_groups[0]["momentum"] = 0.25
    opt.step()
    assert calls == {**dict.fromkeys(calls, 0), "upload_into": row_copies}
    opt.step()
    assert calls["upload_into"] == row_copies and opt.step_count == 10


def test_momentum_step_repeating_its_hyperparameters_copies_nothing(backend, monkeypatch):
    param, (grad,) = problem(40, steps=1)
    p, g, v = (backend.from_numpy(a) for a in (param, grad, np.zeros_like(param)))
    engine = gm.backends.backend_named(backend.name)
    options = dict(lr=0.1, momentum=0.9, backend=backend.name)
    gm.momentum_step(p, g, v, first_step=True, **options)
    gm.momentum_step(p, g, v, **options)
    calls = _count_calls(monkeypatch, engine, TRANSFERS)
    for _ in range(3):
        gm.momentum_step(p, g, v, first_step=True, **options)
        gm.momentum_step(p, g, v, **options)
    assert calls == dict.fromkeys(calls, 0)
    gm.momentum_step(p, g, v, lr=0.3, backend=backend.name)  # a new table: uploaded once
    gm.momentum_step(p, g, v, lr=0.3, backend=backend.name)
    assert calls == {**dict.fromkeys(calls, 0), "upload": 4}


@pytest.mark.parametrize("first, second", [
    (0.0, -0.0), (1, 1.0), (1, True), (np.float32(0.5), 0.5), (0.5, np.float64(0.5))])
def test_momentum_step_tells_apart_values_equal_as_python_numbers(first, second):
    """The stateless table cache keys on each value's type and sign, so a value that
    compares equal to a cached one (True == 1, -0.0 == 0.0) is still checked, and rounds
    as it should."""
    param, (grad,) = problem(8, steps=1)
    for lr in (first, second):
        p, v = param.copy(), np.full_like(param, -0.0)
        try:
            gm.momentum_step(p, grad, v, lr=lr, momentum=0.5, backend="cpu")
        except TypeError:
            assert isinstance(lr, bool)
            continue
        expected_p, expected_v = reference_step(param, grad, np.full_like(param, -0.0),
                                                lr=float(lr), momentum=0.5)
        assert p.tobytes() == expected_p.tobytes() and v.tobytes() == expected_v.tobytes()


def _changes(opt, grad):
    """In-place changes of arrays a warm step checked before: (what, change, error)."""

    def read_only(array):
        array.flags.writeable = False

    def reshape(array):
        array.shape = (array.size // 2, 2)

    def retype(array):
        array.dtype = np.int64

    return [
        ("read-only param", lambda: read_only(opt.param), ValueError, "read-only"),
        ("read-only velocity", lambda: read_only(opt.velocity), ValueError, "read-only"),
        ("grad reshaped", lambda: reshape(grad), ValueError, "shape"),
        ("grad retyped", lambda: retype(grad), TypeError, "dtype"),
        ("velocity replaced", lambda: setattr(opt, "velocity", np.zeros(grad.size,
                                                                        np.float32)),
         TypeError, "velocity has dtype float32"),
    ]


@pytest.mark.parametrize("which", range(5))
def test_arrays_changed_in_place_are_checked_again(which):
    """A warm step compares the arrays' state (shape, strides, dtype, flags) with the one
    it checked: an array changed in place since gets every check again, and nothing is
    written."""
    param, (grad,) = problem(16, steps=1)
    opt = gm.MomentumSGD(param.copy(), lr=0.1)
    grad = grad.copy()
    opt.step(grad)
    what, change, error, pattern = _changes(opt, grad)[which]
    velocity = opt.velocity
    before = (opt.param.tobytes(), velocity.tobytes(), opt.step_count)
    change()
    with pytest.raises(error, match=pattern):
        opt.step(grad)
    assert (opt.param.tobytes(), velocity.tobytes(), opt.step_count) == before, what


def test_a_new_grad_object_is_checked(backend):
    param, grads = problem(16, steps=2)
    opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, backend=backend.name)
    opt.step(backend.from_numpy(grads[0]))
    with pytest.raises(ValueError, match="shape"):
        opt.step(backend.from_numpy(grads[1][:8]))
    with pytest.raises(TypeError, match="dtype"):
        opt.step(backend.from_numpy(grads[1].astype(np.float32)))
    opt.step(backend.from_numpy(grads[1]))
    expected, velocity = reference_step(param, grads[0], np.zeros(16), lr=0.1,
                                        first_step=True)
    expected, _ = reference_step(expected, grads[1], velocity, lr=0.1)
    np.testing.assert_allclose(backend.to_numpy(opt.param), expected, rtol=1e-12,
                               atol=1e-12)
    assert opt.step_count == 2


def test_a_grad_scale_after_a_refused_one_is_checked():
    param, (grad,) = problem(16, steps=1)
    opt = gm.MomentumSGD(param.copy(), lr=0.1)
    opt.step(grad, grad_scale=2.0)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad, grad_scale=0.0)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad, grad_scale=0.0)  # a refused value is never remembered
    assert opt.step_count == 1


@pytest.mark.slow
def test_small_buffers_run_the_serial_kernels_with_the_same_bits():
    """Below SERIAL_BELOW elements the CPU backend runs the serial compilation of the
    same loops; both compilations give the same bits at any size."""
    below, above = cpu_kernels.SERIAL_BELOW - 1, cpu_kernels.SERIAL_BELOW
    kind = (NATIVE, NATIVE, NEAREST, cpu_kernels.ALL_PIECES)  # float32, as momentum_step's
    serial, parallel = (cpu_kernels.kernels(*kind, parallel=p) for p in (False, True))
    assert cpu_kernels.kernels_for(below) == serial
    assert cpu_kernels.kernels_for(above) == parallel
    assert not set(serial) & set(parallel)
    size = above + 5  # several chunks and a ragged end
    param, (grad,) = problem(size, steps=1, dtype=np.float32)
    grad[size - 3] = np.inf
    table = update_table([Hyperparameters(lr=0.1, momentum=0.9, weight_decay=0.01)],
                         [True], np.dtype(np.float32), size=size)
    results = []
    for update, find_nonfinite, _ in (cpu_kernels.kernels_for(above),
                                      cpu_kernels.kernels_for(below)):
        p, v = param.copy(), np.linspace(-1, 1, size, dtype=np.float32)
        counters = np.zeros(GROUP_SLOTS + 1, np.int64)
        arguments = (p, grad, v, np.zeros(0, np.float32), *table.arrays(), np.float32(0.5),
                     np.uint32(table.launch_flags))
        key = (np.uint64(0), np.int64(0))  # stochastic rounding's (unused here)
        find_nonfinite(*arguments, counters, *key)
        grad[size - 3] = 1.5
        update(*arguments, np.zeros(0, np.int64), *key)
        grad[size - 3] = np.inf
        results.append((p.tobytes(), v.tobytes(), counters[LAST_STEP_SKIPPED]))
    assert results[0] == results[1] and results[0][2] == 1

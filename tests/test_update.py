"""Every backend against the float64 reference, over the shared tables."""

import subprocess
import sys

import numpy as np
import pytest

import gpu_momentum as gm
from configs import (ARRAY_ERRORS, CONFIGS, CONSTRUCTOR_ONLY, DTYPE_HYPER_ERRORS,
                     HYPER_ERRORS, SIZES, STEPS, Tagged, hyper_at, problem)
from gpu_momentum.reference import reference_step
from harness import CpuHarness, library_env

RTOL = ATOL = 1e-12  # float64: the kernels differ from the reference by FMA contraction only


def _assert_close(actual, expected, what, step):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                               err_msg=f"{what} after step {step + 1}")


# The largest size takes seconds a configuration: the fast loop runs it with the first.
SIZED_CONFIGS = [pytest.param(config.values[0], size, id=f"{config.id}-{size}",
                              marks=[pytest.mark.slow] if size == max(SIZES) and i else [])
                 for i, config in enumerate(CONFIGS) for size in SIZES]


@pytest.mark.parametrize("config, size", SIZED_CONFIGS)
def test_momentum_step_matches_reference(backend, config, size):
    if backend.size_limit(size) is not None:
        pytest.skip(backend.size_limit(size))
    param, grads = problem(size)
    velocity = np.zeros(size)
    p, v = backend.from_numpy(param), backend.from_numpy(velocity)
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        gm.momentum_step(p, backend.from_numpy(grad), v, first_step=step == 0,
                         backend=backend.name, **hyper)
        param, velocity = reference_step(param, grad, velocity, first_step=step == 0,
                                         **hyper)
        _assert_close(backend.to_numpy(p), param, "param", step)
        _assert_close(backend.to_numpy(v), velocity, "velocity", step)


@pytest.mark.parametrize("config", CONFIGS)
def test_optimizer_matches_reference(backend, config):
    param, grads = problem(1023)
    velocity = np.zeros_like(param)
    p = backend.from_numpy(param)
    opt = gm.MomentumSGD(p, backend=backend.name, **hyper_at(config, 0))
    assert opt.backend == backend.name
    for step, grad in enumerate(grads):
        for name, value in hyper_at(config, step).items():
            if name not in CONSTRUCTOR_ONLY:
                setattr(opt, name, value)
        opt.step(backend.from_numpy(grad))
        param, velocity = reference_step(param, grad, velocity, first_step=step == 0,
                                         **hyper_at(config, step))
        _assert_close(backend.to_numpy(p), param, "param", step)
        _assert_close(backend.to_numpy(opt.velocity), velocity, "velocity", step)
    assert opt.step_count == STEPS


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_first_classic_step_is_p_minus_lr_g(backend, dtype, weight_decay):
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no {np.dtype(dtype)}")
    param, (grad,) = problem(1023, steps=1, dtype=dtype)
    p = backend.from_numpy(param)
    opt = gm.MomentumSGD(p, lr=0.1, momentum=0.9, weight_decay=weight_decay,
                         backend=backend.name)
    opt.step(backend.from_numpy(grad))
    lr, wd = dtype(0.1), dtype(weight_decay)
    g = grad + wd * param if weight_decay else grad
    if backend.contracts_fma:  # g and p + v may each be one fused multiply-add
        rtol = 2 * np.finfo(dtype).eps
        np.testing.assert_allclose(backend.to_numpy(p), param + (-lr * g), rtol=rtol)
        np.testing.assert_allclose(backend.to_numpy(opt.velocity), -lr * g, rtol=rtol)
    else:
        np.testing.assert_array_equal(backend.to_numpy(p), param + (-lr * g))
        np.testing.assert_array_equal(backend.to_numpy(opt.velocity), -lr * g)


def test_float32_tracks_float64_reference(backend):
    if np.float32 not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no float32")
    param, grads = problem(4099)
    velocity = np.zeros_like(param)
    p = backend.from_numpy(param.astype(np.float32))
    opt = gm.MomentumSGD(p, lr=0.05, momentum=0.9, weight_decay=0.01,
                         backend=backend.name)
    for step, grad in enumerate(grads):
        opt.step(backend.from_numpy(grad.astype(np.float32)))
        param, velocity = reference_step(param, grad.astype(np.float32), velocity,
                                         lr=0.05, momentum=0.9, weight_decay=0.01,
                                         first_step=step == 0)
    np.testing.assert_allclose(backend.to_numpy(p), param, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(opt.velocity), velocity, rtol=1e-4,
                               atol=1e-6)


# A second of the simulator a configuration: the fast loop round-trips the first four.
ROUND_TRIP_CONFIGS = [pytest.param(config.values[0], id=config.id,
                                   marks=[] if i < 4 else [pytest.mark.slow])
                      for i, config in enumerate(CONFIGS)]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_state_dict_round_trip_is_bitwise(backend, config):
    param, grads = problem(1023, steps=10)
    first = gm.MomentumSGD(backend.from_numpy(param), backend=backend.name,
                           **hyper_at(config, 0))
    for grad in grads[:5]:
        first.step(backend.from_numpy(grad))
    state = first.state_dict()
    second = gm.MomentumSGD(backend.from_numpy(backend.to_numpy(first.param)),
                            backend=backend.name, **hyper_at(config, 0))
    second.load_state_dict(state)
    assert second.step_count == first.step_count == 5
    for grad in grads[5:]:
        first.step(backend.from_numpy(grad))
        second.step(backend.from_numpy(grad))
        for a, b in ((first.param, second.param), (first.velocity, second.velocity)):
            assert backend.to_numpy(a).tobytes() == backend.to_numpy(b).tobytes()


def test_state_dict_is_a_copy(backend):
    opt = gm.MomentumSGD(backend.from_numpy(np.ones(8)), lr=0.1, backend=backend.name)
    opt.step(backend.from_numpy(np.ones(8)))
    state = opt.state_dict()
    opt.step(backend.from_numpy(np.ones(8)))
    np.testing.assert_array_equal(backend.to_numpy(state["velocity"]), -0.1)
    assert state["step_count"] == 1


def _snapshot(backend, *arrays):
    return [backend.to_numpy(a).tobytes() for a in arrays]


def _valid_arrays(backend, size=16, dtype=np.float64):
    param, (grad,) = problem(size, steps=1, dtype=dtype)
    velocity = np.full(size, 0.25, np.float32 if dtype == np.float16 else dtype)
    return (backend.from_numpy(param), backend.from_numpy(grad),
            backend.from_numpy(velocity))


@pytest.mark.parametrize("id_, bad, error, pattern", HYPER_ERRORS,
                         ids=[case[0] for case in HYPER_ERRORS])
def test_bad_hyperparameters_change_nothing(backend, id_, bad, error, pattern):
    p, g, v = _valid_arrays(backend)
    before = _snapshot(backend, p, g, v)
    kwargs = {"lr": 0.1, "backend": backend.name, **bad}
    with pytest.raises(error, match=pattern):
        gm.momentum_step(p, g, v, **kwargs)
    assert _snapshot(backend, p, g, v) == before
    with pytest.raises(error, match=pattern):
        gm.MomentumSGD(p, **kwargs)
    assert _snapshot(backend, p, g, v) == before

    settable = {k: x for k, x in bad.items() if k not in (*CONSTRUCTOR_ONLY, "backend")}
    if len(settable) == len(bad) == 1:
        opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
        opt.step(g)
        state = opt.state_dict()
        before = _snapshot(backend, p, opt.velocity)
        (name, value), = settable.items()
        with pytest.raises(error, match=pattern):
            setattr(opt, name, value)
        assert getattr(opt, name) == state[name]
        assert _snapshot(backend, p, opt.velocity) == before
        with pytest.raises(error, match=pattern):
            opt.load_state_dict({**state, name: value})
        assert _snapshot(backend, p, opt.velocity) == before
        assert opt.state_dict()[name] == state[name]


def _without_velocity(state):
    return {k: v for k, v in state.items() if k != "velocity"}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("id_, bad, refused_by, taken_by, pattern", DTYPE_HYPER_ERRORS,
                         ids=[case[0] for case in DTYPE_HYPER_ERRORS])
def test_values_the_compute_dtype_cannot_hold_are_refused_everywhere(
        backend, id_, bad, refused_by, taken_by, pattern, dtype):
    """Wherever a value enters: momentum_step, the constructor, a group, the setters, a
    param group's item and update, load_state_dict (the optimizer's own and a group's);
    each refusal changes nothing. Dtypes that hold the value take it, and stay finite."""
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no {np.dtype(dtype)}")
    if np.dtype(dtype).name not in refused_by + taken_by:
        pytest.skip(f"{id_} is about other dtypes than {np.dtype(dtype)}")
    p, g, v = _valid_arrays(backend, dtype=dtype)
    kwargs = {"lr": 0.1, "backend": backend.name, **bad}
    if np.dtype(dtype).name in taken_by:
        gm.momentum_step(p, g, v, **kwargs)
        assert np.isfinite(backend.to_numpy(p)).all() and np.isfinite(
            backend.to_numpy(v)).all()
        return
    before = _snapshot(backend, p, g, v)
    with pytest.raises(ValueError, match=pattern):
        gm.momentum_step(p, g, v, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        gm.MomentumSGD(p, **kwargs)
    assert _snapshot(backend, p, g, v) == before

    # The last settable option brings the value the dtype cannot hold; the others are set
    # at construction, where they are fine on their own.
    fixed = {k: x for k, x in bad.items() if k in CONSTRUCTOR_ONLY}
    *earlier, (name, value) = [(k, x) for k, x in bad.items() if k not in CONSTRUCTOR_ONLY]
    earlier = dict(earlier)
    flat = gm.FlatParams.from_arrays([p, backend.from_numpy(np.ones(3, dtype))])
    with pytest.raises(ValueError, match=rf"groups\[0\]: {pattern}"):
        gm.MomentumSGD(flat, lr=0.1, groups=[{"params": [1], **earlier, name: value}],
                       backend=backend.name, **fixed)
    opt = gm.MomentumSGD(flat, groups=[{"params": [1], **earlier}], backend=backend.name,
                         **{"lr": 0.1, **fixed, **earlier})
    opt.step()  # zero gradients: an lr of 1e20 keeps even float16 parameters finite
    state = opt.state_dict()
    before = _snapshot(backend, flat.data, opt.velocity)
    group = opt.param_groups[0]
    changes = {
        "setter": lambda: setattr(opt, name, value),
        "group item": lambda: group.__setitem__(name, value),
        "group update": lambda: group.update({"dampening": 0.5, name: value}),
        "load_state_dict": lambda: opt.load_state_dict({**state, name: value}),
        "load_state_dict group": lambda: opt.load_state_dict(
            {**state, "groups": [{**state["groups"][0], name: value}]}),
    }
    for how, change in changes.items():
        with pytest.raises(ValueError, match=pattern):
            change()
        assert _snapshot(backend, flat.data, opt.velocity) == before, how
        assert _without_velocity(opt.state_dict()) == _without_velocity(state), how


@pytest.mark.parametrize("id_, make, error, pattern", ARRAY_ERRORS,
                         ids=[case[0] for case in ARRAY_ERRORS])
def test_bad_arrays_change_nothing(backend, id_, make, error, pattern):
    if hasattr(make, "applies") and not make.applies(backend):
        pytest.skip(f"{id_} cannot happen with {backend.name!r} arrays")
    p, g, v = _valid_arrays(backend)
    bad_p, bad_g, bad_v = make(backend, p, g, v)
    touched = [a for a in {id(x): x for x in (p, g, v, bad_p, bad_g, bad_v)}.values()
               if hasattr(a, "__array_interface__") or hasattr(a, "__cuda_array_interface__")]
    before = _snapshot(backend, *touched)
    # A pattern's "{backend}" is the name of the backend that refuses the arrays.
    automatic = gm.backends.select_backend("auto", p).name
    with pytest.raises(error, match=pattern.replace("{backend}", automatic)):
        gm.momentum_step(bad_p, bad_g, bad_v, lr=0.1)
    named = pattern.replace("{backend}", backend.name)
    with pytest.raises(error, match=named):
        gm.momentum_step(bad_p, bad_g, bad_v, lr=0.1, backend=backend.name)
    assert _snapshot(backend, *touched) == before

    if bad_p is p and bad_v is v and bad_g is not g:
        opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
        opt.step(g)
        before = _snapshot(backend, p, opt.velocity)
        with pytest.raises(error, match=named):
            opt.step(bad_g)
        assert _snapshot(backend, p, opt.velocity) == before
        assert opt.step_count == 1


def test_bad_state_dict_changes_nothing(backend):
    p, g, _ = _valid_arrays(backend)
    opt = gm.MomentumSGD(p, lr=0.1, style="torch", backend=backend.name)
    opt.step(g)
    state = opt.state_dict()
    before = _snapshot(backend, p, opt.velocity)
    wrong_velocity = backend.from_numpy(np.zeros(17))
    cases = [
        ([], TypeError, r"state must be a dict"),
        ({**state, "extra": 1}, ValueError, r"extra"),
        ({k: x for k, x in state.items() if k != "velocity"}, ValueError, r"velocity"),
        ({**state, "format": 99}, ValueError, r"format.*99"),
        ({**state, "style": "classic"}, ValueError, r"style.*'classic'"),
        ({**state, "step_count": -1}, ValueError, r"step_count.*-1"),
        ({**state, "step_count": 1.5}, ValueError, r"step_count.*1\.5"),
        ({**state, "velocity": wrong_velocity}, ValueError, r"velocity.*\(17,\)"),
        ({**state, "velocity": [0.0] * 16}, TypeError, r"velocity.*list"),
        ({**state, "lr": float("nan"), "velocity": wrong_velocity}, ValueError, r"lr.*nan"),
        ({**state, "velocity": np.ma.masked_array(np.zeros(16), mask=[True] * 16)},
         TypeError, r'state\["velocity"\] is a numpy\.MaskedArray.*mask would be ignored'),
        ({**state, "step_count": 2**63}, ValueError, r"step_count.*9223372036854775808"),
        ({**state, "velocity_initialized": [1]}, TypeError, r"velocity_initialized.*1"),
    ]
    for bad, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            opt.load_state_dict(bad)
        assert _snapshot(backend, p, opt.velocity) == before
        assert opt.step_count == 1 and opt.lr == 0.1

    # With params: every target checked before the velocity is written.
    new_state = {**state, "velocity": backend.from_numpy(np.full(16, 7.0)), "step_count": 9}
    param_cases = [
        (backend.from_numpy(np.zeros(17)), ValueError, r"params has shape \(17,\)"),
        (backend.from_numpy(np.zeros(16, np.float32)), ValueError, r"params.*float32"),
        (np.ma.masked_array(np.zeros(16)), TypeError, r"params is a numpy\.MaskedArray"),
        (np.zeros((4, 4)).view(np.matrix), TypeError, r"params is a numpy\.matrix"),
        ([0.0] * 16, TypeError, r"params.*list"),
    ]
    for params, error, pattern in param_cases:
        with pytest.raises(error, match=pattern):
            opt.load_state_dict(new_state, params=params)
        assert _snapshot(backend, p, opt.velocity) == before
        assert opt.step_count == 1


def test_loading_params_from_the_velocity_reads_it_first(backend):
    """params may be any array, even the optimizer's own velocity, which the load writes
    first: the parameters get the velocity as it was."""
    p, g, _ = _valid_arrays(backend)
    opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
    opt.step(g)
    old_velocity = backend.to_numpy(opt.velocity)
    state = {**opt.state_dict(), "velocity": backend.from_numpy(np.full(16, 3.0))}
    opt.load_state_dict(state, params=opt.velocity)
    assert backend.to_numpy(p).tobytes() == old_velocity.tobytes()
    np.testing.assert_array_equal(backend.to_numpy(opt.velocity), 3.0)


@pytest.mark.parametrize("target", ["params", "velocity"])
def test_a_load_into_a_read_only_array_changes_nothing(tmp_path, target):
    """load_state_dict(params=...) and load() check that every array they write is
    writable before the first byte moves (a read-only param used to be found only after
    the velocity was replaced)."""
    param, grads = problem(16, steps=2)
    opt = gm.MomentumSGD(param, lr=0.1, backend="cpu")
    opt.step(grads[0])
    opt.save(tmp_path / "a.npz")
    opt.step(grads[1])  # the checkpoint's velocity and params now differ from these
    state = {**opt.state_dict(), "velocity": np.full(16, 7.0), "step_count": 5}
    (param if target == "params" else opt.velocity).flags.writeable = False
    before = _snapshot(CpuHarness(), param, opt.velocity)
    pattern = rf"this optimizer's {target} array is read-only"
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(state, params=np.zeros(16))
    with pytest.raises(gm.CheckpointError, match=pattern):
        opt.load(tmp_path / "a.npz")
    if target == "velocity":
        with pytest.raises(ValueError, match=pattern):
            opt.load_state_dict(state)
    assert _snapshot(CpuHarness(), param, opt.velocity) == before
    assert opt.step_count == 2


def test_memmap_arrays_are_plain_buffers(tmp_path):
    """numpy.memmap (parameters larger than memory) is the one ndarray subclass taken:
    every entry point treats it as the plain buffer it is, bit for bit."""
    param, grads = problem(1023, steps=3)

    def mapped(name, values):
        array = np.memmap(tmp_path / name, dtype=values.dtype, mode="w+",
                          shape=values.shape)
        array[...] = values
        return array

    hyper = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
    mm = mapped("param.bin", param)
    on_disk, in_memory = (gm.MomentumSGD(a, backend="cpu", **hyper)
                          for a in (mm, param.copy()))
    for step, grad in enumerate(grads):
        on_disk.step(mapped(f"grad{step}.bin", grad))
        in_memory.step(grad)
    assert isinstance(on_disk.param, np.memmap)
    assert mm.tobytes() == in_memory.param.tobytes()
    assert on_disk.velocity.tobytes() == in_memory.velocity.tobytes()
    p, v = mapped("p.bin", param), mapped("v.bin", np.zeros_like(param))
    gm.momentum_step(p, mapped("g.bin", grads[0]), v, first_step=True, **hyper)
    expected = reference_step(param, grads[0], np.zeros_like(param), first_step=True,
                              **hyper)
    assert (p.tobytes(), v.tobytes()) == tuple(e.tobytes() for e in expected)
    flat = gm.FlatParams.from_arrays([mm[:1000].reshape(10, 100), mm[1000:]])
    np.testing.assert_array_equal(flat.params[0].ravel(), mm[:1000])
    on_disk.load_state_dict(in_memory.state_dict(), params=mapped("restore.bin", param))
    assert mm.tobytes() == param.tobytes()


def test_ndarray_subclasses_are_refused_at_every_entry_point(backend):
    """Masked arrays and other subclasses get a TypeError naming the argument before and
    after ordinary steps (it does not depend on what the process compiled); the mask is
    never ignored."""
    p, g, v = _valid_arrays(backend)
    host = backend.to_numpy(p)
    masked = np.ma.masked_array(backend.to_numpy(g), mask=np.arange(16) % 2 == 0)
    opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
    for attempt in range(2):  # before and after an ordinary step
        before = _snapshot(backend, p, v, opt.velocity)
        with pytest.raises(TypeError, match=r"grad is a numpy\.MaskedArray"):
            gm.momentum_step(p, masked, v, lr=0.1, backend=backend.name)
        with pytest.raises(TypeError, match=r"grad is a numpy\.MaskedArray"):
            opt.step(masked)
        assert _snapshot(backend, p, v, opt.velocity) == before
        assert opt.step_count == attempt
        gm.momentum_step(p, g, v, lr=0.1, backend=backend.name)
        opt.step(g)
    with pytest.raises(TypeError, match=r"params is a numpy\.MaskedArray"):
        gm.MomentumSGD(np.ma.masked_array(host), lr=0.1)
    with pytest.raises(TypeError, match=r"arrays\[1\] is a numpy\.matrix"):
        gm.FlatParams.from_arrays([host, np.zeros((2, 2)).view(np.matrix)])
    with pytest.raises(TypeError, match=r"arrays\[0\] is a configs\.Tagged"):
        gm.FlatParams.from_arrays([host.view(Tagged)])


def test_ndarray_subclasses_are_refused_in_a_fresh_process():
    """The first thing a process does: no kernel compiled yet, still a TypeError."""
    script = """
import numpy as np, gpu_momentum as gm
p, v = np.ones(8), np.zeros(8)
g = np.ma.masked_array(np.ones(8), mask=[True] + [False] * 7)
for attempt in (lambda: gm.momentum_step(p, g, v, lr=0.1),
                lambda: gm.MomentumSGD(p, lr=0.1, skip_nonfinite=True).step(g),
                lambda: gm.MomentumSGD(np.ma.masked_array(p), lr=0.1)):
    try:
        attempt()
        print("accepted")
    except TypeError as error:
        print(str(error).split(",")[0])
print(p.tolist(), v.tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=library_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "grad is a numpy.MaskedArray", "grad is a numpy.MaskedArray",
        "params is a numpy.MaskedArray", f"{[1.0] * 8} {[0.0] * 8}"]


def _as_numpy_scalars(value):
    """value with every Python bool, int, float and str inside it as a NumPy scalar
    (float32 where that holds the float exactly, so that the results must match)."""
    if isinstance(value, dict):
        return {k: _as_numpy_scalars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_numpy_scalars(v) for v in value]
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float32(value) if float(np.float32(value)) == value else np.float64(value)
    return np.str_(value) if isinstance(value, str) else value


def _run_with_values(backend, convert, checkpoint):
    """Bits of a run whose every hyperparameter, flag, index and state value passes
    through `convert` on its way in (and through a checkpoint at `checkpoint`)."""
    c = convert
    flat = gm.FlatParams.from_arrays([backend.from_numpy(np.linspace(-1, 1, 9)),
                                      backend.from_numpy(np.ones(4))])
    opt = gm.MomentumSGD(flat, lr=c(0.125), momentum=c(0.5), dampening=c(0.25),
                         weight_decay=c(0.0625), l1=c(0.001), nesterov=c(False),
                         maximize=c(False), style=c("torch"),
                         decoupled_weight_decay=c(True), skip_nonfinite=c(True),
                         groups=c([{"params": [1], "lr": 0.5, "nesterov": True,
                                    "dampening": 0.0}]), backend=backend.name)
    backend.assign(flat.grad, np.linspace(0.5, 2, flat.data.size))
    opt.step(grad_scale=c(2.0))
    opt.lr, opt.maximize = c(0.25), c(True)
    group = opt.param_groups[c(0)]
    group["momentum"] = c(0.75)
    group.update(c({"l1": 0.002, "nesterov": False}))
    opt.step(grad_scale=c(4))
    state = opt.state_dict()
    opt.load_state_dict({**c({k: v for k, v in state.items() if k != "velocity"}),
                         "velocity": state["velocity"]})
    opt.step()
    opt.save(checkpoint)
    opt.load(checkpoint)
    p, g, v = _valid_arrays(backend)
    gm.momentum_step(p, g, v, lr=c(0.5), momentum=c(0.25), nesterov=c(True),
                     first_step=c(True), grad_scale=c(2), backend=backend.name)
    assert opt.step_count == 3
    return _snapshot(backend, flat.data, opt.velocity, p, v), opt.state_dict()["groups"]


def test_numpy_scalars_are_taken_wherever_python_numbers_are(backend, tmp_path):
    """np.float32, np.float64, np.int64, np.bool_ and np.str_ in the constructor, groups,
    setters, param_groups, step, momentum_step, load_state_dict and checkpoints: the same
    run, bit for bit, as with Python numbers."""
    assert _run_with_values(backend, _as_numpy_scalars, tmp_path / "numpy.npz") == \
        _run_with_values(backend, lambda value: value, tmp_path / "python.npz")


def test_unavailable_backend_is_a_clear_error():
    missing = [n for n in ("cupy", "numba-cuda") if n not in gm.available_backends()]
    if not missing:
        pytest.skip("every backend is available on this machine")
    p = np.zeros(4)
    with pytest.raises(gm.BackendUnavailableError, match=repr(missing[0])):
        gm.momentum_step(p, np.ones(4), np.zeros(4), lr=0.1, backend=missing[0])
    with pytest.raises(ValueError, match=repr(missing[0])):
        gm.MomentumSGD(p, lr=0.1, backend=missing[0])
    assert not p.any()


def test_step_without_grad_needs_flat_params():
    opt = gm.MomentumSGD(np.zeros(4), lr=0.1)
    with pytest.raises(TypeError, match=r"grad is None"):
        opt.step()
    assert opt.step_count == 0


def test_available_backends_lists_cpu_last():
    names = gm.available_backends()
    assert names[-1] == "cpu"
    assert set(names) <= {"cupy", "numba-cuda", "cpu"}

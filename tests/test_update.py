"""Every backend against the float64 reference, over the shared tables."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import (ARRAY_ERRORS, CONFIGS, CONSTRUCTOR_ONLY, HYPER_ERRORS, SIZES, STEPS,
                     hyper_at, problem)
from gpu_momentum.reference import reference_step

RTOL = ATOL = 1e-12  # float64: the kernels differ from the reference by FMA contraction only


def _assert_close(actual, expected, what, step):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                               err_msg=f"{what} after step {step + 1}")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
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


@pytest.mark.parametrize("config", CONFIGS)
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


def _valid_arrays(backend, size=16):
    param, (grad,) = problem(size, steps=1)
    return (backend.from_numpy(param), backend.from_numpy(grad),
            backend.from_numpy(np.full(size, 0.25)))


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
    with pytest.raises(error, match=pattern):
        gm.momentum_step(bad_p, bad_g, bad_v, lr=0.1)
    with pytest.raises(error, match=pattern):
        gm.momentum_step(bad_p, bad_g, bad_v, lr=0.1, backend=backend.name)
    assert _snapshot(backend, *touched) == before

    if bad_p is p and bad_v is v and bad_g is not g:
        opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
        opt.step(g)
        before = _snapshot(backend, p, opt.velocity)
        with pytest.raises(error, match=pattern):
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
    ]
    for bad, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            opt.load_state_dict(bad)
        assert _snapshot(backend, p, opt.velocity) == before
        assert opt.step_count == 1 and opt.lr == 0.1


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


def test_cpu_backend_rejects_float16():
    p = np.zeros(4, np.float16)
    with pytest.raises(TypeError, match=r"'cpu'.*float16"):
        gm.MomentumSGD(p, lr=0.1)
    with pytest.raises(TypeError, match=r"'cpu'.*float16"):
        gm.momentum_step(p, np.ones(4, np.float16), np.zeros(4, np.float32), lr=0.1)
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

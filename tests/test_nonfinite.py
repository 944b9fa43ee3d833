"""Loss scaling inside the fused pass, and skipping steps whose gradient is not finite."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import GRAD_SCALE_ERRORS, problem
from gpu_momentum.reference import reference_step

NONFINITE = [float("nan"), float("inf"), -float("inf")]


def _bits(backend, *arrays):
    return [backend.to_numpy(a).tobytes() for a in arrays]


@pytest.mark.parametrize("style", ["classic", "torch"])
def test_grad_scale_divides_the_gradient(backend, style):
    param, grads = problem(1023, steps=3)
    velocity = np.zeros_like(param)
    p, v = backend.from_numpy(param), backend.from_numpy(velocity)
    for step, grad in enumerate(grads):
        scale = 3.0 if step % 2 else 65536.0
        gm.momentum_step(p, backend.from_numpy(grad * scale), v, lr=0.1, style=style,
                         weight_decay=0.01, first_step=step == 0, grad_scale=scale,
                         backend=backend.name)
        param, velocity = reference_step(param, grad * scale, velocity, lr=0.1,
                                         style=style, weight_decay=0.01,
                                         first_step=step == 0, grad_scale=scale)
        np.testing.assert_allclose(backend.to_numpy(p), param, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(v), velocity, rtol=1e-12, atol=1e-12)


def test_power_of_two_grad_scale_is_exact(backend):
    param, (grad,) = problem(1023, steps=1)
    unscaled = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, backend=backend.name)
    scaled = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, backend=backend.name)
    unscaled.step(backend.from_numpy(grad))
    scaled.step(backend.from_numpy(grad * 1024), grad_scale=1024)
    assert _bits(backend, scaled.param, scaled.velocity) == \
        _bits(backend, unscaled.param, unscaled.velocity)


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-2.0, ValueError),
                                        (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("2", TypeError)])
def test_bad_grad_scale_changes_nothing(backend, bad, error):
    param, (grad,) = problem(16, steps=1)
    p, g, v = (backend.from_numpy(a) for a in (param, grad, np.zeros(16)))
    opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
    before = _bits(backend, p, v)
    with pytest.raises(error, match=rf"grad_scale.*{bad!r}" if bad == bad else "grad_scale"):
        gm.momentum_step(p, g, v, lr=0.1, grad_scale=bad, backend=backend.name)
    with pytest.raises(error, match="grad_scale"):
        opt.step(g, grad_scale=bad)
    assert _bits(backend, p, v, opt.velocity)[:2] == before and opt.step_count == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("id_, grad_scale, refused_by, pattern", GRAD_SCALE_ERRORS,
                         ids=[case[0] for case in GRAD_SCALE_ERRORS])
def test_grad_scale_the_compute_dtype_cannot_invert_changes_nothing(
        backend, id_, grad_scale, refused_by, pattern, dtype):
    """1 / grad_scale must be a finite, normal number in the compute dtype (float32 for
    float16 and float32 params), or a step would write inf, NaN or nothing at all; other
    dtypes take the same scale."""
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no {np.dtype(dtype)}")
    param, (grad,) = problem(16, steps=1, dtype=dtype)
    velocity = np.zeros(16, np.float32 if dtype == np.float16 else dtype)
    p, g, v = (backend.from_numpy(a) for a in (param, grad, velocity))
    for skip_nonfinite in (False, True):
        opt = gm.MomentumSGD(p, lr=0.1, skip_nonfinite=skip_nonfinite, backend=backend.name)
        if np.dtype(dtype).name not in refused_by:
            opt.step(g, grad_scale=grad_scale)
            assert np.isfinite(backend.to_numpy(p)).all() and not opt.last_step_skipped
            continue
        before = _bits(backend, p, g, v, opt.velocity)
        with pytest.raises(ValueError, match=pattern):
            gm.momentum_step(p, g, v, lr=0.1, grad_scale=grad_scale, backend=backend.name)
        with pytest.raises(ValueError, match=pattern):
            opt.step(g, grad_scale=grad_scale)
        assert _bits(backend, p, g, v, opt.velocity) == before
        assert (opt.step_count, opt.skipped_steps) == (0, 0)


def test_skip_nonfinite_cannot_change_after_construction(backend):
    """Its first-step bookkeeping lives in the backend's counters: switching it off after
    a skipped first step would give a wrong first step. Assigning it raises and changes
    nothing; the next step is still the first."""
    param, grads = problem(16, steps=2)
    opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, momentum=0.9, style="torch",
                         skip_nonfinite=True, backend=backend.name)
    backend.assign(opt.velocity, np.full(16, np.nan))
    opt.step(backend.from_numpy(_poisoned(grads[0], np.nan, 3)))
    before = _bits(backend, opt.param, opt.velocity)
    for value in (False, True, "no"):
        with pytest.raises(AttributeError):
            opt.skip_nonfinite = value
        assert opt.skip_nonfinite is True
        assert _bits(backend, opt.param, opt.velocity) == before
    opt.step(backend.from_numpy(grads[1]))
    expected = reference_step(param, grads[1], np.zeros(16), lr=0.1, momentum=0.9,
                              style="torch", first_step=True)
    for actual, want in zip((opt.param, opt.velocity), expected):
        np.testing.assert_allclose(backend.to_numpy(actual), want, rtol=1e-12, atol=1e-12)
    assert (opt.step_count, opt.skipped_steps) == (1, 1)


def _poisoned(grad, value, where):
    grad = grad.copy()
    grad[where] = value
    return grad


@pytest.mark.parametrize("style", ["classic", "torch"])
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
def test_nonfinite_steps_are_skipped_and_leave_no_trace(backend, style, value):
    param, grads = problem(1023, steps=6)
    opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, momentum=0.9, style=style,
                         dampening=0.25 if style == "torch" else 0.0,
                         skip_nonfinite=True, backend=backend.name)
    # Garbage in the velocity: a skipped first step must leave the next one first, so the
    # velocity is never read before a step has written it.
    backend.assign(opt.velocity, np.full(1023, np.nan))
    velocity = np.zeros_like(param)
    poisoned_steps = {0: 0, 1: 1022, 3: 511}
    taken = 0
    for step, grad in enumerate(grads):
        if step in poisoned_steps:
            before = _bits(backend, opt.param, opt.velocity)
            opt.step(backend.from_numpy(_poisoned(grad, value, poisoned_steps[step])))
            assert opt.last_step_skipped
            assert _bits(backend, opt.param, opt.velocity) == before
        else:
            opt.step(backend.from_numpy(grad))
            assert not opt.last_step_skipped
            param, velocity = reference_step(param, grad, velocity, lr=0.1, momentum=0.9,
                                             style=style, first_step=taken == 0,
                                             dampening=0.25 if style == "torch" else 0.0)
            taken += 1
            np.testing.assert_allclose(backend.to_numpy(opt.param), param, rtol=1e-12,
                                       atol=1e-12)
            np.testing.assert_allclose(backend.to_numpy(opt.velocity), velocity,
                                       rtol=1e-12, atol=1e-12)
        assert opt.step_count == taken
        assert opt.skipped_steps == step + 1 - taken


def test_a_gradient_that_overflows_when_unscaled_is_skipped(backend):
    p = backend.from_numpy(np.ones(8))
    opt = gm.MomentumSGD(p, lr=0.1, skip_nonfinite=True, backend=backend.name)
    opt.step(backend.from_numpy(np.full(8, 1e300)), grad_scale=1e-10)
    assert opt.last_step_skipped and opt.step_count == 0
    np.testing.assert_array_equal(backend.to_numpy(p), 1.0)


def test_without_skipping_a_nan_propagates(backend):
    p = backend.from_numpy(np.ones(8))
    opt = gm.MomentumSGD(p, lr=0.1, backend=backend.name)
    opt.step(backend.from_numpy(_poisoned(np.ones(8), np.nan, 3)))
    assert np.isnan(backend.to_numpy(p)[3]) and not opt.last_step_skipped
    assert opt.step_count == 1 and opt.skipped_steps == 0


def test_skip_counters_survive_state_dict_and_checkpoints(backend, tmp_path):
    param, grads = problem(64, steps=4)
    opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, skip_nonfinite=True,
                         backend=backend.name)
    opt.step(backend.from_numpy(_poisoned(grads[0], np.inf, 0)))
    opt.step(backend.from_numpy(grads[1]))
    opt.save(tmp_path / "ckpt.npz")
    state = opt.state_dict()
    assert (state["step_count"], state["skipped_steps"]) == (1, 1)
    for restore in (lambda o: o.load_state_dict(state), lambda o: o.load(tmp_path / "ckpt.npz")):
        other = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, skip_nonfinite=True,
                               backend=backend.name)
        restore(other)
        assert (other.step_count, other.skipped_steps, other.velocity_initialized) == \
            (1, 1, True)


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match=r"skip_nonfinite.*'yes'"):
        gm.MomentumSGD(np.zeros(3), lr=0.1, skip_nonfinite="yes")

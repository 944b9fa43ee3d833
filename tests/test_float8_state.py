"""The state of an FP8 velocity: state_dict() and checkpoint files hold its codes and
scales; they resume bit for bit, load across the float32 and FP8 formats both ways (as
reference.quantize_velocity and dequantize_velocity say), and bad input is refused with
nothing changed."""

import numpy as np
import pytest

import gpu_momentum as gm
from gpu_momentum.checkpoint import CheckpointError
from gpu_momentum.reference import dequantize_velocity, quantize_velocity
from harness import require

require("ml_dtypes")

FP8 = "float8_e4m3fn"
SIZE = 1000  # four blocks, the last one partial
HYPER = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)


def _grads(count, size=SIZE, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(np.float32) for _ in range(count)]


def _optimizer(harness_or_none=None, velocity_dtype=FP8, size=SIZE):
    param = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    if harness_or_none is None:
        return gm.MomentumSGD(param, backend="cpu", velocity_dtype=velocity_dtype,
                              **HYPER)
    return gm.MomentumSGD(harness_or_none.from_numpy(param),
                          backend=harness_or_none.name, velocity_dtype=velocity_dtype,
                          **HYPER)


def _host(opt):
    """(param, codes, scales) or (param, velocity) of `opt` as host NumPy copies."""
    to_numpy = gm.backends.backend_named(opt.backend).to_numpy
    arrays = (opt.param, *(opt.velocity if opt.velocity_codes is not None
                           else (opt.velocity,)))
    return tuple(np.array(to_numpy(a)) for a in arrays)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))


def _step(opt, harness, grad):
    opt.step(grad if harness is None else harness.from_numpy(grad))


def _resumes_bit_for_bit(harness):
    grads = _grads(6)
    straight, saved = _optimizer(harness), _optimizer(harness)
    for grad in grads[:3]:
        _step(straight, harness, grad)
        _step(saved, harness, grad)
    state = saved.state_dict()
    assert state["velocity_dtype"] == FP8 and "velocity" not in state
    assert state["velocity_codes"].dtype == np.uint8
    assert state["velocity_codes"].shape == (SIZE,)
    assert state["velocity_scales"].dtype == np.float32
    assert state["velocity_scales"].shape == (4,)
    resumed = _optimizer(harness)
    resumed.load_state_dict(state, params=saved.param)
    _assert_same(_host(resumed), _host(saved))
    assert resumed.step_count == 3
    for grad in grads[3:]:
        _step(straight, harness, grad)
        _step(resumed, harness, grad)
    _assert_same(_host(resumed), _host(straight))


def test_an_fp8_state_resumes_bit_for_bit_on_the_cpu():
    _resumes_bit_for_bit(None)


def test_an_fp8_state_resumes_bit_for_bit_on_every_backend(backend):
    _resumes_bit_for_bit(backend)


def test_the_state_dict_copies_the_codes_and_scales():
    opt = _optimizer()
    _step(opt, None, _grads(1)[0])
    state = opt.state_dict()
    state["velocity_codes"][:] = 0
    state["velocity_scales"][:] = 0
    assert opt.velocity_codes.any() and opt.velocity_scales.any()


def test_an_fp8_state_loads_into_a_float32_velocity_dequantized():
    fp8 = _optimizer()
    for grad in _grads(3):
        _step(fp8, None, grad)
    plain = _optimizer(velocity_dtype=None)
    plain.load_state_dict(fp8.state_dict(), params=fp8.param)
    expected = dequantize_velocity(fp8.velocity_codes, fp8.velocity_scales)
    assert np.array_equal(plain.velocity, expected)
    assert plain.step_count == 3 and np.array_equal(plain.param, fp8.param)


def test_a_float32_velocity_loads_into_an_fp8_one_quantized():
    plain = _optimizer(velocity_dtype=None)
    for grad in _grads(3):
        _step(plain, None, grad)
    fp8 = _optimizer()
    fp8.load_state_dict(plain.state_dict(), params=plain.param)
    codes, scales = quantize_velocity(plain.velocity)
    assert np.array_equal(fp8.velocity_codes, codes)
    assert np.array_equal(fp8.velocity_scales.view(np.uint32), scales.view(np.uint32))
    assert fp8.step_count == 3
    # And on from there, as an FP8 optimizer given those codes and scales steps.
    state = plain.state_dict()
    del state["velocity"]
    twin = _optimizer()
    twin.load_state_dict({**state, "velocity_dtype": FP8, "velocity_codes": codes,
                          "velocity_scales": scales}, params=plain.param)
    grad = _grads(1, seed=7)[0]
    fp8.step(grad)
    twin.step(grad)
    _assert_same(_host(fp8), _host(twin))


def _bad_states(state):
    """(key, bad state) pairs: each a valid FP8 state with one bad velocity array."""
    codes, scales = state["velocity_codes"], state["velocity_scales"]
    nan_scale, negative = scales.copy(), scales.copy()
    nan_scale[1], negative[2] = np.nan, -1.0
    infinite = scales.copy()
    infinite[0] = np.inf
    return [("velocity_codes", {**state, "velocity_codes": codes[:-1]}),
            ("velocity_codes", {**state, "velocity_codes": codes.astype(np.int8)}),
            ("velocity_scales", {**state, "velocity_scales": scales[:-1]}),
            ("velocity_scales", {**state, "velocity_scales": scales.astype(np.float64)}),
            ("velocity_scales", {**state, "velocity_scales": nan_scale}),
            ("velocity_scales", {**state, "velocity_scales": negative}),
            ("velocity_scales", {**state, "velocity_scales": infinite})]


@pytest.mark.parametrize("velocity_dtype", [FP8, None])
def test_bad_fp8_arrays_are_refused_with_nothing_changed(velocity_dtype):
    source = _optimizer()
    for grad in _grads(2):
        _step(source, None, grad)
    state = source.state_dict()
    opt = _optimizer(velocity_dtype=velocity_dtype)
    _step(opt, None, _grads(1, seed=3)[0])
    before = _host(opt)
    for key, bad in _bad_states(state):
        with pytest.raises(ValueError, match=key):
            opt.load_state_dict(bad, params=source.param)
        _assert_same(_host(opt), before)
        assert opt.step_count == 1


def test_a_float32_velocity_of_the_wrong_shape_is_refused_by_an_fp8_optimizer():
    plain = _optimizer(velocity_dtype=None)
    state = plain.state_dict()
    opt = _optimizer()
    _step(opt, None, _grads(1)[0])
    before = _host(opt)
    for bad in (state["velocity"][:-1], state["velocity"].astype(np.float64)):
        with pytest.raises(ValueError, match="velocity"):
            opt.load_state_dict({**state, "velocity": bad})
        _assert_same(_host(opt), before)


def test_an_fp8_state_with_the_wrong_keys_or_dtype_name_is_refused():
    fp8 = _optimizer()
    state = fp8.state_dict()
    codes = state.pop("velocity_codes")
    with pytest.raises(ValueError, match="keys"):
        fp8.load_state_dict({**state, "velocity": codes})
    with pytest.raises(ValueError, match="velocity_dtype value: 'float16'"):
        fp8.load_state_dict({**state, "velocity_codes": codes, "velocity_dtype": "float16"})


def test_a_checkpoint_of_an_fp8_velocity_resumes_bit_for_bit(tmp_path):
    grads = _grads(6)
    straight, saved = _optimizer(), _optimizer()
    for grad in grads[:3]:
        straight.step(grad)
        saved.step(grad)
    saved.save(tmp_path / "fp8.npz")
    resumed = _optimizer()
    resumed.load(tmp_path / "fp8.npz")
    _assert_same(_host(resumed), _host(saved))
    for grad in grads[3:]:
        straight.step(grad)
        resumed.step(grad)
    _assert_same(_host(resumed), _host(straight))


def test_checkpoints_load_across_the_velocity_formats(tmp_path):
    fp8, plain = _optimizer(), _optimizer(velocity_dtype=None)
    for grad in _grads(3):
        fp8.step(grad)
        plain.step(grad)
    fp8.save(tmp_path / "fp8.npz")
    plain.save(tmp_path / "plain.npz")
    widened = _optimizer(velocity_dtype=None)
    widened.load(tmp_path / "fp8.npz")
    assert np.array_equal(widened.velocity,
                          dequantize_velocity(fp8.velocity_codes, fp8.velocity_scales))
    assert np.array_equal(widened.param, fp8.param)
    narrowed = _optimizer()
    narrowed.load(tmp_path / "plain.npz")
    codes, scales = quantize_velocity(plain.velocity)
    assert np.array_equal(narrowed.velocity_codes, codes)
    assert np.array_equal(narrowed.velocity_scales, scales)
    assert np.array_equal(narrowed.param, plain.param)


def test_an_fp8_checkpoint_holds_a_quarter_of_the_velocity_bytes(tmp_path):
    size = 1 << 16
    fp8, plain = (_optimizer(velocity_dtype=v, size=size) for v in (FP8, None))
    grad = _grads(1, size=size)[0]
    fp8.step(grad)
    plain.step(grad)
    fp8.save(tmp_path / "fp8.npz")
    plain.save(tmp_path / "plain.npz")
    param_bytes = 4 * size
    fp8_velocity = (tmp_path / "fp8.npz").stat().st_size - param_bytes
    plain_velocity = (tmp_path / "plain.npz").stat().st_size - param_bytes
    # Codes and scales: 1 + 4/256 bytes per element against 4, plus some KiB of headers
    # and metadata in each file.
    assert abs(fp8_velocity - (size + 4 * size // 256)) < 4096
    assert abs(plain_velocity - 4 * size) < 4096
    assert fp8_velocity < 0.27 * plain_velocity


def test_a_checkpoint_with_a_tampered_fp8_member_is_refused_with_nothing_changed(tmp_path):
    import zipfile
    fp8 = _optimizer()
    fp8.step(_grads(1)[0])
    fp8.save(tmp_path / "fp8.npz")
    opt = _optimizer()
    before = _host(opt)
    # A file claiming FP8 whose velocity_scales member is missing.
    with zipfile.ZipFile(tmp_path / "fp8.npz") as source, \
            zipfile.ZipFile(tmp_path / "bad.npz", "w") as target:
        for info in source.infolist():
            if info.filename != "velocity_scales.npy":
                target.writestr(info, source.read(info))
    with pytest.raises(CheckpointError, match="members"):
        opt.load(tmp_path / "bad.npz")
    # A codes member one element longer than the buffer.
    arrays = dict(np.load(tmp_path / "fp8.npz"))
    arrays["velocity_codes"] = np.zeros(SIZE + 1, np.uint8)
    np.savez(tmp_path / "long.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"velocity_codes of shape \(1001,\)"):
        opt.load(tmp_path / "long.npz")
    _assert_same(_host(opt), before)

"""FlatParams: layout, views, padding and the optimizer over a packed model."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import PADDING_GRADIENTS, padding_mask
from gpu_momentum.reference import reference_step
from gpu_momentum.shapes import resnet50_shapes

SHAPES = [(3, 5), (7,), (), (2, 3, 4), (1,), (0,), (9,)]


def _layers(backend, dtype=np.float64, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return host, [backend.from_numpy(a) for a in host]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layout_aligns_every_segment_to_16_bytes(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no {np.dtype(dtype)}")
    host, layers = _layers(backend, dtype)
    flat = gm.FlatParams.from_arrays(layers)
    itemsize = np.dtype(dtype).itemsize
    assert len(flat) == len(SHAPES)
    assert flat.shapes == SHAPES
    assert all(offset * itemsize % 16 == 0 for offset in flat.offsets)
    assert flat.data.size * itemsize % 16 == 0
    assert flat.data.shape == flat.grad.shape == (flat.data.size,)
    data = backend.to_numpy(flat.data)
    used = np.zeros(data.size, bool)
    for array, view, offset in zip(host, flat.params, flat.offsets):
        assert view.shape == array.shape
        np.testing.assert_array_equal(backend.to_numpy(view), array)
        np.testing.assert_array_equal(data[offset:offset + array.size], array.ravel())
        used[offset:offset + array.size] = True
    assert not data[~used].any(), "padding must be zero"
    assert not backend.to_numpy(flat.grad).any()


def test_views_share_the_flat_buffers(backend):
    _, layers = _layers(backend)
    flat = gm.FlatParams.from_arrays(layers)
    backend.assign(flat.grads[0], np.full((3, 5), 2.0))
    backend.assign(flat.params[3], np.zeros((2, 3, 4)))
    grad, data = backend.to_numpy(flat.grad), backend.to_numpy(flat.data)
    assert (grad[flat.offsets[0]:flat.offsets[0] + 15] == 2.0).all()
    assert grad.sum() == 30.0
    assert not data[flat.offsets[3]:flat.offsets[3] + 24].any()


def test_optimizer_updates_every_view_and_keeps_padding_zero(backend):
    host, layers = _layers(backend)
    flat = gm.FlatParams.from_arrays(layers)
    opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9, weight_decay=0.01,
                         backend=backend.name)
    rng = np.random.default_rng(1)
    velocities = [np.zeros_like(a) for a in host]
    for step in range(3):
        grads = [rng.standard_normal(a.shape) for a in host]
        for view, grad in zip(flat.grads, grads):
            backend.assign(view, grad)
        opt.step()
        for i, grad in enumerate(grads):
            param, velocity = reference_step(host[i], grad, velocities[i], lr=0.1,
                                             momentum=0.9, weight_decay=0.01,
                                             first_step=step == 0)
            host[i], velocities[i] = param.reshape(grad.shape), velocity
    for array, view in zip(host, flat.params):
        np.testing.assert_allclose(backend.to_numpy(view), array, rtol=1e-12)
    used = np.zeros(flat.data.size, bool)
    for offset, size in zip(flat.offsets, flat.sizes):
        used[offset:offset + size] = True
    assert not backend.to_numpy(flat.data)[~used].any()
    assert not backend.to_numpy(opt.velocity)[~used].any()


@pytest.mark.slow
@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["", "skip-nonfinite"])
@pytest.mark.parametrize("style", ["classic", "torch"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_padding_never_moves(backend, dtype, style, skip_nonfinite):
    """Whatever lands in the gradient's padding (`flat.grad[...] = x` writes it; NaN and
    inf included), the padding of params and velocity keeps its bits, no step is skipped
    for it, and the segments are updated as without it."""
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no {np.dtype(dtype)}")
    host, layers = _layers(backend, dtype)
    flat = gm.FlatParams.from_arrays(layers)
    padding = padding_mask(flat.offsets, flat.sizes, flat.data.size)
    assert padding.any()
    hyper = {"lr": 0.1, "momentum": 0.9, "style": style, "weight_decay": 0.01, "l1": 0.001,
             "decoupled_weight_decay": style == "torch"}
    opt = gm.MomentumSGD(flat, skip_nonfinite=skip_nonfinite, backend=backend.name, **hyper)
    # Garbage of its own in the padding of params and velocity: it must stay as it is.
    backend.assign(flat.data, np.where(padding, -3.5, backend.to_numpy(flat.data)))
    backend.assign(opt.velocity, np.where(padding, np.nan, 0.0))
    before = [backend.to_numpy(a)[padding].tobytes() for a in (flat.data, opt.velocity)]
    rng = np.random.default_rng(2)
    velocities = [np.zeros(a.size) for a in host]
    for step, value in enumerate(PADDING_GRADIENTS):
        grad = np.where(padding, value, rng.standard_normal(flat.data.size))
        with np.errstate(over="ignore"):  # 1e300 is inf in float16 and float32
            backend.assign(flat.grad, grad)
        opt.step()
        assert not opt.last_step_skipped, f"step {step + 1} read the padding"
        assert [backend.to_numpy(a)[padding].tobytes()
                for a in (flat.data, opt.velocity)] == before, f"step {step + 1}"
        for i, (offset, size) in enumerate(zip(flat.offsets, flat.sizes)):
            segment = grad[offset:offset + size].astype(dtype)
            host[i], velocities[i] = reference_step(host[i], segment, velocities[i],
                                                    first_step=step == 0, **hyper)
    tolerance = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for array, view in zip(host, flat.params):
        np.testing.assert_allclose(backend.to_numpy(view).ravel(), array, rtol=tolerance,
                                   atol=tolerance)
    assert opt.step_count == len(PADDING_GRADIENTS)


def test_resnet50_layout_is_compact():
    shapes = resnet50_shapes()
    flat = gm.FlatParams.from_arrays([np.zeros(s, np.float32) for s in shapes])
    elements = sum(int(np.prod(s)) for s in shapes)
    assert elements == 25_557_032
    assert elements <= flat.data.size < elements + 4 * len(shapes)


@pytest.mark.parametrize("arrays, error, pattern", [
    ([], ValueError, r"arrays.*empty"),
    (np.zeros(3), TypeError, r"arrays.*list of arrays"),
    ("abc", TypeError, r"arrays.*list of arrays"),
    ([np.zeros(2), [1.0, 2.0]], TypeError, r"arrays\[1\].*list"),
    ([np.zeros(2, np.float32), np.zeros(2)], TypeError, r"mixed dtypes.*float32.*float64"),
    ([np.zeros(2, np.int32)], TypeError, r"arrays.*int32"),
])
def test_bad_arrays_are_rejected(arrays, error, pattern):
    with pytest.raises(error, match=pattern):
        gm.FlatParams.from_arrays(arrays)

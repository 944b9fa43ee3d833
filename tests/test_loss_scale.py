"""The loss scale and GradScaler's found_inf in the backend's memory (0-d arrays the
kernels read), against the loss scale as a number: on every backend (the CPU's NumPy
arrays, numba-cuda in the simulator), and the host-built CUDA C kernel with the new
arguments, bit for bit."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import problem

SCALES = [1024.0, 0.5, 2.0**-20]  # loss scalers' powers of two: 1 / s is exact
MODES = {"host-counters": {}, "skip-nonfinite": {"skip_nonfinite": True},
         "capturable": {"capturable": True}}


def _zero_d(harness, value, dtype):
    return harness.from_numpy(np.array(value, dtype))


def _bits(harness, opt):
    return (harness.to_numpy(opt.param).tobytes(), harness.to_numpy(opt.velocity).tobytes(),
            opt.step_count, opt.skipped_steps, opt.last_step_skipped)


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
def test_a_loss_scale_in_memory_is_the_number(backend, mode, scale_dtype):
    """Steps with grad_scale as a 0-d array of either float dtype (the compute dtype's
    read in place, the other converted on the stream) give the bits of grad_scale as a
    number; found_inf set skips, changing nothing but the counters."""
    if backend.on_device and mode == "host-counters":
        pytest.skip("found_inf needs device counters on a GPU (refusal tested below)")
    param, grads = problem(37, steps=len(SCALES) + 1, dtype=np.float32)
    by_number, in_memory = (
        gm.MomentumSGD(backend.from_numpy(param), lr=0.1, momentum=0.9,
                       weight_decay=1e-3, backend=backend.name, **MODES[mode])
        for _ in range(2))
    no, yes = (_zero_d(backend, value, np.float32) for value in (0.0, 1.0))
    for step, scale in enumerate(SCALES):
        grad = backend.from_numpy((grads[step] * scale).astype(np.float32))
        by_number.step(grad, grad_scale=scale)
        in_memory.step(grad, grad_scale=_zero_d(backend, scale, scale_dtype),
                       found_inf=no)
        assert _bits(backend, in_memory) == _bits(backend, by_number), f"step {step + 1}"
    before = _bits(backend, in_memory)
    in_memory.step(backend.from_numpy(grads[-1]), grad_scale=_zero_d(backend, 2.0,
                                                                       scale_dtype),
                   found_inf=yes)
    assert _bits(backend, in_memory)[:3] == before[:3]
    assert (in_memory.skipped_steps, in_memory.last_step_skipped) == (1, True)
    by_number.step(backend.from_numpy(grads[-1]))
    in_memory.step(backend.from_numpy(grads[-1]), found_inf=no)
    assert _bits(backend, in_memory)[:2] == _bits(backend, by_number)[:2]
    assert in_memory.step_count == len(SCALES) + 1 and not in_memory.last_step_skipped


def test_momentum_step_takes_a_loss_scale_in_memory(backend):
    param, (grad,) = problem(37, steps=1, dtype=np.float32)
    results = []
    for scale in (64.0, _zero_d(backend, 64.0, np.float32)):
        p, v = backend.from_numpy(param), backend.from_numpy(np.zeros(37, np.float32))
        gm.momentum_step(p, backend.from_numpy(grad * 64), v, lr=0.1, first_step=True,
                         grad_scale=scale, backend=backend.name)
        results.append((backend.to_numpy(p).tobytes(), backend.to_numpy(v).tobytes()))
    assert results[0] == results[1]


def _host_array(value, dtype):
    return np.array(value, dtype)


@pytest.mark.parametrize("name, make, error, pattern", [
    ("grad_scale", lambda h: h.from_numpy(np.ones(2, np.float32)), ValueError,
     r"Invalid grad_scale value: an array of shape \(2,\)"),
    ("grad_scale", lambda h: h.from_numpy(np.array(2, np.int32)), TypeError,
     r"Invalid grad_scale value: an array of dtype int32 \(grad_scale must be a float"),
    ("found_inf", lambda h: h.from_numpy(np.zeros((1, 1), np.float32)), ValueError,
     r"Invalid found_inf value: an array of shape \(1, 1\)"),
    ("found_inf", lambda h: h.from_numpy(np.array("x")), TypeError,
     r"Invalid found_inf value: an array of dtype <U1"),
    ("grad_scale", lambda h: np.ma.masked_array(2.0), TypeError, r"grad_scale is a numpy"),
])
def test_bad_arrays_in_memory_are_refused_and_change_nothing(backend, name, make, error,
                                                             pattern):
    param, (grad,) = problem(16, steps=1, dtype=np.float32)
    opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, skip_nonfinite=True,
                         backend=backend.name)
    try:
        bad = make(backend)
    except (TypeError, ValueError) as why:  # real CuPy arrays hold no strings
        pytest.skip(f"{backend.name} arrays cannot be made so: {why}")
    before = _bits(backend, opt)
    with pytest.raises(error, match=pattern):
        opt.step(backend.from_numpy(grad), **{name: bad})
    assert _bits(backend, opt) == before


def test_arrays_in_the_other_memory_are_refused(backend):
    """A host array for a GPU optimizer (and the reverse) cannot be read where the kernels
    run; found_inf on a GPU optimizer that counts on the host cannot be read without
    waiting."""
    param, (grad,) = problem(16, steps=1, dtype=np.float32)
    opt = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, backend=backend.name)
    g = backend.from_numpy(grad)
    if backend.on_device:
        with pytest.raises(TypeError, match="grad_scale value: a numpy.ndarray.*GPU"):
            opt.step(g, grad_scale=_host_array(2.0, np.float32))
        with pytest.raises(ValueError, match="found_inf value: an array, but this "
                                             "optimizer counts its steps on the host"):
            opt.step(g, found_inf=_zero_d(backend, 0.0, np.float32))
    else:  # host memory: read on the host, whatever the counters
        opt.step(g, found_inf=_host_array(1.0, np.float32))
        assert opt.skipped_steps == 1 and opt.step_count == 0


@pytest.mark.gpu
def test_torch_grad_scaler_scale_and_found_inf_are_read_on_the_device():
    """gpu_momentum.torch.SGD(capturable=True) on CUDA takes GradScaler's scale and
    found_inf as device tensors (_step_supports_amp_scaling, no .item()): the same bits as
    GradScaler's unscale_ path on an optimizer counting on the host, an overflow skipped
    by both, and the scale evolving alike."""
    from harness import require
    torch = require("torch")
    if not torch.cuda.is_available() or "cupy" not in gm.available_backends():
        pytest.skip("needs a CUDA device that torch and the cupy backend can use")
    from gpu_momentum.torch import SGD

    torch.manual_seed(3)
    models = [torch.nn.Linear(16, 8).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    device_side = SGD(models[0].parameters(), lr=0.1, momentum=0.9, capturable=True)
    host_side = SGD(models[1].parameters(), lr=0.1, momentum=0.9)
    assert device_side._step_supports_amp_scaling
    assert not host_side._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12) for _ in range(2)]
    x = torch.randn(32, 16, device="cuda")
    for step in range(6):
        for model, opt, scaler in zip(models, (device_side, host_side), scalers):
            opt.zero_grad()
            loss = model(x).square().mean() * (float("inf") if step == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    torch.cuda.synchronize()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**12
    assert device_side.skipped_steps == 1 and device_side.step_count == 5

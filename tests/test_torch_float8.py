"""gpu_momentum.torch.SGD(velocity_dtype=torch.float8_e4m3fn): its steps bit for bit
MomentumSGD's FP8 steps (torch style) over the same flat layout, each parameter's segment
starting on a block boundary (MomentumSGD's kernels are held to the reference in
tests/test_float8_optimizer.py), for the shared configurations and groups, every
precision mode, skip_nonfinite, the loss scale and capturable; opt.state's codes and
scales and their edits; state dicts both ways with torch.optim.SGD and bit-exact resume;
and the refusals, with nothing changed."""

import io
import subprocess
import sys

import numpy as np
import pytest

from configs import (CONFIGS, GROUP_CONFIGS, LR_SCHEDULE, SEGMENT_NAMES, SEGMENT_SIZES,
                     TORCH_FLOAT8_ERRORS, group_lr, hyper_at)
from harness import library_env, require

torch = require("torch")
ml_dtypes = require("ml_dtypes")

import gpu_momentum as gm  # noqa: E402
from gpu_momentum.flat import FlatParams  # noqa: E402
from gpu_momentum.kernels.layout import FLOAT8_BLOCK, float8_scale_count  # noqa: E402
from gpu_momentum.reference import dequantize_velocity, quantize_velocity  # noqa: E402
from gpu_momentum.torch import SGD, UnsupportedOptionError  # noqa: E402

FP8 = torch.float8_e4m3fn
NUMPY = {torch.float32: np.dtype(np.float32), torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
         torch.float16: np.dtype(np.float16)}
STEPS = 5


def _numpy(tensor):
    """A torch tensor's values as a host NumPy copy of the same dtype (bfloat16 as
    ml_dtypes')."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY[torch.bfloat16]).copy()
    return tensor.numpy().copy()


def _bits(array):
    return np.ascontiguousarray(array).view(np.uint8)


def _block_offsets(sizes):
    """Each segment's offset in a Float8Bucket: on block boundaries."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(float8_scale_count(end) * FLOAT8_BLOCK)
        end = offsets[-1] + size
    return offsets, end


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(size).astype(np.float32))
                               .to(dtype)) for size in SEGMENT_SIZES]


def _grads(step, dtype, seed=1):
    rng = np.random.default_rng(seed + step)
    return [torch.from_numpy((0.5 * rng.standard_normal(size)).astype(np.float32)).to(dtype)
            for size in SEGMENT_SIZES]


class Twin:
    """A MomentumSGD over a FlatParams laid out as SGD's Float8Bucket lays out `params`
    (torch style, FP8 velocity), stepped with the same gradients."""

    def __init__(self, params, groups=None, style="torch", **options):
        self.offsets, end = _block_offsets(SEGMENT_SIZES)
        dtype = NUMPY[params[0].dtype]
        total = -(-end // 16) * 16
        data = np.zeros(total, dtype)
        for offset, p in zip(self.offsets, params):
            data[offset:offset + p.numel()] = _numpy(p)
        self.flat = FlatParams(data, np.zeros(total, dtype), [(s,) for s in SEGMENT_SIZES],
                               self.offsets, names=list(SEGMENT_NAMES))
        self.opt = gm.MomentumSGD(self.flat, style=style, velocity_dtype="float8_e4m3fn",
                                  groups=groups, backend="cpu", **options)

    def step(self, grads, grad_scale=1.0):
        for view, grad in zip(self.flat.grads, grads):
            view[...] = _numpy(grad)
        self.opt.step(grad_scale=grad_scale)

    def assert_same(self, opt, params):
        """SGD `opt`'s parameters, codes and scales equal this twin's, bit for bit."""
        codes, scales = (np.asarray(a) for a in self.opt.velocity)
        for offset, p in zip(self.offsets, params):
            end = offset + p.numel()
            assert np.array_equal(_bits(_numpy(p)), _bits(self.flat.data[offset:end]))
            entry = opt.state.get(p, {})
            blocks = slice(offset // FLOAT8_BLOCK, float8_scale_count(end))
            if "momentum_codes" not in entry:  # no buffer yet (momentum 0): zeros there
                assert not codes[offset:end].any() and not scales[blocks].any()
                continue
            assert np.array_equal(entry["momentum_codes"].numpy(), codes[offset:end])
            assert np.array_equal(_bits(entry["momentum_scales"].numpy()),
                                  _bits(scales[blocks]))


def _torch_groups(params, options, groups):
    """torch param groups for GROUP_CONFIGS' (options, groups): one per group, then the
    parameters no group names with the optimizer's own options."""
    index = {name: i for i, name in enumerate(SEGMENT_NAMES)}
    named = [[index.get(n, n) for n in g["params"]] for g in groups]
    result = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [params[i] for i in members]} for g, members in zip(groups, named)]
    rest = [p for i, p in enumerate(params) if not any(i in m for m in named)]
    return ([{"params": rest}] if rest else []) + result, bool(rest)


@pytest.mark.parametrize("config", CONFIGS)
def test_steps_equal_momentum_sgd(config):
    """Each configuration's schedule (lr and momentum changed between steps), both
    styles, float32 parameters: bit for bit MomentumSGD's FP8 steps."""
    params = _params(torch.float32)
    options = hyper_at(config, 0)
    twin = Twin(params, **options)
    opt = SGD(params, velocity_dtype=FP8, backend="cpu", **options)
    for step in range(STEPS):
        hyper = hyper_at(config, step)
        opt.param_groups[0]["lr"] = twin.opt.lr = hyper["lr"]
        opt.param_groups[0]["momentum"] = twin.opt.momentum = hyper["momentum"]
        grads = _grads(step, torch.float32)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        twin.step(grads)
        twin.assert_same(opt, params)


@pytest.mark.parametrize("config", GROUP_CONFIGS)
def test_groups_equal_momentum_sgd(config):
    """Several param groups with their own values and a per-group lr schedule."""
    params = _params(torch.float32)
    options = {"lr": LR_SCHEDULE[0], **config["options"]}
    groups = config["groups"]
    torch_groups, has_rest = _torch_groups(params, options, groups)
    twin = Twin(params, groups=groups, **options)
    opt = SGD(torch_groups, velocity_dtype="float8_e4m3fn", backend="cpu", **options)
    for step in range(STEPS):
        twin.opt.lr = LR_SCHEDULE[step]
        for group, twin_group in zip(groups, twin.opt.param_groups):
            twin_group["lr"] = group_lr(group, step)
        lrs = ([LR_SCHEDULE[step]] if has_rest else []) + [group_lr(g, step) for g in groups]
        for torch_group, lr in zip(opt.param_groups, lrs):
            torch_group["lr"] = lr
        grads = _grads(step, torch.float32)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        twin.step(grads)
        twin.assert_same(opt, params)


PRECISION_CASES = [(torch.float32, "nearest"), (torch.float32, "stochastic"),
                   (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"),
                   (torch.bfloat16, "kahan"), (torch.bfloat16, "master"),
                   (torch.float16, "nearest")]


@pytest.mark.parametrize("dtype, precision", PRECISION_CASES,
                         ids=[f"{d}-{p}".replace("torch.", "") for d, p in PRECISION_CASES])
def test_precision_modes_equal_momentum_sgd(dtype, precision):
    """float32 and 16-bit parameters in every precision mode the FP8 kernels have (float32
    "stochastic" rounds the codes), with the seed."""
    params = _params(dtype)
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                   precision=precision, seed=5)
    twin = Twin(params, **options)
    opt = SGD(params, velocity_dtype="float8_e4m3fn", backend="cpu", **options)
    for step in range(STEPS):
        grads = _grads(step, dtype)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        twin.step(grads)
        twin.assert_same(opt, params)
        if precision in ("kahan", "master"):
            buffer = np.asarray(getattr(twin.opt, "compensation" if precision == "kahan"
                                        else "master"))
            key = "compensation" if precision == "kahan" else "master"
            for offset, p in zip(twin.offsets, params):
                assert np.array_equal(_bits(_numpy(opt.state[p][key])),
                                      _bits(buffer[offset:offset + p.numel()]))


@pytest.mark.parametrize("mode", ["skip_nonfinite", "capturable", "loss-scale"])
def test_counted_steps_and_loss_scale_equal_momentum_sgd(mode):
    """skip_nonfinite (a NaN gradient skips the step, a skipped first step stays first),
    capturable (the counters in the buffer's memory) and GradScaler's scale and found_inf
    as SGD reads them (`opt.grad_scale`, `opt.found_inf`)."""
    params = _params(torch.float32)
    flags = {"skip_nonfinite": mode == "skip_nonfinite", "capturable": mode == "capturable"}
    options = dict(lr=0.05, momentum=0.9, dampening=0.2, **flags)
    twin = Twin(params, **options)
    opt = SGD(params, velocity_dtype=FP8, backend="cpu", **options)
    scale = 1024.0
    for step in range(STEPS):
        grads = _grads(step, torch.float32)
        if mode == "skip_nonfinite" and step in (0, 3):
            grads[2][7] = float("nan")
        if mode == "loss-scale":
            grads = [g * scale for g in grads]
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        if not (mode == "loss-scale" and step == 2):
            twin.step(grads, grad_scale=scale if mode == "loss-scale" else 1.0)
        if step > 0 or mode != "skip_nonfinite":
            twin.assert_same(opt, params)
        else:  # a skipped first step: no velocity yet
            assert all("momentum_codes" not in opt.state.get(p, {}) for p in params)
    assert opt.skipped_steps == (2 if mode == "skip_nonfinite" else
                                 1 if mode == "loss-scale" else 0)


def test_grad_none_keeps_codes_and_scales():
    """A parameter whose .grad is None keeps its codes and scales bit for bit (it owns its
    blocks), and one without a gradient at its first step gets no velocity."""
    params = _params(torch.float32)
    opt = SGD(params, lr=0.1, momentum=0.9, velocity_dtype=FP8)
    for step in range(3):
        grads = _grads(step, torch.float32)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 or (i == 2 and step == 2)) else g
        before = {k: v.clone() for k, v in opt.state[params[2]].items()}
        opt.step()
    assert params[1] not in opt.state
    for key, value in before.items():
        assert torch.equal(opt.state[params[2]][key], value)


def _trained(dtype=torch.float32, steps=3, **options):
    params = _params(dtype)
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, **options}
    opt = SGD(params, velocity_dtype=FP8, **options)
    for step in range(steps):
        for p, g in zip(params, _grads(step, dtype)):
            p.grad = g
        opt.step()
    return params, opt


def _decoded(opt, p):
    entry = opt.state[p]
    return dequantize_velocity(entry["momentum_codes"].numpy(),
                               entry["momentum_scales"].numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_holds_decoded_momentum_buffers_torch_loads(dtype):
    """state_dict()'s momentum buffers are the decoded velocity (float32, the parameter's
    shape; momentum_buffer(p) the same), and torch.optim.SGD loads them (cast to the
    parameter's dtype) and steps on."""
    params, opt = _trained(dtype)
    state = opt.state_dict()
    extras = state["gpu_momentum"]
    assert extras["velocity_dtype"] == "float8_e4m3fn"
    for index, p in enumerate(params):
        buffer = state["state"][index]["momentum_buffer"]
        assert set(state["state"][index]) == {"momentum_buffer"}
        assert buffer.dtype == torch.float32 and buffer.shape == p.shape
        assert np.array_equal(buffer.numpy(), _decoded(opt, p))
        assert torch.equal(opt.momentum_buffer(p), buffer)
        assert torch.equal(extras["momentum_codes"][index], opt.state[p]["momentum_codes"])
    theirs = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    theirs.load_state_dict(state)
    for index, p in enumerate(params):
        assert torch.equal(theirs.state[p]["momentum_buffer"],
                           state["state"][index]["momentum_buffer"].to(dtype))
    for p, g in zip(params, _grads(5, dtype)):
        p.grad = g
    theirs.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_bit_for_bit(dtype):
    """A state dict through torch.save and torch.load(weights_only=True) resumes an SGD
    with an FP8 velocity bit for bit."""
    params, opt = _trained(dtype, precision="stochastic", seed=9)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SGD(copies, lr=1.0, velocity_dtype="float8_e4m3fn", precision="stochastic")
    resumed.load_state_dict(state)
    for step in range(3, 6):
        for ours, theirs, g in zip(params, copies, _grads(step, dtype)):
            ours.grad, theirs.grad = g, g.clone()
        opt.step()
        resumed.step()
        for ours, theirs in zip(params, copies):
            assert torch.equal(ours.view(torch.uint8) if dtype == torch.float32 else ours,
                               theirs.view(torch.uint8) if dtype == torch.float32 else theirs)
            for key in ("momentum_codes", "momentum_scales"):
                assert torch.equal(opt.state[ours][key], resumed.state[theirs][key])


def test_channels_last_blocks_follow_memory_order():
    """A channels_last weight's blocks are blocks of its memory: the codes view has its
    strides, and a state resumes bit for bit into the same memory format; into another
    one the momentum buffer is quantized again (within FP8's rounding of it)."""
    def model(memory_format):
        torch.manual_seed(0)
        return torch.nn.Conv2d(8, 16, 3).to(memory_format=memory_format)

    ours = model(torch.channels_last)
    opt = SGD(ours.parameters(), lr=0.1, momentum=0.9, velocity_dtype=FP8)
    x = torch.randn(2, 8, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        ours(x).square().mean().backward()
        opt.step()
    codes = opt.state[ours.weight]["momentum_codes"]
    assert codes.stride() == ours.weight.stride()
    flat = codes.permute(0, 2, 3, 1).reshape(-1)  # memory order of channels_last
    decoded = dequantize_velocity(flat.numpy(), opt.state[ours.weight][
        "momentum_scales"].numpy())
    expected = opt.momentum_buffer(ours.weight).permute(0, 2, 3, 1).reshape(-1)
    assert np.array_equal(decoded, expected.numpy())
    state = opt.state_dict()
    for memory_format in (torch.channels_last, torch.contiguous_format):
        twin = model(memory_format)
        twin.load_state_dict(ours.state_dict())
        resumed = SGD(twin.parameters(), lr=0.1, momentum=0.9, velocity_dtype=FP8)
        resumed.load_state_dict(state)
        buffer, saved = resumed.momentum_buffer(twin.weight), opt.momentum_buffer(
            ours.weight)
        if memory_format == torch.channels_last:
            assert torch.equal(resumed.state[twin.weight]["momentum_codes"], codes)
        else:
            assert torch.allclose(buffer, saved, rtol=2**-3, atol=saved.abs().max() / 2**9)


def test_torch_state_loads_quantized_and_fp8_state_loads_decoded():
    """torch.optim.SGD's state loads into an FP8 SGD quantized (reference.quantize_velocity
    of each momentum buffer), and an FP8 state into a float32-velocity SGD decoded."""
    params = _params(torch.float32)
    theirs = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for step in range(2):
        for p, g in zip(params, _grads(step, torch.float32)):
            p.grad = g
        theirs.step()
    opt = SGD(params, lr=0.05, momentum=0.9, velocity_dtype=FP8)
    opt.load_state_dict(theirs.state_dict())
    for p in params:
        codes, scales = quantize_velocity(theirs.state[p]["momentum_buffer"].numpy())
        assert np.array_equal(opt.state[p]["momentum_codes"].numpy(), codes)
        assert np.array_equal(opt.state[p]["momentum_scales"].numpy(), scales)
        assert "momentum_buffer" not in opt.state[p]
    plain = SGD(params, lr=0.05, momentum=0.9)
    plain.load_state_dict(opt.state_dict())
    for p in params:
        assert np.array_equal(plain.state[p]["momentum_buffer"].numpy(), _decoded(opt, p))
    again = SGD(params, lr=0.05, momentum=0.9, velocity_dtype=FP8)
    again.load_state_dict(plain.state_dict())  # decoded values quantize to the same codes
    for p in params:
        assert torch.equal(again.state[p]["momentum_codes"], opt.state[p]["momentum_codes"])


def test_state_edits():
    """An assigned momentum buffer is quantized into the velocity at the next step (and
    leaves the state); deleted codes make the next step a first step (b = g)."""
    params = _params(torch.float32)
    opt = SGD(params, lr=0.05, momentum=0.9, velocity_dtype=FP8)
    p = params[0]
    value = torch.linspace(-3, 5, p.numel())
    opt.state[p]["momentum_buffer"] = value
    assert torch.equal(opt.momentum_buffer(p), value)
    opt.step()  # no gradients: nothing moves, the edit is taken
    codes, scales = quantize_velocity(value.numpy())
    assert set(opt.state[p]) == {"momentum_codes", "momentum_scales"}
    assert np.array_equal(opt.state[p]["momentum_codes"].numpy(), codes)
    assert np.array_equal(opt.state[p]["momentum_scales"].numpy(), scales)
    grad = _grads(0, torch.float32)[0]
    for reset in ("delete", "none"):
        if reset == "delete":
            del opt.state[p]["momentum_codes"], opt.state[p]["momentum_scales"]
        else:
            opt.state[p]["momentum_buffer"] = None
        p.grad = grad
        opt.step()
        codes, _ = quantize_velocity(grad.numpy())
        assert np.array_equal(opt.state[p]["momentum_codes"].numpy(), codes)
        assert set(opt.state[p]) == {"momentum_codes", "momentum_scales"}


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in entry.items()}
             for p, entry in opt.state.items()}, [dict(g) for g in opt.param_groups])


def _assert_unchanged(opt, params, snapshot):
    values, state, groups = snapshot
    for p, value in zip(params, values):
        assert torch.equal(p.detach().view(torch.uint8), value.view(torch.uint8))
    assert {id(p) for p in opt.state} == set(state)
    for p, entry in opt.state.items():
        assert set(entry) == set(state[id(p)])
        for key, value in entry.items():
            assert torch.equal(value, state[id(p)][key])
    assert len(opt.param_groups) == len(groups)


@pytest.mark.parametrize("id_, kwargs, param_dtype, error, pattern", TORCH_FLOAT8_ERRORS,
                         ids=[row[0] for row in TORCH_FLOAT8_ERRORS])
def test_constructor_refusals(id_, kwargs, param_dtype, error, pattern):
    p = torch.nn.Parameter(torch.ones(5, dtype=getattr(torch, param_dtype)))
    before = p.detach().clone()
    kwargs = {k: getattr(torch, v[len("torch."):]) if isinstance(v, str) and
              v.startswith("torch.") else v for k, v in kwargs.items()}
    with pytest.raises(error, match=pattern):
        SGD([p], lr=0.1, momentum=0.9, **kwargs)
    assert torch.equal(p.detach(), before) and p.grad is None


@pytest.mark.parametrize("name", ["torch", "string", "ml_dtypes"])
def test_velocity_dtype_names(name):
    """torch.float8_e4m3fn, "float8_e4m3fn" and ml_dtypes.float8_e4m3fn name the FP8
    velocity; None, torch.float32 and "float32" the default one."""
    fp8 = {"torch": FP8, "string": "float8_e4m3fn", "ml_dtypes": ml_dtypes.float8_e4m3fn}
    default = {"torch": torch.float32, "string": "float32", "ml_dtypes": None}
    p = torch.nn.Parameter(torch.ones(3))
    assert SGD([p], lr=0.1, velocity_dtype=fp8[name]).velocity_dtype == FP8
    opt = SGD([p], lr=0.1, momentum=0.9, velocity_dtype=default[name])
    p.grad = torch.ones(3)
    opt.step()
    assert opt.velocity_dtype is None and set(opt.state[p]) == {"momentum_buffer"}


def test_known_name_without_ml_dtypes_is_a_type_error():
    """As MomentumSGD: a known name whose package is missing is a TypeError."""
    script = """
import sys
class NoMlDtypes:
    def find_spec(self, name, path=None, target=None):
        if name == "ml_dtypes" or name.startswith("ml_dtypes."):
            raise ImportError("ml_dtypes is not installed")
sys.meta_path.insert(0, NoMlDtypes())
import torch
from gpu_momentum.torch import SGD
for value in ("float8_e4m3fn", torch.float8_e4m3fn):
    try:
        SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, velocity_dtype=value)
    except TypeError as error:
        print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], env=library_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("Invalid velocity_dtype value: 'float8_e4m3fn'" in line
                                   and "needs ml_dtypes" in line for line in lines)


def test_differentiable_refuses_fp8():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(UnsupportedOptionError, match=r"Invalid velocity_dtype value: "
                                                     r"'float8_e4m3fn' with differentiable"):
        SGD([p], lr=0.1, differentiable=True, velocity_dtype=FP8)


def test_wrapper_storage_refused():
    """A parameter in storage a wrapper owns (a view into a larger tensor, as ZeRO's and
    FSDP1's) is refused with an FP8 velocity, naming velocity_dtype."""
    storage = torch.zeros(64)
    p = torch.nn.Parameter(storage[8:24])
    with pytest.raises(ValueError, match=r"velocity_dtype value: 'float8_e4m3fn' "
                                         r"\(parameters in storage a wrapper owns"):
        SGD([p], lr=0.1, velocity_dtype=FP8)


def test_add_param_group_refusal_changes_nothing():
    params, opt = _trained()
    snapshot = _snapshot(opt, params)
    extra = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"velocity_dtype value: 'float8_e4m3fn' "
                                         r"\(float64 parameters"):
        opt.add_param_group({"params": [extra]})
    _assert_unchanged(opt, params, snapshot)


def _bad_codes_dtype(state):
    state["gpu_momentum"]["momentum_codes"][0] = state["gpu_momentum"]["momentum_codes"][
        0].to(torch.int16)


def _bad_codes_shape(state):
    state["gpu_momentum"]["momentum_codes"][1] = torch.zeros(3, dtype=torch.uint8)


def _negative_scale(state):
    state["gpu_momentum"]["momentum_scales"][2][0] = -1.0


def _nan_scale(state):
    state["gpu_momentum"]["momentum_scales"][0][-1] = float("nan")


def _missing_scales(state):
    del state["gpu_momentum"]["momentum_scales"][3]


def _unknown_velocity_dtype(state):
    state["gpu_momentum"]["velocity_dtype"] = "float8_e5m2"


def _codes_not_a_dict(state):
    state["gpu_momentum"]["momentum_codes"] = []


BAD_STATES = [
    (_bad_codes_dtype, ValueError, r"Invalid momentum_codes value in .*torch\.int16"),
    (_bad_codes_shape, ValueError, r"Invalid momentum_codes value in .*shape \(3,\)"),
    (_negative_scale, ValueError, r"Invalid momentum_scales value in .*-1\.0 at block 0"),
    (_nan_scale, ValueError, r"Invalid momentum_scales value in .*nan at block"),
    (_missing_scales, ValueError, r"momentum_codes and momentum_scales values: dicts"),
    (_unknown_velocity_dtype, ValueError, r"velocity_dtype value: 'float8_e5m2'"),
    (_codes_not_a_dict, ValueError, r"momentum_codes and momentum_scales values"),
]


@pytest.mark.parametrize("spoil, error, pattern", BAD_STATES,
                         ids=[row[0].__name__.strip("_") for row in BAD_STATES])
def test_bad_state_refused_nothing_changed(spoil, error, pattern):
    params, opt = _trained()
    state = opt.state_dict()
    spoil(state)
    snapshot = _snapshot(opt, params)
    with pytest.raises(error, match=pattern):
        opt.load_state_dict(state)
    _assert_unchanged(opt, params, snapshot)


def test_bad_state_edit_refused_nothing_changed():
    """A codes tensor of another dtype assigned to opt.state: the step raises and changes
    nothing (the edit stays to be fixed)."""
    params, opt = _trained()
    opt.state[params[0]]["momentum_codes"] = torch.zeros(SEGMENT_SIZES[0])
    for p, g in zip(params, _grads(7, torch.float32)):
        p.grad = g
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"Invalid momentum_codes value in a parameter's "
                                         r"state: torch\.float32"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.gpu
@pytest.mark.hardware_first
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason=f"torch {torch.__version__} has no usable CUDA device")
@pytest.mark.parametrize("backend", ["cupy", "numba-cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_steps_equal_the_cpus(backend, dtype):
    """CUDA parameters (codes and scales in the backend's memory, from torch's through
    from_torch) step as the same SGD on the CPU: bit for bit on cupy; numba-cuda, whose
    compiler fuses multiply-adds, within a step of E4M3 in the velocity."""
    require(backend.replace("-", "."))
    options = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    host_params = _params(dtype)
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in host_params]
    host = SGD(host_params, velocity_dtype=FP8, backend="cpu", **options)
    device = SGD(cuda_params, velocity_dtype=FP8, backend=backend, **options)
    for step in range(STEPS):
        grads = _grads(step, dtype)
        for p, q, g in zip(host_params, cuda_params, grads):
            p.grad, q.grad = g.clone(), g.cuda()
        host.step()
        device.step()
    for p, q in zip(host_params, cuda_params):
        mine, theirs = host.momentum_buffer(p), device.momentum_buffer(q).cpu()
        if backend == "cupy":
            assert torch.equal(p.detach(), q.detach().cpu())
            assert torch.equal(opt_codes(host, p), opt_codes(device, q).cpu())
            assert torch.equal(mine, theirs)
        else:
            assert torch.allclose(p.detach().float(), q.detach().cpu().float(),
                                  rtol=2.0**-6, atol=1e-3)
            assert torch.allclose(mine, theirs, rtol=2.0**-2,
                                  atol=2.0**-8 * float(mine.abs().max()))


def opt_codes(opt, p):
    return opt.state[p]["momentum_codes"]

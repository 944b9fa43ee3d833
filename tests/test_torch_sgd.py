"""gpu_momentum.torch.SGD against torch.optim.SGD: torch's own SGD inputs and error inputs,
torch's generic optimizer behaviours, parity on a real nn.Module (with param groups and
schedulers), gradients that arrive outside the flat buffer, moved parameters, state dicts
both ways, GradScaler. DDP is in test_torch_ddp.py. CUDA tests are marked `gpu`."""

import numba  # noqa: F401  (before torch: two OpenMP runtimes in one process stall)
import copy
import gc
import io
import math
import pickle
import subprocess
import sys
import warnings

import pytest

from configs import TORCH_SGD_ACCEPTED, TORCH_SGD_ERRORS
from harness import library_env, require

torch = require("torch")
from torch_threads import one_thread  # noqa: E402,F401  (autouse: one thread each)
require("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum, OptimizerInfo, _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db, optim_error_inputs_func_sgd, optim_inputs_func_sgd)

import gpu_momentum.torch as gm_torch  # noqa: E402
from gpu_momentum.backends import CpuBackend  # noqa: E402
from gpu_momentum.state_format import STATE_VERSION  # noqa: E402
from gpu_momentum.torch import SGD, UnsupportedOptionError  # noqa: E402

F = torch.nn.functional
SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
# torch's OptimizerInfo for this class: foreach/fused accepted (and ignored), not
# differentiable; complex parameters are packed as real pairs, sparse ones are not.
OUR_INFO = OptimizerInfo(
    SGD, optim_inputs_func=optim_inputs_func_sgd,
    optim_error_inputs_func=optim_error_inputs_func_sgd,
    scheduler_inputs=SGD_INFO.scheduler_inputs, supported_impls=("foreach", "fused"),
    not_og_supported_flags=SGD_INFO.not_og_supported_flags, supports_fused_on=("cpu",),
    supports_sparse=False, supports_complex=True)
INPUTS = optim_inputs_func_sgd(device="cpu")
STEPS = 45
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason=f"torch {torch.__version__} has no usable "
                                               f"CUDA device")])]


class Net(torch.nn.Module):
    """A small model with what optimizers meet: a convolution, linear layers, ReLU, tanh."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.fc1 = torch.nn.Linear(3 * 4 * 4, 10)
        self.fc2 = torch.nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def twins(dtype=torch.float64, device="cpu", seed=0):
    """Two identical models: one for torch.optim.SGD, one for ours."""
    torch.manual_seed(seed)
    model = Net().to(device=device, dtype=dtype)
    return model, copy.deepcopy(model)


def batches(steps, dtype=torch.float64, device="cpu", seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 6, 6, generator=generator).to(device, dtype),
             torch.randint(0, 4, (8,), generator=generator).to(device))
            for _ in range(steps)]


def backward(model, batch, scale=1.0):
    x, y = batch
    loss = F.cross_entropy(model(x.to(model.fc2.bias.dtype)), y)
    (loss * scale).backward()
    return loss


def assert_close(ours, theirs, dtype, what=""):
    """float64 within 1e-12, float32 within 2e-5 relative (of each tensor's largest
    value), parameter by parameter."""
    bound = 1e-12 if dtype == torch.float64 else 2e-5
    for index, (a, b) in enumerate(zip(ours, theirs)):
        a, b = a.detach().cpu(), b.detach().cpu()
        assert a.shape == b.shape and a.dtype == b.dtype, (what, index)
        scale = max(1.0, b.abs().max().item()) if dtype == torch.float64 else max(
            b.abs().max().item(), 1e-30)
        error = (a - b).abs().max().item() if a.numel() else 0.0
        assert error <= bound * scale, f"{what}: param {index} differs by {error:.3g}"


def state_keys(optimizer):
    """Which parameter indices have state, and its keys, as state_dict() shows them."""
    return {k: sorted(v) for k, v in optimizer.state_dict()["state"].items()}


def make_kwargs(kwargs):
    """A fresh copy (tensor lrs are written in place by schedulers)."""
    return copy.deepcopy(kwargs)


def groups_of(model, grouped):
    if not grouped:
        return model.parameters()
    return [{"params": model.conv.parameters(), "lr": 0.03, "weight_decay": 0.01},
            {"params": [*model.fc1.parameters(), *model.fc2.parameters()]}]


def train(pairs, data, schedulers=(), check=None):
    """Steps each (model, optimizer) pair over `data`; schedulers step after each."""
    for step, batch in enumerate(data):
        losses = []
        for model, opt in pairs:
            opt.zero_grad()
            losses.append(backward(model, batch))
            opt.step()
        for scheduler, loss in schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss.item())
            else:
                scheduler.step()
        if check is not None:
            check(step)


# ---- torch's own SGD inputs, on a real model -------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "param-groups"])
@pytest.mark.parametrize("index", range(len(INPUTS)), ids=[i.desc for i in INPUTS])
def test_torch_inputs_track_torch_sgd_on_a_model(index, grouped, dtype, device):
    """Each of torch's SGD inputs, with and without param groups, under one of torch's
    SGD scheduler lists (each list used by some input), 45 steps, each model doing its own
    forward and backward."""
    kwargs = INPUTS[index].kwargs
    theirs_model, ours_model = twins(dtype, device)
    theirs = torch.optim.SGD(groups_of(theirs_model, grouped), **make_kwargs(kwargs))
    ours = SGD(groups_of(ours_model, grouped), **make_kwargs(kwargs))
    lists = SGD_INFO.scheduler_inputs
    make = lists[(2 * index + grouped) % len(lists)]
    schedulers = [(s, None) for s in zip(*(
        [f(opt) for f in make] for opt in (theirs, ours)))]

    def check(step):
        assert_close(ours_model.parameters(), theirs_model.parameters(), dtype,
                     f"step {step + 1}")
        assert len(_storages(p.grad for p in ours_model.parameters())) == 1

    for step, batch in enumerate(batches(STEPS, dtype, device)):
        losses = []
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            opt.zero_grad()
            losses.append(backward(model, batch))
            opt.step()
        for (theirs_s, ours_s), _ in schedulers:
            for scheduler, loss in ((theirs_s, losses[0]), (ours_s, losses[1])):
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(loss.item())
                else:
                    scheduler.step()
        check(step)
    assert state_keys(ours) == state_keys(theirs)
    for group_a, group_b in zip(ours.param_groups, theirs.param_groups):
        assert float(group_a["lr"]) == float(group_b["lr"])


@pytest.mark.parametrize("name, kwargs", TORCH_SGD_ACCEPTED,
                         ids=[case[0] for case in TORCH_SGD_ACCEPTED])
def test_what_torch_accepts_runs_as_in_torch(name, kwargs):
    kwargs = {k: _value(v) for k, v in kwargs.items()}
    theirs_model, ours_model = twins()
    theirs = torch.optim.SGD(theirs_model.parameters(), **make_kwargs(kwargs))
    ours = SGD(ours_model.parameters(), **make_kwargs(kwargs))
    train([(theirs_model, theirs), (ours_model, ours)], batches(12))
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64, name)


def test_group_values_torch_never_checks_run_as_in_torch():
    """torch validates the constructor's values only: a group may hold a negative lr, a
    nesterov without momentum, a momentum above 1."""
    theirs_model, ours_model = twins()

    def groups(model):
        return [{"params": model.conv.parameters(), "lr": -0.01, "momentum": 1.2},
                {"params": model.fc1.parameters(), "nesterov": True, "momentum": 0.0},
                {"params": model.fc2.parameters(), "dampening": -1.0, "maximize": True}]
    theirs = torch.optim.SGD(groups(theirs_model), lr=0.01, momentum=0.9)
    ours = SGD(groups(ours_model), lr=0.01, momentum=0.9)
    train([(theirs_model, theirs), (ours_model, ours)], batches(10))
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64)
    assert state_keys(ours) == state_keys(theirs)


def test_one_cycle_lr_cycles_momentum_as_with_torch():
    theirs_model, ours_model = twins()
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    ours = SGD(ours_model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=STEPS)
                  for o in (theirs, ours)]
    momenta = []

    def check(step):
        momenta.append(ours.param_groups[0]["momentum"])
        assert ours.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"]
        assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64,
                     f"step {step + 1}")

    train([(theirs_model, theirs), (ours_model, ours)], batches(STEPS),
          [(s, None) for s in schedulers], check)
    assert len(set(momenta)) > STEPS // 2  # the momentum really moved every step


def test_a_tensor_lr_written_in_place_gives_what_a_float_lr_gives():
    """torch's test_tensor_lr: schedulers fill a tensor lr in place; the step reads it."""
    models = twins(torch.float32)  # a float32 tensor lr is a float32 number
    float_opt = SGD(models[0].parameters(), lr=0.01, momentum=0.9)
    tensor_opt = SGD(models[1].parameters(), lr=torch.tensor(0.01), momentum=0.9)
    schedulers = [(torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5), None)
                  for o in (float_opt, tensor_opt)]
    train([(models[0], float_opt), (models[1], tensor_opt)], batches(8, torch.float32),
          schedulers)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    assert isinstance(tensor_opt.param_groups[0]["lr"], torch.Tensor)


# ---- torch's error inputs and ours -----------------------------------------------------

@pytest.mark.parametrize("case", optim_error_inputs_func_sgd(device="cpu",
                                                             dtype=torch.float32),
                         ids=lambda case: case.optimizer_error_input.desc)
def test_torch_error_inputs_raise_what_torch_raises(case):
    error_input = case.optimizer_error_input
    assert case.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    for cls in (torch.optim.SGD, SGD):
        if issubclass(case.error_type, Warning):
            with pytest.warns(case.error_type, match=case.error_regex):
                cls(error_input.params, **error_input.kwargs)
        else:
            with pytest.raises(case.error_type, match=case.error_regex):
                cls(error_input.params, **error_input.kwargs)


def _value(value):
    """A table value: "tensor(x)" is torch.tensor(x)."""
    if isinstance(value, str) and value.startswith("tensor("):
        return torch.tensor(eval(value[len("tensor("):-1]))
    return value


@pytest.mark.parametrize("name, kwargs, error, pattern", TORCH_SGD_ERRORS,
                         ids=[case[0] for case in TORCH_SGD_ERRORS])
def test_bad_arguments_change_nothing(name, kwargs, error, pattern):
    model = Net()
    before = [(p, p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(error, match=pattern):
        SGD(model.parameters(), **{k: _value(v) for k, v in kwargs.items()})
    for p, address, values in before:
        assert p.data_ptr() == address and torch.equal(p, values)
    if name in ("lr-negative", "momentum-negative", "weight-decay-negative",
                "nesterov-dampening", "fused-and-foreach"):
        with pytest.raises(error, match=pattern):  # torch.optim.SGD says the same
            torch.optim.SGD(model.parameters(), **kwargs)


@pytest.mark.parametrize("option", [{"l1": 0.01}, {"decoupled_weight_decay": True},
                                    {"skip_nonfinite": True}, {"capturable": True},
                                    {"precision": "kahan"}, {"style": "classic"}],
                         ids=lambda option: next(iter(option)))
def test_differentiable_refuses_the_fused_kernels_options(option):
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(UnsupportedOptionError) as raised:
        SGD([p], differentiable=True, **option)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)


@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_differentiable_packs_nothing_and_steps_as_torch():
    """differentiable=True leaves each tensor where it lives and steps (a non-leaf copy,
    as torch steps one) exactly as torch.optim.SGD(differentiable=True)."""
    ends = []
    for cls in (torch.optim.SGD, SGD):
        torch.manual_seed(0)
        leaf = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        p = leaf.clone()
        address = p.data_ptr()
        opt = cls([p], lr=0.1, momentum=0.9, weight_decay=0.01, differentiable=True)
        weights = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3)
        for _ in range(3):  # (the loss saves no p for its backward: p changes in place)
            loss = (p * weights).sum() ** 2
            p.grad = torch.autograd.grad(loss, p, create_graph=True)[0]
            opt.step()
        assert p.data_ptr() == address
        (meta,) = torch.autograd.grad(p.sum(), leaf)
        ends.append((p.detach(), opt.state[p]["momentum_buffer"], meta))
    for ours, theirs in zip(ends[1], ends[0]):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float_dtype_no_backend_updates_is_refused_naming_it(dtype):
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=dtype))]
    with pytest.raises(TypeError, match=rf"parameter 1 has dtype {dtype}.*'cpu'"):
        SGD(params, lr=0.1)
    assert params[0].data_ptr() != 0 and params[0].grad is None
    frozen = torch.zeros(3, dtype=dtype)  # needs no update: kept out of the buffers
    opt = SGD([params[0], frozen], lr=0.1)
    frozen.grad = torch.ones(3, dtype=dtype)
    params[0].grad = torch.ones(3)
    before = params[0].detach().clone()
    with pytest.raises(TypeError, match=rf"{dtype}.*has a gradient"):
        opt.step()
    assert torch.equal(params[0], before) and not opt.state


def test_parameters_sharing_memory_are_refused():
    base = torch.zeros(10)
    params = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        SGD(params)


def test_skip_nonfinite_needs_one_buffer():
    params = [torch.nn.Parameter(torch.zeros(2)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    with pytest.raises(ValueError, match="Invalid skip_nonfinite value: True"):
        SGD(params, skip_nonfinite=True)


def test_a_cpu_tensor_on_a_gpu_backend_is_refused():
    with pytest.raises((TypeError, ValueError), match="cupy"):
        SGD([torch.nn.Parameter(torch.zeros(2))], backend="cupy")


# ---- torch's generic optimizer behaviours ----------------------------------------------

@pytest.mark.parametrize("scheduler_list", [None, *SGD_INFO.scheduler_inputs])
def test_goes_right_direction(scheduler_list):
    """torch's test_forloop_goes_right_direction, for every SGD input and variant."""
    for optim_input in _get_optim_inputs_including_global_cliquey_kwargs(
            "cpu", torch.float32, OUR_INFO, skip=("differentiable",)):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(10, 5))
        bias = torch.nn.Parameter(torch.randn(10))
        x = torch.randn(5)
        opt = SGD([weight, bias], **optim_input.kwargs)
        schedulers = [make(opt) for make in scheduler_list or []]

        def closure():
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        first = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            for scheduler in schedulers:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(loss)
                else:
                    scheduler.step()
        last = closure().item()
        if optim_input.kwargs.get("maximize", False):
            assert last > first, optim_input.desc
        else:
            assert last < first, optim_input.desc


def test_step_without_grads_changes_nothing_and_runs_hooks_in_order():
    """torch's test_step_is_noop_when_params_have_no_grad and test_step_all_hooks: an
    integer tensor without a gradient, global then local pre-hooks, local then global
    post-hooks."""
    params = [torch.tensor([1, 1]), torch.tensor([2.0, 3.0])]
    opt = SGD(params, lr=0.1, momentum=0.9)
    log = []
    from torch.optim import optimizer as hooks
    handles = [hooks.register_optimizer_step_pre_hook(
                   lambda o, a, k: log.append("global pre")),
               opt.register_step_pre_hook(lambda o, a, k: log.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: log.append("post")),
               hooks.register_optimizer_step_post_hook(
                   lambda o, a, k: log.append("global post"))]
    opt.step()
    for handle in handles:
        handle.remove()
    opt.step()
    assert log == ["global pre", "pre", "post", "global post"]
    assert torch.equal(params[0], torch.tensor([1, 1]))
    assert torch.equal(params[1], torch.tensor([2.0, 3.0])) and not opt.state


def test_zero_gradients_change_nothing_without_weight_decay():
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_a_group_with_a_tiny_lr_stays_bitwise_put():
    """torch's test_param_groups_lr: the outer lr is 1e-28, one group's is 1e-2."""
    model = Net()
    still = [p.detach().clone() for p in model.fc2.parameters()]
    opt = SGD([{"params": [*model.conv.parameters(), *model.fc1.parameters()], "lr": 1e-2},
               {"params": model.fc2.parameters()}], lr=1e-28)
    train([(model, opt)], batches(5))
    for p, b in zip(model.fc2.parameters(), still):
        assert torch.equal(p, b)


def test_state_dict_is_deterministic_and_loads_into_a_fresh_optimizer():
    """torch's test_state_dict_deterministic, named and unnamed, over torch's inputs: the
    same tensors repacked by each new optimizer, a loaded copy stepping in lockstep, and
    equal state dicts, also with duplicated param groups."""
    weight, bias = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(2))
    x = torch.randn(3)

    def run(opt, w, b):
        opt.zero_grad()
        (w.mv(x) + b).pow(2).sum().backward()
        opt.step()

    for named in (False, True):
        for optim_input in _get_optim_inputs_including_global_cliquey_kwargs(
                "cpu", torch.float32, OUR_INFO, skip=("differentiable",)):
            wrap = (lambda ps: [(f"p{i}", p) for i, p in enumerate(ps)]) if named else list
            opt = SGD(wrap([weight, bias]), **make_kwargs(optim_input.kwargs))
            for _ in range(5):
                run(opt, weight, bias)
            with torch.no_grad():
                weight_c, bias_c = (torch.nn.Parameter(t.clone()) for t in (weight, bias))
            opt_c = SGD(wrap([weight_c, bias_c]), **make_kwargs(optim_input.kwargs))
            opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
            for _ in range(5):
                run(opt, weight, bias)
                run(opt_c, weight_c, bias_c)
                assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
            assert _comparable(opt.state_dict()) == _comparable(opt_c.state_dict())
            opt_c.param_groups.extend(opt_c.param_groups)
            assert opt.state_dict()["param_groups"][-1]["params"] == \
                opt_c.state_dict()["param_groups"][-1]["params"]


def _comparable(state_dict):
    """A state dict with tensors as lists, to compare with ==."""
    if isinstance(state_dict, torch.Tensor):
        return state_dict.tolist()
    if isinstance(state_dict, dict):
        return {k: _comparable(v) for k, v in state_dict.items()}
    if isinstance(state_dict, (list, tuple)):
        return [_comparable(v) for v in state_dict]
    return state_dict


def test_state_is_never_empty_and_copies_keep_public_attributes():
    """torch's test_non_empty_state and test_deepcopy_copies_all_public_attrs; a
    printable optimizer."""
    for optim_input in INPUTS:
        model = Net()
        opt = SGD(model.parameters(), **make_kwargs(optim_input.kwargs))
        train([(model, opt)], batches(2))
        assert all(opt.state[p] for p in opt.state), optim_input.desc
        public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
        clone = copy.deepcopy(opt)
        assert public(clone) == public(opt)
        assert "Parameter Group 0" in repr(opt)


def test_an_older_state_dict_without_the_newer_flags_loads():
    """torch's test_can_load_older_state_dict: groups without foreach, fused, maximize,
    differentiable, ... get them back."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    x = torch.rand(1, 4, 16, 16)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    del old[gm_torch.STATE_KEY]
    for group in old["param_groups"]:
        for flag in SGD_INFO.not_og_supported_flags:
            group.pop(flag, None)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["fused"] is False and opt.param_groups[0]["maximize"] is False
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


@pytest.mark.parametrize("number", [1, 2])
def test_state_dicts_of_the_earlier_extras_formats_load(number):
    """The extras' format numbers from before the state version was shared: 1 (no
    precision or seed: loaded as seed 0) and 2 (the state of version 4)."""
    model = Net()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, seed=5)
    train([(model, opt)], batches(2))
    state = copy.deepcopy(opt.state_dict())
    assert state[gm_torch.STATE_KEY]["format"] == STATE_VERSION
    state[gm_torch.STATE_KEY]["format"] = number
    if number == 1:
        del state[gm_torch.STATE_KEY]["precision"], state[gm_torch.STATE_KEY]["seed"]
    other_model = copy.deepcopy(model)
    other = SGD(other_model.parameters(), lr=0.5, momentum=0.9, seed=3)
    other.load_state_dict(state)
    assert (other.seed, other.param_groups[0]["lr"]) == (5 if number == 2 else 0, 0.05)
    assert other.state_dict()[gm_torch.STATE_KEY]["step_count"] == 2
    train([(model, opt), (other_model, other)], batches(2, seed=2))
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_hooks_and_string_keys():
    """torch's state dict hook tests put a string key into `state`."""
    model = Net()
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    train([(model, opt)], batches(1))
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    opt.register_state_dict_post_hook(lambda o, sd: sd.__setitem__("post", True))
    loaded = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: loaded.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: loaded.append("post"))
    state_dict = opt.state_dict()
    assert state_dict["state"]["test"] == 1 and state_dict["post"] is True
    opt.load_state_dict(state_dict)
    assert loaded == ["pre", "post"] and opt.state["test"] == 1
    train([(model, opt)], batches(1))


def test_torch_compare_between_schedule():
    """The shape of torch's _compare_between: zero_grad every iteration, no backward at
    the third (all grads None: a no-op), a frozen layer for two iterations, a 0-dim
    parameter, and reference values copied into the parameters in place each time."""
    for optim_input in INPUTS:
        torch.manual_seed(2)
        models = [torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                                      torch.nn.Linear(3, 1), torch.nn.Sigmoid())
                  for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        empty = torch.randn(())
        empties = [torch.nn.Parameter(empty.clone()) for _ in range(2)]
        opts = [cls([*model.parameters(), empty], **make_kwargs(optim_input.kwargs))
                for cls, model, empty in zip((torch.optim.SGD, SGD), models, empties)]
        x = torch.randn(4, 2)
        for i in range(7):
            for model, empty, opt in zip(models, empties, opts):
                if i == 3:
                    model[2].requires_grad_(False)
                if i == 5:
                    model[2].requires_grad_(True)
                opt.zero_grad()
                if i != 2:
                    (model(x).sum() + empty * 2).backward()
                opt.step()
            for a, b in zip([*models[1].parameters(), empties[1]],
                            [*models[0].parameters(), empties[0]]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7,
                                           msg=f"{optim_input.desc} iteration {i}")
                with torch.no_grad():
                    a.copy_(b)  # in place: the flat buffer keeps holding it
        assert state_keys(opts[1]) == state_keys(opts[0])


def test_meta_parameters_given_storage_later_are_packed_then():
    """torch's test_fused_error_on_params_on_meta: the optimizer is built on meta
    parameters, then model.to_empty() gives them storage (the same Parameter objects when
    modules swap tensors on conversion; else the optimizer holds the old meta ones, as
    torch.optim.SGD does)."""
    with torch.device("meta"):
        meta = Net()
    opt = SGD(meta.parameters(), lr=0.1, momentum=0.9)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        meta.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    torch.manual_seed(0)
    reference = Net()
    meta.load_state_dict(reference.state_dict())
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    train([(reference, theirs), (meta, opt)], batches(4))
    assert_close(meta.parameters(), reference.parameters(), torch.float32)


# ---- flat buffers: views, gradients from anywhere, one launch --------------------------

def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_steps_reuse_the_prepared_launch(monkeypatch):
    """The backend's step is prepared (Backend.step_function) when what it runs over
    changes, not on every step: a scheduler's new lr is written into the same table."""
    prepared = []
    real_step_function = CpuBackend.step_function
    monkeypatch.setattr(CpuBackend, "step_function", lambda self, *a, **k: (
        prepared.append(a[0].size), real_step_function(self, *a, **k))[1])
    model, reference = Net(), Net()
    reference.load_state_dict(model.state_dict())
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    train([(reference, theirs), (model, opt)], batches(2))
    warmed_up = len(prepared)
    for o in (opt, theirs):
        o.param_groups[0]["lr"] = 0.05
    train([(reference, theirs), (model, opt)], batches(3))
    assert len(prepared) == warmed_up <= 2
    assert_close(model.parameters(), reference.parameters(), torch.float32)


def test_parameters_and_gradients_are_views_of_one_buffer_and_one_launch(monkeypatch):
    launches = []
    real_step_function = CpuBackend.step_function

    def counted_step_function(self, param, *args, **kwargs):
        launch = real_step_function(self, param, *args, **kwargs)
        return lambda *a, **k: (launches.append(param.size), launch(*a, **k))[1]

    monkeypatch.setattr(CpuBackend, "step_function", counted_step_function)
    model = Net()
    layers = dict(model.named_parameters())
    opt = SGD([{"params": [layers["conv.weight"]], "lr": 0.1},
               {"params": [layers["conv.bias"], layers["fc1.weight"]], "momentum": 0.5},
               {"params": [layers["fc1.bias"], layers["fc2.weight"], layers["fc2.bias"]]}],
              lr=0.01, momentum=0.9)
    assert len(_storages(model.parameters())) == 1
    assert dict(model.named_parameters()) == layers  # the same Parameter objects
    train([(model, opt)], batches(3))
    assert len(launches) == 3 and len(set(launches)) == 1  # one launch per step
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    backward(model, batches(1)[0])
    assert len(_storages(p.grad for p in model.parameters())) == 1
    assert len(_storages(opt.state[p]["momentum_buffer"] for p in model.parameters())) == 1
    mixed = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2).double())]
    opt = SGD(mixed, lr=0.5)
    for p in mixed:
        p.grad = torch.ones_like(p)
    launches.clear()
    opt.step()
    assert sorted(launches) == [2, 4]  # one per (device, dtype), each padded to 16 bytes
    assert opt.backends == {("cpu", torch.float32): "cpu", ("cpu", torch.float64): "cpu"}


def test_layouts_are_kept_channels_last_and_complex():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    z = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = SGD([*conv.parameters(), z], lr=0.1, momentum=0.9)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert z.dtype == torch.complex64 and len(_storages([conv.weight, z])) == 1
    theirs_z = torch.nn.Parameter(z.detach().clone())
    theirs = torch.optim.SGD([theirs_z], lr=0.1, momentum=0.9)
    for step in range(4):
        grad = torch.randn(3, 2, dtype=torch.complex64)
        z.grad, theirs_z.grad = grad.clone(), grad.clone()
        opt.step()
        theirs.step()
        torch.testing.assert_close(z, theirs_z, rtol=2e-6, atol=2e-6)
    assert opt.state[z]["momentum_buffer"].dtype == torch.complex64


def _count_copies(monkeypatch):
    """The gradient copies step() makes: one list entry (the number of tensors) per
    torch._foreach_copy_."""
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda views, grads, **kwargs: (
        copies.append(len(views)), real_copy(views, grads, **kwargs))[1])
    return copies


@pytest.mark.parametrize("set_to_none", [True, False])
def test_backward_accumulates_into_the_flat_gradient_without_a_copy(monkeypatch,
                                                                     set_to_none):
    """After opt.zero_grad() every p.grad is a view of one flat gradient buffer (apart
    from the parameters'); backward accumulates into those very tensors, and step()
    copies nothing."""
    theirs_model, ours_model = twins()
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.05, momentum=0.9,
                             weight_decay=1e-3)
    ours = SGD(ours_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    copies = _count_copies(monkeypatch)
    params = list(ours_model.parameters())
    for step, batch in enumerate(batches(4)):
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            opt.zero_grad(set_to_none=set_to_none)
            if opt is ours:
                views = [p.grad for p in params]
                assert all(torch.count_nonzero(view) == 0 for view in views)
            backward(model, batch)
            opt.step()
        assert all(p.grad is view for p, view in zip(params, views))
        (storage,) = _storages(views)
        assert storage not in _storages(params)
        assert_close(params, theirs_model.parameters(), torch.float64, f"step {step + 1}")
    assert copies == []
    assert state_keys(ours) == state_keys(theirs)


@pytest.mark.parametrize("zero", ["model", "opt-none", "opt-zeros", "user-grads",
                                  "create-graph"])
def test_gradients_outside_the_buffer_are_used(monkeypatch, zero):
    """model.zero_grad() (None: autograd's new tensors), the optimizer's zero_grad either
    way, gradients the user assigns, and create_graph=True (autograd replaces the view),
    against torch.optim.SGD; each step copies what came from outside in one call. As in
    torch, a step never replaces a gradient object: after the optimizer's zero_grad the
    gradients are views of one buffer, otherwise the tensors autograd or the user made."""
    theirs_model, ours_model = twins()
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.05, momentum=0.9,
                             weight_decay=1e-3)
    ours = SGD(ours_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    copies = _count_copies(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    for step, batch in enumerate(batches(8)):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype)
                 for p in ours_model.parameters()]
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            if zero == "model":
                model.zero_grad()
            else:
                opt.zero_grad(set_to_none=zero != "opt-zeros")
            if zero == "user-grads":
                for p, grad in zip(model.parameters(), grads):
                    if step % 3 or p.dim() > 1:  # every third step, biases have none
                        p.grad = grad.clone()
            elif zero == "create-graph":
                with warnings.catch_warnings():  # torch warns (once) of a cycle
                    warnings.simplefilter("ignore", UserWarning)
                    x, y = batch
                    F.cross_entropy(model(x), y).backward(create_graph=True)
            else:
                backward(model, batch)
            handed = [p.grad for p in model.parameters()]
            opt.step()
            assert all(p.grad is grad for p, grad in zip(model.parameters(), handed))
        assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64,
                     f"step {step + 1}")
        if zero in ("model", "user-grads", "create-graph"):
            assert len(copies) == step + 1  # one copy per step, of what came from outside
        if zero in ("opt-none", "opt-zeros"):
            assert len(_storages(p.grad for p in ours_model.parameters())) == 1
    assert state_keys(ours) == state_keys(theirs)
    if zero in ("opt-none", "opt-zeros"):
        assert copies == []


class Branchy(Net):
    """Net with a spare layer that the forward uses only while `use_spare` is True."""

    def __init__(self):
        super().__init__()
        self.spare = torch.nn.Linear(10, 4)
        self.use_spare = False

    def forward(self, x):
        hidden = torch.tanh(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        out = self.fc2(hidden)
        return out + self.spare(hidden) if self.use_spare else out


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_layer_out_of_the_forward_is_updated_as_with_torch(set_to_none):
    """A layer the forward does not use gets no gradient: with weight decay and
    momentum it stays bit for bit and gets no momentum buffer, also through
    clip_grad_norm_ (which scales its zero view). Once it has been used: after
    zero_grad() it is left alone again; after zero_grad(set_to_none=False) it has a
    zero gradient, and weight decay and momentum move it, as in torch."""
    torch.manual_seed(0)
    theirs_model = Branchy().double()
    ours_model = copy.deepcopy(theirs_model)
    kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
    theirs = torch.optim.SGD(theirs_model.parameters(), **kwargs)
    ours = SGD(ours_model.parameters(), **kwargs)
    spare = list(ours_model.spare.parameters())

    def run(data, use_spare):
        for batch in data:
            for model, opt in ((theirs_model, theirs), (ours_model, ours)):
                model.use_spare = use_spare
                opt.zero_grad(set_to_none=set_to_none)
                backward(model, batch)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
            assert_close(ours_model.parameters(), theirs_model.parameters(),
                         torch.float64)

    data = batches(9)
    start = [p.detach().clone() for p in spare]
    run(data[:3], use_spare=False)
    assert all(torch.equal(p, s) for p, s in zip(spare, start))
    assert not any(p in ours.state for p in spare)
    assert all(p.grad is not None and not p.grad.any() for p in spare)  # zero views
    run(data[3:6], use_spare=True)
    middle = [(p.detach().clone(), ours.state[p]["momentum_buffer"].clone())
              for p in spare]
    run(data[6:], use_spare=False)
    for p, (value, buffer) in zip(spare, middle):
        moved = not torch.equal(p, value)
        assert moved == (not set_to_none)
        assert torch.equal(ours.state[p]["momentum_buffer"], buffer) == set_to_none
    assert state_keys(ours) == state_keys(theirs)


def test_a_gradient_set_to_none_after_backward_is_left_alone():
    theirs_model, ours_model = twins()
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9,
                             weight_decay=0.1)
    ours = SGD(ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for step, batch in enumerate(batches(4)):
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            opt.zero_grad()
            backward(model, batch)
            if step >= 2:
                model.fc1.weight.grad = None
            opt.step()
        assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64)
    kept = ours_model.fc1.weight.detach().clone()
    for model, opt in ((theirs_model, theirs), (ours_model, ours)):
        model.zero_grad()  # every .grad None: a step changes nothing
        opt.step()
    assert torch.equal(ours_model.fc1.weight, kept)
    assert state_keys(ours) == state_keys(theirs)


def test_a_parameter_frozen_when_packed_gets_gradients_once_thawed():
    """A parameter with requires_grad=False at construction (no hook can watch it yet),
    thawed before a zero_grad() and, in the other model, between zero_grad() and
    backward."""
    theirs_model, ours_model = twins()
    for model in (theirs_model, ours_model):
        model.conv.requires_grad_(False)
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9,
                             weight_decay=0.1)
    ours = SGD(ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    data = batches(5)
    train([(theirs_model, theirs), (ours_model, ours)], data[:2])
    assert not any(p in ours.state for p in ours_model.conv.parameters())
    for model, opt in ((theirs_model, theirs), (ours_model, ours)):
        opt.zero_grad()
        model.conv.requires_grad_(True)  # after zero_grad: autograd's own gradient
        backward(model, data[2])
        opt.step()
    train([(theirs_model, theirs), (ours_model, ours)], data[3:])
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64)
    assert state_keys(ours) == state_keys(theirs)
    assert len(_storages(p.grad for p in ours_model.parameters())) == 1


def _hooks(p):
    return len(p._post_accumulate_grad_hooks or {})


def test_one_hook_per_parameter_and_none_left_by_a_deleted_optimizer():
    model = Net()
    opt = SGD(model.parameters(), lr=0.1)
    assert [_hooks(p) for p in model.parameters()] == [1] * 6
    model.fc1.weight.data = model.fc1.weight.data.clone()  # packed again at the step
    train([(model, opt)], batches(1))
    assert [_hooks(p) for p in model.parameters()] == [1] * 6
    del opt
    gc.collect()
    assert [_hooks(p) for p in model.parameters()] == [0] * 6


def test_none_gradients_leave_parameters_and_buffers_alone():
    """A frozen layer keeps its bits and its momentum buffer; a layer that never had a
    gradient gets no buffer, as with torch.optim.SGD."""
    theirs_model, ours_model = twins()
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ours = SGD(ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ours_model.fc2.bias.requires_grad_(False)
    theirs_model.fc2.bias.requires_grad_(False)
    data = batches(9)
    train([(theirs_model, theirs), (ours_model, ours)], data[:3])
    frozen = ours_model.conv.weight.detach().clone()
    frozen_buffer = ours.state[ours_model.conv.weight]["momentum_buffer"].clone()
    for model in (theirs_model, ours_model):
        model.conv.requires_grad_(False)
    train([(theirs_model, theirs), (ours_model, ours)], data[3:6])
    assert torch.equal(ours_model.conv.weight, frozen)
    assert torch.equal(ours.state[ours_model.conv.weight]["momentum_buffer"], frozen_buffer)
    for model in (theirs_model, ours_model):
        model.conv.requires_grad_(True)
    train([(theirs_model, theirs), (ours_model, ours)], data[6:])
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float64)
    assert ours_model.fc2.bias not in ours.state
    assert state_keys(ours) == state_keys(theirs)


def test_moved_parameters_are_packed_again():
    """p.data = ..., model.double() and a reshape after construction: found at the next
    step and packed again, values, gradients and momentum buffers kept."""
    theirs_model, ours_model = twins(torch.float32)
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.05, momentum=0.9)
    ours = SGD(ours_model.parameters(), lr=0.05, momentum=0.9)
    data = batches(8, torch.float32)
    train([(theirs_model, theirs), (ours_model, ours)], data[:2])
    for model in (theirs_model, ours_model):
        model.fc1.weight.data = model.fc1.weight.data.clone()
    kept = ours_model.fc1.weight.detach().clone()
    for model, opt in ((theirs_model, theirs), (ours_model, ours)):
        opt.zero_grad()
        model.fc2.bias.data = model.fc2.bias.data.clone()  # between zero_grad and step
        model.fc1.requires_grad_(False)  # no gradient: stays as it is, as in torch
        backward(model, data[2])
        opt.step()
        model.fc1.requires_grad_(True)
    assert torch.equal(ours_model.fc1.weight, kept)
    train([(theirs_model, theirs), (ours_model, ours)], data[3:4])
    assert len(_storages(ours_model.parameters())) == 1
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float32)
    for model, opt in ((theirs_model, theirs), (ours_model, ours)):
        model.double()
    for state in theirs.state.values():  # torch keeps float32 buffers; ours converts
        state["momentum_buffer"] = state["momentum_buffer"].double()
    data = batches(4, torch.float64)
    train([(theirs_model, theirs), (ours_model, ours)], data)
    assert ours.backends == {("cpu", torch.float64): "cpu"}
    assert ours.state[ours_model.fc1.weight]["momentum_buffer"].dtype == torch.float64
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float32)


def test_a_reshaped_parameter_is_packed_again():
    p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    opt = SGD([p], lr=0.5)
    p.data = p.data.view(3, 2)  # same memory, new shape
    p.grad = torch.ones(3, 2)
    opt.step()
    assert torch.equal(p.detach(), torch.arange(6.0).reshape(3, 2) - 0.5)


def test_add_param_group_packs_the_new_parameters():
    model = Net()
    opt = SGD(model.conv.parameters(), lr=0.1, momentum=0.9)
    train([(model, opt)], batches(2))
    buffer = opt.state[model.conv.weight]["momentum_buffer"].clone()
    opt.add_param_group({"params": model.fc1.parameters(), "lr": 0.01})
    assert len(_storages([*model.conv.parameters(), *model.fc1.parameters()])) == 1
    assert torch.equal(opt.state[model.conv.weight]["momentum_buffer"], buffer)
    eighth = torch.nn.Parameter(torch.zeros(2, dtype=torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        opt.add_param_group({"params": [eighth]})
    assert len(opt.param_groups) == 2
    train([(model, opt)], batches(2))


# ---- checkpoints -----------------------------------------------------------------------

def test_checkpoints_move_both_ways_mid_training():
    """torch.optim.SGD -> this SGD -> torch.optim.SGD, through torch.save and
    torch.load(weights_only=True), each continuing as if nothing had changed."""
    kwargs = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3}
    reference, _ = twins()
    theirs = torch.optim.SGD(groups_of(reference, True), **kwargs)
    data = batches(15)

    def reload(state_dict):
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    train([(reference, theirs)], data[:5])
    ours_model = copy.deepcopy(reference)
    ours = SGD(groups_of(ours_model, True), **kwargs)
    ours.load_state_dict(reload(theirs.state_dict()))
    train([(reference, theirs), (ours_model, ours)], data[5:10])
    assert_close(ours_model.parameters(), reference.parameters(), torch.float64)
    back_model = copy.deepcopy(ours_model)
    back = torch.optim.SGD(groups_of(back_model, True), **kwargs)
    saved = reload(ours.state_dict())
    assert saved[gm_torch.STATE_KEY]["step_count"] == 5
    back.load_state_dict(saved)
    train([(reference, theirs), (ours_model, ours), (back_model, back)], data[10:])
    assert_close(ours_model.parameters(), reference.parameters(), torch.float64)
    assert_close(back_model.parameters(), reference.parameters(), torch.float64)
    assert state_keys(back) == state_keys(theirs) == state_keys(ours)


def test_a_bad_state_dict_changes_nothing():
    model = Net()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    train([(model, opt)], batches(2))
    good = opt.state_dict()
    before = _comparable(good)
    bad = copy.deepcopy(good)
    bad["state"][0]["momentum_buffer"] = torch.zeros(7)
    with pytest.raises(ValueError, match="Invalid momentum_buffer value: shape"):
        opt.load_state_dict(bad)
    for case, pattern in (({**copy.deepcopy(good), "gpu_momentum": {"format": 9}},
                           "Invalid gpu_momentum format value: 9"),
                          ({**copy.deepcopy(good), "gpu_momentum": {"format": 2}},
                           "Invalid gpu_momentum value"),
                          ({**copy.deepcopy(good), "gpu_momentum": {
                              **good["gpu_momentum"], "style": "classic"}},
                           "style='torch'")):
        with pytest.raises(ValueError, match=pattern):
            opt.load_state_dict(case)
    assert _comparable(opt.state_dict()) == before
    train([(model, opt)], batches(1))


def test_copies_and_pickles_step_on_their_own():
    model = Net()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, style="classic")
    train([(model, opt)], batches(2))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.style == "classic" and clone.step_count == 2
        params = [p for g in clone.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        clone.step()
        assert clone.step_count == 3 and clone.backends
        assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert opt.step_count == 2


# ---- GradScaler ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["unscale_", "amp-scaling"])
def test_grad_scaler_skips_overflowing_steps_as_with_torch(path):
    """GradScaler("cpu") with infs injected (the first step among them): the scale evolves
    exactly as with torch.optim.SGD, and so do the parameters. "amp-scaling": the
    optimizer gets GradScaler's grad_scale and found_inf (_step_supports_amp_scaling)."""
    overflows = {0, 3, 4, 9}
    runs = []
    for cls in (torch.optim.SGD, SGD):
        torch.manual_seed(0)
        model = Net()
        opt = cls(model.parameters(), lr=0.05, momentum=0.9, dampening=0.1,
                  weight_decay=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        scales = []
        for step, batch in enumerate(batches(14, torch.float32)):
            opt.zero_grad()
            backward(model, batch, scaler.scale(torch.tensor(1.0)))
            if step in overflows:
                next(model.parameters()).grad.view(-1)[0] = math.inf
            if path == "unscale_":
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        runs.append((model, opt, scales))
    (theirs_model, theirs, theirs_scales), (ours_model, ours, ours_scales) = runs
    assert ours._step_supports_amp_scaling
    assert ours_scales == theirs_scales
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float32)
    assert state_keys(ours) == state_keys(theirs)
    if path == "amp-scaling":
        assert (ours.step_count, ours.skipped_steps) == (10, 4)


def test_skip_nonfinite_on_the_cpu_keeps_first_steps_first():
    p = torch.nn.Parameter(torch.ones(5))
    opt = SGD([p], lr=0.1, momentum=0.9, skip_nonfinite=True)
    p.grad = torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(5)) and not opt.state
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.step_count == 0
    p.grad = torch.full((5,), 2.0)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((5,), 0.8))
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full((5,), 2.0))
    assert opt.step_count == 1 and not opt.last_step_skipped


# ---- GPU (CUDA tensors: cupy, numba-cuda) ----------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason=f"torch {torch.__version__} has no usable CUDA device")
@pytest.mark.parametrize("backend", ["auto", "numba-cuda"])
def test_cuda_steps_queue_on_torchs_current_stream_without_syncing(backend):
    theirs_model, ours_model = twins(torch.float32, "cuda")
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.05, momentum=0.9)
    ours = SGD(ours_model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    stream = torch.cuda.Stream()
    data = batches(6, torch.float32, "cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for batch in data:
            for model, opt in ((theirs_model, theirs), (ours_model, ours)):
                opt.zero_grad()
                backward(model, batch)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert_close(ours_model.parameters(), theirs_model.parameters(), torch.float32)
    assert not ours._step_supports_amp_scaling


# ---- torch stays optional --------------------------------------------------------------

def test_gpu_momentum_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import gpu_momentum, gpu_momentum.bench.candidates\n"
            "try:\n    import gpu_momentum.torch\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=library_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gpu_momentum.torch needs PyTorch" in done.stdout

"""gpu_momentum.torch.differentiable (the differentiable=True path) against
torch.optim.SGD(differentiable=True): torch's own SGD inputs over a few steps of a
meta-learning loop (parameters, momentum buffers and the gradients of a later loss with
respect to the starting values and to tensor hyperparameters, bit for bit), gradcheck
through one step (as torch's TestDifferentiableOptimizer does), and torch's
conventions: the first step's buffer, None gradients, gradients never replaced, the
leaf parameter torch refuses."""

import collections
import copy

import pytest

from harness import require

torch = require("torch")
require("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_optimizers import optim_inputs_func_sgd  # noqa: E402

from gpu_momentum.torch import SGD  # noqa: E402
from gpu_momentum.torch.differentiable import sgd_update, step_param_groups  # noqa: E402

# Meta-learning steps non-leaf copies, whose .grad torch warns about reading.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
F = torch.nn.functional
TORCH_INPUTS = optim_inputs_func_sgd(device="cpu")
GROUP_DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                  "nesterov": False, "maximize": False}


class GroupStepper:
    """Drives step_param_groups as an optimizer would: one param group, torch's default
    values, a state of per-parameter dicts."""

    def __init__(self, params, **kwargs):
        self.param_groups = [{**GROUP_DEFAULTS, **kwargs, "params": list(params)}]
        self.state = collections.defaultdict(dict)

    def step(self):
        step_param_groups(self.param_groups, self.state)


def hyperparameter_tensors(kwargs):
    """The tensor values among kwargs that require grad (their gradients are compared)."""
    return [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def meta_learning_run(make_stepper, kwargs, steps=3):
    """Three inner steps on non-leaf copies of two leaf tensors, gradients with a graph
    (create_graph=True), then the gradient of a final loss with respect to the leaves and
    to the hyperparameters that require grad: (parameters, momentum buffers, those
    gradients)."""
    torch.manual_seed(0)
    leaves = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True)]
    kwargs = copy.deepcopy(kwargs)
    params = [leaf.clone() for leaf in leaves]
    stepper = make_stepper(params, **kwargs)
    generator = torch.Generator().manual_seed(1)

    def loss():
        x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
        y = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        return F.mse_loss(torch.tanh(x @ params[0] + params[1]), y)

    for _ in range(steps):
        grads = torch.autograd.grad(loss(), params, create_graph=True)
        for p, grad in zip(params, grads):
            p.grad = grad
        stepper.step()
    inputs = [*leaves, *hyperparameter_tensors(kwargs)]
    meta_grads = torch.autograd.grad(loss(), inputs, allow_unused=True)
    buffers = [stepper.state[p].get("momentum_buffer") for p in params]
    return params, buffers, meta_grads


def assert_identical(ours, theirs, what):
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a is None, f"{what} {index}: torch has none"
        else:
            assert torch.equal(a, b), f"{what} {index} differs by {(a - b).abs().max():.3g}"


EXTRA_INPUTS = {
    "lr that requires grad": {"lr": torch.tensor(0.05, dtype=torch.float64,
                                                 requires_grad=True)},
    # The next step's in-place buffer update overwrites what the lr's gradient needs: the
    # backward raises, in torch as here.
    "lr that requires grad, momentum": {
        "lr": torch.tensor(0.05, dtype=torch.float64, requires_grad=True), "momentum": 0.9},
    "weight_decay that requires grad": {
        "weight_decay": torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
        "momentum": 0.5, "dampening": 0.25},
    "both require grad, nesterov, maximize": {
        "lr": torch.tensor([0.02], dtype=torch.float64, requires_grad=True),
        "weight_decay": torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
        "momentum": 0.9, "nesterov": True, "maximize": True},
}
INPUTS = {**{i.desc: i.kwargs for i in TORCH_INPUTS}, **EXTRA_INPUTS}


def outcome(make_stepper, kwargs):
    """meta_learning_run's result, or the type and message of what it raised."""
    try:
        return meta_learning_run(make_stepper, kwargs)
    except RuntimeError as error:
        return type(error), str(error)


# What steps: the path's function, and the optimizer that routes to it.
STEPPERS = {"step_param_groups": GroupStepper,
            "SGD": lambda params, **kw: SGD(params, differentiable=True, **kw)}


@pytest.mark.parametrize("stepper", STEPPERS)
@pytest.mark.parametrize("desc", INPUTS)
def test_meta_learning_steps_are_torch_sgds(desc, stepper):
    kwargs = INPUTS[desc]
    ours = outcome(STEPPERS[stepper], kwargs)
    theirs = outcome(
        lambda params, **kw: torch.optim.SGD(params, differentiable=True, **kw), kwargs)
    if isinstance(theirs[0], type):
        assert ours == theirs
        return
    for what, a, b in zip(("parameter", "momentum buffer", "meta-gradient"), ours, theirs):
        assert_identical(a, b, f"{desc}: {what}")
    assert any(g is not None and g.abs().max() > 0 for g in ours[2]), desc  # it flowed


def one_step(kwargs):
    """(p, grad, momentum_buffer, *hyperparameters) -> (new p, new momentum buffer), for
    gradcheck: one step of sgd_update on copies, so the inputs stay as they were."""
    tensor_names = [name for name, value in kwargs.items()
                    if isinstance(value, torch.Tensor)]

    def step(p, grad, buffer, *tensors):
        values = {**GROUP_DEFAULTS, **kwargs, **dict(zip(tensor_names, tensors))}
        p, grad, buffers = p.clone(), grad.clone(), [buffer.clone()]
        sgd_update([p], [grad], buffers, **values)
        return p, buffers[0]

    return step, [kwargs[name] for name in tensor_names]


GRADCHECK_CASES = {
    "torch's test_sgd (lr 0.9)": {"lr": 0.9},
    "momentum, dampening, weight_decay": {"lr": 0.3, "momentum": 0.8, "dampening": 0.2,
                                          "weight_decay": 0.1},
    "nesterov, maximize": {"lr": 0.3, "momentum": 0.9, "nesterov": True, "maximize": True,
                           "weight_decay": 0.05},
    "lr and weight_decay that require grad": {
        "lr": torch.tensor(0.4, dtype=torch.float64, requires_grad=True),
        "weight_decay": torch.tensor(0.9, dtype=torch.float64, requires_grad=True),
        "momentum": 0.7},
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradients_through_one_step_pass_gradcheck(case):
    torch.manual_seed(2)
    p, grad, buffer = (torch.rand(10, dtype=torch.float64, requires_grad=True)
                       for _ in range(3))
    step, tensors = one_step(GRADCHECK_CASES[case])
    assert torch.autograd.gradcheck(step, (p, grad, buffer, *tensors))


@pytest.mark.parametrize("kwargs", [{"lr": 0.9}, {"lr": 0.3, "momentum": 0.9,
                                                  "weight_decay": 0.1, "nesterov": True}],
                         ids=["torch's test_sgd", "momentum, nesterov"])
def test_gradients_through_the_optimizers_step_pass_gradcheck(kwargs):
    """torch's TestDifferentiableOptimizer.test_sgd, through SGD(differentiable=True):
    a fresh optimizer on a copy of p, given the gradient and the momentum buffer in its
    state, one step; gradcheck of (new p, new buffer)."""
    torch.manual_seed(3)
    inputs = [torch.rand(10, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def step(p, grad, buffer):
        p = p.clone()
        p.grad = grad
        opt = SGD([p], differentiable=True, **kwargs)
        opt.state[p]["momentum_buffer"] = buffer.clone()
        opt.step()
        return p, opt.state[p]["momentum_buffer"]

    assert torch.autograd.gradcheck(step, inputs)


def test_the_first_buffer_is_the_gradients_value_outside_the_graph():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True).clone()
    grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True) * 1.0
    buffers = [None]
    sgd_update([p], [grad], buffers, lr=0.5, momentum=0.9, dampening=0.3,
               weight_decay=0.0, nesterov=False, maximize=False)
    assert torch.equal(buffers[0], grad.detach())  # dampening is not applied to it
    assert not buffers[0].requires_grad and buffers[0].data_ptr() != grad.data_ptr()
    assert torch.equal(p.detach(), torch.tensor([0.5, 2.0, -0.5], dtype=torch.float64))


def test_a_none_gradient_is_left_alone_without_state():
    params = [torch.ones(2, dtype=torch.float64, requires_grad=True).clone()
              for _ in range(2)]
    params[0].grad = torch.ones(2, dtype=torch.float64)
    stepper = GroupStepper(params, lr=0.5, momentum=0.9)
    stepper.step()
    assert torch.equal(params[1].detach(), torch.ones(2, dtype=torch.float64))
    assert params[1] not in stepper.state and params[0] in stepper.state


def test_gradient_tensors_are_never_replaced_and_hold_what_torchs_hold():
    """With a weight_decay that requires grad torch adds it into `.grad` in place; the
    gradient objects themselves stay."""
    kwargs = {"lr": 0.1, "weight_decay": torch.tensor(0.2, dtype=torch.float64,
                                                      requires_grad=True)}
    runs = []
    for make in (GroupStepper,
                 lambda params, **kw: torch.optim.SGD(params, differentiable=True, **kw)):
        p = torch.arange(3.0, dtype=torch.float64, requires_grad=True).clone()
        grad = torch.full((3,), 0.5, dtype=torch.float64)
        p.grad = grad
        make([p], **kwargs).step()
        assert p.grad is grad
        runs.append((p.detach(), grad))
    assert_identical(runs[0], runs[1], "parameter and gradient")


def test_a_leaf_parameter_is_refused_as_torch_refuses_it():
    errors = []
    for make in (GroupStepper,
                 lambda params, **kw: torch.optim.SGD(params, differentiable=True, **kw)):
        p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        p.grad = torch.ones(2, dtype=torch.float64)
        with pytest.raises(RuntimeError) as error:
            make([p], lr=0.1).step()
        errors.append(str(error.value))
        assert torch.equal(p.detach(), torch.ones(2, dtype=torch.float64))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("name, value", [("l1", 0.01), ("decoupled_weight_decay", True)])
def test_options_torch_lacks_are_refused_before_anything_changes(name, value):
    params = [torch.ones(2, dtype=torch.float64, requires_grad=True).clone()
              for _ in range(2)]
    for p in params:
        p.grad = torch.ones(2, dtype=torch.float64)
    stepper = GroupStepper(params[:1], lr=0.5, momentum=0.9)
    stepper.param_groups.append({**GROUP_DEFAULTS, "params": params[1:], name: value})
    with pytest.raises(ValueError, match=f"Invalid {name} value: {value!r} in param "
                                         f"group 1"):
        stepper.step()
    assert all(torch.equal(p.detach(), torch.ones(2, dtype=torch.float64)) for p in params)
    assert not stepper.state

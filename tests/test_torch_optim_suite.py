"""The numerical checks of torch's optimizer suite (test/test_optim.py, TestOptimRenewed)
as they run on SGD on the CPU, with gpu_momentum.torch.SGD in torch.optim.SGD's place,
over the configurations torch runs them with (torch's SGD inputs from
torch.testing._internal.common_optimizers, with fused switched on where torch switches
it on): directions of descent with param groups and schedulers, complex parameters,
foreach and fused against the for loop (zero-size parameters, every float dtype, another
default dtype), found_inf, tensor lr, sparse gradients. Where torch checks only a
direction (the loss went down), the parameters are also compared with torch.optim.SGD's
under the same arguments. The suite's behaviour checks (hooks, state dicts, copies) are
in tests/test_torch_optim_behaviours.py, its error inputs in tests/test_torch_sgd.py
(test_torch_error_inputs_raise_what_torch_raises). Of TestDifferentiableOptimizer
(test/optim/test_optim.py), test_sgd's gradcheck is in tests/test_torch_differentiable.py;
the checks over torch's inputs and through tensor hyperparameters are here. Deliberate
differences (docs/pytorch.md, Differences) are asserted as documented: complex
parameters and sparse gradients are taken where torch's fused SGD raises."""

import numba  # noqa: F401  (before torch: two OpenMP runtimes in one process stall)
import functools

import pytest

from harness import require

torch = require("torch")
from torch_threads import one_thread  # noqa: E402,F401  (autouse: one thread each)
require("expecttest")  # torch.testing._internal imports it
from torch.nn import Parameter  # noqa: E402
from torch.optim import lr_scheduler  # noqa: E402
from torch.testing._internal.common_optimizers import (  # noqa: E402
    _get_optim_inputs_including_global_cliquey_kwargs)

from gpu_momentum.torch import SGD  # noqa: E402
from torch_optim_inputs import (SGD_INFO, assert_same_values, fresh,  # noqa: E402
                                linear_loss, plain_configs, torch_configs)


def configs(dtype=torch.float32):
    """torch's configurations without differentiable=True, which torch's suite skips in
    these tests (see tests/test_torch_differentiable.py for that path)."""
    return torch_configs(skip=("differentiable",), dtype=dtype)


def rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


# ---- test_errors: torch's error inputs are tests/test_torch_sgd.py's; what follows one -

def test_a_parameter_twice_in_one_group_warns_and_is_updated_once():
    """The duplicate-parameter error input steps on: torch warns; ours warns too and then
    (docs/pytorch.md, Differences) updates the parameter once per step, as torch.optim.SGD
    updates a parameter given once."""
    ends = []
    for twice in (True, False):
        param = Parameter(torch.ones(3))
        if twice:
            with pytest.warns(UserWarning, match="a parameter group with duplicate "
                                                 "parameters"):
                opt = SGD([param, param], lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
        for _ in range(3):
            param.grad = torch.full((3,), 0.5)
            opt.step()
        ends.append(param.detach().clone())
    assert_same_values(ends[0], ends[1])


# ---- directions: test_forloop_goes_right_direction, the param group tests -------------

def scheduler_list_id(index):
    return "+".join(make(torch.optim.SGD([torch.zeros(1)])).__class__.__name__
                    for make in SGD_INFO.scheduler_inputs[index])


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(loss.detach())  # torch passes the loss; detached: no warning
        else:
            scheduler.step()


@pytest.mark.parametrize("schedulers", [None, *range(len(SGD_INFO.scheduler_inputs))],
                         ids=lambda i: "no_lrsched" if i is None else scheduler_list_id(i))
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("kwargs", plain_configs())
def test_the_for_loop_configurations_go_the_right_way_as_torchs(kwargs, contiguous,
                                                                 schedulers):
    """test_forloop_goes_right_direction (foreach=False; strided parameters are views into
    larger tensors; with_lrsched: each of torch's SGD scheduler lists): 20 steps lower
    the loss (raise it with maximize), ending where torch.optim.SGD ends."""
    ends, values = [], []
    makers = [] if schedulers is None else SGD_INFO.scheduler_inputs[schedulers]
    for cls in (SGD, torch.optim.SGD):
        torch.manual_seed(0)
        if contiguous:
            weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        else:
            weight = Parameter(torch.randn(10, 5, 2)[..., 0])
            bias = Parameter(torch.randn(10, 2)[..., 0])
        inputs = torch.randn(5)
        opt = cls([weight, bias], **fresh(kwargs), foreach=False)
        made = [make(opt) for make in makers]

        def closure():
            opt.zero_grad()
            loss = linear_loss(weight, bias, inputs)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = closure()
            opt.step()
            step_schedulers(made, loss)
        values.append((initial, closure().item()))
        ends.append((weight.detach().clone(), bias.detach().clone()))
    (initial, final), _ = values
    assert final > initial if kwargs.get("maximize") else final < initial
    for ours, torchs in zip(*ends):
        assert_same_values(ours, torchs)


@pytest.mark.parametrize("kwargs", configs())
def test_a_group_without_weight_decay_beside_one_with_it_as_torchs(kwargs):
    """test_param_groups_weight_decay: the weight's group with the configuration, the
    bias's with weight_decay 0; the loss moves the configured way over 20 steps, and the
    parameters end where torch.optim.SGD's do."""
    ends = []
    for cls in (SGD, torch.optim.SGD):
        torch.manual_seed(1)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        inputs = torch.randn(5)
        opt = cls([dict(params=[weight], **fresh(kwargs)),
                   dict(params=[bias], **{**fresh(kwargs), "weight_decay": 0.0})])
        initial = linear_loss(weight, bias, inputs).item()
        for _ in range(20):
            opt.zero_grad()
            loss = linear_loss(weight, bias, inputs)
            loss.backward()
            opt.step()
        ends.append((loss.item(), weight.detach().clone(), bias.detach().clone()))
    final = ends[0][0]
    assert final > initial if kwargs.get("maximize") else final < initial
    for ours, torchs in zip(ends[0][1:], ends[1][1:]):
        assert_same_values(ours, torchs)


@pytest.mark.parametrize("kwargs", configs())
def test_a_group_with_a_tiny_lr_stays_put_beside_one_that_learns(kwargs):
    """test_param_groups_lr: outer lr 1e-28 for a group given random gradients (it must
    not move at all in float32), the configuration's lr (1e-3 if it has none) for the
    other, whose loss moves the configured way, ending where torch.optim.SGD's ends."""
    kwargs = fresh(kwargs)
    if not torch.is_tensor(kwargs.get("lr")) and not kwargs.get("lr"):
        kwargs["lr"] = 1e-3
    ends = []
    for cls in (SGD, torch.optim.SGD):
        torch.manual_seed(2)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        irrelevant = Parameter(torch.randn(2))
        irrelevant_before = irrelevant.detach().clone()
        inputs = torch.randn(5)
        opt = cls([dict(params=[weight, bias], **fresh(kwargs)),
                   dict(params=[irrelevant])], lr=1e-28)
        initial = linear_loss(weight, bias, inputs).item()
        for _ in range(20):
            opt.zero_grad()
            loss = linear_loss(weight, bias, inputs)
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            opt.step()
        assert torch.equal(irrelevant, irrelevant_before)
        ends.append((loss.item(), weight.detach().clone(), bias.detach().clone()))
    final = ends[0][0]
    assert final > initial if kwargs.get("maximize") else final < initial
    for ours, torchs in zip(ends[0][1:], ends[1][1:]):
        assert_same_values(ours, torchs)


@pytest.mark.parametrize("schedulers", range(len(SGD_INFO.scheduler_inputs)),
                         ids=scheduler_list_id)
def test_param_groups_under_torchs_schedulers_go_the_right_way(schedulers):
    """test_param_group_with_lrscheduler_goes_right_direction: two groups (the default lr
    and 0.01) under each of torch's SGD scheduler combinations, 20 closure steps: the
    loss falls, and the parameters end where torch.optim.SGD's do."""
    ends = []
    for cls in (SGD, torch.optim.SGD):
        torch.manual_seed(3)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        inputs = torch.randn(5)
        opt = cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        made = [make(opt) for make in SGD_INFO.scheduler_inputs[schedulers]]

        def closure():
            opt.zero_grad()
            loss = linear_loss(weight, bias, inputs)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            step_schedulers(made, opt.step(closure))
        assert closure().item() < initial
        ends.append((weight.detach().clone(), bias.detach().clone()))
    for ours, torchs in zip(*ends):
        assert_same_values(ours, torchs)


# ---- complex parameters: test_complex, test_complex_2d ---------------------------------

@pytest.mark.parametrize("kwargs", configs(dtype=torch.complex64))
def test_complex_parameters_step_as_their_real_views(kwargs):
    """test_complex: complex64 parameters (and a real one beside them) take, over three
    steps, exactly the steps of their view_as_real copies in another optimizer, and end
    where torch.optim.SGD's complex parameters end. With fused=True torch raises (its
    fused kernel takes floating-point tensors only); ours, whose fused pass is its only
    path, updates them (docs/pytorch.md, Differences)."""
    torch.manual_seed(4)
    complex_params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
                      torch.randn(10, dtype=torch.complex64, requires_grad=True),
                      torch.randn(10, 5, requires_grad=True)]
    real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone()
                   .requires_grad_() for p in complex_params]
    torch_params = [p.detach().clone().requires_grad_() for p in complex_params]
    opt_complex = SGD(complex_params, **fresh(kwargs))
    opt_real = SGD(real_params, **fresh(kwargs))
    if kwargs.get("fused"):  # torch's fused SGD refuses complex parameters; ours takes them
        refused = torch.randn(3, dtype=torch.complex64, requires_grad=True)
        refused.grad = torch.ones_like(refused)
        with pytest.raises(RuntimeError, match="floating point Tensors"):
            torch.optim.SGD([refused], **fresh(kwargs)).step()
    opt_torch = torch.optim.SGD(torch_params, **{**fresh(kwargs), "fused": False})
    for _ in range(3):
        for c, r, t in zip(complex_params, real_params, torch_params):
            r.grad = torch.randn_like(r)
            c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
            t.grad = c.grad.clone()
        for opt in (opt_complex, opt_real, opt_torch):
            opt.step()
        for c, r in zip(complex_params, real_params):
            assert torch.equal(torch.view_as_real(c) if c.is_complex() else c, r)
    for c, t in zip(complex_params, torch_params):
        assert_same_values(c, t)


@pytest.mark.parametrize("kwargs", configs(dtype=torch.complex64))
def test_a_complex_parameter_steps_as_its_real_and_imaginary_parts(kwargs):
    """test_complex_2d: a complex pair under the Rosenbrock function (its absolute value)
    against its real and imaginary parts as two real parameters: ten steps, equal
    gradients and equal parameters after each (NaN where both diverge, as torch's
    assertEqual counts them equal)."""
    torch.manual_seed(5)
    pair = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    real = pair.real.detach().clone().requires_grad_()
    imag = pair.imag.detach().clone().requires_grad_()
    opt_complex = SGD([pair], **fresh(kwargs))
    opt_parts = SGD([real, imag], **fresh(kwargs))
    for _ in range(10):
        opt_complex.zero_grad()
        opt_parts.zero_grad()
        rosenbrock(pair).abs().backward()
        rosenbrock(torch.complex(real, imag)).abs().backward()
        assert_same_values(pair.grad.real, real.grad, equal_nan=True)
        assert_same_values(pair.grad.imag, imag.grad, equal_nan=True)
        opt_complex.step()
        opt_parts.step()
        assert_same_values(pair.real, real, equal_nan=True)
        assert_same_values(pair.imag, imag, equal_nan=True)


# ---- foreach / fused against the for loop: _test_derived_optimizers --------------------

def derived_run(cls, kwargs, dtype, steps=7):
    """torch's _test_derived_optimizers run: a small model, then a 0-dim parameter (torch
    makes it with torch.empty, so only its dtype is compared there; here it holds 0.5)
    and a zero-size one, each with a gradient set once; seven steps after zero_grad, the
    third without a backward, the second linear layer frozen (requires_grad False) for
    the fourth and fifth. Returns the parameters and the optimizer."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                                torch.nn.Linear(3, 1), torch.nn.Sigmoid()).to(dtype)
    scalar = torch.tensor(0.5, dtype=dtype, requires_grad=True)
    empty = torch.empty(0, dtype=dtype, requires_grad=True)
    params = [*model.parameters(), scalar, empty]
    for p in (scalar, empty):
        p.grad = torch.rand_like(p)
    opt = cls(params, **kwargs)
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    for step in range(steps):
        opt.zero_grad()
        if step in (3, 5):
            model[2].requires_grad_(step == 5)
        if step != 2:
            model(inputs).sum().backward()
        opt.step()
    return params, opt


def assert_derived_runs_agree(ours, torchs, **tolerance):
    """Parameters and every state entry of torch's equal, to `tolerance`; our momentum
    buffers of 16-bit parameters are float32 (docs/pytorch.md), compared by value."""
    (params, opt), (torch_params, torch_opt) = ours, torchs
    for p, q in zip(params, torch_params):
        assert p.dtype == q.dtype
        assert_same_values(p, q, **tolerance)
        assert set(opt.state.get(p, {})) == set(torch_opt.state.get(q, {}))
        for key, expected in torch_opt.state.get(q, {}).items():
            actual = opt.state[p][key]
            if p.dtype in (torch.float16, torch.bfloat16):
                assert actual.dtype == torch.float32
                actual = actual.to(expected.dtype)
            assert_same_values(actual, expected, **tolerance)


@pytest.mark.parametrize("flag", ["foreach", "fused"])
@pytest.mark.parametrize("kwargs", plain_configs())
def test_foreach_and_fused_match_torchs_for_loop(kwargs, flag):
    """test_foreach_matches_forloop (float64): ours with foreach=True or fused=True
    against torch.optim.SGD's for loop (foreach=False), parameters and state after each
    run, a zero-size parameter and a step without gradients included."""
    ours = derived_run(SGD, {**fresh(kwargs), flag: True}, torch.float64)
    torchs = derived_run(torch.optim.SGD, {**fresh(kwargs), "foreach": False}, torch.float64)
    assert_derived_runs_agree(ours, torchs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16,
                                   torch.float16], ids=str)
@pytest.mark.parametrize("kwargs", plain_configs())
def test_fused_matches_torchs_fused_in_every_float_dtype(kwargs, dtype):
    """test_fused_matches_forloop on the CPU (torch's fused SGD runs there), for the
    dtypes torch runs it with: ours against torch.optim.SGD(fused=True), which computes
    16-bit parameters in float32 too, to torch's tolerance for the dtype."""
    tolerance = {torch.float16: dict(rtol=1e-3, atol=1e-5),
                 torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}.get(dtype, {})
    ours = derived_run(SGD, {**fresh(kwargs), "fused": True}, dtype)
    torchs = derived_run(torch.optim.SGD, {**fresh(kwargs), "fused": True}, dtype)
    assert_derived_runs_agree(ours, torchs, **tolerance)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float16], ids=str)
def test_the_default_dtype_changes_nothing(default_dtype):
    """test_set_default_dtype_works_with_foreach, on the CPU: under another default dtype
    (float64; float16) ours with foreach=True still matches torch's for loop in float64,
    tensor lr included."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        for optim_input in SGD_INFO.optim_inputs_func(device="cpu"):
            ours = derived_run(SGD, {**fresh(optim_input.kwargs), "foreach": True},
                               torch.float64)
            torchs = derived_run(torch.optim.SGD,
                                 {**fresh(optim_input.kwargs), "foreach": False},
                                 torch.float64)
            assert_derived_runs_agree(ours, torchs, rtol=1e-12, atol=1e-14)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("grad_scale", [None, 1.0], ids=["no-grad_scale", "grad_scale"])
@pytest.mark.parametrize("kwargs", plain_configs())
def test_fused_does_not_step_when_found_inf(kwargs, grad_scale):
    """test_fused_does_not_step_if_foundinf: with `found_inf` set on the optimizer (and
    `grad_scale` or None), as GradScaler sets them, fused=True takes no step."""
    params = [torch.ones(1) for _ in range(5)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = SGD(params, fused=True, **fresh(kwargs))
    opt.grad_scale = None if grad_scale is None else torch.full((1,), grad_scale)
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(p, torch.ones(1)) for p in params)
    assert all("momentum_buffer" not in opt.state.get(p, {}) for p in params)


def test_fused_refuses_meta_parameters_as_torch_then_steps_after_to_empty():
    """test_fused_error_on_params_on_meta: with fused=True, a step over meta parameters
    with gradients raises torch's RuntimeError (ours: UnupdatableGradientError, also a
    TypeError) and changes nothing; after zero_grad and model.to_empty() (which gives the
    model new Parameters: the optimizer's stay on meta, without gradients) the step runs,
    as torch's does."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                                    torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    opt = SGD(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be "
                                           "floating point Tensors") as refusal:
        opt.step()
    assert isinstance(refusal.value, TypeError) and not opt.state
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


# ---- tensor lr: test_tensor_lr ---------------------------------------------------------

@pytest.mark.parametrize("kwargs", configs())
def test_a_tensor_lr_steps_as_the_same_float(kwargs):
    """test_tensor_lr: lr=torch.tensor(1e-3) and lr=1e-3 take the same five steps."""
    kwargs = {k: v for k, v in fresh(kwargs).items() if k != "lr"}
    torch.manual_seed(6)
    weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
    weight_t = weight.detach().clone().requires_grad_()
    bias_t = bias.detach().clone().requires_grad_()
    inputs = torch.randn(5)
    opt = SGD([weight, bias], lr=1e-3, **kwargs)
    opt_t = SGD([weight_t, bias_t], lr=torch.tensor(1e-3), **kwargs)
    for _ in range(5):
        for o, w, b in ((opt, weight, bias), (opt_t, weight_t, bias_t)):
            o.zero_grad()
            linear_loss(w, b, inputs).backward()
            o.step()
        assert torch.equal(weight, weight_t) and torch.equal(bias, bias_t)


# ---- sparse gradients: test_rosenbrock_sparse ------------------------------------------

def sparse_configs():
    """test_rosenbrock_sparse's configurations: torch's (without differentiable and
    fused) minus the keys its sparse metadata sets, deduplicated, each then given the
    metadata's lr."""
    updates, _ = SGD_INFO.metadata_for_sparse
    seen, chosen = set(), []
    inputs = _get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", torch.float64, SGD_INFO, skip=("differentiable", "fused"))
    for optim_input in inputs:
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k not in updates}
        key = tuple(sorted(kwargs.items()))
        if kwargs and key not in seen:
            seen.add(key)
            chosen.append(pytest.param({**kwargs, "lr": updates["lr"]},
                                       id="-".join(f"{k}={v}" for k, v in key)))
    return chosen


def coordinate_gradient(param, sparse, x_only):
    """Rosenbrock's gradient at `param` in x or y only: an uncoalesced sparse tensor
    (the value split into two entries at one index) or the dense equivalent."""
    x, y = param.detach().tolist()
    gradient = [-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)]
    index, value = (0, gradient[0]) if x_only else (1, gradient[1])
    if sparse:
        return torch.sparse_coo_tensor(torch.tensor([[index, index]]),
                                       torch.tensor([value / 4.0, value - value / 4.0]),
                                       (2,), dtype=param.dtype,
                                       check_invariants=True)
    dense = torch.zeros(2, dtype=param.dtype)
    dense[index] = value
    return dense


@pytest.mark.parametrize("with_scheduler", [False, True], ids=["", "with_lrsched"])
@pytest.mark.parametrize("kwargs", sparse_configs())
def test_sparse_gradients_descend_as_dense_ones(kwargs, with_scheduler):
    """test_rosenbrock_sparse (and _with_lrsched, torch's StepLR for sparse SGD): 1800
    steps of cyclic coordinate descent on Rosenbrock's function, each step's closure
    running a backward and then replacing the gradient with an uncoalesced sparse one,
    keep the parameters within 5e-6 of the same descent with dense gradients and end
    nearer the solution. As in torch's test, both closures zero the sparse optimizer's
    gradients; foreach=True (only where torch has foreach kernels) adds a parameter."""
    _, scheduler_makers = SGD_INFO.metadata_for_sparse
    scheduler_makers = scheduler_makers if with_scheduler else []
    start = ([torch.tensor([1.5, 1.5])] * (2 if kwargs.get("foreach") else 1))
    sparse_params = [Parameter(t.clone()) for t in start]
    dense_params = [Parameter(t.clone()) for t in start]
    opt_sparse = SGD(sparse_params, **fresh(kwargs))
    opt_dense = SGD(dense_params, **fresh(kwargs))
    schedulers = [make(o) for o in (opt_sparse, opt_dense) for make in scheduler_makers]
    solution = torch.tensor([1.0, 1.0])
    initial = sum(p.detach().dist(solution) for p in sparse_params)

    def closure(params, sparse, x_only):
        opt_sparse.zero_grad()
        loss = sum(rosenbrock(p) for p in params)
        loss.backward()
        for p in params:
            p.grad = coordinate_gradient(p, sparse, x_only)
        return loss

    for step in range(1800):
        opt_sparse.step(functools.partial(closure, sparse_params, True, step % 2))
        opt_dense.step(functools.partial(closure, dense_params, False, step % 2))
        for scheduler in schedulers:
            scheduler.step()
        for s, d in zip(sparse_params, dense_params):
            assert_same_values(s, d, atol=5e-6, rtol=5e-6)
    assert sum(p.detach().dist(solution) for p in sparse_params) <= initial


@pytest.mark.parametrize("kwargs", configs())
def test_a_sparse_gradient_steps_as_its_dense_equal_where_torch_refuses_too(kwargs):
    """Beside torch's checks: a sparse `.grad` (uncoalesced) takes, in every
    configuration, exactly the steps of the dense gradient it stands for, and stays the
    `.grad`, unchanged. torch's for loop agrees where it takes a sparse gradient (a
    sparse momentum buffer there, a dense one here); with weight_decay or fused=True
    torch raises, ours steps (docs/pytorch.md, Differences)."""
    def sparse_gradient():
        return torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]),
                                       torch.tensor([1.0, -2.0, 0.5]), (4,),
                                       check_invariants=True)

    ends = []
    for grad_of in (sparse_gradient, lambda: sparse_gradient().to_dense()):
        param = Parameter(torch.arange(4.0))
        opt = SGD([param], **fresh(kwargs))
        grad = grad_of()
        for _ in range(3):
            param.grad = grad
            opt.step()
            assert param.grad is grad
        ends.append(param.detach().clone())
    assert torch.equal(grad.to_dense(), torch.tensor([0.0, 1.5, 0.0, -2.0]))
    assert torch.equal(ends[0], ends[1])
    param = Parameter(torch.arange(4.0))
    opt = torch.optim.SGD([param], **fresh(kwargs))
    param.grad = sparse_gradient()
    if kwargs.get("weight_decay") or kwargs.get("fused"):
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        return
    for _ in range(3):
        opt.step()
    assert_same_values(ends[0], param)


# ---- TestDifferentiableOptimizer (test/optim/test_optim.py) ----------------------------

def one_differentiable_step(p, grad, state, kwargs, *state_values):
    """A fresh differentiable=True optimizer on a copy of p given `grad` and a copy of
    `state`, one step: the new p and the state tensors that require grad."""
    p = p.clone()
    p.grad = grad
    opt = SGD([p], **kwargs)
    opt.state[p].update({k: v.clone() for k, v in state.items()})
    opt.step()
    return (p, *(v for v in opt.state[p].values() if v.requires_grad))


@pytest.mark.parametrize("kwargs", plain_configs())
def test_a_differentiable_step_from_a_fused_steps_state_passes_gradcheck(kwargs):
    """test_optimizers_differentiable_wrt_params: the state one fused step leaves (from
    state_dict(), none with momentum 0) feeds a differentiable=True step whose outputs
    pass gradcheck with respect to the parameter, the gradient and that state."""
    torch.manual_seed(9)
    mock = torch.rand(10, dtype=torch.float64, requires_grad=True)
    mock.grad = torch.rand_like(mock)
    fused_opt = SGD([mock], **fresh(kwargs))
    fused_opt.step()
    state = fused_opt.state_dict()["state"].get(0, {})
    assert set(state) == ({"momentum_buffer"} if kwargs.get("momentum") else set())
    p, grad = (torch.rand(10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    step_kwargs = {**fresh(kwargs), "differentiable": True}
    assert torch.autograd.gradcheck(
        lambda *inputs: one_differentiable_step(*inputs[:2], state, step_kwargs,
                                                *inputs[2:]),
        (p, grad, *state.values()))


@pytest.mark.filterwarnings(  # torch's test makes the same cycle, on purpose
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("names", [["lr"], ["weight_decay"], ["weight_decay", "lr"]],
                         ids="+".join)
def test_gradients_reach_tensor_hyperparameters_through_two_steps(names):
    """test_differentiable_lr, _weight_decay, _weight_decay_and_lr: two steps of
    differentiable=True (backward with create_graph, step, zero_grad) from a given
    momentum buffer; the last loss, the state and the hyperparameters pass gradcheck
    with respect to the parameter, the gradient, the buffer and the hyperparameters
    (lr 0.001 and weight_decay 0.9 as tensors that require grad)."""
    torch.manual_seed(10)
    params, grad, buffer = (torch.rand(10, dtype=torch.float64, requires_grad=True)
                            for _ in range(3))
    values = [torch.tensor({"lr": 0.001, "weight_decay": 0.9}[name], dtype=torch.float64,
                           requires_grad=True) for name in names]

    def two_steps(params, grad, buffer, *hyperparameters):
        params = params.clone()
        params.grad = grad
        hyperparameters = [h.clone() for h in hyperparameters]
        opt = SGD([params], differentiable=True, **dict(zip(names, hyperparameters)))
        opt.state[params]["momentum_buffer"] = buffer.clone()
        x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0],
                                                                       dtype=torch.float64)
        for _ in range(2):
            loss = torch.nn.functional.mse_loss(x * params.sum(), y)
            loss.backward(inputs=(params,), create_graph=True)
            opt.step()
            opt.zero_grad()
        loss.backward(inputs=tuple(hyperparameters), create_graph=True)
        assert all(h.grad is not None for h in hyperparameters)
        return (loss, *(v for v in opt.state[params].values() if v.requires_grad),
                *hyperparameters)

    assert torch.autograd.gradcheck(two_steps, (params, grad, buffer, *values))

"""The generic behaviours torch's optimizer suite (test/test_optim.py, TestOptimRenewed)
checks on SGD, run over every configuration torch runs them with (torch's SGD inputs
with fused and differentiable each switched on, from
torch.testing._internal.common_optimizers; torch skips differentiable in its state-dict
tests, and so do these), most beside torch.optim.SGD with the same arguments: a step
without gradients is a no-op that runs the hooks, a step with zero gradients, printing,
step hooks and state-dict hooks (return values, prepend), gradient tensors that are never
replaced nor written into, state dicts (deterministic loading, older state dicts, a
number for 'step', torch.save with a weights_only load, named parameters both ways),
deep copies and non-empty state; and, as torch's scheduler tests check, no reference
cycles through the optimizer. The numerical checks of the same suite are in
tests/test_torch_optim_suite.py."""

import numba  # noqa: F401  (before torch: two OpenMP runtimes in one process stall)
import copy
import gc
import io
import warnings

import pytest

from harness import require

torch = require("torch")
from torch_threads import one_thread  # noqa: E402,F401  (autouse: one thread each)
require("expecttest")  # torch.testing._internal imports it
from torch.nn import Parameter  # noqa: E402
from torch.optim import optimizer as optimizer_hooks  # noqa: E402

from gpu_momentum.torch import SGD  # noqa: E402
from torch_optim_inputs import (SGD_INFO, assert_same_values, conv_model,  # noqa: E402
                                fresh, linear_loss, torch_configs)

IMPLEMENTATIONS = {"torch": torch.optim.SGD, "gpu_momentum": SGD}


def outcome(function):
    """function()'s result, or the type and message of what it raised."""
    try:
        return "returned", function()
    except Exception as error:  # noqa: BLE001  (compared with torch's)
        return type(error), str(error)


@pytest.mark.parametrize("kwargs", torch_configs())
def test_a_step_without_gradients_changes_nothing_and_runs_every_hook(kwargs):
    """torch's test_step_is_noop_when_params_have_no_grad and its step hook tests."""
    for name, cls in IMPLEMENTATIONS.items():
        params = [torch.tensor([1.0, 1.0]), torch.tensor([1, 1])]
        opt = cls(params, **copy.deepcopy(kwargs))
        log = []
        handles = [
            optimizer_hooks.register_optimizer_step_pre_hook(
                lambda o, a, k: log.append("global pre")),
            opt.register_step_pre_hook(lambda o, a, k: log.append("pre")),
            opt.register_step_post_hook(lambda o, a, k: log.append("post")),
            optimizer_hooks.register_optimizer_step_post_hook(
                lambda o, a, k: log.append("global post"))]
        loss = torch.tensor([1.0])
        try:
            assert opt.step() is None, name
            assert opt.step(lambda: loss) is loss, name  # a closure's loss is returned
        finally:
            for handle in handles:
                handle.remove()
        opt.step()
        assert log == ["global pre", "pre", "post", "global post"] * 2, name
        assert torch.equal(params[0], torch.tensor([1.0, 1.0])), name
        assert torch.equal(params[1], torch.tensor([1, 1])) and not opt.state, name


@pytest.mark.parametrize("kwargs", torch_configs())
def test_a_step_with_zero_gradients_does_what_torchs_does(kwargs):
    """torch's test_step_is_noop_for_zero_grads: the parameter (a non-leaf copy under
    differentiable=True, as torch steps one) ends where torch's does, or both raise the
    same error."""
    results = []
    for cls in IMPLEMENTATIONS.values():
        torch.manual_seed(0)
        param = torch.randn(5, 1, requires_grad=True)
        stepped = param.clone() if kwargs.get("differentiable") else param

        def step():
            opt = cls([stepped], **copy.deepcopy(kwargs))
            stepped.grad = torch.zeros_like(stepped)
            opt.step()
            return stepped.detach().clone()

        results.append(outcome(step))
    assert results[0][0] == results[1][0] and str(results[0][1]) == str(results[1][1])


@pytest.mark.parametrize("kwargs", torch_configs())
def test_printed_as_torch_prints_it(kwargs):
    """torch's test_optimizer_can_be_printed, and the same text."""
    printed = [repr(cls([torch.nn.Parameter(torch.ones(2))], **copy.deepcopy(kwargs)))
               for cls in IMPLEMENTATIONS.values()]
    assert printed[1] == printed[0]


@pytest.mark.parametrize("kwargs", torch_configs())
def test_state_dict_hooks_run_as_in_torch(kwargs):
    """torch's state dict hook tests: a pre hook that writes into `state`, a post hook
    that edits the dict, load pre and post hooks, then a step."""
    seen = []
    for name, cls in IMPLEMENTATIONS.items():
        param = torch.nn.Parameter(torch.ones(3))
        stepped = param.clone() if kwargs.get("differentiable") else param
        opt = cls([stepped], **copy.deepcopy(kwargs))
        stepped.grad = torch.full((3,), 0.5)
        opt.step()
        log = []
        opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
        opt.register_state_dict_post_hook(lambda o, sd: sd.__setitem__("post", True))
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append("load pre"))
        opt.register_load_state_dict_post_hook(lambda o: log.append("load post"))
        state_dict = opt.state_dict()
        assert state_dict["state"]["test"] == 1 and state_dict["post"] is True, name
        opt.load_state_dict(state_dict)
        assert log == ["load pre", "load post"] and opt.state["test"] == 1, name
        opt.step()
        seen.append(stepped.detach().clone())
    assert torch.equal(seen[1], seen[0])


@pytest.mark.parametrize("kwargs", torch_configs())
def test_gradients_are_never_replaced_nor_written_into(kwargs):
    """torch's test_grads_are_never_inplaced_into, and the gradient object kept: five
    steps leave each `.grad` the tensor assigned, at its version, and the parameter
    where torch's ends."""
    ends = []
    for name, cls in IMPLEMENTATIONS.items():
        torch.manual_seed(0)
        param = torch.randn(5, 1, requires_grad=True)
        stepped = param.clone() if kwargs.get("differentiable") else param
        opt = cls([stepped], **copy.deepcopy(kwargs))
        grad = torch.rand_like(stepped)
        stepped.grad = grad
        version = grad._version
        for _ in range(5):
            opt.step()
            assert stepped.grad is grad and grad._version == version, name
        ends.append(stepped.detach().clone())
    assert torch.equal(ends[1], ends[0])


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "stepped"])
def test_no_reference_cycles_hold_the_optimizer(stepped):
    """torch's scheduler test test_no_cyclic_references: with a scheduler made and
    deleted (and a step taken), nothing refers to the optimizer, and deleting it leaves
    nothing for the garbage collector."""
    param = torch.nn.Parameter(torch.ones(10))
    opt = SGD([param], lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    if stepped:
        param.grad = torch.ones(10)
        opt.step()
        scheduler.step()
    del scheduler
    assert gc.get_referrers(opt) == []
    gc.collect()
    del opt
    assert gc.collect() == 0


@pytest.mark.parametrize("scheduler_first", [True, False], ids=["scheduler-first",
                                                                 "optimizer-first"])
def test_a_scheduler_sees_the_steps_as_with_torch(scheduler_first):
    """torch's scheduler tests wrap optimizer.step to count it: the warning for a
    scheduler stepped before the optimizer comes exactly when torch's comes."""
    warned = []
    for cls in IMPLEMENTATIONS.values():
        param = torch.nn.Parameter(torch.ones(2))
        opt = cls([param], lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        param.grad = torch.ones(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in (scheduler.step, opt.step)[::1 if scheduler_first else -1]:
                step()
        warned.append([str(w.message) for w in caught
                       if "lr_scheduler.step()" in str(w.message)])
    assert warned[1] == warned[0] and bool(warned[0]) == scheduler_first


# ---- state dicts -----------------------------------------------------------------------

def with_names(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def primed(kwargs, steps, named=False):
    """An optimizer over a weight and a bias (given with names if `named`) after `steps`
    closure steps, its closure, the parameters and the input."""
    torch.manual_seed(7)
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inputs = torch.randn(3, requires_grad=True)
    opt = SGD(with_names([weight, bias], named), **fresh(kwargs))

    def closure(o=opt, w=weight, b=bias):
        o.zero_grad()
        loss = linear_loss(w, b, inputs)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return opt, closure, (weight, bias), inputs


def assert_state_dicts_equal(actual, expected):
    """Equal state dicts: the same keys and, at each, equal tensors or equal values."""
    assert type(actual) is type(expected) or isinstance(expected, dict)
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            assert_state_dicts_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_state_dicts_equal(a, e)
    elif torch.is_tensor(expected):
        assert torch.is_tensor(actual) and actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    else:
        assert actual == expected


def without_param_names(state_dict):
    return {**state_dict, "param_groups": [
        {k: v for k, v in group.items() if k != "param_names"}
        for group in state_dict["param_groups"]]}


@pytest.mark.parametrize("named_saving", [False, True], ids=["", "named"])
@pytest.mark.parametrize("named_loading", [False, True], ids=["", "into-named"])
@pytest.mark.parametrize("kwargs", torch_configs(skip=("differentiable",)))
def test_a_loaded_state_dict_steps_in_lockstep_and_saves_the_same(kwargs, named_saving,
                                                                  named_loading):
    """test_state_dict_deterministic: after ten steps, a copy of the parameters under a
    fresh optimizer that loads the state dict takes the same ten steps (equal parameters
    after each), the two state dicts are equal but for the parameter names, and param
    groups appended twice save alike; each optimizer given its parameters with names or
    without."""
    opt, closure, (weight, bias), inputs = primed(kwargs, 10, named_saving)
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = SGD(with_names([weight_c, bias_c], named_loading), **fresh(kwargs))

    def closure_c():
        opt_c.zero_grad()
        loss = linear_loss(weight_c, bias_c, inputs)
        loss.backward()
        return loss

    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        opt.step(closure)
        opt_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_state_dicts_equal(without_param_names(opt_c.state_dict()),
                             without_param_names(opt.state_dict()))
    opt_c.param_groups.extend(opt_c.param_groups)
    assert (without_param_names(opt.state_dict())["param_groups"][-1]
            == without_param_names(opt_c.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("named", [False, True], ids=["", "named"])
@pytest.mark.parametrize("kwargs", torch_configs(skip=("differentiable",)))
def test_an_older_state_dict_without_the_newer_flags_loads(kwargs, named):
    """test_can_load_older_state_dict (parameters given with names too): a state dict
    whose groups lack the flags SGD gained later (maximize, foreach, fused,
    differentiable, capturable) loads, torch's defaults filled in, and the optimizer
    still steps as torch.optim.SGD after the same load."""
    ends = []
    for cls in (SGD, torch.optim.SGD):
        model, inputs = conv_model()
        opt = cls(model.named_parameters() if named else model.parameters(),
                  **fresh(kwargs))

        def forward_backward():
            opt.zero_grad()
            model(inputs).sum().backward()

        for _ in range(3):
            forward_backward()
            opt.step()
        older = copy.deepcopy(opt.state_dict())
        for group in older["param_groups"]:
            for flag in SGD_INFO.not_og_supported_flags:
                group.pop(flag, None)
        opt.load_state_dict(older)
        assert all(group["maximize"] is False and group["fused"] is False
                   for group in opt.param_groups)
        forward_backward()
        opt.step()
        ends.append([p.detach().clone() for p in model.parameters()])
    for ours, torchs in zip(*ends):
        assert_same_values(ours, torchs)


@pytest.mark.parametrize("kwargs", torch_configs(skip=("differentiable",)))
def test_the_state_dict_survives_save_and_a_weights_only_load(kwargs):
    """test_save_load_equality_with_weights_only: torch.save then torch.load, with
    weights_only=False and True, give back an equal state dict (the library's extras
    included)."""
    opt = primed(kwargs, 3)[0]
    state_dict = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        assert_state_dicts_equal(torch.load(buffer, weights_only=weights_only), state_dict)


@pytest.mark.parametrize("kwargs", torch_configs(skip=("differentiable",)))
def test_a_state_dict_with_a_number_for_step_loads(kwargs):
    """test_load_nontensor_step: a state dict whose per-parameter 'step' entries were
    turned into numbers loads and steps (SGD's state holds no 'step': the dict goes back
    as saved)."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = SGD(params, **fresh(kwargs))
    for _ in range(3):
        opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    for p_state in state_dict["state"].values():
        if torch.is_tensor(p_state.get("step")):
            p_state["step"] = p_state["step"].item()
    opt.load_state_dict(state_dict)
    opt.step()


@pytest.mark.parametrize("kwargs", torch_configs(skip=("differentiable",)))
def test_deepcopy_copies_every_public_attribute(kwargs):
    """test_deepcopy_copies_all_public_attrs: a deep copy of a stepped optimizer has the
    same public attributes; and (beyond torch's check) the copy steps its own copies of
    the parameters, leaving the original's alone, as the original steps them."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = SGD(params, **fresh(kwargs))
    for _ in range(3):
        opt.step()

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    twin = copy.deepcopy(opt)
    assert public(twin) == public(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    for a, b in zip(twin_params, params):
        assert a is not b and torch.equal(a, b)
        a.grad = b.grad.clone()  # a deep-copied Parameter has no .grad
    twin.step()
    assert all(torch.equal(p, value) for p, value in zip(params, before))
    opt.step()
    for a, b in zip(twin_params, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", torch_configs())
def test_a_stepped_parameter_has_a_state_entry_that_is_not_empty(kwargs):
    """test_non_empty_state: after one step of a Linear, every entry of `opt.state` holds
    something (with momentum 0 there is no entry at all, as in torch)."""
    model = torch.nn.Linear(5, 5)
    params = list(model.parameters())
    stepped = ([p.clone() for p in params] if kwargs.get("differentiable") else params)
    opt = SGD(stepped, **fresh(kwargs))
    if kwargs.get("differentiable"):  # non-leaf copies, as torch steps them
        for p in stepped:
            p.grad = torch.rand_like(p)
    else:
        opt.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
    opt.step()
    assert all(len(state) > 0 for state in opt.state.values())
    assert bool(opt.state) == bool(kwargs.get("momentum"))


# ---- hooks: test_step_pre_hook, test_step_post_hook, test_step_all_hooks, the state
# dict hooks with return values and prepend --------------------------------------------

@pytest.mark.parametrize("kwargs", torch_configs())
def test_step_hooks_run_until_removed_across_two_optimizers(kwargs):
    """test_step_pre_hook, test_step_post_hook and test_step_all_hooks: global and local
    hooks of two optimizers over the same tensors run in torch's order at each step, and
    not after their handles are removed."""
    params = [torch.tensor([1.0, 1.0])]
    opt = SGD(params, **fresh(kwargs))
    other = SGD(params)
    log = []
    handles = [optimizer_hooks.register_optimizer_step_pre_hook(lambda *a: log.append(0)),
               optimizer_hooks.register_optimizer_step_post_hook(lambda *a: log.append(5))]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: log.append(1)))
            handles.append(o.register_step_post_hook(lambda *a: log.append(2)))
        opt.step()
        other.step()
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    other.step()
    assert log == [0, 1, 2, 5] * 3


def set_lr_in_loaded(lr):
    def hook(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = lr
    return hook


def load_a_changed_copy(optimizer, state_dict):
    changed = copy.deepcopy(state_dict)
    changed["param_groups"][0]["lr"] = 0.003
    return changed


@pytest.mark.parametrize("kwargs", torch_configs())
def test_state_dict_hooks_return_values_and_prepend_as_torchs(kwargs):
    """test_state_dict_post_hook, test_load_state_dict_pre_hook_and_prepend and
    test_load_state_dict_post_hook: a post hook's returned dict is the state dict; a load
    pre hook edits the dict loaded, one returning a dict replaces it, and prepend=True
    runs a hook first; the load post hook sees the loaded lr."""
    param = torch.rand(2, 3, requires_grad=True)
    stepped = param.clone() if kwargs.get("differentiable") else param
    opt = SGD([stepped], **fresh(kwargs))
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))

    def post_hook(optimizer, state_dict):
        ran = state_dict["state"].pop("test", None) == 1
        return {**state_dict, "ran_state_dict_pre_hook": ran}

    opt.register_state_dict_post_hook(post_hook)
    state_dict = opt.state_dict()
    assert state_dict["ran_state_dict_pre_hook"] is True and "test" not in state_dict["state"]
    opt.register_load_state_dict_pre_hook(set_lr_in_loaded(0.002))
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(load_a_changed_copy, prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_post_hook(
        lambda o: o.state.__setitem__("lr_after_load", o.param_groups[0]["lr"]))
    opt.load_state_dict(state_dict)
    assert opt.state["lr_after_load"] == 0.002


# ---- named parameters: test_can_load_from_to_named_state_dict -------------------------

@pytest.mark.parametrize("named_saving", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("named_loading", [True, False], ids=["into-named", "into-unnamed"])
@pytest.mark.parametrize("kwargs", torch_configs(skip=("differentiable",)))
def test_named_and_unnamed_state_dicts_load_into_each_other_as_torchs(
        kwargs, named_saving, named_loading):
    """test_can_load_from_to_named_state_dict: an optimizer built from
    named_parameters() or parameters() saves after three steps; a second one over the
    same model, built either way, loads it; its state dict names the parameters exactly
    as torch's does after the same load, and it steps as torch.optim.SGD's."""
    names, ends = [], []
    for cls in (SGD, torch.optim.SGD):
        model, inputs = conv_model()
        opt = cls(model.named_parameters() if named_saving else model.parameters(),
                  **fresh(kwargs))
        for _ in range(3):
            opt.zero_grad()
            model(inputs).sum().backward()
            opt.step()
        opt2 = cls(model.named_parameters() if named_loading else model.parameters(),
                   **fresh(kwargs))
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt2.zero_grad()
        model(inputs).sum().backward()
        opt2.step()
        names.append([group.get("param_names")
                      for group in opt2.state_dict()["param_groups"]])
        ends.append([p.detach().clone() for p in model.parameters()])
    assert names[0] == names[1]
    if named_saving or named_loading:
        assert names[0] == [["0.weight", "0.bias", "1.weight", "1.bias"]]
    for ours, torchs in zip(*ends):
        assert_same_values(ours, torchs)


def test_the_same_parameters_under_one_optimizer_after_another():
    """How torch's suite reuses its tensors (test_state_dict_deterministic,
    test_step_is_noop_for_zero_grads, test_non_empty_state): the same weight and bias
    under a new optimizer for each of torch's configurations in turn, each stepping ten
    times, then loaded into a twin that keeps in lockstep; the parameters end where
    torch.optim.SGD's end after the same sequence."""
    ends = []
    for cls in (SGD, torch.optim.SGD):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        inputs = torch.randn(3)
        for param in torch_configs(skip=("differentiable",)):
            opt = cls([weight, bias], **fresh(param.values[0]))
            for _ in range(10):
                opt.zero_grad()
                linear_loss(weight, bias, inputs).backward()
                opt.step()
            with torch.no_grad():
                twin = [Parameter(weight.clone()), Parameter(bias.clone())]
            opt_twin = cls(twin, **fresh(param.values[0]))
            opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
            for _ in range(3):
                for o, (w, b) in ((opt, (weight, bias)), (opt_twin, twin)):
                    o.zero_grad()
                    linear_loss(w, b, inputs).backward()
                    o.step()
                assert torch.equal(weight, twin[0]) and torch.equal(bias, twin[1])
        ends.append((weight.detach().clone(), bias.detach().clone()))
    for ours, torchs in zip(*ends):
        assert_same_values(ours, torchs)

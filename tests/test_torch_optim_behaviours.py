"""The generic behaviours torch's optimizer suite (TestOptimRenewed) checks on SGD, run
over every configuration torch runs them with (torch's SGD inputs with foreach, fused
and differentiable each switched on, from torch.testing._internal.common_optimizers),
each beside torch.optim.SGD with the same arguments: a step without gradients is a
no-op that runs the hooks, a step with zero gradients, printing, state-dict hooks, and
gradient tensors that are never replaced nor written into; and, as torch's scheduler
tests check, no reference cycles through the optimizer."""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import copy
import gc
import warnings

import pytest

from harness import require

torch = require("torch")
require("expecttest")  # torch.testing._internal imports it
from torch.optim import optimizer as optimizer_hooks  # noqa: E402
from torch.testing._internal.common_optimizers import (  # noqa: E402
    _get_optim_inputs_including_global_cliquey_kwargs, optim_db)

from gpu_momentum.torch import SGD  # noqa: E402

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
CONFIGS = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, SGD_INFO)
IMPLEMENTATIONS = {"torch": torch.optim.SGD, "gpu_momentum": SGD}


def config_id(optim_input):
    flags = [flag for flag in ("foreach", "fused", "differentiable")
             if optim_input.kwargs.get(flag)]
    return "-".join([optim_input.desc.replace(" ", "_"), *flags])


def configs():
    """torch's configurations as parameters."""
    return [pytest.param(copy.deepcopy(i.kwargs), id=config_id(i)) for i in CONFIGS]


def outcome(function):
    """function()'s result, or the type and message of what it raised."""
    try:
        return "returned", function()
    except Exception as error:  # noqa: BLE001  (compared with torch's)
        return type(error), str(error)


@pytest.mark.parametrize("kwargs", configs())
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


@pytest.mark.parametrize("kwargs", configs())
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


@pytest.mark.parametrize("kwargs", configs())
def test_printed_as_torch_prints_it(kwargs):
    """torch's test_optimizer_can_be_printed, and the same text."""
    printed = [repr(cls([torch.nn.Parameter(torch.ones(2))], **copy.deepcopy(kwargs)))
               for cls in IMPLEMENTATIONS.values()]
    assert printed[1] == printed[0]


@pytest.mark.parametrize("kwargs", configs())
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


@pytest.mark.parametrize("kwargs", configs())
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

"""What PyTorch users write around an optimizer, each beside torch.optim.SGD doing the
same: gradients replaced through `.data` or `set_`, scaled in place, assigned by the user
(and refilled in place later), and edits of `opt.state` (cleared, an entry deleted, a
momentum buffer assigned or scaled in place). After each, gpu_momentum.torch.SGD's
parameters and reported state are torch.optim.SGD's."""

import numba  # noqa: F401  (before torch: two OpenMP runtimes in one process stall)
import collections
import copy
import io

import pytest

from harness import require

torch = require("torch")
from torch_threads import one_thread  # noqa: E402,F401  (autouse: one thread each)
from gpu_momentum.torch import SGD  # noqa: E402

F = torch.nn.functional
HYPERPARAMETERS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
STEPS = 6
# float64 within a few roundings of torch's (the update's order of operations may
# differ by one rounding per step)
TOLERANCE = 1e-15


def twins(**options):
    """The same float64 MLP twice, with torch.optim.SGD and with gpu_momentum.torch.SGD
    (given the library's `options` too): [(model, optimizer), (model, optimizer)],
    torch's first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    theirs, ours = model, copy.deepcopy(model)
    return [(theirs, torch.optim.SGD(theirs.parameters(), **HYPERPARAMETERS)),
            (ours, SGD(ours.parameters(), **HYPERPARAMETERS, **options))]


def backward(model, step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()


def train(pairs, steps=range(STEPS), after_backward=None, before_step=None):
    """The usual loop on each pair; `after_backward(model, opt, step)` runs between the
    backward and the step, `before_step(model, opt, step)` before the zero_grad."""
    for step in steps:
        for model, opt in pairs:
            if before_step is not None:
                before_step(model, opt, step)
            opt.zero_grad()
            backward(model, step)
            if after_backward is not None:
                after_backward(model, opt, step)
            opt.step()


def assert_as_torch(pairs, what=""):
    """Parameters and the momentum buffers state_dict() reports, within TOLERANCE of
    torch.optim.SGD's."""
    (theirs_model, theirs), (ours_model, ours) = pairs
    for index, (a, b) in enumerate(zip(ours_model.parameters(), theirs_model.parameters())):
        error = (a - b).abs().max().item()
        assert error <= TOLERANCE, f"{what}: parameter {index} is {error:.3g} from torch's"
    theirs_state, ours_state = theirs.state_dict()["state"], ours.state_dict()["state"]
    assert ours_state.keys() == theirs_state.keys(), what
    for index, entry in theirs_state.items():
        buffer = ours_state[index]["momentum_buffer"]
        error = (buffer - entry["momentum_buffer"]).abs().max().item()
        assert error <= TOLERANCE, f"{what}: momentum buffer {index} is {error:.3g} from " \
                                   f"torch's"


# ---- gradients ---------------------------------------------------------------------------

def test_grad_data_assigned_a_new_tensor_is_used():
    pairs = twins()

    def halve(model, opt, step):
        for p in model.parameters():
            p.grad.data = p.grad.data * 0.5

    train(pairs, after_backward=halve)
    assert_as_torch(pairs, "p.grad.data = p.grad.data * 0.5")


def test_grad_set_to_a_new_tensor_is_used():
    pairs = twins()

    def halve(model, opt, step):
        for p in model.parameters():
            p.grad.set_(p.grad * 0.5)

    train(pairs, after_backward=halve)
    assert_as_torch(pairs, "p.grad.set_(p.grad * 0.5)")


def test_grad_data_divided_in_place_is_used():
    pairs = twins()

    def average(model, opt, step):
        for p in model.parameters():
            p.grad.data /= 2  # the all-reduce-by-hand idiom: sum, then /= world_size

    train(pairs, after_backward=average)
    assert_as_torch(pairs, "p.grad.data /= 2")


def user_gradients(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for p in model.parameters()]


def test_a_gradient_the_user_assigned_is_never_replaced():
    (_, _), (model, opt) = twins()
    grads = user_gradients(model, 7)
    for p, grad in zip(model.parameters(), grads):
        p.grad = grad
    for _ in range(2):
        opt.step()
        assert all(p.grad is grad for p, grad in zip(model.parameters(), grads))


def test_a_gradient_the_user_assigned_and_refills_in_place_is_used():
    pairs = twins()
    grads = [user_gradients(pairs[0][0], 7) for _ in pairs]
    for (model, opt), mine in zip(pairs, grads):
        for p, grad in zip(model.parameters(), mine):
            p.grad = grad
        opt.step()
    assert_as_torch(pairs, "after the first step")
    for (model, opt), mine in zip(pairs, grads):
        for grad, new in zip(mine, user_gradients(model, 8)):
            grad.copy_(new)  # the same tensor, new values, no new assignment
        opt.step()
    assert_as_torch(pairs, "after refilling the assigned gradients in place")


# ---- opt.state ---------------------------------------------------------------------------

def edit_state_at(step, edit):
    """A before_step that applies `edit(model, opt)` once, before `step`."""
    def before_step(model, opt, current):
        if current == step:
            edit(model, opt)
    return before_step


def test_clearing_the_state_restarts_the_momentum():
    pairs = twins()
    train(pairs, before_step=edit_state_at(3, lambda model, opt: opt.state.clear()))
    assert_as_torch(pairs, "opt.state.clear() before step 3")


def test_deleting_a_parameters_state_restarts_its_momentum():
    pairs = twins()

    def forget_first(model, opt):
        del opt.state[next(model.parameters())]

    train(pairs, before_step=edit_state_at(3, forget_first))
    assert_as_torch(pairs, "del opt.state[p] before step 3")


def test_an_assigned_momentum_buffer_is_used():
    pairs = twins()

    def replace(model, opt):
        for index, p in enumerate(model.parameters()):
            generator = torch.Generator().manual_seed(20 + index)
            opt.state[p]["momentum_buffer"] = torch.randn(
                p.shape, generator=generator, dtype=p.dtype)

    train(pairs, before_step=edit_state_at(3, replace))
    assert_as_torch(pairs, "opt.state[p]['momentum_buffer'] = ... before step 3")


def test_a_momentum_buffer_scaled_in_place_is_used():
    pairs = twins()

    def damp(model, opt):
        for p in model.parameters():
            opt.state[p]["momentum_buffer"].mul_(0.25)

    train(pairs, before_step=edit_state_at(3, damp))
    assert_as_torch(pairs, "opt.state[p]['momentum_buffer'].mul_(0.25) before step 3")


def first_parameter(model):
    return next(model.parameters())


def random_buffer(p, seed=20):
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype)


def replace_state(model, opt):
    opt.state = collections.defaultdict(dict)


def buffer_set_to_none(model, opt):
    opt.state[first_parameter(model)]["momentum_buffer"] = None


def buffer_key_deleted(model, opt):
    del opt.state[first_parameter(model)]["momentum_buffer"]


def entry_assigned_a_dict(model, opt):
    p = first_parameter(model)
    opt.state[p] = {"momentum_buffer": random_buffer(p)}


def buffer_assigned_then_edited_in_place(model, opt):
    p = first_parameter(model)
    opt.state[p]["momentum_buffer"] = random_buffer(p)
    opt.state[p]["momentum_buffer"].mul_(0.5)


STATE_EDITS = [replace_state, buffer_set_to_none, buffer_key_deleted,
               entry_assigned_a_dict, buffer_assigned_then_edited_in_place,
               lambda model, opt: opt.state.clear()]


@pytest.mark.parametrize("options", [{}, {"skip_nonfinite": True}],
                         ids=["host-counted", "counted-in-the-buffer"])
@pytest.mark.parametrize("edit", STATE_EDITS, ids=[
    "state-replaced", "buffer-set-to-none", "buffer-key-deleted", "entry-assigned-a-dict",
    "assigned-then-scaled", "cleared"])
def test_every_kind_of_state_edit_takes_effect_as_in_torch(edit, options):
    """Also where the kernels keep the step counters and which velocities exist in the
    buffer's memory (skip_nonfinite): those learn of the edit too."""
    pairs = twins(**options)
    train(pairs, before_step=edit_state_at(2, edit))
    assert_as_torch(pairs, edit.__name__)
    train(pairs, steps=range(STEPS, STEPS + 2),  # and a second edit later
          before_step=edit_state_at(STEPS + 1, edit))
    assert_as_torch(pairs, f"{edit.__name__}, twice")


def test_a_momentum_buffer_of_the_wrong_shape_raises_at_step_and_changes_nothing():
    (_, _), (model, opt) = twins()
    train([(model, opt)], steps=range(2))
    p = first_parameter(model)
    wrong = torch.zeros(3, dtype=p.dtype)
    opt.state[p]["momentum_buffer"] = wrong
    before = [t.detach().clone() for t in model.parameters()]
    others = list(model.parameters())[1:]
    velocities = [opt.state[t]["momentum_buffer"].clone() for t in others]
    with pytest.raises(ValueError, match=r"Invalid momentum_buffer value: shape \(3,\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert opt.state[p]["momentum_buffer"] is wrong
    assert all(torch.equal(opt.state[t]["momentum_buffer"], v)
               for t, v in zip(others, velocities))


def test_state_edits_are_tracked_in_copies_and_state_dicts_hold_plain_dicts():
    """A deep copy of each optimizer (with its own copies of the parameters) whose state
    is then cleared restarts as torch's does; the state dict holds torch's plain dicts,
    which torch.load(weights_only=True) reads."""
    pairs = twins()
    train(pairs, steps=range(2))
    copies = []
    for _, original in pairs:
        optimizer = copy.deepcopy(original)
        copies.append((list(optimizer.param_groups[0]["params"]), optimizer))
    for params, optimizer in copies:
        optimizer.state.clear()
        for step in range(2):
            optimizer.zero_grad()
            for p, grad in zip(params, user_gradients_like(params, step)):
                p.grad = grad
            optimizer.step()
    for a, b in zip(copies[1][0], copies[0][0]):
        assert (a - b).abs().max() <= TOLERANCE
    state_dict = copies[1][1].state_dict()
    assert all(type(entry) is dict for entry in state_dict["state"].values())
    saved = io.BytesIO()
    torch.save(state_dict, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    assert all(torch.equal(loaded["state"][i]["momentum_buffer"], entry["momentum_buffer"])
               for i, entry in state_dict["state"].items())


def user_gradients_like(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def test_after_zero_grad_a_moved_gradient_view_is_back_over_the_buffer(monkeypatch):
    """p.grad.data = g: the step copies g in; zero_grad() puts the same .grad object back
    over the flat buffer, so later backwards accumulate there and steps copy nothing."""
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda views, grads, **kwargs: (
        copies.append(len(views)), real_copy(views, grads, **kwargs))[1])
    pairs = twins()
    (_, _), (model, opt) = pairs
    opt.zero_grad()
    views = [p.grad for p in model.parameters()]

    def halve_once(model, opt, step):
        if step == 1:
            for p in model.parameters():
                p.grad.data = p.grad.data * 0.5

    train(pairs, after_backward=halve_once)
    assert_as_torch(pairs, "p.grad.data = ... at one step")
    assert copies == [len(views)]  # that step's, one copy of all of them
    assert all(p.grad is view for p, view in zip(model.parameters(), views))
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1

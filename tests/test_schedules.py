"""A learning rate changed at every step: a scalar write into the update table, through
the backend interface (no table rebuilt, no launch prepared again, no array checked
again, nothing allocated), with steps equal bit for bit to a fresh optimizer built at
each step's values; refused values change nothing."""

import numpy as np
import pytest
import torch

import gpu_momentum.optimizer as optimizer_module
import gpu_momentum.torch.buckets as buckets_module
from gpu_momentum import MomentumSGD
from gpu_momentum.backends import REGISTRY
from gpu_momentum.torch import SGD

SCHEDULE = [0.1, 0.05, 0.07, 0.0, 0.02, 0.3]


class Counting:
    """A backend whose calls of interest are counted (delegating everything)."""

    def __init__(self, backend):
        self._backend = backend
        self.calls = {"step_function": 0, "zeros": 0, "upload": 0, "upload_into": 0}
        self.copied_bytes = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def step_function(self, *args, **kwargs):
        self.calls["step_function"] += 1
        return self._backend.step_function(*args, **kwargs)

    def zeros(self, *args):
        self.calls["zeros"] += 1
        return self._backend.zeros(*args)

    def upload(self, array, param):
        self.calls["upload"] += 1
        return self._backend.upload(array, param)

    def upload_into(self, target, array, param):
        self.calls["upload_into"] += 1
        self.copied_bytes.append(np.asarray(array).nbytes)
        return self._backend.upload_into(target, array, param)


@pytest.fixture
def counted_cpu(monkeypatch):
    counting = Counting(REGISTRY["cpu"])
    monkeypatch.setitem(REGISTRY, "cpu", counting)
    checks = []
    for module in (optimizer_module, buckets_module):
        original = module.check_arrays
        monkeypatch.setattr(module, "check_arrays",
                            lambda *a, _original=original, **k: (checks.append(1),
                                                                 _original(*a, **k))[1])
    return counting, checks


def test_momentum_sgd_schedule_moves_only_scalars(counted_cpu):
    counting, checks = counted_cpu
    rng = np.random.default_rng(0)
    param = rng.standard_normal(1024).astype(np.float32)
    grads = [rng.standard_normal(1024).astype(np.float32) for _ in SCHEDULE]
    opt = MomentumSGD(param.copy(), lr=SCHEDULE[0], momentum=0.9, style="torch",
                      backend="cpu")
    opt.step(grads[0])
    opt.step(grads[0])  # the first step's flags are written: warm-up ends
    buffer = grads[0].copy()  # one gradient array, refilled: as a training loop's
    opt.step(buffer)
    before = dict(counting.calls), len(checks)
    for lr, grad in zip(SCHEDULE, grads):
        buffer[...] = grad
        opt.lr = lr
        opt.step(buffer)
    assert counting.calls == before[0] and len(checks) == before[1]


def test_momentum_sgd_schedule_equals_fresh_optimizers():
    rng = np.random.default_rng(1)
    start = rng.standard_normal(1023).astype(np.float32)
    grads = [rng.standard_normal(1023).astype(np.float32) for _ in SCHEDULE]
    scheduled = MomentumSGD(start.copy(), lr=SCHEDULE[0], momentum=0.9, style="torch",
                            weight_decay=0.01, backend="cpu")
    param = start.copy()
    for step, (lr, grad) in enumerate(zip(SCHEDULE, grads)):
        scheduled.lr = lr
        scheduled.step(grad)
        fresh = MomentumSGD(param, lr=lr, momentum=0.9, style="torch", weight_decay=0.01,
                            backend="cpu")
        if step:  # the velocity and step count carried over, at this step's lr
            fresh.load_state_dict({**state, "lr": lr})
        fresh.step(grad)
        state = fresh.state_dict()
        assert scheduled.param.tobytes() == param.tobytes()
        assert scheduled.velocity.tobytes() == fresh.velocity.tobytes()


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("capturable", [False, True])
def test_torch_sgd_scheduler_moves_only_scalars_and_matches_torch(counted_cpu, capturable):
    counting, checks = counted_cpu
    ours, theirs = _model(), _model()
    opt = SGD(ours.parameters(), lr=0.1, momentum=0.9, capturable=capturable)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=100)
                 for o in (opt, ref)]
    x = torch.randn(4, 8)
    for step in range(8):
        if step == 2:
            before = dict(counting.calls), len(checks), list(counting.copied_bytes)
        for model, o, schedule in zip((ours, theirs), (opt, ref), schedules):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
            schedule.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # torch's rounding order
    assert counting.calls == before[0] and len(checks) == before[1]


@pytest.mark.parametrize("set_value", ["item", "update", "attribute-lr"])
@pytest.mark.parametrize("key, value", [("lr", 1e39), ("weight_decay", 1e39),
                                        ("l1", 1e300)])
def test_torch_sgd_refuses_values_float32_cannot_hold(set_value, key, value):
    model = _model()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, l1=0.0)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    velocity = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    if set_value == "item":
        opt.param_groups[0][key] = value
    elif set_value == "update":
        opt.param_groups[0].update({key: value})
    else:
        for group in opt.param_groups:
            group[key] = value
    for _ in range(2):  # refused again at the next step: nothing was taken
        with pytest.raises(ValueError, match=rf"param_groups\[0\]: Invalid {key} value"):
            opt.step()
    for p, b, v in zip(model.parameters(), before, velocity):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["momentum_buffer"], v)
    opt.param_groups[0][key] = 0.0
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("key, value, pattern", [
    ("lr", 1e39, r"Invalid lr value: 1e\+39"),
    ("weight_decay", 3.5e38, r"Invalid weight_decay value"),
    ("momentum", 1.0, r"Invalid momentum value"),
    ("lr", -0.1, r"Invalid lr value"),
])
@pytest.mark.parametrize("how", ["attribute", "item", "update"])
def test_momentum_sgd_refusals_change_nothing(key, value, pattern, how):
    param = np.ones(8, np.float32)
    opt = MomentumSGD(param, lr=0.1, momentum=0.9, groups=[{"params": [0]}],
                      backend="cpu")
    opt.step(np.ones(8, np.float32))
    state = opt.state_dict()
    with pytest.raises(ValueError, match=pattern):
        if how == "attribute":
            setattr(opt, key, value)
            opt.param_groups[0][key] = value
        elif how == "item":
            opt.param_groups[0][key] = value
        else:
            opt.param_groups[0].update({key: value})
    after = opt.state_dict()
    assert {k: v for k, v in after.items() if k != "velocity"} == \
        {k: v for k, v in state.items() if k != "velocity"}

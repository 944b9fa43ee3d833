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
                                        ("l1", 1e300), ("momentum", 1e39)])
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


# Every step's values (the optimizer's own, then its group's): the lr changes each step;
# momentum, weight decay, l1 (a term turned on: the CPU prepares its loop again) and
# nesterov change at some steps.
EVERY_BACKEND_SCHEDULE = [
    ({"lr": 0.1}, {"lr": 0.05}),
    ({"lr": 0.07}, {"lr": 0.02, "momentum": 0.5}),
    ({"lr": 0.03, "weight_decay": 0.01}, {"lr": 0.2}),
    ({"lr": 0.01}, {"lr": 0.2, "l1": 0.001}),
    ({"lr": 0.0, "nesterov": True}, {"lr": 0.11}),
    ({"lr": 0.3}, {"lr": 0.04, "momentum": 0.8}),
]


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_schedule_on_every_backend_equals_fresh_optimizers(backend, capturable):
    """A MomentumSGD whose values change before every step (attribute and group item)
    takes, bit for bit, the steps of a fresh optimizer built at each step's values with
    the state (velocity, counters) carried over."""
    import gpu_momentum as gm

    rng = np.random.default_rng(2)
    sizes = (37, 64)
    start = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(sum(sizes) + 8).astype(np.float32)
             for _ in EVERY_BACKEND_SCHEDULE]

    def flat_params():
        flat = gm.FlatParams.from_arrays([backend.from_numpy(a) for a in start])
        return flat

    base = {"momentum": 0.9, "style": "torch", "capturable": capturable,
            "backend": backend.name}
    scheduled_flat = flat_params()
    scheduled = gm.MomentumSGD(scheduled_flat, lr=0.1, groups=[{"params": [1]}], **base)
    own = {"lr": 0.1}
    # every option of the group: a fresh optimizer's groups would take its own values
    group = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "l1": 0.0, "nesterov": False}
    fresh_flat, state = flat_params(), None
    for step, ((own_change, group_change), grad) in enumerate(
            zip(EVERY_BACKEND_SCHEDULE, grads)):
        own, group = {**own, **own_change}, {**group, **group_change}
        for key, value in own_change.items():
            setattr(scheduled, key, value)
        scheduled.param_groups[0].update(group_change)
        backend.assign(scheduled_flat.grad, grad[:scheduled_flat.grad.size])
        scheduled.step()

        fresh = gm.MomentumSGD(fresh_flat, **{**base, **own},
                               groups=[{"params": [1], **group}])
        if state is not None:
            fresh.load_state_dict({**state, **own, "groups": [{"params": [1], **group}]})
        backend.assign(fresh_flat.grad, grad[:fresh_flat.grad.size])
        fresh.step()
        state = fresh.state_dict()
        for name, got, want in (("params", scheduled_flat.data, fresh_flat.data),
                                ("velocity", scheduled.velocity, fresh.velocity)):
            assert backend.to_numpy(got).tobytes() == backend.to_numpy(want).tobytes(), \
                f"{name} after step {step + 1}"
    assert scheduled.step_count == len(EVERY_BACKEND_SCHEDULE)


@pytest.mark.parametrize("counted", [False, True], ids=["eager", "counted"])
def test_cuda_c_kernel_reads_a_row_rewritten_in_place(tmp_path_factory, counted):
    """The CUDA C kernel (on the CPU through the host shim) over one table whose row is
    rewritten in place before every step equals, bit for bit, the kernel over a table
    built afresh at each step's values (a counted step: the counters decide first steps,
    as with capturable=True)."""
    from gpu_momentum.groups import update_table
    from gpu_momentum.hyperparams import Hyperparameters
    from gpu_momentum.kernels.layout import GROUP_SLOTS
    from host_kernel import HostKernel, build_library

    kernel = HostKernel(build_library(tmp_path_factory.mktemp("cuda-host-schedule")))
    rng = np.random.default_rng(3)
    n = 1000
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in EVERY_BACKEND_SCHEDULE]
    values = {"lr": 0.1, "momentum": 0.9, "style": "torch"}
    in_place = None
    runs = {name: (start.copy(), np.zeros(n, np.float32),
                   np.zeros(GROUP_SLOTS + 1, np.int64) if counted else None)
            for name in ("in place", "fresh")}
    for step, ((change, _), grad) in enumerate(zip(EVERY_BACKEND_SCHEDULE, grads)):
        values = {**values, **change}
        hyper = Hyperparameters(**values)
        initialized = [counted or step > 0]
        fresh = update_table([hyper], initialized, np.dtype(np.float32), size=n)
        if in_place is None:
            in_place = update_table([hyper], initialized, np.dtype(np.float32), size=n)
        else:  # the row and flags written into the same arrays
            in_place.scalars[0] = hyper.group_row(np.float32)
            in_place.group_flags[0] = hyper.group_flags(initialized[0])
        for name, table in (("in place", in_place), ("fresh", fresh)):
            param, velocity, counters = runs[name]
            kernel.step(param, grad, velocity, table, counters=counters,
                        check_nonfinite=False)
        assert runs["in place"][0].tobytes() == runs["fresh"][0].tobytes(), step
        assert runs["in place"][1].tobytes() == runs["fresh"][1].tobytes(), step


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_lr_changed_every_step_moves_only_the_changed_rows(backend, monkeypatch,
                                                           capturable):
    """Through the backend interface, on every backend: after warm-up, a step with the
    optimizer's lr and its group's lr changed before it builds no table, prepares no
    launch, checks no array and allocates nothing; the only copies are the two changed
    rows (GROUP_COLUMNS scalars each) into a device table, none into the CPU's."""
    import gpu_momentum as gm
    from gpu_momentum.kernels.layout import GROUP_COLUMNS

    flat = gm.FlatParams.from_arrays([backend.from_numpy(np.full(n, 1.0, np.float32))
                                      for n in (37, 64)])
    backend.assign(flat.grad, np.linspace(-1, 1, flat.grad.size))
    opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.9, groups=[{"params": [1]}],
                         capturable=capturable, backend=backend.name)
    for _ in range(2):  # warm-up: the first step's flags are written after it
        opt.step()
    engine = gm.backends.backend_named(backend.name)
    probe = np.zeros(1)
    host_table = engine.upload(probe, flat.data) is probe
    calls = dict.fromkeys(("zeros", "copy", "asarray", "assign", "to_numpy", "upload",
                           "step_function", "check_arrays", "update_table"), 0)
    copied = []

    def counted(owner, name):
        method = getattr(owner, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)
        monkeypatch.setattr(owner, name, call)

    for name in ("zeros", "copy", "asarray", "assign", "to_numpy", "upload",
                 "step_function"):
        counted(engine, name)
    for name in ("check_arrays", "update_table"):
        counted(optimizer_module, name)
    upload_into = engine.upload_into
    monkeypatch.setattr(engine, "upload_into", lambda target, array, param: (
        copied.append(np.asarray(array).nbytes), upload_into(target, array, param))[1])
    for step in range(6):
        opt.lr = 0.1 / (step + 2)
        opt.param_groups[0]["lr"] = 0.05 * (step + 1)
        opt.step()
    assert calls == dict.fromkeys(calls, 0)
    row = GROUP_COLUMNS * np.dtype(np.float32).itemsize
    assert copied == ([] if host_table else [row] * 12)


def _model_and_sgd(seed, **options):
    model = _model(seed)
    decayed = [p for name, p in model.named_parameters() if name.endswith("weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    opt = SGD([{"params": decayed, "weight_decay": 0.01}, {"params": others}], lr=0.1,
              momentum=0.9, **options)
    return model, opt


# (lr, momentum) set as new floats before each step, as a scheduler sets them; momentum 0
# (the velocity left alone, torch style) and back, and a zero lr of either sign.
LR_MOMENTUM_SCHEDULE = [(0.1, 0.9), (0.05, 0.85), (0.07, 0.0), (0.02, 0.5), (0.0, 0.95),
                        (-0.0, 0.9), (0.3, 0.88), (0.011, 0.9)]


def test_torch_sgd_lr_and_momentum_filled_equal_values_read_and_written():
    """A float lr and momentum changed alone (a scheduler's step) are filled into the
    table's columns (no write_values, but where the momentum turns 0 or back); the steps
    equal, bit for bit, those of an optimizer that reads and writes every value (the
    other values set again as new, equal objects)."""
    x = torch.randn(4, 8)
    runs = {}
    for name in ("filled", "written"):
        model, opt = _model_and_sgd(0)
        runs[name] = model, opt, []
    for name, (model, opt, taken) in runs.items():
        for step, (lr, momentum) in enumerate(LR_MOMENTUM_SCHEDULE):
            opt.zero_grad()
            model(x).square().sum().backward()
            for group in opt.param_groups:
                group["lr"], group["momentum"] = lr + 0.0, momentum + 0.0
                if name == "written":
                    group["dampening"] = group["dampening"] + 0.0
            opt.step()
            taken.append([tuple(p.detach().clone() for p in model.parameters()),
                            tuple(opt.state[p]["momentum_buffer"].clone()
                                  for p in model.parameters())])
    for step, (filled, written) in enumerate(zip(runs["filled"][2], runs["written"][2])):
        for got, want in zip(filled, written):
            for a, b in zip(got, want):
                assert a.numpy().tobytes() == b.numpy().tobytes(), f"step {step + 1}"


def test_torch_sgd_scheduled_step_skips_write_values(monkeypatch):
    """After warm-up, a scheduler's lr and momentum reach the table without
    check_values or write_values (only a momentum turning 0 or back goes through them)."""
    from gpu_momentum.torch.bucket_table import TableUpkeep

    calls = []
    for method in ("check_values", "write_values"):
        original = getattr(TableUpkeep, method)
        monkeypatch.setattr(TableUpkeep, method,
                            lambda self, *a, _original=original, _name=method: (
                                calls.append(_name), _original(self, *a))[1])
    model, opt = _model_and_sgd(0)
    x = torch.randn(4, 8)
    for step, (lr, momentum) in enumerate(LR_MOMENTUM_SCHEDULE):
        if step == 2:
            calls.clear()
        opt.zero_grad()
        model(x).square().sum().backward()
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr + 0.0, momentum + 0.0
        opt.step()
    # steps 3 and 4 (momentum 0, then 0.5): the table is rewritten, once per change
    assert calls == ["check_values", "write_values"] * 2


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_torch_sgd_cuda_tensor_lr_is_written_on_the_device(monkeypatch, decoupled):
    """A CUDA tensor lr (faked: a CPU tensor taken as on the device, and CPU tables taken
    as the device's) is never read on the host (.item()): each change (in place, as a
    scheduler's fill_, or a new tensor) is written into the table by write_lr_on_device,
    and the steps equal, bit for bit, those with the same lrs as floats (with decoupled
    weight decay, the decay column 1 - lr * weight_decay too)."""
    import gpu_momentum.torch.bucket_table as bucket_table_module
    import gpu_momentum.torch.group_values as group_values_module

    on_device = []
    monkeypatch.setattr(group_values_module, "read_on_device",
                        lambda tensor: any(tensor is t for t in on_device))
    original_item = torch.Tensor.item

    def item(tensor):
        assert not any(tensor is t for t in on_device), "a device lr was read on the host"
        return original_item(tensor)
    monkeypatch.setattr(torch.Tensor, "item", item)
    writes = []
    original_write = bucket_table_module.write_lr_on_device
    monkeypatch.setattr(bucket_table_module, "write_lr_on_device",
                        lambda *a: (writes.append(a[2]), original_write(*a))[1])
    original_init = buckets_module.Bucket.__init__

    def init(bucket, *args, **kwargs):
        original_init(bucket, *args, **kwargs)
        bucket.reads_device_values = True
    monkeypatch.setattr(buckets_module.Bucket, "__init__", init)

    x = torch.randn(4, 8)
    options = {"decoupled_weight_decay": decoupled}
    (device_model, device_opt), (float_model, float_opt) = (
        _model_and_sgd(0, **options), _model_and_sgd(0, **options))
    lr = torch.tensor(0.1, dtype=torch.float64)
    on_device.append(lr)
    for group in device_opt.param_groups:
        group["lr"] = lr
    schedule = [0.1, 0.05, 0.07, 0.013, 0.2]
    for step, value in enumerate(schedule):
        if step == 3:  # a new tensor in the group, as a user may set
            lr = torch.tensor(value, dtype=torch.float64)
            on_device.append(lr)
            for group in device_opt.param_groups:
                group["lr"] = lr
        else:
            lr.fill_(value)  # as a scheduler changes a tensor lr
        for group in float_opt.param_groups:
            group["lr"] = value
        for model, opt in ((device_model, device_opt), (float_model, float_opt)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        for a, b in zip(device_model.parameters(), float_model.parameters()):
            assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes(), step
        assert writes and writes[-1] is lr


def test_torch_sgd_refusal_of_one_group_changes_no_other():
    """A scheduler's lr for one group refused (float32 cannot hold it) beside another
    group's new lr: the step changes no parameter, and the step after the fix takes both
    groups' lrs, bit for bit as an optimizer given them together."""
    model, opt = _model_and_sgd(0)
    reference_model, reference = _model_and_sgd(0)
    x = torch.randn(4, 8)
    for m, o in ((model, opt), (reference_model, reference)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.05, 1e39
    with pytest.raises(ValueError, match=r"param_groups\[1\]: Invalid lr value"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.param_groups[1]["lr"] = 0.02
    reference.param_groups[0]["lr"], reference.param_groups[1]["lr"] = 0.05, 0.02
    for o in (opt, reference):
        o.step()
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()

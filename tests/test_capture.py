"""Capturable steps (MomentumSGD(capturable=True)): counted by the kernels in the backend's
memory, hyperparameter changes written through at once, nothing but launches per step;
and the refusal of host work inside a capture. On the CPU and in the CUDA simulator what
can be proved without a GPU; the CuPy graph itself in the gpu-marked test at the end."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import problem
from test_overhead import TRANSFERS, _count_calls

GROUPS = [{"params": [1], "lr": 0.05, "momentum": 0.5, "weight_decay": 0.01}]
SIZES = (37, 64)
STEPS = 6
OVERFLOW_STEP = 3  # its gradient holds an inf: skipped with skip_nonfinite


def _flat(harness):
    arrays = [harness.from_numpy(np.linspace(-1, 1, size) * (k + 1))
              for k, size in enumerate(SIZES)]
    return gm.FlatParams.from_arrays(arrays)


def _gradients(size, skip_nonfinite):
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(size) for _ in range(STEPS)]
    if skip_nonfinite:
        grads[OVERFLOW_STEP][5] = np.inf
    return grads


def _state(harness, opt):
    return (harness.to_numpy(opt.param).tobytes(), harness.to_numpy(opt.velocity).tobytes(),
            opt.step_count, opt.skipped_steps, opt.last_step_skipped,
            opt.velocity_initialized)


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["", "skip-nonfinite"])
@pytest.mark.parametrize("style", ["classic", "torch"])
def test_capturable_steps_are_the_eager_steps(backend, style, skip_nonfinite):
    """The same steps, lr schedule, group changes and one overflow, bit for bit and count
    for count, whether the kernels count (capturable) or the host does."""
    flats = [_flat(backend) for _ in range(2)]
    eager, capturable = (
        gm.MomentumSGD(flat, lr=0.1, style=style, groups=GROUPS, backend=backend.name,
                       skip_nonfinite=skip_nonfinite, capturable=capture)
        for flat, capture in zip(flats, (False, True)))
    assert (eager.capturable, capturable.capturable) == (False, True)
    for step, grad in enumerate(_gradients(flats[0].grad.size, skip_nonfinite)):
        for flat, opt in zip(flats, (eager, capturable)):
            backend.assign(flat.grad, grad)
            opt.lr = 0.1 / (1 + step)
            opt.param_groups[0]["momentum"] = 0.5 if step < 2 else 0.25
            opt.step()
        assert _state(backend, capturable) == _state(backend, eager), f"step {step + 1}"
    assert capturable.step_count == STEPS - skip_nonfinite


def test_capturable_writes_changes_through_and_steps_do_only_launches(backend,
                                                                      monkeypatch):
    """Prepared at construction; a hyperparameter change rewrites the group's row of the
    table in place at once, and no step copies, allocates or prepares."""
    flat = _flat(backend)
    opt = gm.MomentumSGD(flat, lr=0.1, groups=GROUPS, capturable=True,
                         backend=backend.name)
    engine = gm.backends.backend_named(backend.name)
    calls = _count_calls(monkeypatch, engine, TRANSFERS + ("step_function",))
    for _ in range(3):
        opt.step()
    assert calls == dict.fromkeys(calls, 0)
    # Only the changed group's row moves: its scalars, then its scalars and flags (none
    # on the CPU, whose table is in host memory).
    on_host = engine.device_type == "cpu"  # its tables are host memory
    opt.lr = 0.2
    assert calls == {**dict.fromkeys(calls, 0), "upload_into": 0 if on_host else 1}
    opt.param_groups[0].update(lr=0.3, nesterov=True)
    opt.step()
    opt.prepare()  # nothing left to do
    assert calls == {**dict.fromkeys(calls, 0), "upload_into": 0 if on_host else 3}


def test_prepare_before_the_first_step_leaves_it_nothing_to_prepare(backend, monkeypatch):
    flat = _flat(backend)
    opt = gm.MomentumSGD(flat, lr=0.1, skip_nonfinite=True, backend=backend.name)
    opt.prepare()
    engine = gm.backends.backend_named(backend.name)
    calls = _count_calls(monkeypatch, engine, TRANSFERS + ("step_function",))
    opt.step()
    opt.step()
    assert calls == dict.fromkeys(calls, 0) and opt.step_count == 2


def test_loading_a_state_keeps_the_counters_in_place(backend):
    """A captured graph reads the counters and the table at fixed addresses: loading a
    state writes into them."""
    flat = _flat(backend)
    opt = gm.MomentumSGD(flat, lr=0.1, capturable=True, backend=backend.name)
    opt.step()
    state = opt.state_dict()
    counters, table = opt._counters, opt._table
    opt.step()
    opt.lr = 0.5
    opt.load_state_dict(state)
    assert opt._counters is counters and opt._table is table
    assert opt.step_count == 1 and opt.lr == 0.1


def _capturing(monkeypatch, backend):
    engine = gm.backends.backend_named(backend.name)
    monkeypatch.setattr(engine, "capturing", lambda param: True)


def test_host_work_inside_a_capture_is_refused(backend, monkeypatch):
    """While param's stream is captured (as the backend reports it), a step that would
    count on the host or prepare something, and a hyperparameter change of a capturable
    optimizer, raise and change nothing; a capturable optimizer's steps go on."""
    if not backend.on_device:
        assert not gm.backends.backend_named(backend.name).capturing(np.zeros(3))
        pytest.skip("host memory has no CUDA graphs: the cpu backend never captures")
    param, (grad,) = problem(16, steps=1)
    eager = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, skip_nonfinite=True,
                           backend=backend.name)
    counted_on_host = gm.MomentumSGD(backend.from_numpy(param), lr=0.1,
                                     backend=backend.name)
    for _ in range(2):  # the second leaves nothing to prepare (first steps are over)
        counted_on_host.step(backend.from_numpy(grad))
    capturable = gm.MomentumSGD(backend.from_numpy(param), lr=0.1, capturable=True,
                                backend=backend.name)
    g = backend.from_numpy(grad)
    _capturing(monkeypatch, backend)
    for opt, why in ((eager, "prepared"), (counted_on_host, "host memory")):
        before = _state(backend, opt)
        with pytest.raises(RuntimeError, match=f"captured into a CUDA graph.*{why}"):
            opt.step(g)
        assert _state(backend, opt) == before
    with pytest.raises(RuntimeError, match="hyperparameter change writes the table"):
        capturable.lr = 0.5
    assert capturable.lr == 0.1
    capturable.step(g)
    capturable.step(backend.from_numpy(grad))  # another grad object: checked, no host work
    monkeypatch.undo()
    assert capturable.step_count == 2


def test_momentum_step_inside_a_capture_needs_its_table_copied_before(backend,
                                                                       monkeypatch):
    if not backend.on_device:
        pytest.skip("host memory has no CUDA graphs: the cpu backend never captures")
    param, (grad,) = problem(16, steps=1)
    p, g, v = (backend.from_numpy(a) for a in (param, grad, np.zeros(16)))
    gm.momentum_step(p, g, v, lr=0.125, backend=backend.name)
    _capturing(monkeypatch, backend)
    gm.momentum_step(p, g, v, lr=0.125, backend=backend.name)  # its table is there
    before = backend.to_numpy(p).tobytes()
    with pytest.raises(RuntimeError, match="momentum_step.*captured.*table"):
        gm.momentum_step(p, g, v, lr=0.25, backend=backend.name)
    assert backend.to_numpy(p).tobytes() == before


@pytest.mark.hardware_first
@pytest.mark.gpu
def test_cupy_graph_replays_are_the_eager_steps():
    """A step captured once with CuPy (stream.begin_capture / end_capture) and replayed
    20 times, with an lr schedule written between replays and one overflow, matches 20
    eager steps bit for bit, counters included."""
    if "cupy" not in gm.available_backends():
        from gpu_momentum.backends import unavailable_reason
        pytest.skip(f"backend 'cupy' is not available: {unavailable_reason('cupy')}")
    import cupy

    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(4099).astype(np.float32) for _ in range(20)]
    grads[7][100] = np.inf
    param = rng.standard_normal(4099).astype(np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        eager_p, graph_p = cupy.asarray(param), cupy.asarray(param)
        eager_g, graph_g = cupy.empty_like(eager_p), cupy.empty_like(graph_p)
        options = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, skip_nonfinite=True,
                       capturable=True)
        eager = gm.MomentumSGD(eager_p, **options)
        replayed = gm.MomentumSGD(graph_p, **options)
        stream.begin_capture()
        replayed.step(graph_g)
        graph = stream.end_capture()
        for step, grad in enumerate(grads):
            lr = 0.1 * 0.9 ** step
            eager.lr = replayed.lr = lr
            eager_g.set(grad, stream=stream)
            graph_g.set(grad, stream=stream)
            eager.step(eager_g)
            graph.launch(stream)
        stream.synchronize()
    assert cupy.asnumpy(graph_p).tobytes() == cupy.asnumpy(eager_p).tobytes()
    assert cupy.asnumpy(replayed.velocity).tobytes() == \
        cupy.asnumpy(eager.velocity).tobytes()
    assert (replayed.step_count, replayed.skipped_steps) == (19, 1) == \
        (eager.step_count, eager.skipped_steps)


# ---- gpu_momentum.torch.SGD(capturable=True) -------------------------------------------

def _torch_problem(torch, device="cpu", steps=6, overflow=None):
    generator = torch.Generator().manual_seed(7)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes]
             for _ in range(steps)]
    if overflow is not None:
        grads[overflow][1][2] = float("inf")
    to = lambda t: t.to(device)
    return [to(p) for p in params], [[to(g) for g in step] for step in grads]


def _torch_run(torch, opt_params, opt, grads, schedule, after_change=None):
    for step, step_grads in enumerate(grads):
        for p, g in zip(opt_params, step_grads):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = schedule(step)
        if after_change is not None:
            after_change(opt)
        opt.step()


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["", "skip-nonfinite"])
def test_torch_sgd_capturable_steps_are_its_eager_steps(skip_nonfinite):
    from harness import require
    torch = require("torch")
    from gpu_momentum.torch import SGD

    params, grads = _torch_problem(torch, overflow=3 if skip_nonfinite else None)
    results = []
    for capturable in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, capturable=capturable,
                  skip_nonfinite=skip_nonfinite)
        assert opt.capturable is capturable
        _torch_run(torch, ps, opt, grads, lambda step: 0.1 / (1 + step))
        results.append(([p.detach().numpy().tobytes() for p in ps],
                        [opt.state[p]["momentum_buffer"].numpy().tobytes() for p in ps],
                        opt.step_count, opt.skipped_steps, opt.last_step_skipped))
    assert results[1] == results[0]
    assert results[1][2:4] == ((5, 1) if skip_nonfinite else (6, 0))


def test_torch_sgd_prepare_writes_the_tables_and_steps_do_only_launches(monkeypatch):
    from harness import require
    torch = require("torch")
    from gpu_momentum.torch import SGD

    params, grads = _torch_problem(torch, steps=3)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = SGD(ps, lr=0.1, momentum=0.9, capturable=True)
    _torch_run(torch, ps, opt, grads[:2], lambda step: 0.1)  # first steps taken
    engine = gm.backends.backend_named("cpu")
    calls = _count_calls(monkeypatch, engine, TRANSFERS)
    opt.param_groups[0]["momentum"] = 0.5
    opt.prepare()  # the group's rows written in place: the CPU's table is host memory
    assert calls == dict.fromkeys(calls, 0)
    opt.step()
    opt.prepare()
    assert sum(calls.values()) == 0  # nothing new: no copy, no allocation


def test_torch_sgd_host_work_inside_a_capture_is_refused(monkeypatch):
    """While torch reports a capture on the current stream: an optimizer counting on the
    host, a table to write (a group value changed without prepare()) and a first
    packing raise and change nothing; a prepared capturable step goes on."""
    from harness import require
    torch = require("torch")
    from gpu_momentum.torch import SGD

    params, grads = _torch_problem(torch, steps=3)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    qs = [torch.nn.Parameter(p.clone()) for p in params]
    counted_on_host = SGD(qs, lr=0.1, momentum=0.9)
    capturable = SGD(ps, lr=0.1, momentum=0.9, capturable=True)
    for opt, opt_params in ((counted_on_host, qs), (capturable, ps)):
        _torch_run(torch, opt_params, opt, grads[:2], lambda step: 0.1)
    for opt in (counted_on_host, capturable):  # as if their buffers were on a GPU
        monkeypatch.setattr(opt._layout, "on_cuda", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = [p.detach().clone() for p in qs]
    with pytest.raises(RuntimeError, match="captured into a CUDA graph.*host memory"):
        counted_on_host.step()
    assert all(torch.equal(p, b) for p, b in zip(qs, before))
    capturable.param_groups[0]["lr"] = 0.05
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="update table must be written.*prepare"):
        capturable.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    capturable.prepare()  # outside the graph in real use; the flag is faked here
    capturable.step()
    fresh = SGD([torch.nn.Parameter(params[0].clone())], lr=0.1, capturable=True)
    fresh._layout = None  # as a copy's first use: the buffers must be packed
    monkeypatch.setattr(fresh, "_on_cuda", lambda: True)
    with pytest.raises(RuntimeError, match="packed into buffers"):
        fresh.step()
    with pytest.raises(RuntimeError, match="packed into buffers"):
        fresh.zero_grad()
    monkeypatch.undo()
    assert capturable.step_count == 3


def test_torch_sgd_a_captured_backward_starts_cleared_gradients_from_zero(monkeypatch):
    """A backward captured into a CUDA graph after zero_grad() accumulates into gradient
    views that, at each replay, hold the last replay's gradients: inside the capture a
    cleared view is zeroed before autograd accumulates into it (the whole buffer while
    none has a gradient), and a view that received one before keeps accumulating. On
    the CPU, with the buffers' capture check faked and the last replay's gradients
    written behind the views' version counters (as a graph writes them)."""
    from harness import require
    torch = require("torch")
    import gpu_momentum.torch as gm_torch
    from gpu_momentum.torch import grad_views

    capturing = [False]
    monkeypatch.setattr(grad_views, "capture_check", lambda device: lambda: capturing[0])
    torch.manual_seed(0)
    first, second, spare = (torch.nn.Linear(4, 3).double() for _ in range(3))
    x = torch.randn(5, 4, dtype=torch.float64)
    opt = gm_torch.SGD([*first.parameters(), *second.parameters(), *spare.parameters()],
                       lr=0.1, momentum=0.9, weight_decay=0.1)

    def grads(*layers):  # one backward through `layers`, by autograd alone
        params = [p for layer in layers for p in layer.parameters()]
        loss = sum(layer(x).square().sum() for layer in layers)
        return torch.autograd.grad(loss, params)

    def backward(*layers, captured):
        capturing[0] = captured
        try:
            sum(layer(x).square().sum() for layer in layers).backward()
        finally:
            capturing[0] = False

    def last_replay():
        for p in opt.param_groups[0]["params"]:
            p.grad.data.fill_(7.0)

    start = [p.detach().clone() for p in spare.parameters()]
    opt.zero_grad()
    last_replay()
    backward(first, second, captured=True)
    expected = grads(first, second)
    for p, g in zip([*first.parameters(), *second.parameters()], expected):
        assert torch.equal(p.grad, g)
    assert not any(p.grad.any() for p in spare.parameters())  # the whole buffer zeroed
    opt.step()

    opt.zero_grad()
    backward(first, captured=False)  # first has a gradient before the capture
    last_replay()
    backward(first, second, captured=True)
    (a, b), (c, d, e, f) = grads(first), grads(first, second)
    assert torch.equal(first.weight.grad, 7.0 + c) and torch.equal(first.bias.grad, 7.0 + d)
    assert torch.equal(second.weight.grad, e) and torch.equal(second.bias.grad, f)
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(spare.parameters(), start))
    assert not any(p in opt.state for p in spare.parameters())


@pytest.mark.gpu
def test_torch_cuda_graph_of_a_whole_training_step_is_eager_training():
    """torch's whole-network capture (zero_grad() before the capture; forward, backward
    and step() in the graph) with capturable=True, replayed on new batches, trains as
    torch.optim.SGD does eagerly; a layer out of the forward is left alone (the captured
    backward zeroes the gradient views a replay finds full, not the other way)."""
    from harness import require
    torch = require("torch")
    if not torch.cuda.is_available() or "cupy" not in gm.available_backends():
        pytest.skip("needs a CUDA device that torch and the cupy backend can use")
    from gpu_momentum.torch import SGD

    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({
            "body": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, 4)),
            "spare": torch.nn.Linear(8, 4)}).cuda()

    def loss(net, x, y):
        return torch.nn.functional.mse_loss(net["body"](x), y)

    options = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    theirs_model, ours_model = model(), model()
    theirs = torch.optim.SGD(theirs_model.parameters(), **options)
    ours = SGD(ours_model.parameters(), capturable=True, **options)
    generator = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(16, 8, device="cuda", generator=generator),
                torch.randn(16, 4, device="cuda", generator=generator)) for _ in range(12)]
    for x, y in batches:
        theirs.zero_grad()
        loss(theirs_model, x, y).backward()
        theirs.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps, as torch.cuda.graph asks: eager
        for x, y in batches[:3]:
            ours.zero_grad()
            loss(ours_model, x, y).backward()
            ours.step()
    torch.cuda.current_stream().wait_stream(side)
    static_x, static_y = (t.clone() for t in batches[3])
    graph = torch.cuda.CUDAGraph()
    ours.zero_grad()
    with torch.cuda.graph(graph):
        loss(ours_model, static_x, static_y).backward()
        ours.step()
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for (name, p), q in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(p in ours.state for p in ours_model["spare"].parameters())
    assert ours.step_count == 12


@pytest.mark.gpu
def test_torch_cuda_graph_replays_are_the_eager_steps():
    """gpu_momentum.torch.SGD(capturable=True, skip_nonfinite=True): a step captured with
    torch.cuda.graph and replayed 20 times, an lr schedule written between replays with
    prepare() and one overflow, matches 20 eager steps bit for bit, counts included."""
    from harness import require
    torch = require("torch")
    if not torch.cuda.is_available() or "cupy" not in gm.available_backends():
        pytest.skip("needs a CUDA device that torch and the cupy backend can use")
    from gpu_momentum.torch import SGD

    params, grads = _torch_problem(torch, "cuda", steps=23, overflow=10)
    schedule = lambda step: 0.1 * 0.9 ** step
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, capturable=True,
                   skip_nonfinite=True, backend="cupy")
    eager_params = [torch.nn.Parameter(p.clone()) for p in params]
    eager = SGD(eager_params, **options)
    _torch_run(torch, eager_params, eager, grads, schedule)

    graph_params = [torch.nn.Parameter(p.clone()) for p in params]
    replayed = SGD(graph_params, **options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps, as torch.cuda.graph asks: eager
        _torch_run(torch, graph_params, replayed, grads[:3], schedule)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed.step()
    for step in range(3, len(grads)):
        for p, g in zip(graph_params, grads[step]):
            p.grad.copy_(g)  # the flat gradient buffer the graph reads
        replayed.param_groups[0]["lr"] = schedule(step)
        replayed.prepare()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(graph_params, eager_params):
        assert torch.equal(p, q)
        assert torch.equal(replayed.state[p]["momentum_buffer"],
                           eager.state[q]["momentum_buffer"])
    assert (replayed.step_count, replayed.skipped_steps) == (22, 1) == \
        (eager.step_count, eager.skipped_steps)

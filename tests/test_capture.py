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
    """Prepared at construction; a hyperparameter change rewrites the table in place at
    once (one copy per per-group array), and no step copies, allocates or prepares."""
    flat = _flat(backend)
    opt = gm.MomentumSGD(flat, lr=0.1, groups=GROUPS, capturable=True,
                         backend=backend.name)
    engine = gm.backends.backend_named(backend.name)
    calls = _count_calls(monkeypatch, engine, TRANSFERS + ("step_function",))
    for _ in range(3):
        opt.step()
    assert calls == dict.fromkeys(calls, 0)
    opt.lr = 0.2
    assert calls == {**dict.fromkeys(calls, 0), "upload_into": 2}
    opt.param_groups[0].update(lr=0.3, nesterov=True)
    opt.step()
    opt.prepare()  # nothing left to do
    assert calls == {**dict.fromkeys(calls, 0), "upload_into": 4}


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

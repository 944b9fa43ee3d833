"""gpu_momentum.torch.SGD with bfloat16 and float16 parameters: each precision mode through
the torch adapter, bit for bit MomentumSGD's update of the same flat layout (itself held
bit for bit to the reference: tests/test_low_precision.py) and, for one parameter, the
reference's; the precision buffers and the seed in its state_dict; the refusals."""

import copy

import numpy as np
import pytest

from harness import require

torch = require("torch")
ml_dtypes = require("ml_dtypes")

import gpu_momentum as gm  # noqa: E402
from gpu_momentum.reference import low_precision_step  # noqa: E402
from gpu_momentum.torch import SGD  # noqa: E402

PRECISIONS = ("nearest", "stochastic", "kahan", "master")
NUMPY = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.float16: np.dtype(np.float16)}
SHAPES = ((3, 5), (7,), (2, 2, 3))  # odd sizes: padding between the segments
HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
SEED = 11
STEPS = 4


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no usable CUDA device")
    return "cuda"


def _as_numpy(tensor):
    """A torch tensor's values as a NumPy array of the same 16-bit dtype (host copy)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY[torch.bfloat16]).copy()
    return tensor.numpy().copy()


def _problem(dtype, seed=0):
    """(initial values, gradients per step) as NumPy arrays of `dtype`, one per shape."""
    rng = np.random.default_rng(seed)
    numpy = NUMPY[dtype]
    start = [rng.standard_normal(shape).astype(numpy) for shape in SHAPES]
    grads = [[rng.standard_normal(shape).astype(numpy) for shape in SHAPES]
             for _ in range(STEPS)]
    return start, grads


def _tensor(array, dtype, device="cpu"):
    return torch.tensor(array.astype(np.float32), device=device).to(dtype)


def _adapter_run(dtype, precision, device="cpu", skip_nonfinite=False, read_between=False):
    start, grads = _problem(dtype)
    params = [torch.nn.Parameter(_tensor(a, dtype, device)) for a in start]
    opt = SGD(params, precision=precision, seed=SEED, skip_nonfinite=skip_nonfinite,
              **HYPER)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = _tensor(g, dtype, device)
        opt.step()
        if read_between:
            assert opt.step_count >= 1  # settles the device counters in between
    return opt, params


def _momentum_sgd_run(dtype, precision, skip_nonfinite=False):
    start, grads = _problem(dtype)
    flat = gm.FlatParams.from_arrays(start)
    opt = gm.MomentumSGD(flat, style="torch", precision=precision, seed=SEED,
                         skip_nonfinite=skip_nonfinite, **HYPER)
    for step_grads in grads:
        for view, g in zip(flat.grads, step_grads):
            view[...] = g
        opt.step()
    return opt, flat


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_each_mode_through_the_adapter_is_momentum_sgds_update(dtype, precision):
    opt, params = _adapter_run(dtype, precision)
    reference, flat = _momentum_sgd_run(dtype, precision)
    assert opt.backends == {("cpu", dtype): "cpu"}
    for index, (p, expected) in enumerate(zip(params, flat.params)):
        assert p.dtype == dtype
        assert _as_numpy(p).tobytes() == expected.tobytes(), index
        state = opt.state[p]
        velocity = reference.velocity[flat.offsets[index]:][:expected.size]
        assert state["momentum_buffer"].dtype == torch.float32
        assert state["momentum_buffer"].numpy().tobytes() == velocity.tobytes()
        name = {"kahan": "compensation", "master": "master"}.get(precision)
        assert set(state) == {"momentum_buffer"} | ({name} if name else set())
        if name:
            buffer = getattr(reference, name)[flat.offsets[index]:][:expected.size]
            assert _as_numpy(state[name]).tobytes() == buffer.tobytes()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_parameter_follows_the_reference(precision):
    """The specification itself: reference.low_precision_step, step by step."""
    rng = np.random.default_rng(3)
    numpy = NUMPY[torch.bfloat16]
    p = rng.standard_normal(37).astype(numpy)
    param = torch.nn.Parameter(_tensor(p, torch.bfloat16))
    opt = SGD([param], precision=precision, seed=SEED, **HYPER)
    velocity = np.zeros(37, np.float32)
    buffer = {"kahan": {"compensation": np.zeros(37, numpy)},
              "master": {"master": p.astype(np.float32)}}.get(precision, {})
    for step in range(STEPS):
        g = rng.standard_normal(37).astype(numpy)
        param.grad = _tensor(g, torch.bfloat16)
        opt.step()
        p, velocity, new = low_precision_step(
            p, g, velocity, precision=precision, seed=SEED, step_count=step,
            first_step=step == 0, style="torch", **buffer, **HYPER)
        buffer = {name: new for name in buffer}
        assert _as_numpy(param).tobytes() == p.tobytes(), step


@pytest.mark.parametrize("precision", ["stochastic", "kahan"])
def test_counted_steps_key_and_skip_as_momentum_sgds(precision):
    """skip_nonfinite: the counters live in the buffer's memory and keep counting the
    optimizer's steps (stochastic rounding's key), also when read between steps."""
    opt, params = _adapter_run(torch.bfloat16, precision, skip_nonfinite=True,
                               read_between=True)
    _, flat = _momentum_sgd_run(torch.bfloat16, precision, skip_nonfinite=True)
    assert opt.step_count == STEPS
    for p, expected in zip(params, flat.params):
        assert _as_numpy(p).tobytes() == expected.tobytes()


def test_stochastic_rounding_is_reproducible_and_follows_the_seed():
    def run(seed):
        param = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = SGD([param], lr=1e-3, momentum=0.9, precision="stochastic", seed=seed)
        for _ in range(3):
            param.grad = torch.full((4096,), 0.3, dtype=torch.bfloat16)
            opt.step()
        return param.detach().clone()

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.float().tolist())) > 1  # rounded both ways


def test_float32_parameters_beside_16_bit_ones_stay_exact():
    """A mixed model: the precision applies to the 16-bit buffer; float32 parameters are
    updated in their own precision, as with precision "nearest"."""
    wide = [torch.nn.Parameter(torch.linspace(-1, 1, 9)) for _ in range(2)]
    half = torch.nn.Parameter(torch.ones(9, dtype=torch.bfloat16))
    opt = SGD([*wide, half], lr=0.1, momentum=0.9, precision="master")
    plain = SGD([torch.nn.Parameter(w.detach().clone()) for w in wide], lr=0.1,
                momentum=0.9)
    for _ in range(3):
        for p in [*wide, *plain.param_groups[0]["params"]]:
            p.grad = torch.full_like(p, 0.25)
        half.grad = torch.full((9,), 0.25, dtype=torch.bfloat16)
        opt.step()
        plain.step()
    for mine, theirs in zip(wide, plain.param_groups[0]["params"]):
        assert torch.equal(mine, theirs)
    assert set(opt.state[half]) == {"momentum_buffer", "master"}
    assert set(opt.state[wide[0]]) == {"momentum_buffer"}


def test_master_starts_from_the_values_of_the_first_step():
    """Values loaded into the parameters after construction (a model's load_state_dict)
    are where the master copy starts: it is taken at each parameter's first step."""
    param = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = SGD([param], lr=0.5, precision="master")
    with torch.no_grad():
        param.copy_(torch.full((8,), 2.0, dtype=torch.bfloat16))
    param.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    assert param.float().tolist() == [1.5] * 8
    assert opt.state[param]["master"].tolist() == [1.5] * 8


@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_dicts_carry_the_mode_the_seed_and_the_buffers(precision):
    opt, params = _adapter_run(torch.bfloat16, precision)
    state = opt.state_dict()
    extras = state["gpu_momentum"]
    assert (extras["precision"], extras["seed"], extras["step_count"]) == (
        precision, SEED, STEPS)
    # A fresh optimizer over copies of the parameters continues bit for bit.
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = SGD(copies, precision=precision, **HYPER)  # seed 0 until loaded
    other.load_state_dict(copy.deepcopy(state))
    assert other.seed == SEED and other.step_count == STEPS
    rng = np.random.default_rng(9)
    for _ in range(2):
        for p, q in zip(params, copies):
            grad = torch.tensor(rng.standard_normal(tuple(p.shape)), dtype=torch.bfloat16)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        other.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], other.state[q]["momentum_buffer"])
    # torch.optim.SGD takes the same state dict: the extra tensors stay its state.
    plain = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params],
                            **HYPER)
    plain.load_state_dict(copy.deepcopy(state))
    assert all("momentum_buffer" in entry for entry in plain.state.values())


def test_a_state_of_another_mode_is_refused_and_changes_nothing():
    opt, params = _adapter_run(torch.bfloat16, "kahan")
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    other, _ = _adapter_run(torch.bfloat16, "master")
    master_state = other.state_dict()
    kept = copy.deepcopy(opt.state_dict())
    for bad, pattern in (
            (master_state, r"Invalid precision value: 'master' \(the state was saved with "
                           r"precision 'master', this optimizer uses 'kahan'\)"),
            ({**state, "gpu_momentum": {**state["gpu_momentum"], "seed": -1}},
             r"Invalid seed value: -1"),
            ({**state, "gpu_momentum": {**state["gpu_momentum"], "precision": "round"}},
             r"Invalid gpu_momentum precision value: 'round'")):
        with pytest.raises(ValueError, match=pattern):
            opt.load_state_dict(copy.deepcopy(bad))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    now = opt.state_dict()
    assert now["gpu_momentum"] == kept["gpu_momentum"]
    for index, entry in kept["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(now["state"][index][key], tensor)
    # A state without the mode's buffer key (torch.optim.SGD's) starts the buffers afresh;
    # one holding another mode's buffer is refused.
    mixed = copy.deepcopy(state)
    mixed["state"][0]["master"] = torch.zeros(SHAPES[0])
    with pytest.raises(ValueError, match=r"holds 'master', which precision 'kahan'"):
        opt.load_state_dict(mixed)


@pytest.mark.parametrize("options, error, pattern", [
    ({"precision": "round"}, ValueError, r"Invalid precision value: 'round'"),
    ({"precision": None}, ValueError, r"Invalid precision value: None"),
    ({"seed": -1}, ValueError, r"Invalid seed value: -1"),
    ({"seed": 2**64}, ValueError, r"Invalid seed value: 18446744073709551616"),
    ({"seed": 1.5}, TypeError, r"Invalid seed value: 1\.5"),
    ({"seed": True}, TypeError, r"Invalid seed value: True"),
])
def test_bad_precision_arguments_are_refused_before_packing(options, error, pattern):
    param = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    pointer = param.data_ptr()
    with pytest.raises(error, match=pattern):
        SGD([param], lr=0.1, **options)
    assert param.data_ptr() == pointer and param.float().tolist() == [1.0] * 5


def test_modes_of_16_bit_parameters_are_refused_for_float32_ones():
    params = [torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(3))]
    pointers = [p.data_ptr() for p in params]
    with pytest.raises(ValueError, match=r"Invalid precision value: 'kahan' \(the "
                                         r"parameters are torch.float32, computed in "
                                         r"their own precision"):
        SGD(params, lr=0.1, precision="kahan")
    assert [p.data_ptr() for p in params] == pointers


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_mode_on_cuda_is_the_cpus_update(precision):
    device = _cuda()
    opt, params = _adapter_run(torch.bfloat16, precision, device=device)
    cpu_opt, cpu_params = _adapter_run(torch.bfloat16, precision)
    assert set(opt.backends.values()) == {"cupy"}
    for p, q in zip(params, cpu_params):
        assert torch.equal(p.cpu(), q)

"""style="torch" tracks torch.optim.SGD step for step (the peer users compare against)."""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import numpy as np
import pytest

import gpu_momentum as gm
from configs import CONFIGS, STEPS, hyper_at, problem
from harness import require

torch = require("torch")

# torch.optim.SGD has neither l1 nor decoupled weight decay.
TORCH_CONFIGS = [c for c in CONFIGS if c.values[0]["style"] == "torch"
                 and "l1" not in c.values[0]
                 and "decoupled_weight_decay" not in c.values[0]] + [
    pytest.param({"style": "torch", "lr": (0.1,) * STEPS, "dampening": 0.5,
                  "momentum": (0.0, 0.0, 0.9, 0.9, 0.0, 0.5, 0.5)},
                 id="torch-momentum-switched-on-late"),
]


@pytest.mark.parametrize("config", TORCH_CONFIGS)
def test_torch_style_tracks_torch_sgd(config):
    param, grads = problem(1023)
    ours = gm.MomentumSGD(param.copy(), **hyper_at(config, 0))
    theirs = torch.nn.Parameter(torch.from_numpy(param.copy()))
    first = {k: v for k, v in hyper_at(config, 0).items() if k != "style"}
    sgd = torch.optim.SGD([theirs], **first)
    for step, grad in enumerate(grads):
        hyper = {k: v for k, v in hyper_at(config, step).items() if k != "style"}
        for name, value in hyper.items():
            setattr(ours, name, value)
            sgd.param_groups[0][name] = value
        ours.step(grad)
        theirs.grad = torch.from_numpy(grad.copy())
        sgd.step()
        np.testing.assert_allclose(ours.param, theirs.detach().numpy(), rtol=1e-12,
                                   atol=1e-12, err_msg=f"param after step {step + 1}")


def test_parameter_groups_track_torch_param_groups():
    """One launch over three groups equals torch.optim.SGD with three param_groups,
    including a group whose lr a schedule changes and a group with momentum 0."""
    rng = np.random.default_rng(0)
    shapes = [(31, 7), (5,), (64, 3), (9,)]
    arrays = [rng.standard_normal(s) for s in shapes]
    options = [{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
               {"lr": 0.01, "momentum": 0.5, "nesterov": True, "weight_decay": 0.0},
               {"lr": 0.05, "momentum": 0.0, "dampening": 0.3, "weight_decay": 0.1}]
    flat = gm.FlatParams.from_arrays(arrays, names=["w1", "b1", "w2", "b2"])
    ours = gm.MomentumSGD(flat, style="torch", lr=0.1, momentum=0.9, weight_decay=0.01,
                          groups=[{"params": ["w2", 3], **options[1]},
                                  {"params": ["b1"], **options[2]}])
    tensors = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    sgd = torch.optim.SGD([{"params": [tensors[0]], **options[0]},
                           {"params": [tensors[2], tensors[3]], **options[1]},
                           {"params": [tensors[1]], **options[2]}])
    for step in range(STEPS):
        if step == 3:
            ours.param_groups[0]["lr"] = sgd.param_groups[1]["lr"] = 0.002
        grads = [rng.standard_normal(s) for s in shapes]
        for view, tensor, grad in zip(flat.grads, tensors, grads):
            view[...] = grad
            tensor.grad = torch.from_numpy(grad.copy())
        ours.step()
        sgd.step()
        for i, (view, tensor) in enumerate(zip(flat.params, tensors)):
            np.testing.assert_allclose(view, tensor.detach().numpy(), rtol=1e-12,
                                       atol=1e-12,
                                       err_msg=f"tensor {i} after step {step + 1}")

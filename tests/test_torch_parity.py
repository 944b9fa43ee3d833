"""style="torch" tracks torch.optim.SGD step for step (the peer users compare against)."""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import numpy as np
import pytest

import gpu_momentum as gm
from configs import CONFIGS, STEPS, hyper_at, problem
from harness import require

torch = require("torch")

TORCH_CONFIGS = [c for c in CONFIGS if c.values[0]["style"] == "torch"] + [
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

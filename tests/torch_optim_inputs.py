"""torch's own SGD test inputs (torch.testing._internal.common_optimizers) as pytest
parameters, and the small models torch's optimizer suite (test/test_optim.py) steps,
for the tests that run that suite's checks on gpu_momentum.torch.SGD. Import it after
harness.require("torch") and require("expecttest")."""

import copy

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    _get_optim_inputs_including_global_cliquey_kwargs, optim_db)

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)


def config_id(optim_input):
    flags = [flag for flag in ("foreach", "fused", "differentiable")
             if optim_input.kwargs.get(flag)]
    return "-".join([optim_input.desc.replace(" ", "_"), *flags])


def torch_configs(skip=(), dtype=torch.float32):
    """torch's SGD configurations with each global flag (fused, differentiable; foreach
    only where torch has foreach kernels, not on the CPU) switched on in turn, as torch's
    suite runs them, less the flags in `skip`."""
    inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, SGD_INFO,
                                                               skip=skip)
    return [pytest.param(i.kwargs, id=config_id(i)) for i in inputs]


def plain_configs():
    """torch's SGD configurations as its optim_inputs_func gives them (no global flag)."""
    return [pytest.param(i.kwargs, id=i.desc.replace(" ", "_"))
            for i in SGD_INFO.optim_inputs_func(device="cpu")]


def fresh(kwargs):
    """A copy of a configuration's keyword arguments (a tensor lr copied too)."""
    return copy.deepcopy(kwargs)


def linear_loss(weight, bias, inputs):
    """The loss torch's suite steps most often: |weight @ inputs + bias|^2."""
    return (weight.mv(inputs) + bias).pow(2).sum()


def conv_model():
    """torch's suite's model for state-dict loading: a 1x1 convolution and a batch norm,
    seeded, and an input for it."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2),
                                torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def assert_same_values(actual, expected, **tolerance):
    torch.testing.assert_close(actual.detach(), expected.detach(), **tolerance)

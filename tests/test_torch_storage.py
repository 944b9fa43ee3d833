"""Parameters whose storage someone else owns, in one process: views into a tensor the
user (or a wrapper) holds are updated where they live and never moved; a parameter
re-pointed into such storage after construction (as ZeroRedundancyOptimizer's bucket
views do) stays there; storage of the parameter's own is packed, once. Each beside
torch.optim.SGD on the same tensors, and SGD.pack_count says how many packings moved
parameters. (The wrappers themselves, on two gloo ranks: test_torch_wrappers.py.)"""

import numba  # noqa: F401  (before torch: two OpenMP runtimes in one process stall)

import pytest

from harness import require

torch = require("torch")
from gpu_momentum.torch import SGD  # noqa: E402

HYPERPARAMETERS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
STEPS = 4
# float64 within a few roundings of torch's (the update's order of operations may
# differ by one rounding per step)
TOLERANCE = 1e-15
SHAPES = [(3, 4), (5,), (2, 3)]


def gradients(step):
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=generator, dtype=torch.float64)
            for shape in SHAPES]


def views_of_one_tensor():
    """A flat tensor the caller holds, and parameters that are views of it (with a gap
    between the first two, as a wrapper's padding)."""
    flat = torch.linspace(-1, 1, 30, dtype=torch.float64)
    offsets = [0, 14, 20]
    params = [torch.nn.Parameter(flat[o:o + torch.Size(s).numel()].view(s))
              for o, s in zip(offsets, SHAPES)]
    return flat, params


def train(opt, params, steps=STEPS):
    for step in range(steps):
        for p, g in zip(params, gradients(step)):
            p.grad = g.clone()
        opt.step()


def test_views_of_a_held_tensor_are_updated_where_they_live():
    flat, params = views_of_one_tensor()
    theirs_flat, theirs = views_of_one_tensor()
    addresses = [p.data_ptr() for p in params]
    opt = SGD(params, **HYPERPARAMETERS)
    train(opt, params)
    train(torch.optim.SGD(theirs, **HYPERPARAMETERS), theirs)
    assert [p.data_ptr() for p in params] == addresses
    # The holder sees every update; the gap between two parameters is untouched.
    assert torch.allclose(flat, theirs_flat, rtol=0, atol=TOLERANCE)
    assert torch.equal(flat[12:14], theirs_flat[12:14])
    assert opt.pack_count == 0
    for p in params:
        assert opt.state[p]["momentum_buffer"].shape == p.shape


def test_parameters_re_pointed_into_a_wrapper_bucket_stay_there():
    """As ZeroRedundancyOptimizer(parameters_as_bucket_view=True): the optimizer packs
    its parameters, then each is re-pointed into the wrapper's bucket (one bucket of
    several parameters, and one of exactly one); the next steps update the bucket."""
    for count in (len(SHAPES), 1):
        params = [torch.nn.Parameter(torch.full(s, 0.5, dtype=torch.float64))
                  for s in SHAPES[:count]]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = SGD(params, **HYPERPARAMETERS)
        reference = torch.optim.SGD(theirs, **HYPERPARAMETERS)
        train(opt, params, 1)
        train(reference, theirs, 1)
        bucket = torch.cat([p.detach().flatten() for p in params])
        offset = 0
        for p in params:
            p.data = bucket[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        train(opt, params)
        train(reference, theirs)
        assert torch.allclose(bucket, torch.cat([p.detach().flatten() for p in theirs]),
                              rtol=0, atol=TOLERANCE)
        assert all(p.untyped_storage().data_ptr() == bucket.untyped_storage().data_ptr()
                   for p in params)
        assert opt.pack_count == 1, count


def test_own_storage_is_packed_once_and_again_only_when_moved():
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = SGD(params, **HYPERPARAMETERS)
    train(opt, params)
    assert opt.pack_count == 1
    params[0].data = params[0].detach().clone()  # storage of its own again: packed
    train(opt, params, 1)
    assert opt.pack_count == 2


def test_overlapping_views_are_refused_at_construction():
    flat = torch.zeros(10, dtype=torch.float64)
    params = [torch.nn.Parameter(flat[:6]), torch.nn.Parameter(flat[4:])]
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        SGD(params, **HYPERPARAMETERS)
    assert torch.equal(flat, torch.zeros(10, dtype=torch.float64))

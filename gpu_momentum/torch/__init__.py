"""`gpu_momentum.torch.SGD`: a drop-in `torch.optim.SGD` whose update is this library's fused
pass, one kernel launch per (device, dtype) per step (`pip install "gpu-momentum[torch]"`).

    from gpu_momentum.torch import SGD      # was: from torch.optim import SGD
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

How it works:
- At construction the parameters of each (device, dtype) are packed into one flat buffer
  (segments 16-byte aligned, as FlatParams lays them out) and each `p.data` becomes a view
  into it, with the strides it had (channels_last stays channels_last); complex
  parameters are packed as their real and imaginary parts. The Parameter objects stay the
  same, so modules, hooks and `module.state_dict()` are untouched. Gradients and momentum
  buffers have matching flat buffers; `state[p]["momentum_buffer"]` is a view into the
  velocity buffer.
- `zero_grad()`, with either set_to_none, zeroes each flat gradient buffer in one call and
  leaves each parameter's `.grad` a view of it: backward accumulates into the buffer in
  place and `step()` copies nothing. torch's None is kept as a meaning, not as a value: a
  post-accumulate-grad hook on each parameter marks it when autograd accumulates into its
  `.grad`, and one that received nothing since `zero_grad(set_to_none=True)` (its `.grad`
  a zero view) is left alone at `step()`, as torch leaves a None `.grad`. After
  `zero_grad(set_to_none=False)` a parameter that had a gradient has a zero one (updated,
  as in torch) and one that had none still has none. DDP writes the reduced gradient of a
  parameter this process did not use into its view in place, without autograd: each view
  has its own version counter, and a check queued at the end of each backward pass
  counts such a write as a gradient. A backward captured into a CUDA graph zeroes the
  cleared views first, in the graph (a gradient hook on each CUDA parameter): each
  replay finds the last replay's gradients there.
- A `.grad` that is not the view at `step()` (autograd's own after `model.zero_grad()`,
  DDP's bucket views, a `p.grad` the user assigned, a gradient with a graph) is a
  gradient: all of them are copied into the buffer with one `torch._foreach_copy_`, and
  each stays its parameter's `.grad` (torch never replaces a gradient object at a step;
  `zero_grad()` points them at their views again). A view that `p.grad.data = g` or
  `p.grad.set_(g)` moved off the buffer is found by its data pointer (one comparison per
  parameter per step) and copied the same way; `zero_grad()` puts it back over the
  buffer. A None `.grad` at `step()` is no gradient. In a `torch.distributed` process
  group `zero_grad()` leaves a None `.grad` None and makes DDP's bucket views None, as
  torch does: DDP would hand a view given to a parameter that no rank used back as a
  zero bucket view, which `step()` cannot tell from a reduced gradient.
- `step()` reads every parameter group's hyperparameters (any change, such as a
  scheduler's, reaches the kernel without a recompile) into one row of the kernels' update
  table per parameter, so each parameter has its group's values and its own first step,
  and a parameter whose `.grad` is None is left alone (its range is NO_GROUP). The table is
  rewritten, in place, only when a value changed; then one launch updates the whole
  buffer.
- `opt.state` is torch's defaultdict(dict) that counts its edits (and its entries'):
  a step compares one counter, and only after an edit looks at the entries, taking them
  as torch.optim.SGD's next step would: a cleared or deleted momentum buffer makes that
  parameter's next step a first step, and an assigned one is copied into the flat
  velocity, whose view then stands in `opt.state` again.
- `differentiable=True` packs nothing: `step()` is torch's update through torch
  operations under autograd (the `differentiable` module), for meta-learning.
- A parameter moved out of its buffer after construction (`model.to(...)`,
  `p.data = ...`, `model.to_empty(...)`) is found at the next `step()` or `zero_grad()`
  and everything is packed again from the current tensors, keeping momentum buffers and
  gradients.
- Storage a wrapper owns is never packed: DTensor parameters (FSDP2: their local shards),
  views into a larger tensor (FSDP1's flat parameter, ZeroRedundancyOptimizer's buckets)
  and parameters re-pointed after packing into storage another tensor holds are updated
  where they live, their values and gradients copied into a bucket of their own around
  its launch (`foreign`); a DTensor parameter's momentum buffer is a DTensor.

Devices: CPU tensors are updated by the "cpu" backend through NumPy views; CUDA tensors by
"cupy" (or "numba-cuda" when asked), zero-copy, queued on torch's current CUDA stream,
with no host synchronisation in `step()` (a CUDA tensor lr is copied into the device's
update table on the step's stream, never read on the host, nor checked there).

The package's modules: `optimizer` (SGD: torch.optim.SGD's signature, checks and
methods), `layout` (which parameters go into which buffer), `buckets` (one buffer: its
flat tensors, counters and launch), `bucket_table` (a bucket's update table, written in
place), `group_values` (which param groups changed since the last step), `storage`
(whose storage a parameter lives in), `foreign` (the bucket of parameters in storage a
wrapper owns, updated where they live), `grad_views` (the gradient views and their
hooks), `state` (`opt.state`, counting its edits), `differentiable` (the
differentiable=True path), `state_dict` (pickling and the state dict: the library's
extras and their checks), `tensors` (torch tensors as the backends' arrays), `float8`
(velocity_dtype=torch.float8_e4m3fn: the FP8 velocity's Bucket and opt.state entries)
and `float8_state` (its state dict and the methods that read it). They are the package's own: its API
is the names below.
"""

try:
    import torch  # noqa: F401 (`import gpu_momentum` itself never needs torch)
except ImportError as error:
    raise ImportError(f"gpu_momentum.torch needs PyTorch: pip install "
                      f"'gpu-momentum[torch]' ({error})") from error

from .optimizer import SGD, UnsupportedOptionError
from .state_dict import STATE_KEY

# Named by the path users import them from (in reprs, tracebacks and pickles), not by
# the module that defines them.
SGD.__module__ = UnsupportedOptionError.__module__ = __name__

__all__ = ["SGD", "UnsupportedOptionError"]

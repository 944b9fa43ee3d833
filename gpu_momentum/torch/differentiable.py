"""The `differentiable=True` path of `gpu_momentum.torch.SGD`: torch.optim.SGD's update as
torch operations, one parameter at a time, recorded by autograd, so that gradients flow
through `step()` into the parameters' earlier values, the gradients, the momentum
buffers and tensor hyperparameters (a tensor lr or weight_decay that requires grad), as
meta-learning needs. It is not the fused kernel: nothing is packed, every tensor is
updated where it lives, and the per-step cost is torch's own for-loop's.

    step_param_groups(optimizer.param_groups, optimizer.state)   # under torch.enable_grad

The maths and the order of its operations are torch.optim.SGD's for-loop
(`torch.optim.sgd._single_tensor_sgd`), so values agree bit for bit and autograd records
the same graph; see `sgd_update`.
"""

import torch

__all__ = ["sgd_update", "step_param_groups"]


def sgd_update(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
               nesterov, maximize):
    r"""One step of torch.optim.SGD over `params` (updated in place) with `grads`, through
    torch operations that autograd records. `momentum_buffers` holds a tensor or None per
    parameter (read only when momentum != 0); a None is replaced, in the list, by the
    buffer this step creates. Per parameter p with gradient g::

        g = -g if maximize else g
        g = g + weight_decay * p                  (weight_decay != 0)
        b = g.detach().clone()                    first step (its buffer is None): the
                                                  buffer starts from g's value, outside
                                                  the graph, as in torch
        b = momentum * b + (1 - dampening) * g    afterwards, in place in the buffer
        g = g + momentum * b if nesterov else b   (momentum != 0)
        p = p - lr * g                            in place

    As in torch: a tensor lr of one element is used as a 0-d tensor; an lr that requires
    grad enters as `p.addcmul_(g, lr, value=-1)` and a weight_decay that requires grad as
    `g.addcmul_(p.clone(), weight_decay)`, in place in the gradient tensor (so, without
    maximize, `p.grad` itself then holds g + weight_decay * p, as it does in torch); a
    parameter that is a leaf requiring grad is refused by autograd's in-place check,
    as torch's is (step a non-leaf copy, as meta-learning code does)."""
    if isinstance(lr, torch.Tensor) and lr.dim() != 0:
        lr = lr.squeeze()
    for index, param in enumerate(params):
        grad = grads[index] if not maximize else -grads[index]
        if weight_decay != 0:
            if isinstance(weight_decay, torch.Tensor) and weight_decay.requires_grad:
                grad = grad.addcmul_(param.clone(), weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = momentum_buffers[index]
            if buffer is None:
                buffer = grad.detach().clone()
                momentum_buffers[index] = buffer
            else:
                buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
        if isinstance(lr, torch.Tensor) and lr.requires_grad:
            param.addcmul_(grad, lr, value=-1)
        else:
            param.add_(grad, alpha=-lr)


# Group options of gpu_momentum.torch.SGD that torch.optim.SGD lacks: this path computes
# torch's update only, so a group that sets one of them otherwise is refused.
_TORCH_ONLY_VALUES = {"l1": 0.0, "decoupled_weight_decay": False}


def step_param_groups(param_groups, state):
    """torch.optim.SGD.step()'s body for differentiable=True, under autograd: for each
    group, the parameters whose `.grad` is not None, in the group's order, are updated
    by `sgd_update` with the group's values, reading `state[p]["momentum_buffer"]` (None
    when absent) and storing the buffer back when momentum != 0. A parameter whose
    `.grad` is None is left alone and gets no state. `.grad` tensors are used as they
    are: never copied into a buffer, never replaced.

    A group holding a gpu_momentum-only option with a value other than its default (l1,
    decoupled_weight_decay) raises ValueError naming it, before anything is changed."""
    for index, group in enumerate(param_groups):
        for name, default in _TORCH_ONLY_VALUES.items():
            value = group.get(name, default)
            if value != default:
                raise ValueError(f"Invalid {name} value: {value!r} in param group {index} "
                                 f"(differentiable=True computes torch.optim.SGD's update, "
                                 f"which has no {name}; it must be {default!r})")
    with torch.enable_grad():
        for group in param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            momentum = group["momentum"]
            buffers = [state[p].get("momentum_buffer") for p in params] if momentum != 0 \
                else []
            sgd_update(params, grads, buffers, lr=group["lr"], momentum=momentum,
                       dampening=group["dampening"], weight_decay=group["weight_decay"],
                       nesterov=group["nesterov"], maximize=group["maximize"])
            if momentum != 0:
                for p, buffer in zip(params, buffers):
                    state[p]["momentum_buffer"] = buffer

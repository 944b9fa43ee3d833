"""The specification: a plain NumPy implementation of both update styles.

Every backend is tested against `reference_step` in float64. With `dtype=np.float32` it
computes in float32 with the kernels' operation order, which the host-compiled CUDA C
kernel must match bit for bit.
"""

import numpy as np


def reference_step(param, grad, velocity, *, lr, momentum=0.9, dampening=0.0,
                   weight_decay=0.0, nesterov=False, maximize=False, style="classic",
                   first_step=False, grad_scale=1.0, l1=0.0, decoupled_weight_decay=False,
                   dtype=np.float64):
    """Returns (new_param, new_velocity) as new arrays of `dtype`; inputs are not modified.

    g = grad * (1 / grad_scale);  g' = (-g if maximize else g) + weight_decay * p
                                        + l1 * sign(p)       (sign(0) = 0)
    decoupled_weight_decay: g' has no weight_decay * p term; instead
        p = p * (1 - lr * weight_decay) before the momentum update (SGDW, as AdamW).
    classic: v = mu*v - lr*g';  p = p + v           (nesterov: p = p + mu*v - lr*g')
    torch:   v = mu*v + (1 - dampening)*g';  p = p - lr*v   (nesterov: p - lr*(g' + mu*v))
    On the first step the old velocity is not read: classic starts from v = 0, torch sets
    v = g' (PyTorch skips dampening there). Torch style with momentum 0 is p = p - lr*g'
    and leaves v as it is, as PyTorch leaves its momentum buffer.
    """
    scalar = np.dtype(dtype).type
    p = np.array(param, dtype=dtype).reshape(-1)
    g = np.array(grad, dtype=dtype).reshape(-1)
    v = np.array(velocity, dtype=dtype).reshape(-1)
    lr, mu, wd, l1_ = scalar(lr), scalar(momentum), scalar(weight_decay), scalar(l1)
    grad_coeff = scalar(1) - scalar(dampening)

    g = g * scalar(1.0 / grad_scale)
    if maximize:
        g = -g
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g + wd * p
    if l1 != 0:  # branches, not l1 * sign(p): g stays bitwise g (even -0.0) where p == 0
        g = np.where(p > 0, g + l1_, np.where(p < 0, g - l1_, g))
    if weight_decay != 0 and decoupled_weight_decay:
        p = p * (scalar(1) - lr * wd)
    if style == "classic":
        v = -lr * g if first_step else mu * v - lr * g
        p = p + (mu * v - lr * g) if nesterov else p + v
    elif style == "torch" and momentum == 0:
        p = p - lr * g
    elif style == "torch":
        v = g.copy() if first_step else mu * v + grad_coeff * g
        p = p - lr * (g + mu * v) if nesterov else p - lr * v
    else:
        raise ValueError(f"Invalid style value: {style!r}")
    return p, v

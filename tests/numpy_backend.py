"""A backend from outside the library: the update as NumPy array operations, no Numba.

It implements gpu_momentum.backends.contract.Backend (its memory methods those of
gpu_momentum.backends.host_memory.HostMemory) and is added with
gpu_momentum.backends.register_backend alone (tests/test_numpy_backend.py); its step is
the shared runner.StepRunner over its own StepKernels. It takes float32 and float64
parameters, computed in their own dtype with the operations of
kernels.elementwise.momentum_update in the same order (one rounding each), range by
range of the update table.
"""

import numpy as np

from gpu_momentum.backends.host_memory import HostMemory
from gpu_momentum.backends.runner import StepKernels, StepRunner
from gpu_momentum.kernels.elementwise import count_step, mark_velocities_initialized
from gpu_momentum.kernels.layout import (CLASSIC, DECAY, GRAD_COEFF, GROUP_SLOTS, L1,
                                         LAST_STEP_SKIPPED, LR, MAXIMIZE, MOMENTUM,
                                         NESTEROV, NO_GROUP, VELOCITY_INITIALIZED,
                                         WEIGHT_DECAY)


class NumpyBackend(HostMemory):
    name = "numpy"
    dtypes = ("float32", "float64")
    element_aligned = False

    def native(self, array):
        return False  # NumPy arrays are the cpu backend's first

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        return StepRunner(NumpyKernels(param, velocity, table, counters), param.size,
                          check_nonfinite)


class NumpyKernels(StepKernels):
    """The launches as NumPy operations over each range of the table that a group
    updates; a loss scale and found_inf are read when the step runs."""

    def __init__(self, param, velocity, table, counters):
        self.param = np.asarray(param).reshape(-1)
        self.velocity = np.asarray(velocity).reshape(-1)
        self.table, self.counters = table, counters
        self.scalar = table.scalars.dtype.type
        starts = np.concatenate([[0], table.range_ends[:-1]]).astype(np.int64)
        self.ranges = [(int(start), int(end), int(group)) for start, end, group in
                       zip(starts, table.range_ends, table.range_groups)
                       if group != NO_GROUP]

    def kernel_grad(self, grad):
        return np.asarray(grad).reshape(-1)

    def kernel_grad_scale(self, grad_scale):
        with np.errstate(divide="ignore", over="ignore"):
            return self.scalar(1) / self.scalar(grad_scale[()])

    def kernel_found_inf(self, found_inf):
        return found_inf

    def launches(self):
        return {"clear": self.clear, "find_nonfinite": self.find_nonfinite,
                "update": self.update, "finish": self.finish}

    def clear(self, step):
        found = step.found_inf is not None and step.found_inf[()] != 0
        self.counters[LAST_STEP_SKIPPED] = 1 if found else 0

    def find_nonfinite(self, step):
        inv = _inverse(step)
        with np.errstate(over="ignore", invalid="ignore"):
            if not all(np.isfinite(step.grad[start:end] * inv).all()
                       for start, end, _ in self.ranges):
                self.counters[LAST_STEP_SKIPPED] = 1

    def update(self, step):
        counters = self.counters
        if counters is not None and counters[LAST_STEP_SKIPPED] != 0:
            return
        inv, table = _inverse(step), self.table
        classic = table.launch_flags & CLASSIC != 0
        for start, end, k in self.ranges:
            flags = int(table.group_flags[k])
            if counters is not None:
                initialized = counters[GROUP_SLOTS + k] != 0
            else:
                initialized = flags & VELOCITY_INITIALIZED != 0
            p, v = self.param[start:end], self.velocity[start:end]
            p[...], v[...] = _update(p, step.grad[start:end], v, table.scalars[k], inv,
                                     classic, flags & NESTEROV != 0,
                                     flags & MAXIMIZE != 0, initialized)

    def finish(self, step):
        if self.counters[LAST_STEP_SKIPPED] == 0:
            mark_velocities_initialized(self.counters, self.table.group_flags, 0, 1)
        count_step(self.counters)


def _inverse(step):
    return step.inv_grad_scale if step.grad_scale is None else step.grad_scale


def _update(p, g, v, row, inv_grad_scale, classic, nesterov, maximize, initialized):
    """kernels.elementwise.momentum_update over arrays: (new p, new v)."""
    lr, momentum, grad_coeff = row[LR], row[MOMENTUM], row[GRAD_COEFF]
    weight_decay, l1, decay = row[WEIGHT_DECAY], row[L1], row[DECAY]
    with np.errstate(all="ignore"):
        g = g * inv_grad_scale
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if l1 != 0:  # a zero (or NaN) p leaves g bitwise as it is
            g = np.where(p > 0, g + l1, np.where(p < 0, g - l1, g))
        if decay != 1:
            p = p * decay
        if classic:
            v = momentum * v - lr * g if initialized else -lr * g
            p = p + (momentum * v - lr * g) if nesterov else p + v
        elif momentum == 0:
            p = p - lr * g
        else:
            v = momentum * v + grad_coeff * g if initialized else g
            p = p - lr * (g + momentum * v) if nesterov else p - lr * v
    return p, v

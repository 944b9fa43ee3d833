"""The step every backend runs: its launches in order, prepared once.

A backend's `step_function` prepares a `StepKernels` (its kernels over the arrays, table
and counters of one step, with everything that stays the same from step to step worked
out) and returns a `StepRunner` over it. The runner does what every backend's step does
alike: it converts what a step hands over (the gradient, the loss scale in the compute
dtype and the step count only when they are other objects than the last step's),
refuses found_inf without counters, and queues the launches of
kernels.cuda_launch.step_launches in order ("clear", "find_nonfinite", "agree",
"update", "finish"), calling `agree` itself. The backend supplies the launches, the
conversions of its arrays and the stream they run on; nothing here allocates or copies.

Each launch is a callable taking the one `StepArguments` object of the runner, whose
fields each step rewrites in place: a backend may supply prepared launch objects (their
arguments packed once) that repack only the fields that changed, comparing them by
identity with the ones they last packed.
"""

import functools

import numpy as np

from ..kernels.cuda_launch import step_launches
from .contract import refuse_found_inf_without_counters

# The launches a backend's StepKernels.launches() supplies ("agree" is the runner's).
KERNEL_LAUNCHES = ("clear", "find_nonfinite", "update", "finish")


class StepArguments:
    """What changes from step to step, as the kernels take it (one object per runner,
    rewritten by each step)."""

    __slots__ = ("grad", "inv_grad_scale", "grad_scale", "found_inf", "agree",
                 "step_count")

    def __init__(self, no_grad_scale, no_found_inf):
        self.grad = self.inv_grad_scale = self.agree = None
        self.grad_scale, self.found_inf = no_grad_scale, no_found_inf
        self.step_count = np.int64(0)


class StepKernels:
    """What a backend prepares for one step: its launches over fixed arrays, and how the
    arrays a step hands over become the kernels' arguments. A backend subclasses it,
    sets the attributes and supplies the methods.

    counters: the step counters as the kernels and `agree` take them, or None (a step
    without counters: the update alone). scalar: the compute dtype's scalar type
    (inv_grad_scale is converted to it). no_grad_scale, no_found_inf: what the launches
    get in StepArguments.grad_scale and found_inf for a step without them (a null array
    on a GPU, None on the CPU). before_step: None, or what each step calls first (a
    check that the step runs where it was prepared)."""

    before_step = None
    counters = None
    scalar = np.float32
    no_grad_scale = None
    no_found_inf = None

    def kernel_grad(self, grad):
        """grad as the kernels take it (a view, no copy); called only for a grad object
        the last step did not have."""
        raise NotImplementedError

    def kernel_grad_scale(self, grad_scale):
        """The loss scale in the backend's memory as the kernels take it; may queue a
        conversion to the compute dtype on the step's stream (into memory prepared once)."""
        raise NotImplementedError

    def kernel_found_inf(self, found_inf):
        """GradScaler's found_inf as the "clear" launch takes it."""
        raise NotImplementedError

    def launches(self):
        """{name: launch} for each name of KERNEL_LAUNCHES the step can run (see
        step_launches): each launch takes the runner's StepArguments and queues its
        kernel; None for one whose work another launch of this backend does."""
        raise NotImplementedError


class StepRunner:
    """A backend's prepared step: `runner(grad, inv_grad_scale, agree=None,
    grad_scale=None, found_inf=None, step_count=0)` queues what Backend.step queues,
    with no checks, copies or allocations of its own (see Backend.step_function).

    elements: the update's size (nothing but the counting is launched over none);
    check_nonfinite=False: a counted step without "find_nonfinite"."""

    __slots__ = ("kernels", "arguments", "counted", "before_step", "plain", "agreeing",
                 "last_grad", "last_inv_grad_scale", "last_step_count", "no_grad_scale",
                 "no_found_inf")

    def __init__(self, kernels, elements, check_nonfinite=True):
        self.kernels = kernels
        self.arguments = StepArguments(kernels.no_grad_scale, kernels.no_found_inf)
        self.counted = kernels.counters is not None
        self.before_step = kernels.before_step
        self.no_grad_scale, self.no_found_inf = kernels.no_grad_scale, kernels.no_found_inf
        counters = kernels.counters
        launches = {**kernels.launches(),
                    "agree": lambda arguments: arguments.agree(counters)}
        self.plain, self.agreeing = (
            tuple(launches[name] for name in step_launches(elements, self.counted, agree,
                                                           check_nonfinite)
                  if launches[name] is not None)
            for agree in (False, True))
        self.last_grad = self.last_inv_grad_scale = self.last_step_count = None

    def __call__(self, grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None,
                 step_count=0):
        kernels, arguments = self.kernels, self.arguments
        if self.before_step is not None:
            self.before_step()
        if grad is not self.last_grad:
            arguments.grad = kernels.kernel_grad(grad)
            self.last_grad = grad
        if inv_grad_scale is not self.last_inv_grad_scale:
            arguments.inv_grad_scale = kernels.scalar(inv_grad_scale)
            self.last_inv_grad_scale = inv_grad_scale
        if not self.counted:
            refuse_found_inf_without_counters(found_inf)
        arguments.found_inf = (self.no_found_inf if found_inf is None else
                               kernels.kernel_found_inf(found_inf))
        arguments.grad_scale = (self.no_grad_scale if grad_scale is None else
                                kernels.kernel_grad_scale(grad_scale))
        if step_count is not self.last_step_count:
            arguments.step_count = np.int64(step_count)
            self.last_step_count = step_count
        arguments.agree = agree
        for launch in self.plain if agree is None else self.agreeing:
            launch(arguments)


_WARMED = set()


def warm_up_once(key, launch_each, synchronize):
    """`launch_each()` (a backend launching each of its kernels of one kind once, over no
    elements, with scratch counters), then `synchronize()`, the first time for `key`: the
    kernels compiled and loaded, so that a CUDA graph captured later records launches
    only."""
    if key in _WARMED:
        return
    launch_each()
    synchronize()
    _WARMED.add(key)


@functools.cache
def null_array(backend, device, dtype):
    """An empty array of `dtype` in `backend`'s memory on `device` (the current device when
    first asked): what the kernels get for an optional array argument (counters=None, no
    precision buffer, no loss scale or found_inf in device memory); never read."""
    return backend.zeros(0, dtype)

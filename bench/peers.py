"""The peers' builders: the update as users write it without this library (NumPy, CuPy,
torch.optim.SGD), and the CPU memory rooflines. Each takes a Problem and returns a Built."""

import itertools

import numpy as np

from .data import (LR, LR_EACH_STEP, MOMENTUM, ONE_CYCLE, ONE_CYCLE_STEPS, SCHEDULED_LRS,
                   Built, Unsupported)


def naive_builder(to_device, to_numpy):
    """`v = beta*v - lr*g; p += v` per tensor, as a user writes it with NumPy or CuPy."""
    def build(problem):
        try:  # a library without arithmetic in this dtype (bfloat16) fails here
            trial = to_device(np.ones(2, problem.dtype))
            trial += MOMENTUM * trial - LR * trial
        except Exception as error:  # whatever the array library raises
            raise Unsupported(f"no {problem.dtype} arithmetic ({type(error).__name__}: "
                              f"{error})") from error
        params = [to_device(t) for t in problem.tensors(problem.p0)]
        grads = [to_device(t) for t in problem.tensors(problem.g0)]
        velocities = [to_device(np.zeros_like(t)) for t in problem.tensors(problem.p0)]

        def step():
            for i, (p, g) in enumerate(zip(params, grads)):
                v = MOMENTUM * velocities[i] - LR * g
                velocities[i] = v
                p += v
        return Built(step, lambda: [to_numpy(p) for p in params])
    return build


def numpy_two_line_builder(problem):
    """`v[...] = beta*v - lr*g; p[...] += v`, the two lines users write in place (the
    overhead workload's reference for small buffers)."""
    param, grad = problem.p0.copy(), problem.g0.copy()
    velocity = np.zeros_like(param)

    def step():
        velocity[...] = MOMENTUM * velocity - LR * grad
        param[...] += velocity
    return Built(step, lambda: [param.copy()])


def scheduled_numpy_two_line_builder(problem):
    """The two lines with the lr of SCHEDULED_LRS taken before every step (NumPy pays
    nothing for a new lr: it is a Python float in the expression)."""
    param, grad = problem.p0.copy(), problem.g0.copy()
    velocity = np.zeros_like(param)
    lrs = itertools.cycle(SCHEDULED_LRS)

    def step():
        lr = next(lrs)
        velocity[...] = MOMENTUM * velocity - lr * grad
        param[...] += velocity
    return Built(step, lambda: [param.copy()])


def scheduled(torch, opt, schedule):
    """`opt.step` with the lr changed as `schedule` says (bench.data): None, `opt.step`
    itself; LR_EACH_STEP, every group's lr set from SCHEDULED_LRS before it (the first
    value taken by the first call); ONE_CYCLE, torch's OneCycleLR (peak LR) stepped after
    it."""
    if schedule is None:
        return opt.step
    if schedule == LR_EACH_STEP:
        lrs, groups, step = itertools.cycle(SCHEDULED_LRS), opt.param_groups, opt.step

        def step_at_next_lr():
            lr = next(lrs)
            for group in groups:
                group["lr"] = lr
            step()
        return step_at_next_lr
    if schedule == ONE_CYCLE:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR,
                                                        total_steps=ONE_CYCLE_STEPS)
        step = opt.step  # the scheduler's wrapper, which counts the optimizer's steps

        def step_and_schedule():
            step()
            scheduler.step()
        return step_and_schedule
    raise ValueError(f"Invalid schedule value: {schedule!r}")


def numpy_out_builder(problem):
    """The same update in place with `out=` and one scratch array per tensor."""
    params = [t.copy() for t in problem.tensors(problem.p0)]
    grads = [t.copy() for t in problem.tensors(problem.g0)]
    velocities = [np.zeros_like(p) for p in params]
    scratch = [np.empty_like(p) for p in params]

    def step():
        for p, g, v, tmp in zip(params, grads, velocities, scratch):
            np.multiply(g, LR, out=tmp)
            np.multiply(v, MOMENTUM, out=v)
            np.subtract(v, tmp, out=v)
            np.add(p, v, out=p)
    return Built(step, lambda: [p.copy() for p in params])


def torch_parameters(torch, device, problem):
    """The workload's tensors as nn.Parameters on `device`, each with its gradient set."""
    def tensor(host):
        if host.dtype.name == "bfloat16":  # torch reads no ml_dtypes array: via float32
            return torch.tensor(host.astype(np.float32), device=device).to(torch.bfloat16)
        return torch.tensor(host, device=device)

    params = []
    for host, grad in zip(problem.tensors(problem.p0), problem.tensors(problem.g0)):
        param = torch.nn.Parameter(tensor(host))
        param.grad = tensor(grad)
        params.append(param)
    return params


def torch_values(torch, params, dtype):
    """The parameters' values as host arrays of `dtype` (bfloat16 through float32)."""
    return [p.detach().float().cpu().numpy().astype(dtype) if p.dtype == torch.bfloat16
            else p.detach().cpu().numpy().copy() for p in params]


def torch_builder(torch, device, options, schedule=None):
    """torch.optim.SGD(momentum=0.9) over the workload's tensors, grads already set; the
    lr changed between steps as `schedule` says (`scheduled`), after the first step."""
    def build(problem):
        params = torch_parameters(torch, device, problem)
        try:
            opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **options)
            # Fails here rather than while timing if this variant lacks the dtype; the
            # first step also creates the velocity, as in training.
            opt.step()
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            raise Unsupported(f"torch: {error}") from error
        return Built(scheduled(torch, opt, schedule),
                     lambda: torch_values(torch, params, problem.dtype))
    return build


def stream_builder(problem):
    from gpu_momentum.kernels.roofline import stream_read3_write2

    bits = np.dtype(f"uint{8 * problem.dtype.itemsize}")
    a, b, c = (x.view(bits) for x in (problem.p0.copy(), np.zeros_like(problem.p0),
                                       problem.g0.copy()))
    return Built(lambda: stream_read3_write2(a, b, c),
                 lambda: [a.view(problem.dtype).copy()])


def copyto_builder(problem):
    src, dst = problem.p0.copy(), np.empty_like(problem.p0)
    return Built(lambda: np.copyto(dst, src), lambda: [dst.copy()])

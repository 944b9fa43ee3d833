"""What the benchmark runs: this library's backends, the peers users would otherwise write,
and the memory rooflines, each as a Candidate whose builder allocates its buffers and
returns a step.

Every candidate moves the same data: params and grads of the benchmark's dtype, a velocity
of the dtype its framework keeps (the library: `compute_dtype`, float32 for float16
params; the peers: the param dtype). A peer that is not installed, or that cannot run a
dtype, is reported with the reason and never replaced by something else.
"""

import dataclasses
import itertools

import numba  # noqa: F401  (before torch: two OpenMP runtimes loaded the other way stall)
import numpy as np

from gpu_momentum import FlatParams, MomentumSGD
from gpu_momentum.arrays import compute_dtype
from gpu_momentum.backends import (REGISTRY, BackendUnavailableError, backend_named,
                                   backend_names)
from gpu_momentum.kernels.layout import PRECISION_NAMES

from .data import (COPY_ROOFLINE, CUPY_PEER, FLOAT8_VELOCITY, FLOAT32_VELOCITY, GROUPS,
                   LR, LR_EACH_STEP, MOMENTUM, NAIVE_ARRAYS, NUMPY_TWO_LINE, ONE_CYCLE,
                   ROOFLINE_PEERS, ROOFLINES, SCHEDULED_LRS, SIXTEEN_BIT, TORCH_API, WIDE,
                   Absent, Built, Candidate, Problem, Unsupported, backend_name)
from .measure import HostTimer, copy_bytes, state_bytes, stream_bytes, update_bytes
from .peers import (copyto_builder, naive_builder, numpy_out_builder,
                    numpy_two_line_builder, scheduled, scheduled_numpy_two_line_builder,
                    stream_builder, torch_builder, torch_parameters, torch_values)

__all__ = ["CUPY_PEER", "GROUPS", "LR", "MOMENTUM", "ROOFLINES", "TORCH_API", "Absent",
           "Built", "Candidate", "Problem", "Unsupported", "discover", "float8_candidates",
           "group_spec", "groups_comparison", "library_candidate", "overhead_candidates",
           "torch_workload"]
TORCH_VARIANTS = (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                  ("fused", {"fused": True}))


def group_spec(count):
    """`count` parameter groups, segment i alone in group i, each with its own lr, momentum
    and weight decay."""
    return [{"params": [i], "lr": LR * (1 + i / count),
             "momentum": MOMENTUM * (1 - i / count / 10), "weight_decay": 1e-4 * (i + 1)}
            for i in range(count)]


def library_candidate(name, timer, groups=1, precision=None, velocity=None,
                      schedule=None):
    """MomentumSGD (classic style, `v = mu*v - lr*g; p += v`) on backend `name`: the flat
    workload as one array, the many-tensor workloads packed into one FlatParams. With
    groups > 1 (the groups comparison), a workload of that many tensors, each its own
    parameter group (`group_spec`), still one launch per step. With a `precision` (a
    mode of 16-bit parameters) it runs 16-bit dtypes only, in that mode; without, float32
    and float64 only. velocity: None, the compute dtype's (float32; float64 for float64
    params); "param", the param dtype's (16-bit params); FLOAT8_VELOCITY, E4M3 codes with
    a scale per block (float32 and 16-bit params: without a precision, float32 only).
    schedule=LR_EACH_STEP (the flat workload): `opt.lr` set from SCHEDULED_LRS before
    every step."""
    backend = backend_named(name)
    options = {} if precision is None else {"precision": precision}
    dtypes = SIXTEEN_BIT if precision is not None else (
        ("float32",) if velocity == FLOAT8_VELOCITY else WIDE)

    def build(problem):
        if problem.dtype.name not in backend.dtypes:
            raise Unsupported(f"backend {name!r} has no {problem.dtype} "
                              f"(it takes {list(backend.dtypes)})")
        if problem.dtype.name not in dtypes:
            raise Unsupported(f"this row runs {' and '.join(dtypes)} parameters")
        if groups > 1 and (problem.shapes is None or len(problem.shapes) != groups):
            raise Unsupported(f"{groups} groups need a workload of {groups} tensors")
        hyper = {"lr": LR, "momentum": MOMENTUM, "backend": name, **options}
        if velocity is not None:
            hyper["velocity_dtype"] = problem.dtype if velocity == "param" else velocity
        if problem.shapes is None:
            param = backend.copy(backend.asarray(problem.p0))
            grad = backend.copy(backend.asarray(problem.g0))
            opt = MomentumSGD(param, **hyper)
            if schedule == LR_EACH_STEP:
                lrs = itertools.cycle(SCHEDULED_LRS)

                def step_at_next_lr():
                    opt.lr = next(lrs)
                    opt.step(grad)
                return Built(step_at_next_lr, lambda: [backend.to_numpy(param)])
            return Built(lambda: opt.step(grad), lambda: [backend.to_numpy(param)])
        layers = [backend.asarray(t) for t in problem.tensors(problem.p0)]
        flat = FlatParams.from_arrays(layers)
        for view, grad in zip(flat.grads, problem.tensors(problem.g0)):
            backend.assign(view, grad)
        opt = MomentumSGD(flat, groups=group_spec(groups) if groups > 1 else None, **hyper)
        return Built(opt.step, lambda: [backend.to_numpy(p) for p in flat.params])

    def velocity_of(dtype):
        return {None: compute_dtype(dtype), "param": dtype}.get(velocity, velocity)

    def bytes_per_element(dtype):
        return update_bytes(dtype, velocity_of(dtype), precision or "nearest")

    def state_bytes_per_element(dtype):
        return state_bytes(dtype, velocity_of(dtype), precision or "nearest")

    buffers = {"kahan": 1, "master": 2}.get(precision, 0)  # float32 counts twice
    return Candidate("backend", backend.device_type, build,
                     bytes_per_element, timer, arrays=4 + buffers, backend=name,
                     groups=groups, precision=precision, velocity_dtype=velocity,
                     param_dtypes=dtypes, schedule=schedule,
                     state_bytes=state_bytes_per_element)


def precision_candidates(name, timer):
    """The rows of 16-bit parameters: each precision with a float32 velocity, and
    "nearest" with a velocity of the param dtype."""
    return [*(library_candidate(name, timer, precision=precision)
              for precision in PRECISION_NAMES),
            library_candidate(name, timer, precision="nearest", velocity="param")]


def float8_candidates(name, timer):
    """The rows with an FP8 velocity: float32 params, and 16-bit params in each precision
    mode (beside the float32-velocity rows of `library_candidate` and
    `precision_candidates`, which the FP8 rows' ratios compare against)."""
    return [library_candidate(name, timer, velocity=FLOAT8_VELOCITY),
            *(library_candidate(name, timer, precision=precision, velocity=FLOAT8_VELOCITY)
              for precision in PRECISION_NAMES)]


def groups_comparison(found):
    """The library's backends among `found`, each followed by its GROUPS-group variant
    (timed in turns with it, over the same FlatParams layout); peers, rooflines, the
    precision modes' rows and the FP8 velocity's sit this comparison out."""
    return [variant for c in found if c.kind == "backend" and c.precision is None
            and c.velocity_dtype is None
            for variant in (c, library_candidate(c.backend, c.timer, GROUPS))]


def torch_sgd_builder(torch, device, backend, schedule=None):
    """gpu_momentum.torch.SGD(momentum=0.9) on `backend` over the workload's tensors as
    nn.Parameters with gradients (packed into its flat buffers when it is built); its step
    is all of opt.step(), the per-step Python included, and the lr's change as `schedule`
    says (bench.peers.scheduled)."""
    def build(problem):
        from gpu_momentum.torch import SGD

        params = torch_parameters(torch, device, problem)
        try:
            opt = SGD(params, lr=LR, momentum=MOMENTUM, backend=backend)
            # The gradients where a training step finds them: in the flat buffer, which
            # backward fills after opt.zero_grad() (a .grad set from outside stays the
            # parameter's own and is copied in at every step).
            grads = [p.grad for p in params]
            opt.zero_grad(set_to_none=False)
            for p, grad in zip(params, grads):
                p.grad.copy_(grad)
            opt.step()  # creates the momentum buffers, as in training
        except (TypeError, ValueError) as error:
            raise Unsupported(f"{TORCH_API}: {error}") from error
        return Built(scheduled(torch, opt, schedule),
                     lambda: torch_values(torch, params, problem.dtype))
    return build


def torch_workload(devices=("cpu", "cuda")):
    """(candidates, absent) of the torch workloads: gpu_momentum.torch.SGD on each backend
    for the device beside torch.optim.SGD's for-loop, foreach and fused on that device, all
    over the same nn.Parameters with gradients; then each backend's row and torch fused
    with OneCycleLR stepped after every step."""
    gpu, gpu_reason = gpu_probe(devices)
    absent = []
    peers = torch_candidates(absent, devices, gpu, gpu_reason)
    try:
        import torch
    except ImportError as error:
        names = [(n, REGISTRY[n].device_type) for n in backend_names()]
        return [], absent + [Absent(f"{TORCH_API} ({n})", "backend",
                                    f"torch is not installed ({error})")
                             for n, device in names if device in devices]
    ours = []
    for name in backend_names():
        device = REGISTRY[name].device_type
        if device not in devices:
            continue
        reason = None
        try:
            backend_named(name)
        except BackendUnavailableError as error:
            reason = str(error)
        if device == "cuda" and reason is None and not any(p.device == "cuda"
                                                           for p in peers):
            reason = f"torch {torch.__version__} cannot use the GPU"
        if reason is not None:
            absent.append(Absent(f"{TORCH_API} ({name})", "backend", reason))
            continue
        timer = HostTimer() if device == "cpu" else gpu.TorchEventTimer(torch)
        ours.append(Candidate("backend", device, torch_sgd_builder(torch, device, name),
                              update_bytes, timer, arrays=5, backend=name, api=TORCH_API))
    one_cycle = [dataclasses.replace(c, build=torch_sgd_builder(torch, c.device, c.backend,
                                                                ONE_CYCLE),
                                     schedule=ONE_CYCLE) for c in ours]
    one_cycle += [dataclasses.replace(c, build=torch_builder(torch, c.device, {"fused": True},
                                                             ONE_CYCLE),
                                      schedule=ONE_CYCLE)
                  for c in peers if c.peer == "torch SGD fused"]
    return ours + peers + one_cycle, absent


def overhead_candidates(found):
    """The overhead workload's candidates: every backend and peer among `found` (no
    rooflines), each timed by the wall clock around a loop of steps with one
    synchronisation of its device at the end, so that the per-step Python counts as the
    user sees it (the FP8 velocity's rows sit it out); NumPy's two-line update where the
    CPU is measured; and where a GPU
    backend is (timed with CuPy's events: the cupy backend is there), the cupy backend's
    step replayed from a CUDA graph (wall clock, and the GPU's own time). Then the
    scheduled rows: each backend, NumPy's two-line update and each torch.optim.SGD with the
    lr set before every step (LR_EACH_STEP)."""
    timed = [dataclasses.replace(c, timer=HostTimer(_device_synchronize(c.device)))
             for c in found if c.kind != "roofline" and c.velocity_dtype != FLOAT8_VELOCITY]
    if any(c.device == "cpu" for c in found):
        timed.append(Candidate("peer", "cpu", numpy_two_line_builder, update_bytes,
                               HostTimer(), arrays=3, peer=NUMPY_TWO_LINE))
    timed += _scheduled_overhead_candidates(timed)
    if any(c.kind == "backend" and c.device == "cuda" for c in found):
        from . import gpu
        timed += gpu.graph_candidates()
    return timed


def _scheduled_overhead_candidates(timed):
    """The LR_EACH_STEP variants of the overhead workload's eager backends (MomentumSGD,
    one group, float32/float64), NumPy's two-line update and torch.optim.SGD's variants."""
    variants = dict(TORCH_VARIANTS)
    found = []
    for c in timed:
        if c.kind == "backend" and c.precision is None and c.launch == "eager" \
                and c.api == "MomentumSGD" and c.groups == 1:
            found.append(library_candidate(c.backend, c.timer, schedule=LR_EACH_STEP))
        elif c.peer == NUMPY_TWO_LINE:
            found.append(dataclasses.replace(c, build=scheduled_numpy_two_line_builder,
                                             schedule=LR_EACH_STEP))
        elif c.kind == "peer" and c.peer.startswith("torch SGD "):
            import torch

            options = variants[c.peer[len("torch SGD "):]]
            found.append(dataclasses.replace(
                c, build=torch_builder(torch, c.device, options, LR_EACH_STEP),
                schedule=LR_EACH_STEP))
    return found


def _device_synchronize(device):
    """What waits for every candidate's queued work on `device`."""
    if device == "cpu":
        return lambda: None
    from . import gpu
    return gpu.synchronize_device


def torch_candidates(absent, devices, gpu, gpu_reason):
    """The torch.optim.SGD peers on the CPU and, when there is a GPU torch can use, on it."""
    peers = [(f"torch SGD {variant}", options) for variant, options in TORCH_VARIANTS]
    try:
        import torch
    except ImportError as error:
        absent += [Absent(f"{peer} ({device})", "peer",
                          f"torch is not installed ({error})")
                   for device in devices for peer, _ in peers]
        return []
    found = []
    if "cpu" in devices:
        found += [Candidate("peer", "cpu", torch_builder(torch, "cpu", options),
                            update_bytes, HostTimer(), arrays=3, peer=peer)
                  for peer, options in peers]
    if "cuda" in devices:
        if gpu is None:
            reason = gpu_reason
        elif not torch.cuda.is_available():
            reason = f"torch {torch.__version__} cannot use the GPU (built without CUDA?)"
        else:
            reason = None
            timer = gpu.TorchEventTimer(torch)
            found += [Candidate("peer", "cuda", torch_builder(torch, "cuda", options),
                                update_bytes, timer, arrays=3, peer=peer)
                      for peer, options in peers]
        if reason is not None:
            absent += [Absent(f"{peer} (cuda)", "peer", reason) for peer, _ in peers]
    return found


def gpu_probe(devices):
    """(the bench.gpu module, None) where GPU runs can be timed, else (None, why not);
    (None, None) when "cuda" is not among `devices`."""
    if "cuda" not in devices:
        return None, None
    from . import gpu as gpu_module  # only GPU runs touch CuPy beyond this probe
    reason = gpu_module.unavailable_reason()
    return (gpu_module if reason is None else None), reason


def discover(devices=("cpu", "cuda"), velocity_dtypes=(FLOAT32_VELOCITY,)):
    """(candidates, absent): what runs here on `devices`, and what does not with why; the
    library's rows with each of `velocity_dtypes` (VELOCITY_DTYPES)."""
    absent, found = [], []
    gpu, gpu_reason = gpu_probe(devices)

    for name in backend_names():
        device = REGISTRY[name].device_type
        if device not in devices:
            continue
        try:
            backend = backend_named(name)
        except BackendUnavailableError as error:
            absent.append(Absent(backend_name(name), "backend", str(error)))
            continue
        if device == "cpu":
            timer = HostTimer(backend.synchronize)
        elif gpu is None:
            absent.append(Absent(backend_name(name), "backend",
                                 f"GPU runs are timed with CuPy events: {gpu_reason}"))
            continue
        else:
            timer = gpu.CupyEventTimer()
        if FLOAT32_VELOCITY in velocity_dtypes:
            found += [library_candidate(name, timer), *precision_candidates(name, timer)]
        if FLOAT8_VELOCITY in velocity_dtypes:
            found += float8_candidates(name, timer)

    if "cpu" in devices:
        found += [
            Candidate("peer", "cpu", naive_builder(np.array, np.array), update_bytes,
                      HostTimer(), arrays=NAIVE_ARRAYS, peer="numpy naive"),
            Candidate("peer", "cpu", numpy_out_builder, update_bytes, HostTimer(),
                      arrays=4, peer="numpy out="),
        ]
    found += torch_candidates(absent, devices, gpu, gpu_reason)
    if gpu is not None:
        found += gpu.candidates()
    elif "cuda" in devices:
        absent += [Absent(CUPY_PEER, "peer", gpu_reason),
                   Absent(ROOFLINES["cuda"], "roofline", gpu_reason),
                   Absent(COPY_ROOFLINE, "roofline", gpu_reason)]
    if "cpu" in devices:
        found += [
            Candidate("roofline", "cpu", stream_builder, stream_bytes, HostTimer(),
                      arrays=3, peer=ROOFLINE_PEERS["cpu"]),
            Candidate("roofline", "cpu", copyto_builder, copy_bytes, HostTimer(), arrays=2,
                      peer="numpy copyto"),
        ]
    return found, absent

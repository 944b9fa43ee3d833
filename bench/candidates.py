"""What the benchmark runs: this library's backends, the peers users would otherwise write,
and the memory rooflines, each as a builder that allocates its buffers and returns a step.

Every candidate moves the same data: params and grads of the benchmark's dtype, a velocity
of the dtype its framework keeps (the library: `state_dtype`, float32 for float16 params;
the peers: the param dtype). A peer that is not installed, or that cannot run a dtype, is
reported with the reason and never replaced by something else.
"""

import dataclasses
from typing import Callable, NamedTuple

import numba  # noqa: F401  (before torch: two OpenMP runtimes loaded the other way stall)
import numpy as np

from gpu_momentum import FlatParams, MomentumSGD
from gpu_momentum._arrays import state_dtype
from gpu_momentum._backends import BACKEND_NAMES, BackendUnavailableError, backend_named

from .measure import HostTimer, copy_bytes, stream_bytes, update_bytes

LR, MOMENTUM = 0.01, 0.9
LIBRARY = "gpu-momentum "
# The groups comparison: the library over GROUPS equal segments, once with one group (the
# optimizer's own hyperparameters) and once with each segment its own group.
GROUPS = 100
ROOFLINES = {"cpu": "roofline: stream 3R+2W (cpu)", "cuda": "roofline: D2D copy (cuda)"}
CUPY_PEER = "cupy expressions (cuda)"
# A naive update holds params, grads and velocity, plus up to three temporaries while
# evaluating `beta*v - lr*g` (the old velocity lives until the new one is bound).
NAIVE_ARRAYS = 6
TORCH_VARIANTS = (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                  ("fused", {"fused": True}))


class Unsupported(Exception):
    """This candidate cannot run this dtype or workload; the message says why."""


@dataclasses.dataclass
class Problem:
    """Host data of one measurement: flat params and grads, and the tensors' shapes.

    shapes is None for the flat workload (one buffer); otherwise p0 and g0 are the tensors
    of `shapes` laid end to end, which the library packs into a FlatParams and the peers
    update one tensor at a time.
    """
    p0: np.ndarray
    g0: np.ndarray
    shapes: list = None

    @property
    def n(self):
        return self.p0.size

    @property
    def dtype(self):
        return self.p0.dtype

    def tensors(self, flat):
        """Views of a flat host array shaped like the workload's tensors (or the array)."""
        if self.shapes is None:
            return [flat]
        views, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape, dtype=np.int64))
            views.append(flat[offset:offset + size].reshape(shape))
            offset += size
        return views


class Built(NamedTuple):
    """A candidate ready to time: `step()` runs once; `params()` returns host copies of
    the arrays it updates, so tests can check that every candidate does the same work."""
    step: Callable
    params: Callable


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One line of the benchmark. `build(problem)` allocates its buffers and returns a
    Built (or raises Unsupported); `timer` times the step."""
    name: str
    kind: str  # "backend", "peer" or "roofline"
    device: str  # "cpu" or "cuda"
    build: Callable
    bytes_per_element: Callable
    timer: object
    arrays: int  # buffers of the problem's size it holds at its peak, for the memory cap
    one_group: str = None  # groups comparison: the 1-group row this one is timed against

    @property
    def roofline(self):
        return ROOFLINES[self.device]


@dataclasses.dataclass(frozen=True)
class Absent:
    name: str
    kind: str
    reason: str


def group_spec(count):
    """`count` parameter groups, segment i alone in group i, each with its own lr, momentum
    and weight decay."""
    return [{"params": [i], "lr": LR * (1 + i / count),
             "momentum": MOMENTUM * (1 - i / count / 10), "weight_decay": 1e-4 * (i + 1)}
            for i in range(count)]


def library_candidate(name, timer, groups=1):
    """MomentumSGD (classic style, `v = mu*v - lr*g; p += v`) on backend `name`: the flat
    workload as one array, the many-tensor workloads packed into one FlatParams. With
    groups > 1 (the groups comparison), a workload of that many tensors, each its own
    parameter group (`group_spec`), still one launch per step."""
    backend = backend_named(name)

    def build(problem):
        if problem.dtype not in backend.dtypes:
            raise Unsupported(f"backend {name!r} has no {problem.dtype} "
                              f"(it takes {[str(d) for d in backend.dtypes]})")
        if groups > 1 and (problem.shapes is None or len(problem.shapes) != groups):
            raise Unsupported(f"{groups} groups need a workload of {groups} tensors")
        if problem.shapes is None:
            param = backend.copy(backend.asarray(problem.p0))
            grad = backend.copy(backend.asarray(problem.g0))
            opt = MomentumSGD(param, lr=LR, momentum=MOMENTUM, backend=name)
            return Built(lambda: opt.step(grad), lambda: [backend.to_numpy(param)])
        layers = [backend.asarray(t) for t in problem.tensors(problem.p0)]
        flat = FlatParams.from_arrays(layers)
        for view, grad in zip(flat.grads, problem.tensors(problem.g0)):
            backend.assign(view, grad)
        opt = MomentumSGD(flat, lr=LR, momentum=MOMENTUM, backend=name,
                          groups=group_spec(groups) if groups > 1 else None)
        return Built(opt.step, lambda: [backend.to_numpy(p) for p in flat.params])

    device = "cpu" if name == "cpu" else "cuda"
    one_group = LIBRARY + name
    return Candidate(one_group if groups == 1 else f"{one_group} ({groups} groups)",
                     "backend", device, build,
                     lambda dtype: update_bytes(dtype, state_dtype(dtype)), timer, arrays=4,
                     one_group=None if groups == 1 else one_group)


def groups_comparison(found):
    """The library's backends among `found`, each followed by its GROUPS-group variant
    (timed in turns with it, over the same FlatParams layout); peers and rooflines sit this
    comparison out."""
    return [variant for c in found if c.kind == "backend"
            for variant in (c, library_candidate(c.name[len(LIBRARY):], c.timer, GROUPS))]


def naive_builder(to_device, to_numpy):
    """`v = beta*v - lr*g; p += v` per tensor, as a user writes it with NumPy or CuPy."""
    def build(problem):
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


def torch_builder(torch, device, options):
    """torch.optim.SGD(momentum=0.9) over the workload's tensors, grads already set."""
    def build(problem):
        params = []
        for host, grad in zip(problem.tensors(problem.p0), problem.tensors(problem.g0)):
            param = torch.nn.Parameter(torch.tensor(host, device=device))
            param.grad = torch.tensor(grad, device=device)
            params.append(param)
        try:
            opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **options)
            # Fails here rather than while timing if this variant lacks the dtype; the
            # first step also creates the velocity, as in training.
            opt.step()
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            raise Unsupported(f"torch: {error}") from error
        return Built(opt.step, lambda: [p.detach().cpu().numpy().copy() for p in params])
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


def torch_candidates(absent, devices, gpu, gpu_reason):
    """The torch.optim.SGD peers on the CPU and, when there is a GPU torch can use, on it."""
    names = {device: [f"torch SGD {variant} ({device})" for variant, _ in TORCH_VARIANTS]
             for device in devices}
    try:
        import torch
    except ImportError as error:
        absent += [Absent(name, "peer", f"torch is not installed ({error})")
                   for device in devices for name in names[device]]
        return []
    found = []
    if "cpu" in devices:
        found += [Candidate(name, "peer", "cpu", torch_builder(torch, "cpu", options),
                            update_bytes, HostTimer(), arrays=3)
                  for name, (_, options) in zip(names["cpu"], TORCH_VARIANTS)]
    if "cuda" in devices:
        if gpu is None:
            reason = gpu_reason
        elif not torch.cuda.is_available():
            reason = f"torch {torch.__version__} cannot use the GPU (built without CUDA?)"
        else:
            reason = None
            timer = gpu.TorchEventTimer(torch)
            found += [Candidate(name, "peer", "cuda", torch_builder(torch, "cuda", options),
                                update_bytes, timer, arrays=3)
                      for name, (_, options) in zip(names["cuda"], TORCH_VARIANTS)]
        if reason is not None:
            absent += [Absent(name, "peer", reason) for name in names["cuda"]]
    return found


def discover(devices=("cpu", "cuda")):
    """(candidates, absent): what runs here on `devices`, and what does not with why."""
    absent, found = [], []
    gpu, gpu_reason = None, None
    if "cuda" in devices:
        from . import gpu as gpu_module  # only GPU runs touch CuPy beyond this probe
        gpu_reason = gpu_module.unavailable_reason()
        gpu = gpu_module if gpu_reason is None else None

    for name in BACKEND_NAMES:
        device = "cpu" if name == "cpu" else "cuda"
        if device not in devices:
            continue
        try:
            backend = backend_named(name)
        except BackendUnavailableError as error:
            absent.append(Absent(LIBRARY + name, "backend", str(error)))
            continue
        if device == "cpu":
            found.append(library_candidate(name, HostTimer(backend.synchronize)))
        elif gpu is None:
            absent.append(Absent(LIBRARY + name, "backend",
                                 f"GPU runs are timed with CuPy events: {gpu_reason}"))
        else:
            found.append(library_candidate(name, gpu.CupyEventTimer()))

    if "cpu" in devices:
        found += [
            Candidate("numpy naive (cpu)", "peer", "cpu", naive_builder(np.array, np.array),
                      update_bytes, HostTimer(), arrays=NAIVE_ARRAYS),
            Candidate("numpy out= (cpu)", "peer", "cpu", numpy_out_builder, update_bytes,
                      HostTimer(), arrays=4),
        ]
    found += torch_candidates(absent, devices, gpu, gpu_reason)
    if gpu is not None:
        found += gpu.candidates()
    elif "cuda" in devices:
        absent += [Absent(CUPY_PEER, "peer", gpu_reason),
                   Absent(ROOFLINES["cuda"], "roofline", gpu_reason)]
    if "cpu" in devices:
        found += [
            Candidate(ROOFLINES["cpu"], "roofline", "cpu", stream_builder, stream_bytes,
                      HostTimer(), arrays=3),
            Candidate("numpy copyto (cpu)", "roofline", "cpu", copyto_builder, copy_bytes,
                      HostTimer(), arrays=2),
        ]
    return found, absent

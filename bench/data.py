"""What the benchmark measures and what it records: problems, candidates, absent
candidates, and the names and constants every part of the benchmark shares."""

import dataclasses
from typing import Callable, NamedTuple

import numpy as np

from gpu_momentum.kernels.layout import FLOAT8_VELOCITY

LR, MOMENTUM = 0.01, 0.9
LIBRARY = "gpu-momentum"
SIXTEEN_BIT = ("bfloat16", "float16")  # the dtypes of the precision modes' rows
WIDE = ("float32", "float64")  # the dtypes the library's other rows run
# The groups comparison: the library over GROUPS equal segments, once with one group (the
# optimizer's own hyperparameters) and once with each segment its own group.
GROUPS = 100
# The memory roofline of each device (`peer` of its roofline row), and its row's name: on
# both, a streaming kernel with the update's traffic (read three arrays, write two). The
# GPU's device-to-device copy is measured beside it (COPY_ROOFLINE), and its theoretical
# peak is worked out from its attributes (bench.gpu.theoretical_peak_gbps).
ROOFLINE_PEERS = {"cpu": "roofline: stream 3R+2W", "cuda": "roofline: stream 3R+2W"}
ROOFLINES = {device: f"{peer} ({device})" for device, peer in ROOFLINE_PEERS.items()}
COPY_ROOFLINE_PEER = "roofline: D2D copy"
COPY_ROOFLINE = f"{COPY_ROOFLINE_PEER} (cuda)"
CUPY_EXPRESSIONS = "cupy expressions"
CUPY_PEER = f"{CUPY_EXPRESSIONS} (cuda)"
# A naive update holds params, grads and velocity, plus up to three temporaries while
# evaluating `beta*v - lr*g` (the old velocity lives until the new one is bound).
NAIVE_ARRAYS = 6
KINDS = ("backend", "peer", "roofline")
# The torch workloads time this front end of the library against torch.optim.SGD.
TORCH_API = "gpu_momentum.torch.SGD"
# The overhead workload: one flat buffer at each of these sizes, every backend and peer
# timed by the wall clock around a loop of steps with one synchronisation at its end (the
# per-step Python included), beside NumPy's two-line update.
OVERHEAD = "overhead"
OVERHEAD_SIZES = tuple(2**e for e in range(10, 21))
NUMPY_TWO_LINE = "numpy two-line"
# Scheduled rows (`schedule` of a candidate): LR_EACH_STEP, in the overhead workload, sets
# the lr before every step, cycling through SCHEDULED_LRS (the same values for every
# backend and peer); ONE_CYCLE, in the torch workloads, steps torch's OneCycleLR after
# every step (over ONE_CYCLE_STEPS steps, more than any run takes).
LR_EACH_STEP, ONE_CYCLE = "lr each step", "OneCycleLR"
SCHEDULED_LRS = tuple(LR * (1 + k / 8) for k in range(8))
ONE_CYCLE_STEPS = 10**9
GRAPH_REPLAY, GRAPH_GPU_TIME = "graph replay", "graph replay, GPU time"
# The library's velocities (`--velocity-dtypes`): FLOAT32_VELOCITY, the update's compute
# dtype (float32; float64 for float64 params) and, for 16-bit params, also a velocity of
# the param dtype; FLOAT8_VELOCITY, E4M3 codes with a float32 scale per block (float32 and
# 16-bit params, every precision mode they have).
FLOAT32_VELOCITY = "float32"
VELOCITY_DTYPES = (FLOAT32_VELOCITY, FLOAT8_VELOCITY)
# How a row's name shows a velocity other than the compute dtype's
# (Candidate.velocity_dtype).
VELOCITY_LABELS = {"param": ", 16-bit velocity", FLOAT8_VELOCITY: ", FP8 velocity"}


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
    Built (or raises Unsupported); `timer` times the step.

    Rows are told apart by fields, never by their display name: `backend` names the
    library's backend (kind "backend"), `peer` what a peer or roofline is (kind "peer" or
    "roofline", e.g. "torch SGD fused"), `groups` the parameter groups of the groups
    comparison's many-group variant (1 elsewhere), `api` which of the library's
    front ends runs the backend: "MomentumSGD", or TORCH_API (gpu_momentum.torch.SGD over
    nn.Parameters, in the torch workloads), `launch` how its steps are launched:
    "eager" (step() each time), GRAPH_REPLAY (one step captured in a CUDA graph, the
    graph launched) or GRAPH_GPU_TIME (the same, timed by CUDA events around each
    replay: the GPU's own time for the step's kernels), `schedule` how the lr changes
    between steps (None: it stays; LR_EACH_STEP, ONE_CYCLE), and `precision` and
    `velocity_dtype` ("param": the param dtype; FLOAT8_VELOCITY: E4M3 codes with a scale
    per block; None: the compute dtype, float32 or float64) the library's rows of 16-bit
    parameters (precision None: its float32 and float64 rows). `param_dtypes` names the
    dtypes a candidate runs (None: every dtype)."""
    kind: str  # one of KINDS
    device: str  # "cpu" or "cuda"
    build: Callable
    bytes_per_element: Callable
    timer: object
    arrays: int  # buffers of the problem's size it holds at its peak, for the memory cap
    backend: str = None
    peer: str = None
    groups: int = 1
    api: str = "MomentumSGD"
    launch: str = "eager"
    precision: str = None
    velocity_dtype: str = None
    param_dtypes: tuple = None
    schedule: str = None
    state_bytes: Callable = None  # the library's rows: optimizer state bytes per element

    @property
    def name(self):
        """The display name: "gpu-momentum cpu", "gpu-momentum cpu stochastic",
        "gpu-momentum cpu nearest, 16-bit velocity", "gpu-momentum cpu, FP8 velocity",
        "gpu-momentum cpu nearest, FP8 velocity", "torch SGD fused (cpu)",
        "gpu_momentum.torch.SGD (cpu)", "gpu-momentum cpu + lr each step",
        "torch SGD fused + OneCycleLR (cpu)", ..."""
        scheduled = "" if self.schedule is None else f" + {self.schedule}"
        if self.kind == "backend" and self.api == TORCH_API:
            return f"{TORCH_API} ({self.backend}){scheduled}"
        if self.kind == "backend":
            many = f" ({self.groups} groups)" if self.groups > 1 else ""
            mode = "" if self.precision is None else f" {self.precision}"
            if self.velocity_dtype is not None:
                mode += VELOCITY_LABELS[self.velocity_dtype]
            launch = f" ({self.launch})" if self.launch != "eager" else ""
            return f"{backend_name(self.backend)}{mode}{many}{launch}{scheduled}"
        return f"{self.peer}{scheduled} ({self.device})"

    def runs(self, dtype):
        """Whether this candidate runs parameters of `dtype` (a name)."""
        return self.param_dtypes is None or dtype in self.param_dtypes

    @property
    def roofline(self):
        return ROOFLINES[self.device]


@dataclasses.dataclass(frozen=True)
class Absent:
    name: str
    kind: str
    reason: str


def backend_name(backend):
    """The display name of the library's `backend`, as Candidate.name gives it."""
    return f"{LIBRARY} {backend}"

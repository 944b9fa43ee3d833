"""The cpu backend: NumPy arrays, updated by the Numba loops of kernels/cpu.py (parallel
over the cores, or serial for small buffers)."""

import numpy as np

from ..kernels.elementwise import storage_format
from ..float8_velocity import is_float8_velocity
from ..kernels.layout import LAST_STEP_SKIPPED, PRECISIONS, READ_COUNTERS
from .contract import bits_view
from .host_memory import HostMemory
from .runner import StepKernels, StepRunner

NO_COUNTERS = np.zeros(0, np.int64)  # what the kernels get for counters=None
NO_BUFFER = np.zeros(0, np.float32)  # for precision_buffer=None
NO_STEP_COUNT = np.int64(0)  # counted steps read counters[STEP_COUNT]


class CpuBackend(HostMemory):
    name = "cpu"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    element_aligned = False  # Numba's loads handle any address

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        """velocity: an array, or a Float8Velocity (the FP8 kernels of
        kernels/cpu_float8.py then run)."""
        kind = _CpuFloat8Kernels if is_float8_velocity(velocity) else _CpuKernels
        return StepRunner(kind(param, velocity, table, counters, check_nonfinite,
                               precision, precision_buffer, seed), param.size,
                          check_nonfinite)


class _CpuKernels(StepKernels):
    """The CPU's launches: the Numba loops of kernels/cpu.py, called now. A loss scale
    and found_inf are read on the host when the step runs, as a kernel would read them.
    A counted step's two loops each do two of the GPU's launches: find_nonfinite also
    clears (or found_inf skips the step), so it runs at "clear"; update_unless_skipped
    also counts, so it runs at "finish", which a counted step reaches even over no
    elements."""

    def __init__(self, param, velocity, table, counters, check_nonfinite, precision,
                 precision_buffer, seed):
        self.param = _bits(param)
        self.update, self.find_nonfinite, self.update_unless_skipped = self._kernels(
            param, velocity, table, PRECISIONS[precision.upper()])
        self.buffer = NO_BUFFER if precision_buffer is None else _bits(precision_buffer)
        self.table = table.arrays()
        self.scalar = table.scalars.dtype.type
        self.counters = counters
        launch_flags = table.launch_flags
        if counters is not None:
            launch_flags |= READ_COUNTERS
        self.launch_flags, self.seed = np.uint32(launch_flags), np.uint64(seed)
        self.check_nonfinite = check_nonfinite
        self.current = None  # a counted step's kernel arguments, set by "clear"

    def _kernels(self, param, velocity, table, precision):
        """The kernels' (step, find_nonfinite, update_unless_skipped); sets the velocity
        arguments (self.velocity: the arrays between grad and the precision buffer)."""
        from ..kernels.cpu import kernels_for, pieces_needed

        self.velocity = (_bits(velocity),)
        formats = storage_format(param.dtype), storage_format(velocity.dtype)
        return kernels_for(self.param.size, *formats, precision,
                           pieces_needed(table.scalars))

    def kernel_grad(self, grad):
        return _bits(grad)

    def kernel_grad_scale(self, grad_scale):
        """1 / grad_scale, read now (host memory), in the compute dtype."""
        return _reciprocal(self.scalar(grad_scale[()]))

    def kernel_found_inf(self, found_inf):
        return found_inf

    def launches(self):
        if self.counters is None:
            return {"update": self._update}
        return {"clear": self._clear, "find_nonfinite": None, "update": None,
                "finish": self._finish}

    def _arguments(self, step):
        inv = step.inv_grad_scale if step.grad_scale is None else step.grad_scale
        return (self.param, step.grad, *self.velocity, self.buffer, *self.table, inv,
                self.launch_flags)

    def _update(self, step):
        self.update(*self._arguments(step), NO_COUNTERS, self.seed, step.step_count)

    def _clear(self, step):
        """LAST_STEP_SKIPPED set from found_inf, else from the gradient's values (or 0
        for a step that does not look for non-finite values)."""
        arguments = self.current = self._arguments(step)
        if step.found_inf is not None and step.found_inf[()] != 0:
            self.counters[LAST_STEP_SKIPPED] = 1
        elif self.check_nonfinite:
            self.find_nonfinite(*arguments, self.counters, self.seed, NO_STEP_COUNT)
        else:
            self.counters[LAST_STEP_SKIPPED] = 0

    def _finish(self, step):
        self.update_unless_skipped(*self.current, self.counters, self.seed, NO_STEP_COUNT)


class _CpuFloat8Kernels(_CpuKernels):
    """The CPU's launches with an FP8 velocity: kernels/cpu_float8.py's loops, which take
    the codes and scales where the others take the velocity."""

    def _kernels(self, param, velocity, table, precision):
        from ..kernels.cpu import pieces_needed
        from ..kernels.cpu_float8 import float8_kernels_for

        self.velocity = (np.asarray(velocity.codes).reshape(-1),
                         np.asarray(velocity.scales).reshape(-1))
        return float8_kernels_for(self.param.size, storage_format(param.dtype), precision,
                                  pieces_needed(table.scalars))


def _reciprocal(scale):
    """1 / scale in scale's dtype, as the GPU kernels work it out from a loss scale in
    device memory (inf for 0: the gradient is then not finite)."""
    with np.errstate(divide="ignore", over="ignore"):
        return scale.dtype.type(1) / scale


def _bits(array):
    """A 1-D plain ndarray view (a numpy.memmap is passed as the buffer it is), 16-bit
    elements as their uint16 bits (contract.bits_view)."""
    return bits_view(np.asarray(array).reshape(-1))

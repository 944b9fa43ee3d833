"""The cpu backend: NumPy arrays, updated by the Numba loops of kernels/cpu.py (parallel
over the cores, or serial for small buffers)."""

import numpy as np

from ..kernels.elementwise import storage_format
from ..kernels.layout import LAST_STEP_SKIPPED, PRECISIONS, READ_COUNTERS
from .contract import PreparedStep, bits_view, refuse_found_inf_without_counters

NO_COUNTERS = np.zeros(0, np.int64)  # what the kernels get for counters=None
NO_BUFFER = np.zeros(0, np.float32)  # for precision_buffer=None
NO_STEP_COUNT = np.int64(0)  # counted steps read counters[STEP_COUNT]


class CpuBackend(PreparedStep):
    name = "cpu"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    element_aligned = False  # Numba's loads handle any address

    zeros = staticmethod(np.zeros)
    copy = staticmethod(np.copy)
    asarray = to_numpy = staticmethod(np.asarray)

    def unavailable_reason(self):
        return None

    def owns(self, array):
        return isinstance(array, np.ndarray)

    native = owns

    def assign(self, target, source):
        target[...] = source

    def synchronize(self):
        pass

    def place(self, param):
        return None

    def upload(self, array, param):
        return array  # the update runs in host memory: the host table is the table

    def upload_into(self, target, array, param):
        target[...] = array

    def capturing(self, param):
        return False

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        from ..kernels.cpu import kernels_for, pieces_needed

        formats = storage_format(param.dtype), storage_format(velocity.dtype)
        param, velocity = _bits(param), _bits(velocity)
        update, find_nonfinite, update_unless_skipped = kernels_for(
            param.size, *formats, PRECISIONS[precision.upper()],
            pieces_needed(table.scalars))
        buffer = NO_BUFFER if precision_buffer is None else _bits(precision_buffer)
        scalars, group_flags, range_ends, range_groups = table.arrays()
        scalar = table.scalars.dtype.type
        launch_flags = table.launch_flags
        if counters is not None:
            launch_flags |= READ_COUNTERS
        launch_flags, seed = np.uint32(launch_flags), np.uint64(seed)
        # The latest grad and scale as the kernels take them: a step repeating them (the
        # same objects) converts nothing.
        last_grad = flat_grad = last_scale = inv = None

        def launch(grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None,
                   step_count=0):
            nonlocal last_grad, flat_grad, last_scale, inv
            if grad is not last_grad:
                last_grad, flat_grad = grad, _bits(grad)
            if grad_scale is not None:  # host memory: read now, as a kernel would
                last_scale, inv = None, _reciprocal(scalar(grad_scale[()]))
            elif inv_grad_scale is not last_scale:
                last_scale, inv = inv_grad_scale, scalar(inv_grad_scale)
            arguments = (param, flat_grad, velocity, buffer, scalars, group_flags,
                         range_ends, range_groups, inv, launch_flags)
            if counters is None:
                refuse_found_inf_without_counters(found_inf)
                update(*arguments, NO_COUNTERS, seed, np.int64(step_count))
                return
            if found_inf is not None and found_inf[()] != 0:
                counters[LAST_STEP_SKIPPED] = 1
            elif check_nonfinite:
                find_nonfinite(*arguments, counters, seed, NO_STEP_COUNT)
            else:
                counters[LAST_STEP_SKIPPED] = 0
            if agree is not None:
                agree(counters)
            update_unless_skipped(*arguments, counters, seed, NO_STEP_COUNT)

        return launch



def _reciprocal(scale):
    """1 / scale in scale's dtype, as the GPU kernels work it out from a loss scale in
    device memory (inf for 0: the gradient is then not finite)."""
    with np.errstate(divide="ignore", over="ignore"):
        return scale.dtype.type(1) / scale


def _bits(array):
    """A 1-D plain ndarray view (a numpy.memmap is passed as the buffer it is), 16-bit
    elements as their uint16 bits (contract.bits_view)."""
    return bits_view(np.asarray(array).reshape(-1))

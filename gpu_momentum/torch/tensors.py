"""The glue between torch tensors and the backends' arrays: torch's dtypes as NumPy's, the
flat buffers as each backend's arrays and the context its launches run in, and the views
that make a parameter's tensors segments of a flat buffer."""

import contextlib

import numpy as np
import torch

NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
                torch.float64: np.dtype(np.float64)}
try:  # torch.bfloat16 as NumPy knows it: ml_dtypes' (the "bf16" extra)
    import ml_dtypes
    NUMPY_DTYPES[torch.bfloat16] = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    pass
TORCH_DTYPES = {numpy: torch_dtype for torch_dtype, numpy in NUMPY_DTYPES.items()}
data_ptr = torch.Tensor.data_ptr  # looked up once: read for every parameter at every step


class ArraysFor:
    """The flat tensors as the backend's arrays, and the context its launches run in:
    NumPy views on the CPU; on CUDA, torch's current stream of the buffers' device (CuPy
    launches on its current stream; numba-cuda on the stream an array names, and torch's
    __cuda_array_interface__ names none)."""

    def __init__(self, backend, device, tensors):
        self.backend, self.device, self.tensors = backend, device, tensors
        if device.type == "cpu":
            self.fixed = tuple(map(_numpy_view, tensors))
        elif backend.name == "cupy":
            import cupy
            with cupy.cuda.Device(self._index()):
                self.fixed = tuple(_StreamArray(t, None) if t.dtype == torch.bfloat16
                                   else cupy.asarray(t) for t in tensors)
        else:
            self.fixed = None  # numba-cuda: views naming the current stream, per step

    def _index(self):
        return self.device.index if self.device.index is not None else \
            torch.cuda.current_device()

    def stream(self):
        """torch's current CUDA stream of the buffers' device, as its handle."""
        return torch.cuda.current_stream(self.device).cuda_stream

    def context(self):
        if self.device.type == "cpu":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.backend.name == "cupy":
            import cupy
            stack.enter_context(cupy.cuda.Device(self._index()))
            stack.enter_context(cupy.cuda.ExternalStream(self.stream(), self._index()))
        else:
            from numba import cuda
            stack.enter_context(cuda.gpus[self._index()])
        return stack

    def step_arrays(self):
        if self.fixed is not None:
            return self.fixed
        stream = self.stream() or 1  # CAI v3: 1 is the legacy default stream, torch's 0
        return tuple(_StreamArray(t, stream) for t in self.tensors)


class _StreamArray:
    """A torch CUDA tensor's __cuda_array_interface__ (version 3) naming `stream`. torch
    gives bfloat16 tensors no interface: theirs is their bits' (an int16 view, described
    as "<u2") with `dtype` ml_dtypes' bfloat16, which the library's checks read
    (arrays.describe) and its kernels take as bits."""

    def __init__(self, tensor, stream):
        interface = tensor.__cuda_array_interface__ if tensor.dtype != torch.bfloat16 else \
            {**tensor.view(torch.int16).__cuda_array_interface__, "typestr": "<u2"}
        if tensor.dtype == torch.bfloat16:
            self.dtype = NUMPY_DTYPES[torch.bfloat16]
        self.__cuda_array_interface__ = {**interface, "version": 3, "stream": stream}


def _numpy_view(tensor):
    """A CPU tensor as a NumPy array over its memory: bfloat16 through its bits, as
    ml_dtypes' bfloat16 (NumPy has no torch.bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY_DTYPES[torch.bfloat16])
    return tensor.numpy()


def real_dtype(dtype):
    """The dtype of the flat buffer that holds tensors of `dtype` (complex: real parts)."""
    return dtype.to_real() if dtype.is_complex else dtype


def segment(flat, offset, like):
    """A view of `flat` from `offset` shaped like tensor `like`: with its strides where
    those cover its elements densely (channels_last, transposed), else contiguous;
    complex as view_as_complex of (real, imaginary) pairs."""
    if like.is_complex():
        pairs = flat[offset:offset + 2 * like.numel()].view(*like.shape, 2)
        return torch.view_as_complex(pairs)
    size = like.numel()
    strides = like.stride() if _covers_densely(like) else None
    piece = flat[offset:offset + size]
    return piece.view(like.shape) if strides is None else piece.as_strided(like.shape,
                                                                           strides)


def _covers_densely(tensor):
    """Whether the strides map the elements one to one onto numel() consecutive ones."""
    if tensor.numel() == 0:
        return False
    expected = 1
    for stride, size in sorted((t, s) for s, t in zip(tensor.shape, tensor.stride())
                               if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense(tensor):
    """`tensor` as a strided tensor (a sparse one densified)."""
    return tensor.to_dense() if tensor.layout != torch.strided else tensor



def to_float(value):
    """A group value as a Python float (a tensor's item: on CUDA that waits for it)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


"""The glue between torch tensors and the backends' arrays: torch's dtypes as NumPy's, the
flat buffers as each backend's arrays and the context its launches run in, and the views
that make a parameter's tensors segments of a flat buffer."""

import numpy as np
import torch

from ..kernels.layout import DECAY, LR

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
    """The flat tensors as the backend's arrays (Backend.from_torch), and the context its
    launches run in (Backend.torch_context: on CUDA, torch's current stream of the
    buffers' device). A backend whose arrays name their stream gets new views at each
    step, naming torch's current stream then."""

    def __init__(self, backend, device, tensors):
        self.backend, self.device, self.tensors = backend, device, tensors
        self.fixed = None if backend.arrays_name_stream else \
            tuple(map(backend.from_torch, tensors))

    def stream(self):
        """The backend's handle of torch's current stream on the buffers' device."""
        return self.backend.torch_stream(self.device)

    def context(self):
        return self.backend.torch_context(self.device)

    def step_arrays(self):
        if self.fixed is not None:
            return self.fixed
        stream = self.stream()
        return tuple(self.backend.from_torch(t, stream) for t in self.tensors)


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


def as_torch(array, device):
    """A torch tensor over the memory of a backend's array on `device`, no copy (CUDA
    arrays through __cuda_array_interface__, host arrays through NumPy's)."""
    return torch.as_tensor(array, device=device)


def write_lr_on_device(scalars, rows, lr, decoupled_weight_decay=None):
    """Writes the 1-element tensor `lr` into the lr column of rows `rows` (a slice, or
    their indices) of `scalars` (a torch view of an update table's scalars on lr's
    device), cast to their dtype as table_row casts it (to the nearest); with
    `decoupled_weight_decay` (a nonzero float) also the decay column, 1 - lr *
    weight_decay worked out there in that dtype. Queued on torch's current stream: the
    value is never read on the host, and nothing waits."""
    if not isinstance(rows, slice):
        rows = torch.from_numpy(rows).to(scalars.device, non_blocking=True)
    lr = lr.detach().reshape(()).to(scalars.dtype, non_blocking=True)
    scalars[rows, LR] = lr
    if decoupled_weight_decay is not None:  # (a Python float: cast to the dtype first)
        scalars[rows, DECAY] = 1 - lr * decoupled_weight_decay

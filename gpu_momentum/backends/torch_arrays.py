"""Torch tensors as the backends' arrays, without copies (Backend.from_torch), and
torch's current CUDA stream. Only gpu_momentum.torch hands tensors over, so torch is
imported here only when a tensor already exists.

torch gives bfloat16 tensors no `__cuda_array_interface__` and NumPy has no bfloat16 of
its own: a bfloat16 tensor is read through its bits (an int16 view) and described with
ml_dtypes' bfloat16, which the library's checks read (arrays.describe) and its kernels
take as bits.
"""

import numpy as np


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def numpy_view(tensor):
    """A CPU tensor as a NumPy array over its memory: bfloat16 through its bits, as
    ml_dtypes' bfloat16."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_bfloat16())
    return tensor.numpy()


class CudaTensorArray:
    """A torch CUDA tensor's __cuda_array_interface__ (version 3) naming `stream` (None:
    none); a bfloat16 tensor's is its bits' (described as "<u2") with `dtype` ml_dtypes'
    bfloat16."""

    def __init__(self, tensor, stream):
        import torch

        interface = tensor.__cuda_array_interface__ if tensor.dtype != torch.bfloat16 else \
            {**tensor.view(torch.int16).__cuda_array_interface__, "typestr": "<u2"}
        if tensor.dtype == torch.bfloat16:
            self.dtype = _bfloat16()
        self.__cuda_array_interface__ = {**interface, "version": 3, "stream": stream}


def current_stream(device):
    """The handle of torch's current CUDA stream on `device` (0: the legacy default
    stream)."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def device_index(device):
    """The index of a torch CUDA device (the current one for a plain "cuda")."""
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()

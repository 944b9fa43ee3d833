"""`HostMemory`: the part of the Backend contract that is the same for every backend whose
arrays are NumPy arrays in host memory (the cpu backend, and backends added from outside
that compute on the host): the update runs where the arrays are, so the host table is the
table, there is no stream, and nothing is ever captured."""

import contextlib

import numpy as np

from .contract import PreparedStep
from .torch_arrays import numpy_view


class HostMemory(PreparedStep):
    """Backend's memory methods for NumPy arrays; a subclass adds name, dtypes,
    element_aligned and step_function (and may say `native` differently)."""

    device_type = "cpu"
    arrays_name_stream = False

    zeros = staticmethod(np.zeros)
    copy = staticmethod(np.copy)
    asarray = to_numpy = staticmethod(np.asarray)

    def unavailable_reason(self):
        return None

    def owns(self, array):
        return isinstance(array, np.ndarray)

    def native(self, array):
        return self.owns(array)

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

    def torch_stream(self, device):
        return None

    def torch_context(self, device):
        return contextlib.nullcontext()

    def from_torch(self, tensor, stream=None):
        return numpy_view(tensor)

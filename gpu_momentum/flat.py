"""FlatParams: many arrays (a model's layers) packed into one contiguous buffer."""

import numpy as np

from .arrays import check_param_dtype, describe, type_name
from .backends import select_backend

SEGMENT_ALIGNMENT_BYTES = 16  # one 128-bit vector: every segment can use vector loads


class FlatParams:
    """One flat parameter buffer and one gradient buffer of the same layout.

    `data` and `grad` are 1-D buffers; `params` and `grads` are views into them shaped like
    the packed arrays (the model works on these views and writes gradients into `grads`).
    Segment i lives at `data[offsets[i]:offsets[i] + sizes[i]]` and starts on a 16-byte
    boundary. The padding between segments starts at zero and no update reads or writes
    it (nor the gradient's padding): whatever `grad[...] = x` puts there, NaN included,
    the padding of the parameters and of the velocity keeps its bits.
    """

    def __init__(self, data, grad, shapes, offsets, names=None):
        self.data = data
        self.grad = grad
        self.shapes = [tuple(s) for s in shapes]
        self.offsets = [int(o) for o in offsets]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.params = self._views(data)
        self.grads = self._views(grad)
        self.names = _check_names(names, len(self.shapes))

    @classmethod
    def from_arrays(cls, arrays, names=None):
        """Packs copies of `arrays` (all NumPy or all CuPy, one floating dtype).

        names: optional distinct strings, one per array (layer names), by which parameter
        groups may name segments. The buffers are allocated by the backend that owns the
        arrays; the gradient buffer starts at zero.
        """
        single_array = (hasattr(arrays, "__array_interface__")
                        or hasattr(arrays, "__cuda_array_interface__"))
        if single_array or isinstance(arrays, (str, bytes)) or not hasattr(arrays,
                                                                           "__iter__"):
            raise TypeError(f"arrays must be a list of arrays, got {type_name(arrays)}")
        arrays = list(arrays)
        if not arrays:
            raise ValueError("arrays must hold at least one array, got an empty list")
        _check_names(names, len(arrays))
        infos = [describe(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
        dtypes = sorted({str(info.dtype) for info in infos})
        if len(dtypes) > 1:
            raise TypeError(f"arrays have mixed dtypes {dtypes}; a flat buffer holds one "
                            f"dtype (use one FlatParams per dtype)")
        dtype = infos[0].dtype
        check_param_dtype("arrays", dtype)
        backend = select_backend(None, arrays[0])
        for i, array in enumerate(arrays):
            if not backend.owns(array):
                raise TypeError(f"arrays[{i}] is a {type_name(array)} but arrays[0] is a "
                                f"{type_name(arrays[0])}; pack arrays of one kind")

        offsets, end = [], 0
        for info in infos:
            offset = aligned(end, dtype.itemsize)
            offsets.append(offset)
            end = offset + info.nbytes // dtype.itemsize
        total = aligned(end, dtype.itemsize)

        data, grad = backend.zeros(total, dtype), backend.zeros(total, dtype)
        flat = cls(data, grad, [info.shape for info in infos], offsets, names)
        for view, array in zip(flat.params, arrays):
            backend.assign(view, array)
        return flat

    def _views(self, buffer):
        return [buffer[o:o + n].reshape(s)
                for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def __len__(self):
        return len(self.shapes)

    def __repr__(self):
        return (f"FlatParams({len(self)} segments, {self.data.size} elements, "
                f"dtype={self.data.dtype})")


def _check_names(names, count):
    """`names` as a list, or None; distinct strings, one per segment."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise TypeError(f"Invalid names value: {names!r} (names must be a list of strings)")
    names = list(names)
    if len(names) != count or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"Invalid names value: {names!r} (names must be {count} "
                         f"non-empty strings, one per array)")
    if len(set(names)) != count:
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"Invalid names value: {twice!r} is given twice (names must be "
                         f"distinct)")
    return names


def vector_elements(itemsize):
    """The elements of `itemsize` bytes in one SEGMENT_ALIGNMENT_BYTES vector (at least
    one): the unit segments, buckets and shards start on."""
    return max(1, SEGMENT_ALIGNMENT_BYTES // itemsize)


def aligned(elements, itemsize):
    """`elements` (elements of `itemsize` bytes) rounded up to a whole number of vectors
    (vector_elements): where the next segment may start."""
    vector = vector_elements(itemsize)
    return -(-elements // vector) * vector

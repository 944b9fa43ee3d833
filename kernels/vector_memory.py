"""128-bit global memory for the Numba CUDA kernels: a word of 16 bytes per load or store.

numba-cuda compiles `array[i]` to one scalar load (ld.global.f32, ld.global.u16); the CUDA
C kernel (kernels/momentum.cu) moves 16 bytes per instruction. `vector_memory(simulated)`
gives the kernels the same: `load(count)` is a device function (array, first) -> a tuple of
the `count` elements from `first` on, `store(array, first, values)` writes such a tuple
back, each as aligned LLVM vector loads and stores in the global address space, which
LLVM's NVPTX back end emits as ld.global.v4.f32 / v2.f64 / v4.u32 (more than 16 bytes:
several such instructions). 16-bit elements travel as <4 x i32> and are split and joined
with shifts: LLVM would move an <8 x i16> as two 64-bit ld.global.v4.u16; so do 8-bit
elements (4 per lane: a word of 4 or 8 FP8 codes is one ld.global.u32 or v2.u32).

The caller guarantees that `array`'s data + first elements lies on a boundary of
min(16, the word's bytes) (`address` gives the data's address): an unaligned vector
access faults on the GPU.

In the CUDA simulator the kernels run as Python: the same names are plain functions over
the simulator's arrays (no alignment needed, `address` is the NumPy data pointer, so the
kernels take the same head/words/tail path as on a GPU).
"""

import functools

VECTOR_BYTES = 16


class VectorMemory:
    """address(array) -> int64, load(count) -> loader, store(array, first, values)."""

    def __init__(self, address, load, store):
        self.address, self.load, self.store = address, load, store


def elements_per_word(itemsize):
    """Elements of `itemsize` bytes in one 16-byte word: 4 float32, 2 float64, 8 16-bit."""
    return VECTOR_BYTES // itemsize


@functools.cache
def vector_memory(simulated):
    """The target's VectorMemory: the CUDA intrinsics, or Python for the simulator."""
    return _simulated() if simulated else _compiled()


def _simulated():
    def address(array):
        return array.ctypes.data

    @functools.cache
    def load(count):
        def load_word(array, first):
            return tuple(array[first + k] for k in range(count))
        return load_word

    def store(array, first, values):
        for k, value in enumerate(values):
            array[first + k] = value

    return VectorMemory(address, load, store)


def _compiled():
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    lane_index = ir.IntType(32)

    def lanes(context, dtype, count):
        """(element type, elements per lane, vector type) of `count` elements: 16-bit and
        8-bit elements share a 32-bit lane with their neighbours (lower index in the lower
        bits)."""
        element = context.get_value_type(dtype)
        narrow = isinstance(element, ir.IntType) and element.width < 32
        per_lane = 32 // element.width if narrow else 1
        return element, per_lane, ir.VectorType(lane_index if narrow else element,
                                                count // per_lane)

    def global_pointer(context, builder, array_type, array, first, vector):
        data = context.make_array(array_type)(context, builder, array).data
        pointer = builder.bitcast(builder.gep(data, [first], inbounds=True),
                                  vector.as_pointer())
        # Address space 1 (global): a generic ld.v4 would first test where it points.
        return builder.addrspacecast(pointer, vector.as_pointer(1))

    def alignment(context, dtype, count):
        """The word's alignment: its size, up to 16 bytes."""
        return min(VECTOR_BYTES, count * context.get_abi_sizeof(
            context.get_value_type(dtype)))

    @intrinsic
    def address(typingctx, array):
        def codegen(context, builder, signature, args):
            data = context.make_array(array)(context, builder, args[0]).data
            return builder.ptrtoint(data, context.get_value_type(types.int64))
        return types.int64(array), codegen

    @functools.cache
    def load(count):
        @intrinsic
        def load_word(typingctx, array, first):
            word_type = types.UniTuple(array.dtype, count)

            def codegen(context, builder, signature, args):
                element, per_lane, vector = lanes(context, array.dtype, count)
                word = builder.load(global_pointer(context, builder, array, args[0],
                                                   args[1], vector),
                                    align=alignment(context, array.dtype, count))
                values = []
                for k in range(vector.count):
                    lane = builder.extract_element(word, ir.Constant(lane_index, k))
                    if per_lane == 1:
                        values.append(lane)
                        continue
                    for part in range(per_lane):
                        shift = ir.Constant(lane_index, part * element.width)
                        values.append(builder.trunc(builder.lshr(lane, shift), element))
                return context.make_tuple(builder, word_type, values)
            return word_type(array, first), codegen
        return load_word

    @intrinsic
    def store(typingctx, array, first, values):
        count = values.count

        def codegen(context, builder, signature, args):
            element, per_lane, vector = lanes(context, array.dtype, count)
            word = ir.Constant(vector, ir.Undefined)
            for k in range(vector.count):
                if per_lane == 1:
                    lane = builder.extract_value(args[2], k)
                else:
                    lane = ir.Constant(lane_index, 0)
                    for part in range(per_lane):
                        value = builder.zext(
                            builder.extract_value(args[2], k * per_lane + part), lane_index)
                        shift = ir.Constant(lane_index, part * element.width)
                        lane = builder.or_(lane, builder.shl(value, shift))
                word = builder.insert_element(word, lane, ir.Constant(lane_index, k))
            builder.store(word, global_pointer(context, builder, array, args[0], args[1],
                                               vector),
                          align=alignment(context, array.dtype, count))
            return context.get_dummy_value()
        return types.void(array, first, values), codegen

    return VectorMemory(address, load, store)

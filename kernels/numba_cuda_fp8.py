"""Numba CUDA kernels with an FP8 velocity: one warp per block of FLOAT8_BLOCK elements.

`float8_update_kernel(param_format, precision)` is the update of one kind (compiled on
first use); its arguments are those of kernels.numba_cuda's update_kernel with the
velocity as two arrays (layout in kernels.layout, format in gpu_momentum.reference):

  param, grad, codes, scales, precision_buffer, scalars, group_flags, range_ends,
  range_groups, inv_grad_scale, grad_scale, launch_flags, counters, seed, step_count

codes: uint8[n], the E4M3 codes; scales: float32[ceil(n / FLOAT8_BLOCK)]. The
non-finite check and the step's other launches are kernels.numba_cuda's (check_kernel,
clear_skip_kernel, finish_step_kernel), in kernels.cuda_launch.step_launches' order.

Each warp of a thread block takes one block of the buffer per round (rounds stride over
the grid, the same number for every thread of a thread block) and keeps its new
velocities in registers, eight per lane. Memory, as momentum.cu's momentum_step_fp8: when
every array starts on a word (param, grad and the precision buffer on 16 bytes, codes on
a lane word's bytes), a whole block moves as words (kernels.vector_memory): lane l
updates the WORD elements from begin + (32 w + l) WORD (w < 8 / WORD; WORD = 4 float32
or 8 16-bit params: 128-bit loads and stores, the codes a 32-bit or 64-bit word, the
warp's words adjacent), element by element within a word that holds a range end. The
last partial block, and every block of arrays off their words, go element by element:
lane l updates begin + 32 j + l (j < 8, coalesced). The block's absmax, and whether any
of its groups writes the velocity, meet in shared memory (atomic max, then one
__syncthreads per round: three slot sets in turn, each cleared two rounds before its
next use, so no second barrier is needed); then the lane writes its codes and lane 0 the
scale. The results equal the CPU kernels' (kernels.cpu_float8) and momentum.cu's
momentum_step_fp8 bit for bit (which reduces with warp shuffles: Numba's CUDA simulator
has none, but has barriers and shared memory).
"""

import functools

import numpy as np
from numba import cuda, float32, uint32
from numba.core import config

from .elementwise import KAHAN, MASTER, NATIVE, specialized
from .float8 import (LARGEST, float8_functions, float8_step, float8_update,
                     velocity_random_bits)
from .layout import (CLASSIC, FLOAT8_BLOCK, LAST_STEP_SKIPPED, NO_GROUP, PRECISION_NAMES,
                     READ_COUNTERS, STEP_COUNT, STOCHASTIC)
from .numba_cuda import (FORMAT_NAMES, STORAGE, THREADS_PER_BLOCK, VECTORS,
                         device_functions_built_for, group_hyperparameters_cuda,
                         inverse_loss_scale, linked, read_param_source, seek_cursor,
                         step_key_cuda)
from .vector_memory import VECTOR_BYTES, elements_per_word

_inline = cuda.jit(device=True, inline="always")  # see kernels.numba_cuda
FLOAT8 = float8_functions(STORAGE, _inline)
from_code_cuda = FLOAT8.from_code
magnitude_bits_cuda = FLOAT8.magnitude_bits
# Called at every element of a lane's words: compiled once, inlined by LLVM.
to_code_cuda = float8_functions(STORAGE, linked).to_code
r16_cuda = velocity_random_bits(STORAGE, _inline, key_per_element=True)
f32_from_bits_cuda = STORAGE.f32_from_bits
WARP = 32
PER_LANE = FLOAT8_BLOCK // WARP
MOST_WARPS = THREADS_PER_BLOCK // WARP  # shared slots per set: launches use at most this
SLOT_SETS = 3


# A lane's eight new velocities live in a tuple, written and read through a chain of
# selects on j: a local array indexed in a loop LLVM does not unroll (the element update
# is long) would sit in local memory.
assert PER_LANE == 8, "_put, _largest_magnitude and the tuples below hold eight values"


@cuda.jit(device=True, inline="always")
def _put(values, j, x):
    """`values` with element j replaced by x."""
    return (x if j == 0 else values[0], x if j == 1 else values[1],
            x if j == 2 else values[2], x if j == 3 else values[3],
            x if j == 4 else values[4], x if j == 5 else values[5],
            x if j == 6 else values[6], x if j == 7 else values[7])


@cuda.jit(device=True, inline="always")
def _get(values, j):
    """Element j of `values`, by selects."""
    x = values[0]
    for m in range(1, PER_LANE):
        if j == m:
            x = values[m]
    return x


@cuda.jit(device=True, inline="always")
def _largest_magnitude(values):
    """The largest finite |v| of the eight values, as float32 bits (0: none)."""
    return max(max(max(magnitude_bits_cuda(values[0]), magnitude_bits_cuda(values[1])),
                   max(magnitude_bits_cuda(values[2]), magnitude_bits_cuda(values[3]))),
               max(max(magnitude_bits_cuda(values[4]), magnitude_bits_cuda(values[5])),
                   max(magnitude_bits_cuda(values[6]), magnitude_bits_cuda(values[7]))))


# The kernels of each kind are copies of these templates (elementwise.specialized) whose
# globals name that kind's compiled functions and constants: `update`, `element`,
# `whole_block`, `write_whole_codes`, `on_words`, `stochastic`.

def _element(param, grad, codes, precision_buffer, scalars, group_flags, counters,
             range_ends, range_groups, read_counters, i, old_scale, key, inv_grad_scale,
             classic, r, end, k, hyper):
    """Element i, updated in place with its own range's group (a cursor moved from a
    smaller index, kernels.numba_cuda.seek_cursor): (new velocity (0 for padding),
    whether its group writes the velocity, the cursor)."""
    r, end, k, hyper = seek_cursor(scalars, group_flags, counters, range_ends,
                                   range_groups, read_counters, i, r, end, k, hyper)
    v = float32(0)
    writes = False
    if k != NO_GROUP:
        (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
         initialized) = hyper
        old = float32(0)
        if initialized or (not classic and momentum == 0):  # exists, or kept
            old = from_code_cuda(codes[i]) * old_scale
        v = update(param, grad, precision_buffer, i, old, key, lr,  # noqa: F821
                   momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
                   nesterov, maximize, initialized)
        writes = classic or momentum != 0
    return v, writes, r, end, k, hyper


def _update(param, grad, codes, scales, precision_buffer, scalars, group_flags, range_ends,
            range_groups, inv_grad_scale, grad_scale, launch_flags, counters, seed,
            step_count):
    if launch_flags & READ_COUNTERS != 0 and counters[LAST_STEP_SKIPPED] != 0:
        return  # a non-finite gradient: the step changes nothing (every thread alike)
    inv_grad_scale = inverse_loss_scale(inv_grad_scale, grad_scale)
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    key = step_key_cuda(seed, counters[STEP_COUNT] if read_counters else step_count)
    absmax = cuda.shared.array((SLOT_SETS, MOST_WARPS), np.uint32)
    writers = cuda.shared.array((SLOT_SETS, MOST_WARPS), np.uint32)
    thread = cuda.threadIdx.x
    warp, lane = thread // WARP, thread % WARP
    warps_per_block = cuda.blockDim.x // WARP
    if thread < SLOT_SETS * MOST_WARPS:
        absmax[thread // MOST_WARPS, thread % MOST_WARPS] = uint32(0)
        writers[thread // MOST_WARPS, thread % MOST_WARPS] = uint32(0)
    cuda.syncthreads()
    zero = float32(0)
    # The cursor: each lane's indices only grow (blocks in rounds, words and elements in
    # a block in order), so it looks a range up only past the current range's end. Group
    # 0's values until the first lookup (never the table at NO_GROUP).
    r, end, k = -1, 0, NO_GROUP
    hyper = group_hyperparameters_cuda(scalars, group_flags, counters, 0, read_counters)
    n = param.size
    # As momentum.cu's momentum_step_fp8: whole blocks move as words when every array
    # starts on one (a block is whole words of every element size); else, and in the
    # last partial block, element by element.
    aligned = on_words(param, grad, codes, precision_buffer)  # noqa: F821
    rounds_from = cuda.blockIdx.x * warps_per_block
    rounds = 0
    for first_block in range(rounds_from, scales.size, cuda.gridDim.x * warps_per_block):
        now, later = rounds % SLOT_SETS, (rounds + 1) % SLOT_SETS
        rounds += 1
        block = first_block + warp
        begin = block * FLOAT8_BLOCK
        whole = aligned and begin + FLOAT8_BLOCK <= n
        writes = False
        magnitude = uint32(0)
        values = (zero, zero, zero, zero, zero, zero, zero, zero)
        if block < scales.size:
            old_scale = scales[block]
            if whole:  # the lane's words: elements begin + (32 w + lane) WORD on
                values, writes, r, end, k, hyper = whole_block(  # noqa: F821
                    param, grad, codes, precision_buffer, scalars, group_flags, counters,
                    range_ends, range_groups, read_counters, begin, lane, old_scale, key,
                    inv_grad_scale, classic, r, end, k, hyper)
            else:  # element j of the lane: begin + 32 j + lane
                for j in range(PER_LANE):
                    i = begin + j * WARP + lane
                    v = zero
                    if i < n:
                        v, wrote, r, end, k, hyper = element(  # noqa: F821
                            param, grad, codes, precision_buffer, scalars, group_flags,
                            counters, range_ends, range_groups, read_counters, i,
                            old_scale, key, inv_grad_scale, classic, r, end, k, hyper)
                        writes = writes or wrote
                    values = _put(values, j, v)
            magnitude = _largest_magnitude(values)
            cuda.atomic.max(absmax, (now, warp), magnitude)
            if writes:
                cuda.atomic.max(writers, (now, warp), uint32(1))
        if lane == 0:  # the set of two rounds ago: every thread has read it
            absmax[later, warp] = uint32(0)
            writers[later, warp] = uint32(0)
        cuda.syncthreads()
        if block < scales.size and writers[now, warp] != 0:
            scale = f32_from_bits_cuda(absmax[now, warp]) / LARGEST
            if whole:
                write_whole_codes(codes, values, begin, lane, scale, key)  # noqa: F821
            else:
                for j in range(PER_LANE):
                    i = begin + j * WARP + lane
                    if i < n:
                        r16 = r16_cuda(key, i) if stochastic else uint32(0)  # noqa: F821
                        codes[i] = to_code_cuda(_get(values, j), scale, r16,
                                                stochastic)  # noqa: F821
            if lane == 0:
                scales[block] = scale


def _on_words_function(word, has_buffer):
    """on_words(param, grad, codes, precision_buffer): whether the arrays start on words
    (param, grad and the buffer (when has_buffer) on 16 bytes, codes on `word` bytes), so
    that every whole block's lane words are aligned."""
    address = VECTORS.address

    def on_words(param, grad, codes, precision_buffer):
        return (address(param) % VECTOR_BYTES == 0 and address(grad) % VECTOR_BYTES == 0
                and address(codes) % word == 0 and
                (not has_buffer or address(precision_buffer) % VECTOR_BYTES == 0))

    return _inline(on_words)


# whole_block(...) -> (values, writes, r, end, k, hyper): the lane's words of a whole
# block, word w holding elements first = begin + (32 w + lane) WORD on (coalesced: the
# warp's words are adjacent), each as update_word, or element by element where it holds
# a range end; NO_GROUP words (padding) are left alone with velocity 0. values[w WORD + e]
# is element first + e's new velocity. write_whole_codes(codes, values, begin, lane,
# scale, key) stores their codes, one word of WORD bytes per word. Written out per word
# and element (tuples are indexed by constants), so their source is made for each WORD.
_WHOLE_BLOCK = """
def whole_block(param, grad, codes, precision_buffer, scalars, group_flags, counters,
                range_ends, range_groups, read_counters, begin, lane, old_scale, key,
                inv_grad_scale, classic, r, end, k, hyper):
    writes = False
{words}
    return ({values},), writes, r, end, k, hyper


def write_whole_codes(codes, values, begin, lane, scale, key):
{code_words}
"""

_WORD = """
    first = begin + ({w} * WARP + lane) * WORD
    r, end, k, hyper = seek_cursor(scalars, group_flags, counters, range_ends,
                                   range_groups, read_counters, first, r, end, k, hyper)
    if first + WORD <= end:
        if k != NO_GROUP:
            {word_values}, wrote = update_word(param, grad, codes, precision_buffer,
                                               first, old_scale, key, hyper,
                                               inv_grad_scale, classic)
            writes = writes or wrote
        else:
            {word_values} = {zeros}
    else:
{by_element}
"""

_BY_ELEMENT = """        {value}, wrote, r, end, k, hyper = element(
            param, grad, codes, precision_buffer, scalars, group_flags, counters,
            range_ends, range_groups, read_counters, first + {e}, old_scale, key,
            inv_grad_scale, classic, r, end, k, hyper)
        writes = writes or wrote"""

_CODE_WORD = """
    first = begin + ({w} * WARP + lane) * WORD
    store(codes, first, ({codes},))"""

_UPDATE_WORD = """
def update_word(param, grad, codes, precision_buffer, first, old_scale, key, hyper,
                inv_grad_scale, classic):
    (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
     initialized) = hyper
    {g} = load_param_word(grad, first)
    {c} = load_code_word(codes, first)
{read_param}
    reads = initialized or (not classic and momentum == 0)  # exists, or kept
{steps}
    store(param, first, ({new_p},))
{store_buffer}
    return {new_v}, classic or momentum != 0
"""


def _whole_block_functions(word, param_format, precision, step_values, element):
    """(whole_block, write_whole_codes) for lane words of `word` elements."""
    words = PER_LANE // word
    names = lambda prefix: [f"{prefix}{e}" for e in range(word)]
    joined = lambda prefix: ", ".join(names(prefix))
    read_param = read_param_source(word, precision)
    steps = "\n".join(
        f"    o{e} = from_code(c{e}) * old_scale if reads else zero\n"
        f"    r{e}, v{e}, s{e} = step_values(p{e}, load_param(g{e}), o{e}, first + {e}, "
        "key, lr, momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic, "
        "nesterov, maximize, initialized)" for e in range(word))
    store_buffer = (f"    store(precision_buffer, first, ({joined('s')},))"
                    if precision in (KAHAN, MASTER) else "")
    update_source = _UPDATE_WORD.format(
        g=joined("g"), c=joined("c"), read_param=read_param, steps=steps,
        new_p=joined("r"), store_buffer=store_buffer, new_v=joined("v"))
    value_names = [f"v{w}_{e}" for w in range(words) for e in range(word)]
    word_sources = []
    for w in range(words):
        mine = value_names[w * word:(w + 1) * word]
        word_sources.append(_WORD.format(
            w=w, word_values=", ".join(mine), zeros=", ".join(["zero"] * word),
            by_element="\n".join(_BY_ELEMENT.format(value=value, e=e)
                                  for e, value in enumerate(mine))))
    stochastic = precision == STOCHASTIC
    code_words = "".join(_CODE_WORD.format(w=w, codes=", ".join(
        f"to_code(values[{w * word + e}], scale, "
        f"{f'r16(key, first + {e})' if stochastic else 'zero_bits'}, {stochastic})"
        for e in range(word))) for w in range(words))
    source = _WHOLE_BLOCK.format(words="".join(word_sources),
                                 values=", ".join(value_names), code_words=code_words)
    namespace = {
        "load_param_word": VECTORS.load(word), "load_buffer_word": VECTORS.load(word),
        "load_code_word": VECTORS.load(word), "store": VECTORS.store,
        "load_param": STORAGE.load[param_format], "step_values": step_values,
        "from_code": from_code_cuda, "to_code": to_code_cuda, "r16": r16_cuda,
        "seek_cursor": seek_cursor, "element": element, "NO_GROUP": NO_GROUP,
        "WARP": WARP, "WORD": word, "zero": float32(0), "zero_bits": uint32(0)}
    exec(compile(update_source, f"<update_word {word}>", "exec"), namespace)
    namespace["update_word"] = linked(namespace["update_word"])
    exec(compile(source, f"<whole_block {word}>", "exec"), namespace)
    return _inline(namespace["whole_block"]), _inline(namespace["write_whole_codes"])


@functools.cache
def float8_update_kernel(param_format, precision):
    """The FP8-velocity update kernel of params stored as `param_format` (NATIVE float32,
    BFLOAT16, FLOAT16) and `precision` (kernels.layout.PRECISIONS); launch it with whole
    warps per block (`float8_launch_config`)."""
    suffix = f"{FORMAT_NAMES[param_format]}_float8_{PRECISION_NAMES[precision]}"
    step_values = float8_step(STORAGE, linked, param_format, precision,
                              key_per_element=True)
    update = float8_update(STORAGE, _inline, param_format, precision,
                           key_per_element=True, step_jit=linked)
    element = linked(specialized(_element, f"element_{suffix}", update=update))
    word = _word_elements(param_format)
    whole_block, write_whole_codes = _whole_block_functions(
        word, param_format, precision, step_values, element)
    return cuda.jit(cache=True)(specialized(
        _update, f"momentum_step_{suffix}", element=element, whole_block=whole_block,
        write_whole_codes=write_whole_codes,
        on_words=_on_words_function(word, precision in (KAHAN, MASTER)),
        stochastic=precision == STOCHASTIC))


def _word_elements(param_format):
    """Elements per lane word: 16 bytes of params (4 float32, 8 16-bit), as momentum.cu's
    momentum_step_fp8 (its codes: a 32-bit or 64-bit word)."""
    return elements_per_word(4 if param_format == NATIVE else 2)


def float8_launch_config(size, most_blocks):
    """(blocks, threads) for `size` elements: THREADS_PER_BLOCK threads (whole warps; in
    the CUDA simulator one warp), a warp per block of the buffer, at most `most_blocks`
    thread blocks; blocks >= 1."""
    threads = WARP if config.ENABLE_CUDASIM else THREADS_PER_BLOCK
    warps = -(-size // FLOAT8_BLOCK)
    return max(1, min(most_blocks, -(-warps // (threads // WARP)))), threads


# Every FP8 kind the kernels compile, by dtype name: (param dtype, precision). float32
# params round nothing but, with "stochastic", the codes.
FLOAT8_KINDS = (("float32", "nearest"), ("float32", "stochastic"),
                *((param, precision) for param in ("bfloat16", "float16")
                  for precision in PRECISION_NAMES))


def float8_kernel_signature(param_dtype, precision="nearest"):
    """(kernel, argument types) of the FP8-velocity update of one kind (dtype names)."""
    from numba import types

    from .elementwise import storage_format
    from .layout import PRECISIONS

    sixteen_bit = param_dtype in ("bfloat16", "float16")
    param = types.Array(types.uint16 if sixteen_bit else types.float32, 1, "C")
    buffer = param if precision == "kahan" else types.Array(types.float32, 1, "C")
    counters = types.Array(types.int64, 1, "C")
    table = (types.Array(types.float32, 2, "C"), types.Array(types.uint32, 1, "C"),
             counters, types.Array(types.int32, 1, "C"))
    kernel = float8_update_kernel(storage_format(param_dtype),
                                  PRECISIONS[precision.upper()])
    return kernel, (param, param, types.Array(types.uint8, 1, "C"),
                    types.Array(types.float32, 1, "C"), buffer, *table, types.float32,
                    types.Array(types.float32, 1, "C"), types.uint32, counters,
                    types.uint64, types.int64)


def compile_float8_ptx(param_dtype, cc, precision="nearest"):
    """The PTX of one FP8 kind's update at compute capability `cc`, e.g. (9, 0). Needs the
    numba-cuda compiler (NVVM), not a GPU, and not the simulator."""
    kernel, signature = float8_kernel_signature(param_dtype, precision)
    with device_functions_built_for(cc):
        return cuda.compile_ptx(kernel.py_func, signature, cc=cc)[0]

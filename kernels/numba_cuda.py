"""Numba CUDA kernels: the fused update as one grid-stride pass over the flat buffers.

`update_kernel(param_format, velocity_format, precision)` is the update of one kind
(compiled on first use, one kernel per kind and array types); its arguments, in order
(layout in kernels.layout):
  param, grad   1-D contiguous device arrays: float32/float64, or the uint16 bits of
                bfloat16/float16 (kernels.elementwise.storage_format); param updated in
                place
  velocity      1-D contiguous device array, updated in place: the compute dtype (float32
                for 16-bit params), or the params' 16-bit format
  precision_buffer  KAHAN: the compensation (the params' format); MASTER: the float32
                master copy; else an empty array, not read
  scalars, group_flags, range_ends, range_groups
                the four arrays of a gpu_momentum.groups.UpdateTable, in device memory
                (scalars of the compute dtype)
  inv_grad_scale  1 / loss scale, of the compute dtype
  grad_scale    empty, or one element of the compute dtype: the loss scale in device
                memory; each thread then multiplies by 1 / grad_scale[0], worked out in the
                compute dtype, and inv_grad_scale is not read
  launch_flags  CLASSIC, and READ_COUNTERS when `counters` decide
  counters      the step counters (int64); read only with READ_COUNTERS (else empty)
  seed, step_count  uint64, int64: the key of STOCHASTIC rounding's random bits (with
                READ_COUNTERS the kernel reads the step count from counters[STEP_COUNT])
Elements of a NO_GROUP range (FlatParams padding) are neither read nor written, by the
update or by `check_kernel(param_format)` (grad, range_ends, range_groups,
inv_grad_scale, grad_scale, counters). clear_skip_kernel(counters, found_inf) starts a
counted step: LAST_STEP_SKIPPED = found_inf[0] != 0 (GradScaler's verdict), or 0 for an
empty found_inf.
Hyperparameters are data, not compile-time constants: a schedule changing lr or momentum
reuses the compiled kernel. The launches of a step are kernels.cuda_launch.step_launches'
(gpu_momentum.backends.numba_cuda).

Memory, as kernels/momentum.cu: the update moves 128 bits per load and store
(kernels.vector_memory) from the first element where every array starts a 16-byte word,
with a scalar head before it and a scalar tail; arrays misaligned against each other go
element by element. Words of 4 float32/float64 or 8 16-bit params.

16-bit values are converted with the bit operations of kernels.elementwise, not with
numba.cuda.bf16: that module is empty in the CUDA simulator, compiles to calls of
functions linked in later (no self-contained PTX), and rounds NaNs unlike ml_dtypes.
"""

import contextlib
import functools
from importlib.metadata import version
from types import SimpleNamespace

import numpy as np
from numba import cuda, types
from numba.core import config

from .elementwise import (BFLOAT16, FLOAT16, NATIVE, count_step, group_hyperparameters,
                          mark_velocities_initialized, scaled_gradient_is_finite,
                          seek_range, specialized, storage_format, storage_functions,
                          storage_step, storage_update)
from .layout import (CLASSIC, KAHAN, LAST_STEP_SKIPPED, MASTER, NO_GROUP, PRECISION_NAMES,
                     PRECISIONS, READ_COUNTERS, STEP_COUNT, compute_dtype_name)
from .vector_memory import VECTOR_BYTES, elements_per_word, vector_memory

# The CPU kernels compile the same Python functions with numba.njit. Here they become CUDA
# device functions with inline="always": Numba inlines their IR into the kernel, so the
# kernel compiles as one unit for whichever compute capability is asked for, and
# `cuda.compile_ptx(..., cc=(9, 0))` works on a machine without a GPU. A device function
# compiled on its own (inline="never") is built for the current device, which needs one.
_inline = cuda.jit(device=True, inline="always")
# The element updates are big, and called from several places of a kernel (the head and
# tail, each element of a 128-bit word, the words that hold a range end): Numba's inlining
# copies and retypes the whole body at each call (15 s to compile a 16-bit kind). These
# are compiled once and inlined by LLVM instead (forceinline: the PTX holds no calls);
# compile_ptx supplies the compute capability numba-cuda asks the current device for.
# (The simulator, which runs them as Python, takes no forceinline.)
linked = (_inline if config.ENABLE_CUDASIM else
          cuda.jit(device=True, forceinline=True))
seek_range_cuda = _inline(seek_range)
group_hyperparameters_cuda = _inline(group_hyperparameters)
scaled_gradient_is_finite_cuda = _inline(scaled_gradient_is_finite)
count_step_cuda = _inline(count_step)
mark_velocities_initialized_cuda = _inline(mark_velocities_initialized)
# The simulator runs the conversions as Python: its bit casts are NumPy views.
STORAGE = storage_functions(_inline, simulated=bool(config.ENABLE_CUDASIM))
step_key_cuda = STORAGE.step_key
VECTORS = vector_memory(bool(config.ENABLE_CUDASIM))
FORMAT_NAMES = {NATIVE: "native", BFLOAT16: "bfloat16", FLOAT16: "float16"}

THREADS_PER_BLOCK = 256
# The CUDA simulator runs each thread of a block as a Python thread, one block after the
# other: two small blocks keep it quick and still stride across blocks for any size.
SIMULATOR_THREADS_PER_BLOCK = 32
SIMULATOR_BLOCKS = 2
FINISH_THREADS = 32  # finish_step_kernel's one block, striding over the groups


# The kernels of each kind are copies of these templates (elementwise.specialized) whose
# globals name that kind's compiled functions: `update` and `load_grad`.

@cuda.jit(device=True, inline="always")
def inverse_loss_scale(inv_grad_scale, grad_scale):
    """1 / the loss scale: from grad_scale[0] in device memory, else inv_grad_scale."""
    if grad_scale.size != 0:
        return grad_scale.dtype.type(1) / grad_scale[0]
    return inv_grad_scale


@cuda.jit(device=True, inline="always")
def seek_cursor(scalars, group_flags, counters, range_ends, range_groups, read_counters,
                i, r, end, k, hyper):
    """The cursor (range r, its end, its group k, k's hyperparameters) at element i, moved
    from the cursor of a smaller index: a lookup only when i passes the range's end."""
    if i >= end:
        r = seek_range_cuda(range_ends, i, r)
        end = range_ends[r]
        k = range_groups[r]
        if k != NO_GROUP:
            hyper = group_hyperparameters_cuda(scalars, group_flags, counters, k,
                                               read_counters)
    return r, end, k, hyper


def _update_one(param, grad, velocity, precision_buffer, i, key, hyper, inv_grad_scale,
                classic):
    (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
     initialized) = hyper
    update(param, grad, velocity, precision_buffer, i, key, lr,  # noqa: F821
           momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic,
           nesterov, maximize, initialized)


def _update(param, grad, velocity, precision_buffer, scalars, group_flags, range_ends,
            range_groups, inv_grad_scale, grad_scale, launch_flags, counters, seed,
            step_count):
    if launch_flags & READ_COUNTERS != 0 and counters[LAST_STEP_SKIPPED] != 0:
        return  # a non-finite gradient: the step changes nothing
    inv_grad_scale = inverse_loss_scale(inv_grad_scale, grad_scale)
    classic = launch_flags & CLASSIC != 0
    read_counters = launch_flags & READ_COUNTERS != 0
    key = step_key_cuda(seed, counters[STEP_COUNT] if read_counters else step_count)
    # (each element finds its block key: 2**32 elements cross blocks, and a thread's
    # indices are a stride apart)
    # As kernels/momentum.cu: a scalar head up to the first element where every array
    # starts a 16-byte word, WORD elements per load and store from there, a scalar tail.
    # Each thread's indices only grow through the three loops: it looks its range up
    # only when an index passes the current range's end (seek_cursor); a NO_GROUP range's
    # elements are left alone. Group 0's values until the first lookup (never the table
    # at NO_GROUP).
    # param.size is 64-bit, so i is too: buffers past 2**31 elements index correctly.
    n = param.size
    start = vector_start(param, grad, velocity, precision_buffer, n)  # noqa: F821
    words = (n - start) // WORD  # noqa: F821
    thread, stride = cuda.grid(1), cuda.gridsize(1)
    r, end, k = -1, 0, NO_GROUP
    hyper = group_hyperparameters_cuda(scalars, group_flags, counters, 0, read_counters)
    for i in range(thread, start, stride):
        r, end, k, hyper = seek_cursor(scalars, group_flags, counters, range_ends,
                                       range_groups, read_counters, i, r, end, k, hyper)
        if k != NO_GROUP:
            update_one(param, grad, velocity, precision_buffer, i, key,  # noqa: F821
                       hyper, inv_grad_scale, classic)
    for word in range(thread, words, stride):
        first = start + word * WORD  # noqa: F821
        r, end, k, hyper = seek_cursor(scalars, group_flags, counters, range_ends,
                                       range_groups, read_counters, first, r, end, k,
                                       hyper)
        if first + WORD <= end:  # noqa: F821
            if k != NO_GROUP:
                (lr, momentum, grad_coeff, weight_decay, l1, decay, nesterov, maximize,
                 initialized) = hyper
                update_word(param, grad, velocity, precision_buffer,  # noqa: F821
                            first, key, lr, momentum, grad_coeff, weight_decay, l1, decay,
                            inv_grad_scale, classic, nesterov, maximize, initialized)
        else:
            # The word holds a range end: each element with its own group's scalars (only
            # views whose ranges do not start on a word get here, once per range end).
            for i in range(first, first + WORD):  # noqa: F821
                r, end, k, hyper = seek_cursor(scalars, group_flags, counters,
                                               range_ends, range_groups, read_counters,
                                               i, r, end, k, hyper)
                if k != NO_GROUP:
                    update_one(param, grad, velocity, precision_buffer,  # noqa: F821
                               i, key, hyper, inv_grad_scale, classic)
    for i in range(start + words * WORD + thread, n, stride):  # noqa: F821
        r, end, k, hyper = seek_cursor(scalars, group_flags, counters, range_ends,
                                       range_groups, read_counters, i, r, end, k, hyper)
        if k != NO_GROUP:
            update_one(param, grad, velocity, precision_buffer, i, key,  # noqa: F821
                       hyper, inv_grad_scale, classic)


def vector_start_function(has_buffer):
    """vector_start(param, grad, velocity, precision_buffer, n): the first element where
    the arrays (the buffer only when has_buffer) all start a 16-byte word, or n when there
    is none (views misaligned against each other: every element is then scalar). Arrays
    are element-aligned, so the head is shorter than one word."""
    address = VECTORS.address

    def vector_start(param, grad, velocity, precision_buffer, n):
        head = ((VECTOR_BYTES - address(param) % VECTOR_BYTES) % VECTOR_BYTES
                // param.itemsize)
        together = (
            (address(grad) + head * grad.itemsize) % VECTOR_BYTES == 0 and
            (address(velocity) + head * velocity.itemsize) % VECTOR_BYTES == 0 and
            (not has_buffer or
             (address(precision_buffer) + head * precision_buffer.itemsize)
             % VECTOR_BYTES == 0))
        return head if together and head < n else n

    return _inline(vector_start)


# update_word(param, grad, velocity, precision_buffer, first, key, <hyperparameters>):
# WORD elements from `first` loaded as whole 16-byte words, each updated by storage_step,
# stored as whole words. Written out per element (the elements of a word are a tuple,
# indexed by constants), so its source is made for each kind's WORD.
_WORD_UPDATE = """
def update_word(param, grad, velocity, precision_buffer, first, key, lr, momentum,
                grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic, nesterov,
                maximize, initialized):
    {g} = load_param_word(grad, first)
    {v} = load_velocity_word(velocity, first)
{read_param}
{steps}
    store(param, first, ({new_p},))
    store(velocity, first, ({new_v},))
{store_buffer}
"""


def read_param_source(word, precision):
    """The source lines of a word update that read its `word` parameters as values p0,
    p1, ... in the compute dtype: from the master copy, as param + compensation (kahan),
    or from param (load_param_word, load_buffer_word and load_param are the generated
    function's names)."""
    joined = lambda prefix: ", ".join(f"{prefix}{k}" for k in range(word))
    if precision == MASTER:
        return f"    {joined('b')} = load_buffer_word(precision_buffer, first)\n" + \
            "\n".join(f"    p{k} = b{k}" for k in range(word))
    if precision == KAHAN:
        return (f"    {joined('q')} = load_param_word(param, first)\n"
                f"    {joined('b')} = load_param_word(precision_buffer, first)\n" +
                "\n".join(f"    p{k} = load_param(q{k}) + load_param(b{k})"
                           for k in range(word)))
    return (f"    {joined('q')} = load_param_word(param, first)\n" +
            "\n".join(f"    p{k} = load_param(q{k})" for k in range(word)))


def _word_update(word, param_format, precision, step_values):
    """update_word for `word` elements per word."""
    names = lambda prefix: [f"{prefix}{k}" for k in range(word)]
    joined = lambda prefix: ", ".join(names(prefix))
    read_param = read_param_source(word, precision)
    steps = "\n".join(
        f"    r{k}, w{k}, c{k} = step_values(p{k}, load_param(g{k}), v{k}, first + {k}, "
        "key, lr, momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale, classic, "
        "nesterov, maximize, initialized)" for k in range(word))
    store_buffer = (f"    store(precision_buffer, first, ({joined('c')},))"
                    if precision in (KAHAN, MASTER) else "")
    source = _WORD_UPDATE.format(g=joined("g"), v=joined("v"), read_param=read_param,
                                 steps=steps, new_p=joined("r"), new_v=joined("w"),
                                 store_buffer=store_buffer)
    namespace = {
        "load_param_word": VECTORS.load(word), "load_velocity_word": VECTORS.load(word),
        "load_buffer_word": VECTORS.load(word), "store": VECTORS.store,
        "load_param": STORAGE.load[param_format], "step_values": step_values}
    exec(compile(source, f"<update_word {word}>", "exec"), namespace)
    return _inline(namespace["update_word"])


def _find_nonfinite(grad, range_ends, range_groups, inv_grad_scale, grad_scale, counters):
    # Checked as the update computes it: widened to the compute dtype first; only where a
    # group updates (NO_GROUP ranges are neither read nor written).
    inv_grad_scale = inverse_loss_scale(inv_grad_scale, grad_scale)
    r, end, k = -1, 0, NO_GROUP
    for i in range(cuda.grid(1), grad.size, cuda.gridsize(1)):
        if i >= end:
            r = seek_range_cuda(range_ends, i, r)
            end = range_ends[r]
            k = range_groups[r]
        if k != NO_GROUP and not scaled_gradient_is_finite_cuda(
                load_grad(grad[i]), inv_grad_scale):  # noqa: F821
            # Every writer stores the same 1: the race between threads is harmless.
            counters[LAST_STEP_SKIPPED] = 1


@functools.cache
def update_kernel(param_format, velocity_format, precision):
    """The update kernel of params stored as `param_format`, a velocity stored as
    `velocity_format` and `precision` (kernels.layout.PRECISIONS)."""
    suffix = (f"{FORMAT_NAMES[param_format]}_{FORMAT_NAMES[velocity_format]}_"
              f"{PRECISION_NAMES[precision]}")
    update = storage_update(STORAGE, linked, param_format, velocity_format, precision,
                            key_per_element=True)
    step_values = storage_step(STORAGE, linked, param_format, velocity_format, precision,
                               key_per_element=True)
    word = _word_elements(param_format)
    return cuda.jit(cache=True)(specialized(
        _update, f"momentum_step_{suffix}",
        update_one=_inline(specialized(_update_one, f"update_one_{suffix}", update=update)),
        update_word=_word_update(word, param_format, precision, step_values),
        vector_start=vector_start_function(precision in (KAHAN, MASTER)), WORD=word))


def _word_elements(param_format):
    """Elements per word of the update: a 16-byte word of 16-bit params; 4 float32 or
    float64 params (one kernel serves both), one 16-byte word of float32, two of float64.
    Either way every word starts on a 16-byte boundary."""
    return elements_per_word(4 if param_format == NATIVE else 2)


@functools.cache
def check_kernel(param_format):
    """The non-finite gradient check of params stored as `param_format`."""
    return cuda.jit(cache=True)(specialized(
        _find_nonfinite, f"find_nonfinite_{FORMAT_NAMES[param_format]}",
        load_grad=STORAGE.load[param_format]))


# Skipping steps with a non-finite gradient: the launches of
# kernels.cuda_launch.step_launches besides the update and the check.
@cuda.jit(cache=True)
def clear_skip_kernel(counters, found_inf):
    if cuda.grid(1) == 0:
        counters[LAST_STEP_SKIPPED] = 1 if found_inf.size != 0 and found_inf[0] != 0 else 0


@cuda.jit(cache=True)
def convert_scale_kernel(out, scale):
    """out[0] = scale[0] in out's dtype: a loss scale in device memory of another dtype
    than the compute dtype, converted on the stream before the kernels read it."""
    if cuda.grid(1) == 0:
        out[0] = scale[0]


@cuda.jit(cache=True)
def finish_step_kernel(counters, group_flags):
    """One block: counts the step as taken or skipped; a taken step initializes the
    velocity of every group that writes it. Nothing here writes LAST_STEP_SKIPPED, so the
    threads read it without a race."""
    thread = cuda.grid(1)
    taken = counters[LAST_STEP_SKIPPED] == 0
    if thread == 0:
        count_step_cuda(counters)
    if taken:
        mark_velocities_initialized_cuda(counters, group_flags, thread, cuda.gridsize(1))


def _no_op():
    pass


def compiler_problem():
    """None when numba-cuda compiles kernels here, else why it cannot.

    Seen on a GPU machine: numba-cuda 0.30.4 with numpy 2.5, which dropped `np.row_stack`
    that numba-cuda still names; every compile failed. Checked once, with a kernel that
    does nothing, so such a machine lists numba-cuda as unavailable, with this reason,
    instead of failing at the first step. The CUDA simulator compiles nothing: it passes.
    """
    if config.ENABLE_CUDASIM:
        return None
    try:
        cuda.compile_ptx(_no_op, (), cc=(8, 0))
    except Exception as error:  # whatever breaks inside Numba
        return (f"numba-cuda {version('numba-cuda')} cannot compile kernels with numpy "
                f"{np.__version__} ({type(error).__name__}: {error})")
    return None


@functools.cache
def _launch_limits(device_id):
    """(threads per block, blocks that fill the device): more blocks would only queue."""
    device = cuda.get_current_device()
    blocks_per_sm = threads_per_multiprocessor(device) // THREADS_PER_BLOCK
    return THREADS_PER_BLOCK, device.MULTIPROCESSOR_COUNT * blocks_per_sm


def threads_per_multiprocessor(device):
    """The device's resident-thread limit per multiprocessor."""
    # numba-cuda names device attributes after its driver binding: the ctypes one spells
    # it MULTI_PROCESSOR, cuda-bindings (numba-cuda 0.30 on a GPU) MULTIPROCESSOR.
    for name in ("MAX_THREADS_PER_MULTIPROCESSOR", "MAX_THREADS_PER_MULTI_PROCESSOR"):
        try:
            return getattr(device, name)
        except AttributeError:
            continue
    raise AttributeError(f"{device} reports no resident-thread limit per multiprocessor")


def launch_config(size):
    """(blocks, threads) for `size` elements on the current device; blocks >= 1."""
    if config.ENABLE_CUDASIM:
        threads, most_blocks = SIMULATOR_THREADS_PER_BLOCK, SIMULATOR_BLOCKS
    else:
        threads, most_blocks = _launch_limits(cuda.get_current_device().id)
    return max(1, min(most_blocks, -(-size // threads))), threads


# Every kind of update the kernels compile, by dtype name: (param, velocity, precision).
KINDS = (("float32", "float32", "nearest"), ("float64", "float64", "nearest"),
         *((param, velocity, precision) for param in ("bfloat16", "float16")
           for velocity in ("float32", param) for precision in PRECISION_NAMES))


def _array_type(dtype_name, ndim=1):
    from numba.np.numpy_support import from_dtype

    element = (types.uint16 if dtype_name in ("bfloat16", "float16") else
               from_dtype(np.dtype(dtype_name)))
    return types.Array(element, ndim, "C")


def kernel_signatures(param_dtype, velocity_dtype=None, precision="nearest"):
    """{name: (kernel, argument types)} of every kernel of one kind of update (dtype
    names; velocity_dtype None: the compute dtype)."""
    compute_name = compute_dtype_name(param_dtype)
    velocity_dtype = velocity_dtype or compute_name
    formats = (storage_format(param_dtype), storage_format(velocity_dtype))
    compute = getattr(types, compute_name)  # types.float32 or types.float64
    param, velocity = _array_type(param_dtype), _array_type(velocity_dtype)
    buffer = _array_type("float32" if precision == "master" else
                         param_dtype if precision == "kahan" else "float32")
    counters = types.Array(types.int64, 1, "C")
    group_flags = types.Array(types.uint32, 1, "C")
    table = (types.Array(compute, 2, "C"), group_flags, counters,
             types.Array(types.int32, 1, "C"))
    scale = types.Array(compute, 1, "C")  # grad_scale: empty, or the loss scale
    update = update_kernel(*formats, PRECISIONS[precision.upper()])
    return {
        "momentum_step": (update, (param, param, velocity, buffer, *table, compute,
                                   scale, types.uint32, counters, types.uint64,
                                   types.int64)),
        "find_nonfinite": (check_kernel(formats[0]), (param, table[2], table[3], compute,
                                                      scale, counters)),
        "finish_step": (finish_step_kernel, (counters, group_flags)),
    }


def compile_ptx(param_dtype, cc, velocity_dtype=None, precision="nearest", names=None):
    """{kernel name: PTX} of one kind of update (dtype names) at compute capability `cc`,
    e.g. (9, 0); `names`: only these kernels of kernel_signatures.

    Needs the numba-cuda compiler (NVVM), not a GPU, and not the simulator.
    """
    with device_functions_built_for(cc):
        return {name: cuda.compile_ptx(kernel.py_func, signature, cc=cc)[0]
                for name, (kernel, signature) in kernel_signatures(
                    param_dtype, velocity_dtype, precision).items()
                if names is None or name in names}


@contextlib.contextmanager
def device_functions_built_for(cc):
    """numba-cuda builds a device function that it does not inline itself (the linked
    element updates) with the options of the current device's compute capability, and
    asks the driver for it, which fails without a GPU. Its LLVM IR is linked into the
    kernel and compiled with the kernel for the kernel's `cc`: meanwhile the dispatcher
    module's get_current_device answers a device of `cc`."""
    from numba.cuda import dispatcher

    asked = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = asked

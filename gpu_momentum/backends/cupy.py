"""The cupy backend: the CUDA C kernel (kernels/momentum.cu) compiled by CuPy's RawModule,
over CuPy arrays or any `__cuda_array_interface__` array that cupy.asarray takes without
a copy. A step queues its launches on CuPy's current stream and returns: no
synchronisation and no device allocation.

The module is compiled once per device (memoized RawModule) and each dtype's launch limit
is worked out once per device.
"""

import functools

import numpy as np

from ..arrays import describe
from ..kernels.cuda_launch import check_counters, launch_plan, step_launches
from ..kernels.cuda_source import (BLOCK_SIZE, FINISH_EXPRESSION, entry_point,
                                   module_options, module_source, name_expressions)
from ..kernels.layout import GROUP_COLUMNS, GROUP_SLOTS, LAST_STEP_SKIPPED, READ_COUNTERS
from ..precision import as_bits, storage_dtype
from .contract import PreparedStep, refuse_found_inf_without_counters


class CupyBackend(PreparedStep):
    name = "cupy"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    element_aligned = True

    def unavailable_reason(self):
        try:
            import cupy
        except Exception as error:  # a broken CUDA install fails with more than ImportError
            return f"CuPy cannot be imported ({type(error).__name__}: {error})"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as error:
            return f"CUDA has no usable device ({error})"
        return None if count else "no CUDA device is present"

    def owns(self, array):
        return hasattr(array, "__cuda_array_interface__")

    def native(self, array):
        return type(array).__module__.split(".")[0] == "cupy"

    def zeros(self, shape, dtype):
        import cupy
        return cupy.zeros(shape, dtype)

    def copy(self, array):
        import cupy
        return cupy.array(array, copy=True)

    def asarray(self, array):
        import cupy
        return cupy.asarray(array)

    def to_numpy(self, array):
        import cupy
        return cupy.asnumpy(array)

    def assign(self, target, source):
        import cupy
        cupy.asarray(target)[...] = cupy.asarray(source)

    def synchronize(self):
        import cupy
        cupy.cuda.get_current_stream().synchronize()

    def place(self, param):
        import cupy
        return cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr

    def upload(self, array, param):
        # cupy.asarray stages through pinned memory and copies without waiting (a copy
        # from pageable memory may wait for the stream).
        import cupy
        return cupy.asarray(array)

    def upload_into(self, target, array, param):
        import cupy
        cupy.copyto(target, cupy.asarray(array))

    def capturing(self, param):
        import cupy

        return cupy.cuda.get_current_stream().is_capturing()

    def step_function(self, param, velocity, table, counters=None, check_nonfinite=True, *,
                      precision="nearest", precision_buffer=None, seed=0):
        """Launches on the current stream of the device the arrays are on, which must be
        the current device at every step (checked: one runtime call)."""
        import cupy

        named = {"param": param, "velocity": velocity}
        if precision_buffer is not None:
            named["precision_buffer"] = precision_buffer
        infos = {name: describe(name, array) for name, array in named.items()}
        arrays = {name: _kernel_array(array, infos[name]) for name, array in named.items()}
        param, velocity = arrays["param"], arrays["velocity"]
        named = [*arrays.items(),
                 *((f"table.{name}", array) for name, array in
                   zip(("scalars", "group_flags", "range_ends", "range_groups"),
                       table.arrays()))]
        if counters is not None:
            check_counters(counters, table.group_count)
            named.append(("counters", counters))
        device = _on_current_device(named)
        entry = entry_point(infos["param"].dtype, infos["velocity"].dtype, precision)
        update, check, finish, max_blocks = _kernels(device, entry)
        plan = launch_plan(infos["param"].dtype, param.size, table, 1.0, max_blocks,
                           counters is not None, seed)
        buffer = arrays.get("precision_buffer", _empty(device, np.uint16))
        scalar = type(plan.inv_grad_scale)
        grid, block = (plan.grid,), (plan.block,)
        skipped = None if counters is None else \
            counters[LAST_STEP_SKIPPED:LAST_STEP_SKIPPED + 1]
        update_tail = (plan.n, *table.arrays(), plan.range_count)
        update_counters = _empty(device, np.int64) if counters is None else counters
        finish_args = (counters, table.group_flags, plan.group_count)
        compute = scalar(0).dtype
        no_scale = _empty(device, compute)  # a null pointer: inv_grad_scale is read
        # Set by each step: its grad as a CuPy array, 1 / grad_scale in the compute dtype
        # (a step repeating the objects of the one before converts nothing), the loss
        # scale in device memory, GradScaler's found_inf and `agree`.
        last_grad = kernel_grad = last_scale = inv = agreement = found = scale_slot = None
        device_scale, step = no_scale, plan.step_count
        launches = {
            "clear": lambda: skipped.fill(0) if found is None else cupy.not_equal(
                found, 0, out=skipped),
            "find_nonfinite": lambda: check(grid, block, (
                kernel_grad, plan.n, table.range_ends, table.range_groups,
                plan.range_count, inv, device_scale, counters)),
            "agree": lambda: agreement(counters),
            "update": lambda: update(grid, block, (
                param, kernel_grad, velocity, buffer, *update_tail, inv, device_scale,
                plan.launch_flags, update_counters, plan.seed, step)),
            "finish": lambda: finish((1,), (plan.finish_block,), finish_args),
        }
        plain, agreeing = ([launches[name] for name in step_launches(
            plan.grid, counters is not None, agree, check_nonfinite)]
            for agree in (False, True))
        runtime = cupy.cuda.runtime

        def on_device(name, array):
            as_cupy = cupy.asarray(array)
            _on_current_device([(name, as_cupy)])
            return as_cupy

        def launch(grad, inv_grad_scale, agree=None, grad_scale=None, found_inf=None,
                   step_count=0):
            nonlocal last_grad, kernel_grad, last_scale, inv, agreement, found, device_scale
            nonlocal scale_slot, step
            if runtime.getDevice() != device:
                _on_current_device(named)  # raises, naming the arrays' device
            if grad is not last_grad:
                kernel_grad = _kernel_array(grad, describe("grad", grad))
                _on_current_device([("grad", kernel_grad)])
                last_grad = grad
            step = np.int64(step_count)
            if inv_grad_scale is not last_scale:
                last_scale, inv = inv_grad_scale, scalar(inv_grad_scale)
            if counters is None:
                refuse_found_inf_without_counters(found_inf)
            found = None if found_inf is None else on_device("found_inf", found_inf)
            device_scale = no_scale
            if grad_scale is not None:
                device_scale = on_device("grad_scale", grad_scale).reshape(1)
                if device_scale.dtype != compute:  # converted on the stream, in order
                    if scale_slot is None:  # made once, by the first such step
                        scale_slot = cupy.empty(1, compute)
                    cupy.copyto(scale_slot, device_scale, casting="same_kind")
                    device_scale = scale_slot
            agreement = agree
            for queue in plain if agree is None else agreeing:
                queue()

        return launch



def _kernel_array(array, info):
    """A CuPy array over `array`'s memory, without a copy: 16-bit elements (bfloat16,
    float16) as their bits, uint16, which the kernel stores them as; so an interface that
    describes bfloat16 only as raw bytes ("<V2") needs nothing from CuPy's dtypes."""
    import cupy

    if info.dtype.itemsize != 2:
        return cupy.asarray(array)
    if isinstance(array, cupy.ndarray):
        return as_bits(array)
    if info.nbytes == 0:
        return cupy.empty(info.shape, np.uint16)
    memory = cupy.cuda.UnownedMemory(info.address, info.nbytes, array)
    return cupy.ndarray(info.shape, np.uint16, cupy.cuda.MemoryPointer(memory, 0))


@functools.cache
def _module(device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=module_source(), options=module_options(),
                              name_expressions=name_expressions())


@functools.cache
def _kernels(device_id, entry):
    """(update, non-finite check, finish_step, max_blocks) of an EntryPoint on a device,
    each launched once over no elements (the module compiled, each function loaded: a
    CUDA graph captured later records launches only)."""
    import cupy

    with cupy.cuda.Device(device_id):
        module = _module(device_id)
        update = module.get_function(entry.update_expression)
        check = module.get_function(entry.check_expression)
        finish = module.get_function(FINISH_EXPRESSION)
        sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        per_sm = min(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernel.kernel.ptr, BLOCK_SIZE, 0) for kernel in (update, check))
        _warm_up(update, check, finish, entry)
    return update, check, finish, sms * per_sm


def _warm_up(update, check, finish, entry):
    """Each kernel launched once over no elements, with scratch counters, and waited for."""
    import cupy

    compute = entry.compute_dtype
    param = cupy.zeros(0, storage_dtype(entry.param_dtype))
    velocity = cupy.zeros(0, storage_dtype(entry.velocity_dtype))
    table = (cupy.zeros((1, GROUP_COLUMNS), compute), cupy.zeros(1, np.uint32),
             cupy.zeros(1, np.int64), cupy.zeros(1, np.int32))
    counters = cupy.zeros(GROUP_SLOTS + 1, np.int64)
    one, scale = compute.type(1), cupy.ones(1, compute)
    update((1,), (BLOCK_SIZE,), (param, param, velocity, param, np.int64(0), *table,
                                 np.int32(1), one, scale, np.uint32(READ_COUNTERS),
                                 counters, np.uint64(0), np.int64(0)))
    check((1,), (BLOCK_SIZE,), (param, np.int64(0), table[2], table[3], np.int32(1), one,
                                scale, counters))
    finish((1,), (32,), (counters, table[1], np.int32(1)))
    cupy.cuda.get_current_stream().synchronize()


@functools.cache
def _empty(device_id, dtype):
    """An empty array of `dtype` on a device: a null pointer for an optional argument
    (counters=None, precision_buffer=None, grad_scale=None)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.zeros(0, dtype)




def _on_current_device(named_arrays):
    import cupy

    current = cupy.cuda.runtime.getDevice()
    for name, array in named_arrays:
        if array.device.id != current:
            raise ValueError(f"{name} is on GPU {array.device.id} but the current device is "
                             f"GPU {current}; step under `with cupy.cuda.Device("
                             f"{array.device.id}):` or move the arrays to GPU {current}")
    return current

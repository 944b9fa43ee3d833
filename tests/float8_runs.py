"""Runs of the FP8-velocity kernels for the tests: the same steps through the reference,
the CPU kernels, the Numba CUDA kernel (the simulator without a GPU) and the CUDA C kernel
built for the CPU (tests/host_kernel.py), over one group or a grouped FlatParams.

A run is a `Problem` (initial arrays, per-step gradients, per-step tables and the
reference's groups) stepped by `run(problem, backend, ...)`, which returns the state
after every step: [(param, codes, scales, buffer)], NumPy arrays.
"""

import dataclasses

import numpy as np

import gpu_momentum as gm
from configs import (LR_SCHEDULE, PADDING_GRADIENTS, SEED, SEGMENT_NAMES, group_lr,
                     hyper_at, padding_mask, problem, storage_dtype)
from gpu_momentum.groups import resolve_groups, update_table
from gpu_momentum.hyperparams import Hyperparameters
from gpu_momentum.kernels.elementwise import storage_format
from gpu_momentum.kernels.layout import PRECISIONS, float8_scale_count
from gpu_momentum.reference import float8_velocity_step

BACKENDS = ("reference", "cpu", "numba-cuda", "cuda-host")


@dataclasses.dataclass
class Problem:
    param: np.ndarray  # the param dtype (bfloat16 as ml_dtypes')
    grads: list
    tables: list  # an UpdateTable per step
    groups: list  # per step: [(start, end, reference options)] for float8_velocity_step
    precision: str = "nearest"
    seed: int = SEED

    @property
    def buffer(self):
        """The precision buffer's initial contents, or None."""
        if self.precision == "kahan":
            return np.zeros_like(self.param)
        if self.precision == "master":
            return self.param.astype(np.float32)
        return None


def _initialized_after(initialized, hypers):
    return [done or h["style"] == "classic" or h.get("momentum", 0.9) != 0
            for done, h in zip(initialized, hypers)]


def single_group_problem(config, size, param_dtype, precision, steps):
    """One group over `size` elements, CONFIGS' `config` step by step."""
    dtype = storage_dtype(param_dtype)
    param, grads = problem(size, steps, seed=3)
    with np.errstate(over="ignore"):
        param, grads = param.astype(dtype), [(0.5 * g).astype(dtype) for g in grads]
    tables, groups, initialized = [], [], [False]
    for step in range(steps):
        hyper = hyper_at(config, step)
        tables.append(update_table([Hyperparameters(**hyper)], initialized, np.float32,
                                   size=size))
        groups.append([(0, size, {**hyper, "first_step": not initialized[0]})])
        initialized = _initialized_after(initialized, [hyper])
    return Problem(param, grads, tables, groups, precision)


def grouped_problem(config, segment_sizes, param_dtype, precision, steps):
    """A FlatParams of SEGMENT_NAMES with `segment_sizes`, GROUP_CONFIGS' `config`; the
    gradients' padding holds PADDING_GRADIENTS, which no kernel may read."""
    dtype = storage_dtype(param_dtype)
    values, _ = problem(sum(segment_sizes), steps)
    arrays = np.split(values, np.cumsum(segment_sizes)[:-1])
    flat = gm.FlatParams.from_arrays([a.astype(dtype) for a in arrays],
                                     names=list(SEGMENT_NAMES))
    total = flat.data.size
    padding = padding_mask(flat.offsets, flat.sizes, total)
    _, grads = problem(total, steps, seed=1)
    garbage = np.resize(np.array(PADDING_GRADIENTS), total)
    with np.errstate(over="ignore"):
        grads = [np.where(padding, garbage, 0.5 * g).astype(dtype) for g in grads]
    param = np.array(flat.data)
    param[padding] = -3.5
    options, user_groups = config["options"], config["groups"]
    tables, groups = [], []
    initialized = [False] * (len(user_groups) + 1)
    for step in range(steps):
        defaults = Hyperparameters(**{**options, "lr": LR_SCHEDULE[step]})
        resolved = [{**g, "lr": group_lr(g, step)} for g in user_groups]
        plan = resolve_groups(resolved, defaults, flat.offsets, flat.sizes, total,
                              list(SEGMENT_NAMES))
        tables.append(update_table(plan.hypers, initialized, np.float32, plan.range_ends,
                                   plan.range_groups))
        hypers = [{**options, "lr": LR_SCHEDULE[step]}]
        hypers += [{**options, **{k: v for k, v in g.items() if k != "params"}}
                   for g in resolved]
        groups.append([(int(offset), int(offset) + int(size),
                        {**hypers[k], "first_step": not initialized[k]})
                       for offset, size, k in zip(flat.offsets, flat.sizes,
                                                  plan.segment_groups)])
        initialized = _initialized_after(initialized, hypers)
    return Problem(param, grads, tables, groups, precision)


def _bits(a):
    """A kernel's view of an array: 16-bit values as their uint16 bits."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def run(problem_, backend, host=None, max_blocks=2, offsets=None):
    """The state after each step of `problem_` on `backend` (one of BACKENDS; "cuda-host"
    needs `host`, a tests.host_kernel.HostKernel). offsets (numba-cuda): {"param",
    "grad", "codes", "buffer": elements} the device arrays start into larger ones."""
    param = problem_.param.copy()
    n = param.size
    codes = np.zeros(n, np.uint8)
    scales = np.zeros(float8_scale_count(n), np.float32)
    buffer = problem_.buffer
    mode = PRECISIONS[problem_.precision.upper()]
    states = []
    for step, (grad, table, groups) in enumerate(zip(problem_.grads, problem_.tables,
                                                     problem_.groups)):
        if backend == "reference":
            param, codes, scales, new_buffer = float8_velocity_step(
                param, grad, codes, scales, groups, precision=problem_.precision,
                compensation=buffer, master=buffer, seed=problem_.seed, step_count=step)
            buffer = new_buffer if buffer is not None else None
        elif backend == "cpu":
            from gpu_momentum.kernels.cpu import pieces_needed
            from gpu_momentum.kernels.cpu_float8 import float8_kernels

            kernel = float8_kernels(storage_format(param.dtype), mode, parallel=False,
                                    pieces=pieces_needed(table.scalars))[0]
            kernel(_bits(param), _bits(grad), codes, scales,
                   np.empty(0, np.float32) if buffer is None else _bits(buffer),
                   *table.arrays(), np.float32(1), np.uint32(table.launch_flags),
                   np.empty(0, np.int64), np.uint64(problem_.seed), np.int64(step))
        elif backend == "numba-cuda":
            _numba_cuda_step(param, grad, codes, scales, buffer, table, mode,
                             problem_.seed, step, max_blocks, offsets or {})
        else:
            host.step_float8(param, grad, codes, scales, table,
                             precision=problem_.precision, precision_buffer=buffer,
                             seed=problem_.seed, step_count=step, max_blocks=max_blocks)
        states.append(tuple(None if a is None else np.array(a)
                            for a in (param, codes, scales, buffer)))
    return states


def _numba_cuda_step(param, grad, codes, scales, buffer, table, mode, seed, step,
                     max_blocks, offsets):
    from numba import cuda

    def to_device(name, host):
        """`host` on the device, offsets[name] elements into a larger array."""
        offset = offsets.get(name, 0)
        padded = np.zeros(host.size + 16, host.dtype)
        padded[offset:offset + host.size] = host
        return cuda.to_device(padded)[offset:offset + host.size]

    from gpu_momentum.kernels.numba_cuda_fp8 import (float8_launch_config,
                                                     float8_update_kernel)

    if param.size == 0:
        return
    kernel = float8_update_kernel(storage_format(param.dtype), mode)
    arrays = [to_device(name, _bits(a)) for name, a in (("param", param), ("grad", grad))]
    state = [to_device("codes", codes), cuda.to_device(scales)]
    device_buffer = (cuda.to_device(np.empty(0, np.float32)) if buffer is None
                     else to_device("buffer", _bits(buffer)))
    blocks, threads = float8_launch_config(param.size, max_blocks)
    kernel[blocks, threads](*arrays, *state, device_buffer,
                            *[cuda.to_device(a) for a in table.arrays()], np.float32(1),
                            cuda.to_device(np.empty(0, np.float32)),
                            np.uint32(table.launch_flags),
                            cuda.to_device(np.zeros(1, np.int64)), np.uint64(seed),
                            np.int64(step))
    _bits(param)[...] = arrays[0].copy_to_host()
    codes[...], scales[...] = state[0].copy_to_host(), state[1].copy_to_host()
    if buffer is not None:
        _bits(buffer)[...] = device_buffer.copy_to_host()


def assert_same_states(expected, got, what):
    """Every step's arrays equal bit for bit."""
    assert len(expected) == len(got)
    for step, (want, have) in enumerate(zip(expected, got)):
        for name, a, b in zip(("param", "codes", "scales", "buffer"), want, have):
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, (what, step, name)
            bits = lambda x: x.view(np.uint8 if x.dtype.itemsize == 1 else
                                    np.uint16 if x.dtype.itemsize == 2 else np.uint32)
            differ = np.flatnonzero(bits(a) != bits(b))
            assert differ.size == 0, (f"{what}: step {step}, {name} differs at "
                                      f"{differ[:8].tolist()}: {a[differ[:4]]} vs "
                                      f"{b[differ[:4]]}")

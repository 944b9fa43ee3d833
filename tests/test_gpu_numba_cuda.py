"""numba-cuda on a real GPU: buffers past 2**31 elements, CuPy / PyTorch / bare
`__cuda_array_interface__` arrays without copies on the streams they name, a step that returns
before the GPU is done, one compile per dtype, and the on-disk kernel cache.

Every configuration and dtype against the reference runs on the hardware through
test_update.py and test_numba_cuda.py (which use the simulator only where no GPU is).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import gpu_momentum as gm
from cuda_driver import cuda_device_count
from harness import NumbaCudaHarness

HUGE = 2**31 + 5


def _no_real_gpu_reason():
    if cuda_device_count() == 0:
        return "no CUDA GPU on this machine"
    if NumbaCudaHarness().simulated:
        return "NUMBA_ENABLE_CUDASIM is set: Numba runs its simulator, not the GPU"
    return None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_no_real_gpu_reason() is not None,
                                 reason=str(_no_real_gpu_reason()))]


def _fill_kernel():
    from numba import cuda

    @cuda.jit
    def fill(array, value):
        for i in range(cuda.grid(1), array.size, cuda.gridsize(1)):
            array[i] = value

    return fill


def _spin_kernel():
    """A one-thread kernel that keeps a stream busy for about a second."""
    from numba import cuda

    @cuda.jit
    def spin(milliseconds):
        for _ in range(milliseconds):
            cuda.nanosleep(1_000_000)

    return spin


def test_more_than_2_31_elements():
    from numba import cuda

    need = 3 * 4 * HUGE + 2**30
    free = cuda.current_context().get_memory_info().free
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, "
                    f"{free / 2**30:.1f} GiB free")
    fill = _fill_kernel()
    p = cuda.device_array(HUGE, np.float32)
    g = cuda.device_array(HUGE, np.float32)
    fill[1024, 256](p, np.float32(1))
    fill[1024, 256](g, np.float32(2))
    fill[1, 256](g[2**31:], np.float32(4))  # the tail only a 64-bit index reaches
    opt = gm.MomentumSGD(p, lr=0.5, momentum=0.9)
    assert opt.backend == "numba-cuda"
    opt.step(g)
    opt.step(g)
    f32 = np.float32
    for grad, where in ((2, slice(0, 4)), (4, slice(-4, None))):
        v1 = -f32(0.5) * f32(grad)
        v2 = f32(0.9) * v1 - f32(0.5) * f32(grad)
        np.testing.assert_allclose(p[where].copy_to_host(), f32(1) + v1 + v2, rtol=1e-6)
        np.testing.assert_allclose(opt.velocity[where].copy_to_host(), v2, rtol=1e-6)
    del p, g, opt


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_step_returns_before_the_gpu_is_done(skip_nonfinite):
    from numba import cuda

    p, g = cuda.to_device(np.ones(4099)), cuda.to_device(np.full(4099, 2.0))
    opt = gm.MomentumSGD(p, lr=0.5, skip_nonfinite=skip_nonfinite)
    assert opt.backend == "numba-cuda"
    spin = _spin_kernel()
    spin[1, 1](1)  # compiles both kernels first
    opt.step(g)
    cuda.synchronize()
    stream = cuda.default_stream()
    spin[1, 1, stream](1000)
    spun = cuda.event()
    spun.record(stream)
    opt.step(g)
    assert not spun.query(), "step() waited for earlier work on its stream"
    cuda.synchronize()
    np.testing.assert_allclose(p.copy_to_host(), 1 - 1 - 0.9 - 1, rtol=1e-12)
    assert (opt.step_count, opt.skipped_steps) == (2, 0)


def _check_foreign_arrays(p, g, v, to_host, stream_done, synchronize):
    """Steps arrays of another library; the gradient is rewritten on their stream while
    it is held up by a spin, so only an update queued on that stream sees the new one."""
    from numba import cuda

    spin = _spin_kernel()
    spin[1, 1](1)
    gm.momentum_step(p, g, v, lr=0.5, first_step=True, backend="numba-cuda")
    synchronize()
    # No "stream" in the interface (PyTorch's version 2 has none): Numba's default stream.
    exported = p.__cuda_array_interface__.get("stream")
    spin[1, 1, cuda.external_stream(exported) if exported else cuda.default_stream()](500)
    g[...] = 3.0
    gm.momentum_step(p, g, v, lr=0.5, first_step=True, backend="numba-cuda")
    assert not stream_done(), "step() waited for the arrays' stream"
    synchronize()
    p_host, v_host = to_host(p), to_host(v)
    # the second step started again from zero velocity, with the rewritten gradient
    np.testing.assert_allclose(v_host, -0.5 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(p_host, 1.0 - 0.5 * 2.0 - 0.5 * 3.0, rtol=1e-6)


def test_cupy_arrays_on_cupy_current_stream_without_copies():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        p = cupy.ones(4099, cupy.float32)
        g = cupy.full(4099, 2.0, cupy.float32)
        v = cupy.zeros(4099, cupy.float32)
        address = p.data.ptr
        _check_foreign_arrays(p, g, v, cupy.asnumpy, lambda: stream.done,
                              stream.synchronize)
    assert p.data.ptr == address


def test_torch_tensors_on_the_default_stream_without_copies():
    """PyTorch's __cuda_array_interface__ names no stream, so the update is queued on
    Numba's default stream: the legacy default stream, torch's default stream too."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    p = torch.ones(4099, device="cuda")
    g = torch.full((4099,), 2.0, device="cuda")
    v = torch.zeros(4099, device="cuda")
    address = p.data_ptr()
    _check_foreign_arrays(p, g, v, lambda t: t.cpu().numpy(),
                          torch.cuda.default_stream().query, torch.cuda.synchronize)
    assert p.data_ptr() == address


class _BareCudaArray:
    """Only `__cuda_array_interface__`, as a library Numba does not know would offer."""

    def __init__(self, owner):
        self._owner = owner
        self.__cuda_array_interface__ = owner.__cuda_array_interface__


def test_any_cuda_array_interface_object():
    from numba import cuda

    p, g, v = (cuda.to_device(np.full((3, 341), x, np.float32)) for x in (1.0, 2.0, 0.0))
    gm.momentum_step(_BareCudaArray(p), _BareCudaArray(g), _BareCudaArray(v), lr=0.5,
                     backend="numba-cuda", first_step=True)
    np.testing.assert_array_equal(p.copy_to_host(), 0.0)
    np.testing.assert_array_equal(v.copy_to_host(), -1.0)


_CACHE_SCRIPT = """
import numpy as np
from numba import cuda
import gpu_momentum as gm
from gpu_momentum.kernels.elementwise import storage_format
from gpu_momentum.kernels.layout import NEAREST
from gpu_momentum.kernels.numba_cuda import update_kernel
kernels = []
for dtype in (np.float16, np.float32, np.float64):
    opt = gm.MomentumSGD(cuda.to_device(np.ones(1000, dtype)), lr=0.1)
    for lr in (0.1, 0.01, 0.3):
        opt.lr = lr
        opt.step(cuda.to_device(np.ones(1000, dtype)))
    kernels.append(update_kernel(storage_format(np.dtype(dtype)),
                                 storage_format(opt.velocity.dtype), NEAREST))
cuda.synchronize()
print(sum(len(k.overloads) for k in kernels),
      sum(sum(k.stats.cache_hits.values()) for k in kernels),
      sum(sum(k.stats.cache_misses.values()) for k in kernels))
"""


def test_one_compile_per_dtype_cached_on_disk(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env,
                           capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    first, second = ([int(x) for x in run.stdout.split()] for run in runs)
    assert first == [3, 0, 3]   # three dtypes compiled, whatever lr did
    assert second == [3, 3, 0]  # and loaded from the disk cache by the next process

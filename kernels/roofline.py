"""The CPU memory roofline for the benchmark: a streaming kernel with the update's traffic.

A plain copy understates what a CPU's memory can do: each written cache line is first read
(write-allocate), so a copy of 8 bytes per float32 element moves 12. The momentum update
reads three arrays and writes two of them back in place, so its written lines are already
in cache. This kernel does exactly that with trivial arithmetic, giving the bandwidth the
update could reach if it were free to compute.
"""

import numba


@numba.njit(parallel=True, cache=True)
def stream_read3_write2(a, b, c):
    """a[i] += c[i]; b[i] += c[i] over 1-D arrays of one unsigned integer type.

    Callers pass the param, velocity and grad buffers viewed as unsigned integers of the
    same width: bandwidth does not depend on what the bits mean, one kernel then serves
    float16 (which Numba cannot compute with on the CPU), float32 and float64, and
    wrapping integer adds never reach slow paths such as subnormal or infinite floats.
    """
    for i in numba.prange(a.size):
        x = c[i]
        a[i] += x
        b[i] += x

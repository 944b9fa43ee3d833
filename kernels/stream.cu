// The GPU memory roofline of the momentum update: a kernel with exactly its traffic, read
// three arrays and write two of them back in place, 128 bits per load and store
// (ld.global.v4.u32 / st.global.v4.u32, LDG.E.128 / STG.E.128 in SASS), with trivial
// arithmetic. What the update could reach if its arithmetic were free.
//
// The benchmark (bench/gpu.py) passes the param, velocity and grad buffers viewed as
// 16-byte words: bandwidth does not depend on what the bits mean, so one kernel serves
// every dtype, and wrapping integer adds never reach slow paths (subnormal or infinite
// floats). Launch: any grid of any block size; a grid-stride loop covers `words`.

extern "C" __global__ void stream_read3_write2(uint4* __restrict__ a, uint4* __restrict__ b,
                                               const uint4* __restrict__ c, long long words) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
#pragma unroll 1
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         i < words; i += stride) {
        const uint4 x = c[i];
        uint4 y = a[i];
        uint4 z = b[i];
        y.x += x.x; y.y += x.y; y.z += x.z; y.w += x.w;
        z.x += x.x; z.y += x.y; z.z += x.z; z.w += x.w;
        a[i] = y;
        b[i] = z;
    }
}

// Runs an elementwise CUDA C kernel on the CPU. Force-included (g++ -include) ahead of the
// exact module source that CuPy compiles; the CUDA headers (-I) supply __half and the
// host side of __device__/__forceinline__. Kernels only: no __syncthreads, shared memory
// or warp functions. Build with -ffp-contract=off so that, like the GPU build
// (--fmad=false), every multiply and add is rounded on its own.
#pragma once

#include <vector_types.h>

#define __launch_bounds__(...)

// The built-in variables, one set per simulated thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// A launch: every thread of every block, one after another. Elementwise kernels touch
// disjoint elements per thread, so the order cannot change the result.
template <typename Kernel, typename... Args>
void gm_host_launch(unsigned grid, unsigned block, Kernel kernel, Args... args) {
    gridDim = dim3(grid);
    blockDim = dim3(block);
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = uint3{b, 0, 0};
            threadIdx = uint3{t, 0, 0};
            kernel(args...);
        }
    }
}

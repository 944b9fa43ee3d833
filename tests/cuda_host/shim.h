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

// Warp-synchronous kernels (the FP8 velocity's block reduction uses __shfl_xor_sync): the
// 32 lanes of a warp run as coroutines (ucontext) on the calling thread. A shuffle stores
// the lane's value and yields; once every lane of the warp has reached it, each reads its
// partner's value (two alternating slot sets, so that a lane running ahead to the next
// shuffle cannot overwrite a value another lane has still to read). A warp whose lanes
// reach different numbers of shuffles (divergence, undefined on a GPU) aborts.
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

struct GmHostWarp {
    ucontext_t scheduler;
    ucontext_t lanes[32];
    unsigned slots[2][32];
    unsigned long long rounds[32];
    bool finished[32];
    const std::function<void()>* body;
};
inline thread_local GmHostWarp* gm_host_warp = nullptr;

inline void gm_host_lane_entry() {
    (*gm_host_warp->body)();
    gm_host_warp->finished[threadIdx.x % 32] = true;
}  // returns to uc_link, the scheduler

inline unsigned __shfl_xor_sync(unsigned, unsigned value, int lane_mask, int = 32) {
    GmHostWarp& warp = *gm_host_warp;
    const unsigned lane = threadIdx.x % 32;
    const unsigned slot = warp.rounds[lane]++ & 1u;
    warp.slots[slot][lane] = value;
    swapcontext(&warp.lanes[lane], &warp.scheduler);
    return warp.slots[slot][(lane ^ static_cast<unsigned>(lane_mask)) % 32];
}

template <typename Kernel, typename... Args>
void gm_host_launch_warps(unsigned grid, unsigned block, Kernel kernel, Args... args) {
    if (block % 32 != 0) {
        std::fprintf(stderr, "gm_host_launch_warps: %u threads are not whole warps\n",
                     block);
        std::abort();
    }
    constexpr std::size_t stack_bytes = 1 << 16;
    static thread_local std::vector<char> stacks(32 * stack_bytes);
    const std::function<void()> body = [&] { kernel(args...); };
    GmHostWarp warp{};
    warp.body = &body;
    GmHostWarp* const outer = gm_host_warp;
    gm_host_warp = &warp;
    gridDim = dim3(grid);
    blockDim = dim3(block);
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned first = 0; first < block; first += 32) {
            blockIdx = uint3{b, 0, 0};
            for (unsigned lane = 0; lane < 32; ++lane) {
                getcontext(&warp.lanes[lane]);
                warp.lanes[lane].uc_stack.ss_sp = &stacks[lane * stack_bytes];
                warp.lanes[lane].uc_stack.ss_size = stack_bytes;
                warp.lanes[lane].uc_link = &warp.scheduler;
                makecontext(&warp.lanes[lane], gm_host_lane_entry, 0);
                warp.rounds[lane] = 0;
                warp.finished[lane] = false;
            }
            for (;;) {  // one round: every lane to its next shuffle, or to its end
                for (unsigned lane = 0; lane < 32; ++lane) {
                    threadIdx = uint3{first + lane, 0, 0};
                    swapcontext(&warp.scheduler, &warp.lanes[lane]);
                }
                unsigned finished = 0;
                for (unsigned lane = 0; lane < 32; ++lane) {
                    finished += warp.finished[lane];
                    if (warp.rounds[lane] != warp.rounds[0]) finished = 33;
                }
                if (finished == 32) break;
                if (finished != 0) {
                    std::fprintf(stderr, "gm_host_launch_warps: the lanes of warp %u of "
                                 "block %u diverged at a shuffle\n", first / 32, b);
                    std::abort();
                }
            }
        }
    }
    gm_host_warp = outer;
}

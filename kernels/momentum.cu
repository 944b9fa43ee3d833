// The fused momentum-SGD update in CUDA C: one pass reads param, grad and velocity once and
// writes param and velocity once, for every parameter group in one launch. CuPy compiles
// this file (gpu_momentum/backends/cupy.py) from the text that kernels/cuda_source.py builds,
// which prepends the GM_* #defines used below (generated from kernels/layout.py); the same
// text is compiled for the CPU by the tests (tests/cuda_host/shim.h).
//
// Entry points, listed as NVRTC name expressions, for T = float, double and __half: storage
// type T, velocity type V (float for __half, else T), compute type C (double for double,
// else float: __half is stored, never computed with).
//
// momentum_step<T>: the update. Arguments, in order:
//   T* param                  n elements, updated in place
//   const T* grad             n elements
//   V* velocity               n elements, updated in place (read and written as flags say)
//   long long n               element count (buffers over 2**31 elements are normal)
//   const C* group_scalars    [groups][GM_GROUP_COLUMNS], row k is group k's scalars
//                             (GM_COLUMN_* : lr, momentum, grad_coeff = 1 - dampening,
//                             coupled weight_decay, l1, decoupled decay = 1 - lr * wd or
//                             exactly 1)
//   const unsigned* group_flags  [groups], per-group GM_FLAG_* bits (MAXIMIZE, NESTEROV,
//                             VELOCITY_INITIALIZED, KEEP_VELOCITY)
//   const long long* range_ends  [range_count], increasing, the last is n: range r is
//                             [range_ends[r - 1], range_ends[r]) (from 0 for r = 0)
//   const int* range_groups   [range_count], the group of each range, or GM_NO_GROUP
//   int range_count           at least 1
//   C inv_grad_scale          1 / loss scale; exactly 1 without loss scaling
//   const C* grad_scale       null, or the loss scale in device memory (one C, written
//                             by the host or another kernel before this launch): the
//                             gradient is then multiplied by C(1) / *grad_scale, worked
//                             out by each thread in C, and inv_grad_scale is not read (a
//                             CUDA graph replays the launch with the scale of the moment;
//                             for the power-of-two scales of loss scalers the product is
//                             exactly the host's 1 / grad_scale)
//   unsigned launch_flags     launch-wide GM_FLAG_* bits (CLASSIC, READ_COUNTERS), or'ed
//                             into every group's flags
//   const long long* counters with GM_FLAG_READ_COUNTERS, the step counters in device
//                             memory (GM_COUNTER_* slots, then one per group from
//                             GM_COUNTER_GROUP_SLOTS): the step does nothing when
//                             LAST_STEP_SKIPPED is set, and group k's velocity is
//                             initialized when its slot is not 0 (its VELOCITY_INITIALIZED
//                             bit is ignored); else unused (may be null)
// A range whose group is GM_NO_GROUP (the padding between FlatParams segments) is left
// alone: its elements are neither read nor written.
// Skipping steps with a non-finite gradient, all on the stream, no host round trip
// (kernels/cuda_launch.py, step_launches): counters[LAST_STEP_SKIPPED] = 0 (a memset; or
// found_inf != 0, GradScaler's verdict, written by the launcher),
// find_nonfinite<T>(grad, n, range_ends, range_groups, range_count, inv_grad_scale,
// grad_scale, counters) sets it when a scaled gradient element of a group's range is NaN
// or inf (never clears it),
// momentum_step<T> with GM_FLAG_READ_COUNTERS, then
// finish_step(counters, group_flags, group_count), one block, counts the step and marks
// the groups' velocities as initialized.
// Launch: at most GM_BLOCK_SIZE threads per block, any grid size (grid-stride loops).
//
// The maths follows kernels/elementwise.py operation for operation (and no FMA contraction:
// the options carry --fmad=false), so it matches gpu_momentum.reference bit for bit.
//
// Groups: each thread keeps the hyperparameters of the range its last element was in (a
// Cursor) and looks them up again (the next range or a binary search, then one table row,
// all cached) only when an element leaves that range, so the element update reads only
// registers. A thread moves by the grid stride (gridDim.x * blockDim.x vectors, about
// 0.7M float32 elements on an H100): where ranges are about that long (100 groups over
// 2**26 elements) it reloads almost every iteration, a few cached loads before its data
// loads; where they are much longer, rarely. Not yet measured on a GPU.

#include <cuda_fp16.h>

static_assert(sizeof(void*) == 8, "64-bit addresses assumed by the alignment arithmetic");

namespace gm {

template <typename T> struct Types { using velocity = T; using compute = T; };
template <> struct Types<__half> { using velocity = float; using compute = float; };

__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ double to_compute(double x) { return x; }
__device__ __forceinline__ float to_compute(__half x) { return __half2float(x); }

__device__ __forceinline__ void store(float& out, float x) { out = x; }
__device__ __forceinline__ void store(double& out, double x) { out = x; }
__device__ __forceinline__ void store(__half& out, float x) { out = __float2half_rn(x); }

// The hyperparameters of one group, as an element update reads them.
template <typename C>
struct Hyper {
    C lr, momentum, grad_coeff, weight_decay, l1, decay, inv_grad_scale;
    unsigned flags;
    __device__ __forceinline__ bool has(unsigned flag) const { return (flags & flag) != 0; }
    // The old velocity is read when it is initialized (not on the first step), unless
    // torch style with momentum 0 leaves it untouched.
    __device__ __forceinline__ bool reads_velocity() const {
        return has(GM_FLAG_VELOCITY_INITIALIZED) && !has(GM_FLAG_KEEP_VELOCITY);
    }
};

// What a launch reads besides the arrays: the kernel's arguments, gathered.
template <typename C>
struct Table {
    const C* __restrict__ scalars;
    const unsigned* __restrict__ group_flags;
    const long long* __restrict__ range_ends;
    const int* __restrict__ range_groups;
    int range_count;
    C inv_grad_scale;
    unsigned launch_flags;
    const long long* __restrict__ counters;
};

// The range [begin, end) of a thread's walk over the buffer. Starts empty, so that the
// first element looks its range up.
struct Range {
    long long begin = 0, end = 0;
    int index = -1;

    // Moves to the range holding element i, unless already there, and says whether it
    // moved: the next range when i is in it (one load: a grid-stride walk goes forward,
    // range after range), else a binary search over all the range ends, like
    // kernels.elementwise.seek_range (the first r with i < range_ends[r]), which finds i
    // in any direction.
    __device__ __forceinline__ bool seek(long long i, const long long* __restrict__ ends,
                                         int count) {
        if (i >= begin && i < end) return false;
        int low = index + 1;
        if (i < end || low >= count || i >= ends[low]) {
            low = 0;
            int high = count - 1;
            while (low < high) {
                const int middle = (low + high) >> 1;
                if (i < ends[middle]) {
                    high = middle;
                } else {
                    low = middle + 1;
                }
            }
        }
        index = low;
        begin = low > 0 ? ends[low - 1] : 0;
        end = ends[low];
        return true;
    }
};

// The range a thread is in and its group's hyperparameters; a NO_GROUP range (FlatParams
// padding) gets GM_FLAG_LEAVE_ALONE, and its elements are neither read nor written.
template <typename C>
struct Cursor {
    Range range;
    Hyper<C> h;

    __device__ __forceinline__ void seek(long long i, const Table<C>& t) {
        if (!range.seek(i, t.range_ends, t.range_count)) return;
        const int k = t.range_groups[range.index];
        if (k == GM_NO_GROUP) {
            h.flags = GM_FLAG_LEAVE_ALONE;  // nothing else of h is read
            return;
        }
        const C* row = t.scalars + static_cast<long long>(k) * GM_GROUP_COLUMNS;
        unsigned flags = t.launch_flags | t.group_flags[k];
        if (flags & GM_FLAG_READ_COUNTERS) {
            // The device counters, not the host's table, know whether the group's velocity
            // is initialized: a skipped first step leaves the next one first.
            flags &= ~GM_FLAG_VELOCITY_INITIALIZED;
            if (t.counters[GM_COUNTER_GROUP_SLOTS + k] != 0) {
                flags |= GM_FLAG_VELOCITY_INITIALIZED;
            }
        }
        h = Hyper<C>{row[GM_COLUMN_LR], row[GM_COLUMN_MOMENTUM], row[GM_COLUMN_GRAD_COEFF],
                     row[GM_COLUMN_WEIGHT_DECAY], row[GM_COLUMN_L1], row[GM_COLUMN_DECAY],
                     t.inv_grad_scale, flags};
    }
};

// The range a thread's non-finite check is in, and whether some group updates it (only
// those elements are checked).
struct CheckedRange {
    Range range;
    bool checked = false;

    __device__ __forceinline__ void seek(long long i, const long long* __restrict__ ends,
                                         const int* __restrict__ groups, int count) {
        if (range.seek(i, ends, count)) checked = groups[range.index] != GM_NO_GROUP;
    }
};

// NaN and inf give NaN; every finite x gives exactly 0. Needs no math header, on the GPU
// or in the host build.
template <typename C>
__device__ __forceinline__ bool finite(C x) { return x - x == C(0); }

// One element, in registers. Launch flags are uniform and group flags change only at range
// ends, so nearly every warp takes each branch the same way in all its threads. The scalar
// tests (weight_decay != 0, l1 != 0, decay != 1) are those of kernels/elementwise.py:
// skipping a term is not the same as adding zero (-0.0 + 0 is +0.0).
template <typename C>
__device__ __forceinline__ void update(C& p, C g, C& v, const Hyper<C>& h) {
    g = g * h.inv_grad_scale;
    if (h.has(GM_FLAG_MAXIMIZE)) g = -g;
    if (h.weight_decay != C(0)) g = g + h.weight_decay * p;
    if (h.l1 != C(0)) {
        // l1 * sign(p) as branches: where p is 0, g stays bitwise what it was.
        if (p > C(0)) {
            g = g + h.l1;
        } else if (p < C(0)) {
            g = g - h.l1;
        }
    }
    if (h.decay != C(1)) p = p * h.decay;
    if (h.has(GM_FLAG_CLASSIC)) {
        v = h.has(GM_FLAG_VELOCITY_INITIALIZED) ? h.momentum * v - h.lr * g : -h.lr * g;
        p = h.has(GM_FLAG_NESTEROV) ? p + (h.momentum * v - h.lr * g) : p + v;
    } else if (h.has(GM_FLAG_KEEP_VELOCITY)) {
        p = p - h.lr * g;
    } else {
        v = h.has(GM_FLAG_VELOCITY_INITIALIZED) ? h.momentum * v + h.grad_coeff * g : g;
        p = h.has(GM_FLAG_NESTEROV) ? p - h.lr * (g + h.momentum * v) : p - h.lr * v;
    }
}

template <typename T, typename V, typename C>
__device__ __forceinline__ void update_element(T* __restrict__ param,
                                               const T* __restrict__ grad,
                                               V* __restrict__ velocity, long long i,
                                               const Hyper<C>& h) {
    if (h.has(GM_FLAG_LEAVE_ALONE)) return;
    C p = to_compute(param[i]);
    C v = h.reads_velocity() ? C(velocity[i]) : C(0);
    update(p, to_compute(grad[i]), v, h);
    store(param[i], p);
    if (!h.has(GM_FLAG_KEEP_VELOCITY)) velocity[i] = V(v);
}

// W consecutive elements moved as whole 128-bit words (two for a float velocity of __half
// params): ld.global.v4 / st.global.v4, LDG.E.128 / STG.E.128 in SASS.
template <typename T, int W>
struct alignas(16) Pack {
    T x[W];
};

// Elements per 128-bit word. A function, not a static member: NVRTC would emit the member
// as a global variable.
template <typename T>
__host__ __device__ constexpr int vector_width() { return GM_VECTOR_BYTES / sizeof(T); }

template <typename T, typename V, typename C>
__device__ __forceinline__ void update_vector(T* __restrict__ param,
                                              const T* __restrict__ grad,
                                              V* __restrict__ velocity, long long i,
                                              const Hyper<C>& h) {
    constexpr int W = vector_width<T>();
    using PT = Pack<T, W>;
    using PV = Pack<V, W>;
    if (h.has(GM_FLAG_LEAVE_ALONE)) return;
    PT p = *reinterpret_cast<const PT*>(param + i);
    const PT g = *reinterpret_cast<const PT*>(grad + i);
    PV v = {};
    if (h.reads_velocity()) v = *reinterpret_cast<const PV*>(velocity + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
        C pk = to_compute(p.x[k]);
        C vk = v.x[k];
        update(pk, to_compute(g.x[k]), vk, h);
        store(p.x[k], pk);
        v.x[k] = V(vk);
    }
    *reinterpret_cast<PT*>(param + i) = p;
    if (!h.has(GM_FLAG_KEEP_VELOCITY)) *reinterpret_cast<PV*>(velocity + i) = v;
}

__device__ __forceinline__ unsigned long long address(const void* pointer) {
    return reinterpret_cast<unsigned long long>(pointer);
}

// The first element where param, grad and velocity all start a 16-byte word, so that the
// vector body can run from there; n when there is none (views misaligned against each
// other), and then every element takes the scalar path. Arrays are element-aligned (the
// launcher checks), so the head is shorter than one vector.
template <typename T, typename V>
__device__ __forceinline__ long long vector_start(const T* param, const T* grad,
                                                  const V* velocity, long long n) {
    const unsigned long long head =
        (GM_VECTOR_BYTES - address(param) % GM_VECTOR_BYTES) % GM_VECTOR_BYTES / sizeof(T);
    const bool together = (address(grad) + head * sizeof(T)) % GM_VECTOR_BYTES == 0 &&
                          (address(velocity) + head * sizeof(V)) % GM_VECTOR_BYTES == 0;
    return together && static_cast<long long>(head) < n ? static_cast<long long>(head) : n;
}

}  // namespace gm

template <typename T>
__global__ void __launch_bounds__(GM_BLOCK_SIZE, GM_MIN_BLOCKS_PER_SM)
momentum_step(T* __restrict__ param, const T* __restrict__ grad,
              typename gm::Types<T>::velocity* __restrict__ velocity, long long n,
              const typename gm::Types<T>::compute* __restrict__ group_scalars,
              const unsigned* __restrict__ group_flags,
              const long long* __restrict__ range_ends,
              const int* __restrict__ range_groups,
              int range_count, typename gm::Types<T>::compute inv_grad_scale,
              const typename gm::Types<T>::compute* __restrict__ grad_scale,
              unsigned launch_flags, const long long* __restrict__ counters) {
    using C = typename gm::Types<T>::compute;
    constexpr int W = gm::vector_width<T>();
    if ((launch_flags & GM_FLAG_READ_COUNTERS) &&
        counters[GM_COUNTER_LAST_STEP_SKIPPED] != 0) {
        return;  // a non-finite gradient: the step changes nothing
    }
    const C inv = grad_scale != nullptr ? C(1) / *grad_scale : inv_grad_scale;
    const gm::Table<C> table{group_scalars, group_flags, range_ends, range_groups,
                             range_count,   inv,         launch_flags, counters};
    gm::Cursor<C> cursor;
    const long long thread = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const long long start = gm::vector_start(param, grad, velocity, n);
    const long long vectors = (n - start) / W;
    // Not unrolled: occupancy already keeps enough loads in flight, and an unrolled
    // grid-stride loop costs registers (sm_100 and sm_120 then spill).
#pragma unroll 1
    for (long long i = thread; i < vectors; i += stride) {
        const long long first = start + i * W;
        cursor.seek(first, table);
        if (first + W <= cursor.range.end) {
            gm::update_vector(param, grad, velocity, first, cursor.h);
        } else {
            // The word holds a range end: each element with its own group's scalars.
            // FlatParams segments start on 16-byte words, so only views that do not start
            // on one get here, once per range end at most.
#pragma unroll 1
            for (long long e = first; e < first + W; ++e) {
                cursor.seek(e, table);
                gm::update_element(param, grad, velocity, e, cursor.h);
            }
        }
    }
    // The scalar head (everything, when the arrays cannot be vectorised together) and tail:
    // fewer than W elements each, not worth unrolled code.
#pragma unroll 1
    for (long long i = thread; i < start; i += stride) {
        cursor.seek(i, table);
        gm::update_element(param, grad, velocity, i, cursor.h);
    }
#pragma unroll 1
    for (long long i = start + vectors * W + thread; i < n; i += stride) {
        cursor.seek(i, table);
        gm::update_element(param, grad, velocity, i, cursor.h);
    }
}

// Sets counters[GM_COUNTER_LAST_STEP_SKIPPED] when grad * inv_grad_scale (in the compute
// type, as the update computes it; C(1) / *grad_scale when grad_scale is not null) holds
// a NaN or inf in a range some group updates;
// never clears it. NO_GROUP ranges (padding) are not read.
template <typename T>
__global__ void __launch_bounds__(GM_BLOCK_SIZE, GM_MIN_BLOCKS_PER_SM)
find_nonfinite(const T* __restrict__ grad, long long n,
               const long long* __restrict__ range_ends,
               const int* __restrict__ range_groups, int range_count,
               typename gm::Types<T>::compute inv_grad_scale,
               const typename gm::Types<T>::compute* __restrict__ grad_scale,
               long long* __restrict__ counters) {
    using C = typename gm::Types<T>::compute;
    if (grad_scale != nullptr) inv_grad_scale = C(1) / *grad_scale;
    constexpr int W = gm::vector_width<T>();
    using PT = gm::Pack<T, W>;
    const long long thread = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const long long start = gm::vector_start(grad, grad, grad, n);
    const long long vectors = (n - start) / W;
    gm::CheckedRange at;
    bool all_finite = true;
#pragma unroll 1
    for (long long i = thread; i < vectors; i += stride) {
        const long long first = start + i * W;
        at.seek(first, range_ends, range_groups, range_count);
        if (first + W <= at.range.end) {
            if (!at.checked) continue;
            const PT g = *reinterpret_cast<const PT*>(grad + first);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                all_finite &= gm::finite(gm::to_compute(g.x[k]) * inv_grad_scale);
            }
        } else {
            // The word holds a range end: each element by its own range.
#pragma unroll 1
            for (long long e = first; e < first + W; ++e) {
                at.seek(e, range_ends, range_groups, range_count);
                if (at.checked) {
                    all_finite &= gm::finite(gm::to_compute(grad[e]) * inv_grad_scale);
                }
            }
        }
    }
#pragma unroll 1
    for (long long i = thread; i < start; i += stride) {
        at.seek(i, range_ends, range_groups, range_count);
        if (at.checked) all_finite &= gm::finite(gm::to_compute(grad[i]) * inv_grad_scale);
    }
#pragma unroll 1
    for (long long i = start + vectors * W + thread; i < n; i += stride) {
        at.seek(i, range_ends, range_groups, range_count);
        if (at.checked) all_finite &= gm::finite(gm::to_compute(grad[i]) * inv_grad_scale);
    }
    // Every writer stores the same 1, so the race between threads is harmless.
    if (!all_finite) counters[GM_COUNTER_LAST_STEP_SKIPPED] = 1;
}

// One block, after momentum_step: thread 0 counts the step as taken or skipped; unless it
// was skipped, every thread marks the velocities of its groups (k = threadIdx.x, then every
// blockDim.x-th) as initialized, except those of groups that leave the velocity alone.
// Nothing here writes LAST_STEP_SKIPPED, so the threads read it without a race.
__global__ void finish_step(long long* __restrict__ counters,
                            const unsigned* __restrict__ group_flags, int group_count) {
    const bool skipped = counters[GM_COUNTER_LAST_STEP_SKIPPED] != 0;
    if (threadIdx.x == 0) {
        counters[skipped ? GM_COUNTER_SKIPPED_STEPS : GM_COUNTER_STEP_COUNT] += 1;
    }
    if (skipped) return;
    for (int k = threadIdx.x; k < group_count; k += blockDim.x) {
        if ((group_flags[k] & GM_FLAG_KEEP_VELOCITY) == 0) {
            counters[GM_COUNTER_GROUP_SLOTS + k] = 1;
        }
    }
}

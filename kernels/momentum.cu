// The fused momentum-SGD update in CUDA C: one pass reads param, grad and velocity once and
// writes param and velocity once. CuPy compiles this file (kernels/cupy_kernels.py) from the
// text that kernels/cuda_source.py builds, which prepends the GM_* #defines used below; the
// same text is compiled for the CPU by the tests (tests/cuda_host/shim.h).
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
//   C lr, C momentum          learning rate, momentum
//   C grad_coeff              1 - dampening (torch style; classic ignores it)
//   C weight_decay            only read with GM_FLAG_WEIGHT_DECAY
//   C inv_grad_scale          1 / loss scale; exactly 1 without loss scaling
//   unsigned flags            GM_FLAG_* bits, the same for every element of a launch
//   const long long* counters with GM_FLAG_COUNTERS, the step counters in device memory
//                             (GM_COUNTER_* slots): the step does nothing when
//                             LAST_STEP_SKIPPED is set, and is a first step when
//                             VELOCITY_INITIALIZED is not; otherwise unused (may be null)
// Skipping steps with a non-finite gradient, all on the stream, no host round trip:
//   counters[LAST_STEP_SKIPPED] = 0 (a memset), find_nonfinite<T>(grad, n, inv_grad_scale,
//   counters) sets it when a scaled gradient element is NaN or inf, momentum_step<T> with
//   GM_FLAG_COUNTERS, then finish_step(counters, initializes_velocity) counts the step.
// Launch: at most GM_BLOCK_SIZE threads per block, any grid size (grid-stride loops).
//
// The maths follows kernels/elementwise.py operation for operation (and no FMA contraction:
// the options carry --fmad=false), so it matches gpu_momentum.reference bit for bit.
//
// Seam for later per-step inputs (a per-group hyperparameter table, say): they become
// arguments after `counters` and are folded into the Hyper<C> each thread builds once in
// load_hyper; the element update reads only Hyper.

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

template <typename C>
struct Hyper {
    C lr, momentum, grad_coeff, weight_decay, inv_grad_scale;
    unsigned flags;
    __device__ __forceinline__ bool has(unsigned flag) const { return (flags & flag) != 0; }
    // The old velocity is read unless it does not exist yet (first step) or torch style
    // with momentum 0 leaves it untouched.
    __device__ __forceinline__ bool reads_velocity() const {
        return !has(GM_FLAG_FRESH_VELOCITY | GM_FLAG_KEEP_VELOCITY);
    }
};

// Whether this launch runs (false: a non-finite gradient skips the step) and, from the
// counters or the flags, whether it is a first step.
template <typename C>
__device__ __forceinline__ bool load_hyper(Hyper<C>& h, C lr, C momentum, C grad_coeff,
                                           C weight_decay, C inv_grad_scale, unsigned flags,
                                           const long long* counters) {
    if (flags & GM_FLAG_COUNTERS) {
        if (counters[GM_COUNTER_LAST_STEP_SKIPPED] != 0) return false;
        flags &= ~GM_FLAG_FRESH_VELOCITY;
        if (counters[GM_COUNTER_VELOCITY_INITIALIZED] == 0) flags |= GM_FLAG_FRESH_VELOCITY;
    }
    h = Hyper<C>{lr, momentum, grad_coeff, weight_decay, inv_grad_scale, flags};
    return true;
}

// NaN and inf give NaN; every finite x gives exactly 0. Needs no math header, on the GPU
// or in the host build.
template <typename C>
__device__ __forceinline__ bool finite(C x) { return x - x == C(0); }

// One element, in registers. The flags are uniform across the launch, so every branch
// goes the same way in every thread of a warp.
template <typename C>
__device__ __forceinline__ void update(C& p, C g, C& v, const Hyper<C>& h) {
    g = g * h.inv_grad_scale;
    if (h.has(GM_FLAG_MAXIMIZE)) g = -g;
    if (h.has(GM_FLAG_WEIGHT_DECAY)) g = g + h.weight_decay * p;
    if (h.has(GM_FLAG_CLASSIC)) {
        v = h.has(GM_FLAG_FRESH_VELOCITY) ? -h.lr * g : h.momentum * v - h.lr * g;
        p = h.has(GM_FLAG_NESTEROV) ? p + (h.momentum * v - h.lr * g) : p + v;
    } else if (h.has(GM_FLAG_KEEP_VELOCITY)) {
        p = p - h.lr * g;
    } else {
        v = h.has(GM_FLAG_FRESH_VELOCITY) ? g : h.momentum * v + h.grad_coeff * g;
        p = h.has(GM_FLAG_NESTEROV) ? p - h.lr * (g + h.momentum * v) : p - h.lr * v;
    }
}

template <typename T, typename V, typename C>
__device__ __forceinline__ void update_element(T* __restrict__ param,
                                               const T* __restrict__ grad,
                                               V* __restrict__ velocity, long long i,
                                               const Hyper<C>& h) {
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
              typename gm::Types<T>::compute lr, typename gm::Types<T>::compute momentum,
              typename gm::Types<T>::compute grad_coeff,
              typename gm::Types<T>::compute weight_decay,
              typename gm::Types<T>::compute inv_grad_scale, unsigned flags,
              const long long* __restrict__ counters) {
    constexpr int W = gm::vector_width<T>();
    gm::Hyper<typename gm::Types<T>::compute> h;
    if (!gm::load_hyper(h, lr, momentum, grad_coeff, weight_decay, inv_grad_scale, flags,
                        counters)) {
        return;
    }
    const long long thread = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const long long start = gm::vector_start(param, grad, velocity, n);
    const long long vectors = (n - start) / W;
    // Not unrolled: occupancy already keeps enough loads in flight, and an unrolled
    // grid-stride loop costs registers (sm_100 and sm_120 then spill).
#pragma unroll 1
    for (long long i = thread; i < vectors; i += stride) {
        gm::update_vector(param, grad, velocity, start + i * W, h);
    }
    // The scalar head (everything, when the arrays cannot be vectorised together) and tail:
    // fewer than W elements each, not worth unrolled code.
#pragma unroll 1
    for (long long i = thread; i < start; i += stride) {
        gm::update_element(param, grad, velocity, i, h);
    }
#pragma unroll 1
    for (long long i = start + vectors * W + thread; i < n; i += stride) {
        gm::update_element(param, grad, velocity, i, h);
    }
}

// Sets counters[GM_COUNTER_LAST_STEP_SKIPPED] when grad * inv_grad_scale (in the compute
// type, as the update computes it) holds a NaN or inf anywhere; never clears it.
template <typename T>
__global__ void __launch_bounds__(GM_BLOCK_SIZE, GM_MIN_BLOCKS_PER_SM)
find_nonfinite(const T* __restrict__ grad, long long n,
               typename gm::Types<T>::compute inv_grad_scale,
               long long* __restrict__ counters) {
    using C = typename gm::Types<T>::compute;
    constexpr int W = gm::vector_width<T>();
    using PT = gm::Pack<T, W>;
    const long long thread = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const long long start = gm::vector_start(grad, grad, grad, n);
    const long long vectors = (n - start) / W;
    bool all_finite = true;
#pragma unroll 1
    for (long long i = thread; i < vectors; i += stride) {
        const PT g = *reinterpret_cast<const PT*>(grad + start + i * W);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            all_finite &= gm::finite(gm::to_compute(g.x[k]) * inv_grad_scale);
        }
    }
#pragma unroll 1
    for (long long i = thread; i < start; i += stride) {
        all_finite &= gm::finite(gm::to_compute(grad[i]) * inv_grad_scale);
    }
#pragma unroll 1
    for (long long i = start + vectors * W + thread; i < n; i += stride) {
        all_finite &= gm::finite(gm::to_compute(grad[i]) * inv_grad_scale);
    }
    // Every writer stores the same 1, so the race between threads is harmless.
    if (!all_finite) counters[GM_COUNTER_LAST_STEP_SKIPPED] = 1;
}

// One thread, after momentum_step: counts the step as taken or skipped.
__global__ void finish_step(long long* counters, unsigned initializes_velocity) {
    if (counters[GM_COUNTER_LAST_STEP_SKIPPED] != 0) {
        counters[GM_COUNTER_SKIPPED_STEPS] += 1;
    } else {
        counters[GM_COUNTER_STEP_COUNT] += 1;
        if (initializes_velocity) counters[GM_COUNTER_VELOCITY_INITIALIZED] = 1;
    }
}

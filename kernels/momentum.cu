// The fused momentum-SGD update in CUDA C: one pass reads param, grad and velocity once and
// writes param and velocity once, for every parameter group in one launch. CuPy compiles
// this file (gpu_momentum/backends/cupy.py) from the text that kernels/cuda_source.py builds,
// which prepends the GM_* #defines used below (generated from kernels/layout.py); the same
// text is compiled for the CPU by the tests (tests/cuda_host/shim.h).
//
// Entry points, listed as NVRTC name expressions (kernels/cuda_source.py ENTRY_POINTS), for
// the supported combinations of P, the parameters' storage (gm::Float, gm::Double, and the
// 16-bit gm::BFloat16 and gm::Half, stored as unsigned short and converted with the bit
// operations below), V, the velocity's storage (P itself; or gm::Float for 16-bit P),
// and MODE, a GM_PRECISION_* (NEAREST only unless P is 16-bit). The compute type C is
// double for gm::Double, else float: 16-bit values are stored, never computed with.
//
// momentum_step<P, V, MODE>: the update. Arguments, in order:
//   P::storage* param         n elements, updated in place (MASTER: written, never read)
//   const P::storage* grad    n elements
//   V::storage* velocity      n elements, updated in place (read and written as flags say)
//   B* precision_buffer       n elements, updated in place: KAHAN the compensation (B =
//                             P::storage), MASTER the float32 master copy of the params
//                             (B = float); unused (may be null) otherwise
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
//                             LAST_STEP_SKIPPED is set, group k's velocity is initialized
//                             when its slot is not 0 (its VELOCITY_INITIALIZED bit is
//                             ignored), and STEP_COUNT keys STOCHASTIC rounding; else
//                             unused (may be null)
//   unsigned long long seed   STOCHASTIC: with the step count (counters[STEP_COUNT] with
//   long long step_count      READ_COUNTERS, else step_count: the steps taken before this
//                             one), the key of each element's random bits; else unused
// A range whose group is GM_NO_GROUP (the padding between FlatParams segments) is left
// alone: its elements are neither read nor written.
// Skipping steps with a non-finite gradient, all on the stream, no host round trip
// (kernels/cuda_launch.py, step_launches): counters[LAST_STEP_SKIPPED] = 0 (a memset; or
// found_inf != 0, GradScaler's verdict, written by the launcher),
// find_nonfinite<P>(grad, n, range_ends, range_groups, range_count, inv_grad_scale,
// grad_scale, counters) sets it when a scaled gradient element of a group's range is NaN
// or inf (never clears it),
// momentum_step<P, V, MODE> with GM_FLAG_READ_COUNTERS, then
// finish_step(counters, group_flags, group_count), one block, counts the step and marks
// the groups' velocities as initialized.
// Launch: at most GM_BLOCK_SIZE threads per block, any grid size (grid-stride loops).
//
// The maths follows kernels/elementwise.py operation for operation (and no FMA contraction:
// the options carry --fmad=false), so it matches gpu_momentum.reference bit for bit; the
// 16-bit conversions, stochastic rounding and the hash are its storage_functions, bit
// operation for bit operation (ml_dtypes' and NumPy's casts, NaN bit patterns included:
// cuda_bf16.h's __float2bfloat16_rn and cuda_fp16.h's __float2half_rn round NaNs
// otherwise).
//
// Groups: each thread keeps the hyperparameters of the range its last element was in (a
// Cursor) and looks them up again (the next range or a binary search, then one table row,
// all cached) only when an element leaves that range, so the element update reads only
// registers. A thread moves by the grid stride (gridDim.x * blockDim.x vectors, about
// 0.7M float32 elements on an H100): where ranges are about that long (100 groups over
// 2**26 elements) it reloads almost every iteration, a few cached loads before its data
// loads; where they are much longer, rarely. Not yet measured on a GPU.

#if !defined(__CUDA_ARCH__)
#include <cstring>  // the host build's bit casts (NVRTC has no __builtin_memcpy)
#endif

static_assert(sizeof(void*) == 8, "64-bit addresses assumed by the alignment arithmetic");

namespace gm {

__device__ __forceinline__ unsigned bits_of(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    unsigned u;
    std::memcpy(&u, &x, sizeof u);
    return u;
#endif
}

__device__ __forceinline__ float float_of(unsigned u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// bfloat16 bits -> float: a shift, exact (NaN payloads kept).
__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return float_of(static_cast<unsigned>(h) << 16);
}

// float -> bfloat16 bits as ml_dtypes casts: round to nearest even (|x| >= bf16 max + half
// an ulp carries into inf), NaN -> sign | 0x7fc0.
__device__ __forceinline__ unsigned short f32_to_bf16_rn(float x) {
    const unsigned u = bits_of(x);
    const unsigned r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<unsigned short>(
        (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) & 0x8000u) | 0x7fc0u : r);
}

// float -> bfloat16 bits, stochastically with 16 random bits r16: rounds away from zero
// with probability (dropped bits) / 2**16; to nearest from bf16 max on (and inf, NaN).
__device__ __forceinline__ unsigned short f32_to_bf16_sr(float x, unsigned r16) {
    const unsigned u = bits_of(x);
    if ((u & 0x7fffffffu) >= 0x7f7f0000u) return f32_to_bf16_rn(x);
    return static_cast<unsigned short>((u + r16) >> 16);
}

// float16 bits -> float as NumPy's astype: exact, NaN payloads kept (not quieted).
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    const unsigned magnitude = static_cast<unsigned>(h) & 0x7fffu;
    unsigned bits;
    if (magnitude >= 0x7c00u) {
        bits = (magnitude | 0x3fc00u) << 13;
    } else if (magnitude >= 0x0400u) {
        bits = (magnitude + 0x1c000u) << 13;
    } else {  // subnormal or zero: magnitude * 2**-24, exact
        bits = bits_of(static_cast<float>(magnitude) * 5.9604644775390625e-08f);
    }
    return float_of(bits | sign);
}

// float -> float16 bits as NumPy's astype: round to nearest even, |x| >= 65520 to inf,
// gradual underflow, NaN -> sign | 0x7c00 | (mantissa >> 13) (0x7c01 where that is inf).
__device__ __forceinline__ unsigned short f32_to_f16_rn(float x) {
    const unsigned u = bits_of(x);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7fffffffu;
    unsigned r;
    if (a > 0x7f800000u) {
        r = 0x7c00u | ((a & 0x7fffffu) >> 13);
        if (r == 0x7c00u) r = 0x7c01u;
    } else if (a >= 0x477ff000u) {
        r = 0x7c00u;
    } else if (a >= 0x38800000u) {
        r = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
    } else {  // subnormal or zero: |x| + 0.5 rounds to a multiple of 2**-24 (the float16
              // subnormal's step) as float addition rounds, to nearest even
        r = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
    }
    return static_cast<unsigned short>(r | sign);
}

// float -> float16 bits, stochastically with 16 random bits r16: a normal result drops 13
// bits against r16's top 13; a subnormal one compares its fraction's top 16 bits with r16;
// to nearest from 65504 on (and inf, NaN). A float subnormal gives 0 (flushed or not).
__device__ __forceinline__ unsigned short f32_to_f16_sr(float x, unsigned r16) {
    const unsigned u = bits_of(x);
    const unsigned a = u & 0x7fffffffu;
    if (a >= 0x477fe000u) return f32_to_f16_rn(x);
    const unsigned sign = (u >> 16) & 0x8000u;
    unsigned r;
    if (a >= 0x38800000u) {
        r = (a - 0x38000000u + (r16 >> 3)) >> 13;
    } else {  // in units of 2**-24, |x| is q + fraction, all exact
        const float y = float_of(a) * 16777216.0f;
        const unsigned q = static_cast<unsigned>(y);
        const unsigned dropped = static_cast<unsigned>((y - static_cast<float>(q)) * 65536.0f);
        r = q + ((dropped + r16) >> 16);
    }
    return static_cast<unsigned short>(r | sign);
}

// lowbias32 (C. Wellons): a bijection of 32-bit words.
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// The key of one step's random bits, from the seed and the steps taken before it.
__device__ __forceinline__ unsigned step_key(unsigned long long seed, long long steps) {
    const unsigned long long count = static_cast<unsigned long long>(steps);
    unsigned k = mix32(static_cast<unsigned>(seed) ^ 0x9e3779b9u);
    k = mix32(k ^ static_cast<unsigned>(seed >> 32));
    k = mix32(k ^ static_cast<unsigned>(count));
    return mix32(k ^ static_cast<unsigned>(count >> 32));
}

// 32 random bits of element i: the high 16 round a 16-bit parameter, the low 16 a 16-bit
// velocity.
__device__ __forceinline__ unsigned element_bits(unsigned key, long long i) {
    const unsigned long long j = static_cast<unsigned long long>(i);
    return mix32(static_cast<unsigned>(j) * 0x9e3779b9u +
                 mix32(key ^ static_cast<unsigned>(j >> 32)));
}

// Storage formats: what an array holds (storage), what the update computes in (compute),
// and how a computed value goes back (nearest, stochastic with 16 random bits).
template <typename T>  // float and double: stored as computed, nothing to round
struct Wide {
    __host__ __device__ static constexpr int min_blocks_with_buffer() {
        return GM_MIN_BLOCKS_PER_SM;
    }
    using storage = T;
    using compute = T;
    __device__ __forceinline__ static T load(T x) { return x; }
    __device__ __forceinline__ static T nearest(T x) { return x; }
    __device__ __forceinline__ static T stochastic(T x, unsigned) { return x; }
};
using Float = Wide<float>;
using Double = Wide<double>;
struct BFloat16 {
    __host__ __device__ static constexpr int min_blocks_with_buffer() {
        return GM_MIN_BLOCKS_PER_SM;
    }
    using storage = unsigned short;
    using compute = float;
    __device__ __forceinline__ static float load(unsigned short h) { return bf16_to_f32(h); }
    __device__ __forceinline__ static unsigned short nearest(float x) {
        return f32_to_bf16_rn(x);
    }
    __device__ __forceinline__ static unsigned short stochastic(float x, unsigned r16) {
        return f32_to_bf16_sr(x, r16);
    }
};
struct Half {
    __host__ __device__ static constexpr int min_blocks_with_buffer() {
        return GM_MIN_BLOCKS_PER_SM_FLOAT16_BUFFER;
    }
    using storage = unsigned short;
    using compute = float;
    __device__ __forceinline__ static float load(unsigned short h) { return f16_to_f32(h); }
    __device__ __forceinline__ static unsigned short nearest(float x) {
        return f32_to_f16_rn(x);
    }
    __device__ __forceinline__ static unsigned short stochastic(float x, unsigned r16) {
        return f32_to_f16_sr(x, r16);
    }
};

// The element type of MODE's precision buffer: the compensation has the parameters'
// storage, the master copy is float; other modes have none (never dereferenced).
template <typename P, int MODE> struct Buffer { using type = typename P::storage; };
template <typename P> struct Buffer<P, GM_PRECISION_MASTER> { using type = float; };

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

// One element's stored values in, the update in the compute type, the stored values out,
// as MODE says (kernels.elementwise.storage_update): p is the parameter (not read with
// MASTER), v the velocity (read as h says), b the element of the precision buffer.
template <typename P, typename V, int MODE>
__device__ __forceinline__ void step_stored(typename P::storage& p, typename P::storage g,
                                            typename V::storage& v,
                                            typename Buffer<P, MODE>::type& b, long long i,
                                            unsigned key,
                                            const Hyper<typename P::compute>& h) {
    using C = typename P::compute;
    C x;
    if constexpr (MODE == GM_PRECISION_MASTER) {
        x = b;
    } else if constexpr (MODE == GM_PRECISION_KAHAN) {
        x = P::load(p) + P::load(b);
    } else {
        x = P::load(p);
    }
    C w = h.reads_velocity() ? V::load(v) : C(0);
    update(x, P::load(g), w, h);
    // A NaN result is stored as the quiet NaN: which NaN the arithmetic made is the
    // hardware's (x86 passes an operand's on, NVIDIA GPUs make 0x7fffffff) and the
    // compiler's (it may flip a NaN's sign).
    if constexpr (sizeof(typename P::storage) == 2) {
        if (x != x) x = float_of(0x7fc00000u);
    }
    if constexpr (sizeof(typename V::storage) == 2) {
        if (w != w) w = float_of(0x7fc00000u);
    }
    if constexpr (MODE == GM_PRECISION_STOCHASTIC) {
        const unsigned bits = element_bits(key, i);
        p = P::stochastic(x, bits >> 16);
        v = V::stochastic(w, bits & 0xffffu);
    } else {
        p = P::nearest(x);
        v = V::nearest(w);
    }
    if constexpr (MODE == GM_PRECISION_KAHAN) {
        // The rounding's error, exact in float; none where the result is not finite.
        const C error = x - P::load(p);
        b = P::nearest(finite(error) ? error : C(0));
    } else if constexpr (MODE == GM_PRECISION_MASTER) {
        b = x;
    }
}

__host__ __device__ constexpr bool has_buffer(int mode) {
    return mode == GM_PRECISION_KAHAN || mode == GM_PRECISION_MASTER;
}

// The resident blocks per SM an update's __launch_bounds__ promises (its register
// budget): float16 with a compensation or master copy holds more values through its
// longer conversions, and spills within GM_MIN_BLOCKS_PER_SM's budget.
template <typename P, int MODE>
__host__ __device__ constexpr int min_blocks_per_sm() {
    return has_buffer(MODE) ? P::min_blocks_with_buffer() : GM_MIN_BLOCKS_PER_SM;
}

template <typename P, typename V, int MODE>
__device__ __forceinline__ void update_element(
    typename P::storage* __restrict__ param, const typename P::storage* __restrict__ grad,
    typename V::storage* __restrict__ velocity,
    typename Buffer<P, MODE>::type* __restrict__ buffer, long long i, unsigned key,
    const Hyper<typename P::compute>& h) {
    if (h.has(GM_FLAG_LEAVE_ALONE)) return;
    typename P::storage p{};
    if constexpr (MODE != GM_PRECISION_MASTER) p = param[i];
    typename V::storage v{};
    if (h.reads_velocity()) v = velocity[i];
    typename Buffer<P, MODE>::type b{};
    if constexpr (has_buffer(MODE)) b = buffer[i];
    step_stored<P, V, MODE>(p, grad[i], v, b, i, key, h);
    param[i] = p;
    if (!h.has(GM_FLAG_KEEP_VELOCITY)) velocity[i] = v;
    if constexpr (has_buffer(MODE)) buffer[i] = b;
}

// W consecutive elements moved as whole 128-bit words (two for a float velocity or master
// copy of 16-bit params): ld.global.v4 / st.global.v4, LDG.E.128 / STG.E.128 in SASS.
template <typename T, int W>
struct alignas(16) Pack {
    T x[W];
};

// Elements per 128-bit word. A function, not a static member: NVRTC would emit the member
// as a global variable.
template <typename T>
__host__ __device__ constexpr int vector_width() { return GM_VECTOR_BYTES / sizeof(T); }

template <typename P, typename V, int MODE>
__device__ __forceinline__ void update_vector(
    typename P::storage* __restrict__ param, const typename P::storage* __restrict__ grad,
    typename V::storage* __restrict__ velocity,
    typename Buffer<P, MODE>::type* __restrict__ buffer, long long i, unsigned key,
    const Hyper<typename P::compute>& h) {
    using T = typename P::storage;
    constexpr int W = vector_width<T>();
    using PT = Pack<T, W>;
    using PV = Pack<typename V::storage, W>;
    using PB = Pack<typename Buffer<P, MODE>::type, W>;
    if (h.has(GM_FLAG_LEAVE_ALONE)) return;
    PT p = {};
    if constexpr (MODE != GM_PRECISION_MASTER) p = *reinterpret_cast<const PT*>(param + i);
    const PT g = *reinterpret_cast<const PT*>(grad + i);
    PV v = {};
    if (h.reads_velocity()) v = *reinterpret_cast<const PV*>(velocity + i);
    PB b = {};
    if constexpr (has_buffer(MODE)) b = *reinterpret_cast<const PB*>(buffer + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
        step_stored<P, V, MODE>(p.x[k], g.x[k], v.x[k], b.x[k], i + k, key, h);
    }
    *reinterpret_cast<PT*>(param + i) = p;
    if (!h.has(GM_FLAG_KEEP_VELOCITY)) *reinterpret_cast<PV*>(velocity + i) = v;
    if constexpr (has_buffer(MODE)) *reinterpret_cast<PB*>(buffer + i) = b;
}

__device__ __forceinline__ unsigned long long address(const void* pointer) {
    return reinterpret_cast<unsigned long long>(pointer);
}

// The first element where param, grad, velocity and the precision buffer (when not null)
// all start a 16-byte word, so that the vector body can run from there; n when there is
// none (views misaligned against each other), and then every element takes the scalar
// path. Arrays are element-aligned (the launcher checks), so the head is shorter than one
// vector.
template <typename T, typename V, typename B>
__device__ __forceinline__ long long vector_start(const T* param, const T* grad,
                                                  const V* velocity, const B* buffer,
                                                  long long n) {
    const unsigned long long head =
        (GM_VECTOR_BYTES - address(param) % GM_VECTOR_BYTES) % GM_VECTOR_BYTES / sizeof(T);
    const bool together =
        (address(grad) + head * sizeof(T)) % GM_VECTOR_BYTES == 0 &&
        (address(velocity) + head * sizeof(V)) % GM_VECTOR_BYTES == 0 &&
        (buffer == nullptr || (address(buffer) + head * sizeof(B)) % GM_VECTOR_BYTES == 0);
    return together && static_cast<long long>(head) < n ? static_cast<long long>(head) : n;
}

}  // namespace gm

template <typename P, typename V, int MODE>
__global__ void __launch_bounds__(GM_BLOCK_SIZE, gm::min_blocks_per_sm<P, MODE>())
momentum_step(typename P::storage* __restrict__ param,
              const typename P::storage* __restrict__ grad,
              typename V::storage* __restrict__ velocity,
              typename gm::Buffer<P, MODE>::type* __restrict__ precision_buffer, long long n,
              const typename P::compute* __restrict__ group_scalars,
              const unsigned* __restrict__ group_flags,
              const long long* __restrict__ range_ends,
              const int* __restrict__ range_groups,
              int range_count, typename P::compute inv_grad_scale,
              const typename P::compute* __restrict__ grad_scale,
              unsigned launch_flags, const long long* __restrict__ counters,
              unsigned long long seed, long long step_count) {
    using C = typename P::compute;
    constexpr int W = gm::vector_width<typename P::storage>();
    if ((launch_flags & GM_FLAG_READ_COUNTERS) &&
        counters[GM_COUNTER_LAST_STEP_SKIPPED] != 0) {
        return;  // a non-finite gradient: the step changes nothing
    }
    unsigned key = 0;
    if constexpr (MODE == GM_PRECISION_STOCHASTIC) {
        key = gm::step_key(seed, (launch_flags & GM_FLAG_READ_COUNTERS)
                                       ? counters[GM_COUNTER_STEP_COUNT] : step_count);
    }
    auto* const buffer = gm::has_buffer(MODE) ? precision_buffer : nullptr;
    const C inv = grad_scale != nullptr ? C(1) / *grad_scale : inv_grad_scale;
    const gm::Table<C> table{group_scalars, group_flags, range_ends, range_groups,
                             range_count,   inv,         launch_flags, counters};
    gm::Cursor<C> cursor;
    const long long thread = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const long long start = gm::vector_start(param, grad, velocity, buffer, n);
    const long long vectors = (n - start) / W;
    // Not unrolled: occupancy already keeps enough loads in flight, and an unrolled
    // grid-stride loop costs registers (sm_100 and sm_120 then spill).
#pragma unroll 1
    for (long long i = thread; i < vectors; i += stride) {
        const long long first = start + i * W;
        cursor.seek(first, table);
        if (first + W <= cursor.range.end) {
            gm::update_vector<P, V, MODE>(param, grad, velocity, buffer, first, key,
                                          cursor.h);
        } else {
            // The word holds a range end: each element with its own group's scalars.
            // FlatParams segments start on 16-byte words, so only views that do not start
            // on one get here, once per range end at most.
#pragma unroll 1
            for (long long e = first; e < first + W; ++e) {
                cursor.seek(e, table);
                gm::update_element<P, V, MODE>(param, grad, velocity, buffer, e, key,
                                               cursor.h);
            }
        }
    }
    // The scalar head (everything, when the arrays cannot be vectorised together) and tail:
    // fewer than W elements each, not worth unrolled code.
#pragma unroll 1
    for (long long i = thread; i < start; i += stride) {
        cursor.seek(i, table);
        gm::update_element<P, V, MODE>(param, grad, velocity, buffer, i, key, cursor.h);
    }
#pragma unroll 1
    for (long long i = start + vectors * W + thread; i < n; i += stride) {
        cursor.seek(i, table);
        gm::update_element<P, V, MODE>(param, grad, velocity, buffer, i, key, cursor.h);
    }
}

// Sets counters[GM_COUNTER_LAST_STEP_SKIPPED] when grad * inv_grad_scale (in the compute
// type, as the update computes it; C(1) / *grad_scale when grad_scale is not null) holds
// a NaN or inf in a range some group updates;
// never clears it. NO_GROUP ranges (padding) are not read.
template <typename P>
__global__ void __launch_bounds__(GM_BLOCK_SIZE, GM_MIN_BLOCKS_PER_SM)
find_nonfinite(const typename P::storage* __restrict__ grad, long long n,
               const long long* __restrict__ range_ends,
               const int* __restrict__ range_groups, int range_count,
               typename P::compute inv_grad_scale,
               const typename P::compute* __restrict__ grad_scale,
               long long* __restrict__ counters) {
    using T = typename P::storage;
    using C = typename P::compute;
    if (grad_scale != nullptr) inv_grad_scale = C(1) / *grad_scale;
    constexpr int W = gm::vector_width<T>();
    using PT = gm::Pack<T, W>;
    const long long thread = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

    const long long start = gm::vector_start(grad, grad, grad, grad, n);
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
                all_finite &= gm::finite(P::load(g.x[k]) * inv_grad_scale);
            }
        } else {
            // The word holds a range end: each element by its own range.
#pragma unroll 1
            for (long long e = first; e < first + W; ++e) {
                at.seek(e, range_ends, range_groups, range_count);
                if (at.checked) {
                    all_finite &= gm::finite(P::load(grad[e]) * inv_grad_scale);
                }
            }
        }
    }
#pragma unroll 1
    for (long long i = thread; i < start; i += stride) {
        at.seek(i, range_ends, range_groups, range_count);
        if (at.checked) all_finite &= gm::finite(P::load(grad[i]) * inv_grad_scale);
    }
#pragma unroll 1
    for (long long i = start + vectors * W + thread; i < n; i += stride) {
        at.seek(i, range_ends, range_groups, range_count);
        if (at.checked) all_finite &= gm::finite(P::load(grad[i]) * inv_grad_scale);
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

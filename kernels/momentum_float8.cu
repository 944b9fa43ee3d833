// The fused update with an FP8 velocity: E4M3 codes, one byte per element, and one float
// scale per block of GM_FLOAT8_BLOCK elements of the flat buffer (gpu_momentum.reference
// defines the format: float32_to_e4m3, e4m3_to_float32, quantize_velocity). Appended to
// momentum.cu by kernels/cuda_source.py, whose functions (update, Cursor, element_bits,
// the 16-bit storage formats) it uses.
//
// momentum_step_fp8<P, MODE>: P is gm::Float, gm::BFloat16 or gm::Half (float compute),
// MODE a GM_PRECISION_* (Float: NEAREST, or STOCHASTIC, which then rounds the codes
// only). Arguments as momentum_step's, with the velocity as two arrays:
//   unsigned char* codes      n E4M3 codes, rewritten block by block
//   float* scales             ceil(n / GM_FLOAT8_BLOCK) scales, one per block
// One warp owns a block at a time (grid-stride over blocks): each lane updates 8 of its
// elements (as two float4 words of float params, or one 128-bit word of 16-bit params,
// when the arrays are aligned and the block is whole; else element by element), keeping
// their new velocities in registers; five xor-shuffles give the block's absmax and five
// more whether any of its groups writes the velocity; only then are the codes (4 or 8
// bytes per lane, coalesced) and the scale written. Nothing is read twice.
// A padding element (GM_NO_GROUP) counts as velocity 0 and its code becomes 0; a group
// that leaves its velocity alone (KEEP_VELOCITY) keeps its dequantized value, requantized
// with the block; a block no group writes keeps its codes and scale.

namespace gm {

// v / scale as an E4M3 code (reference.float32_to_e4m3 of the quotient, saturating at
// 448): NaN and inf give 0x7f; a zero scale (a block of zeros) gives 0.
__device__ __forceinline__ unsigned e4m3_code(float v, float scale, unsigned r16,
                                              bool stochastic) {
    if ((bits_of(v) & 0x7fffffffu) >= 0x7f800000u) return GM_FLOAT8_NAN;
    const unsigned u = bits_of(scale > 0.0f ? v / scale : 0.0f);
    const unsigned sign = (u >> 24) & 0x80u;
    unsigned a = u & 0x7fffffffu;
    if (a > 0x43e00000u) a = 0x43e00000u;  // 448
    unsigned m;
    if (a >= 0x3c800000u) {  // normal: rebias the exponent, drop 20 mantissa bits
        m = stochastic ? (a - 0x3c000000u + (r16 << 4)) >> 20
                       : (a - 0x3c000000u + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
    } else if (stochastic) {  // in units of 2**-9, |x| is whole + fraction, all exact
        const float y = float_of(a) * 512.0f;
        const unsigned whole = static_cast<unsigned>(y);
        const unsigned dropped =
            static_cast<unsigned>((y - static_cast<float>(whole)) * 65536.0f);
        m = whole + ((dropped + r16) >> 16);
    } else {  // |x| + 16384 rounds |x| to a multiple of 2**-9 (its ulp), to nearest even
        m = bits_of(float_of(a) + 16384.0f) - 0x46800000u;
    }
    return m | sign;
}

// An E4M3 code's value, exactly; 0x7f and 0xff give the quiet NaN.
__device__ __forceinline__ float e4m3_value(unsigned code) {
    const unsigned magnitude = code & 0x7fu;
    const unsigned sign = (code & 0x80u) << 24;
    unsigned bits;
    if (magnitude == 0x7fu) {
        bits = 0x7fc00000u;
    } else if (magnitude >= 8u) {
        bits = (magnitude << 20) + 0x3c000000u;
    } else {
        bits = bits_of(static_cast<float>(magnitude) * 0.001953125f);  // m * 2**-9
    }
    return float_of(bits | sign);
}

// |v|'s bits where v is finite, else 0: their unsigned maximum is the largest finite |v|.
__device__ __forceinline__ unsigned finite_magnitude(float v) {
    const unsigned a = bits_of(v) & 0x7fffffffu;
    return a < 0x7f800000u ? a : 0u;
}

// The maximum over the 32 lanes of a warp; every lane gets it. All lanes must call it.
__device__ __forceinline__ unsigned warp_max(unsigned x) {
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) {
        const unsigned other = __shfl_xor_sync(0xffffffffu, x, mask);
        x = other > x ? other : x;
    }
    return x;
}

// Whether an element's group writes the velocity (not padding, not KEEP_VELOCITY).
__device__ __forceinline__ bool writes_velocity(const Hyper<float>& h) {
    return !h.has(GM_FLAG_LEAVE_ALONE) && !h.has(GM_FLAG_KEEP_VELOCITY);
}

// One element with an FP8 velocity: p, g and b as step_stored has them, `code` its old
// code and `old_scale` its block's; returns the new velocity, unrounded (0 for padding,
// whose p and b are then left as they are).
template <typename P, int MODE>
__device__ __forceinline__ float step_fp8(typename P::storage& p, typename P::storage g,
                                          unsigned code, float old_scale,
                                          typename Buffer<P, MODE>::type& b, long long i,
                                          unsigned key, const Hyper<float>& h) {
    if (h.has(GM_FLAG_LEAVE_ALONE)) return 0.0f;
    float x;
    if constexpr (MODE == GM_PRECISION_MASTER) {
        x = b;
    } else if constexpr (MODE == GM_PRECISION_KAHAN) {
        x = P::load(p) + P::load(b);
    } else {
        x = P::load(p);
    }
    // Read where it exists, and where the group keeps it (a zeroed state reads 0).
    const bool reads = h.has(GM_FLAG_VELOCITY_INITIALIZED) || h.has(GM_FLAG_KEEP_VELOCITY);
    float w = reads ? e4m3_value(code) * old_scale : 0.0f;
    update(x, P::load(g), w, h);
    if constexpr (sizeof(typename P::storage) == 2) {
        if (x != x) x = float_of(0x7fc00000u);
    }
    if constexpr (MODE == GM_PRECISION_STOCHASTIC) {
        p = P::stochastic(x, element_bits(key, i) >> 16);
    } else {
        p = P::nearest(x);
    }
    if constexpr (MODE == GM_PRECISION_KAHAN) {
        const float error = x - P::load(p);
        b = P::nearest(finite(error) ? error : 0.0f);
    } else if constexpr (MODE == GM_PRECISION_MASTER) {
        b = x;
    }
    return w;
}

// The code of element i's new velocity v in a block of scale `scale`.
template <int MODE>
__device__ __forceinline__ unsigned code_fp8(float v, float scale, long long i,
                                             unsigned key) {
    if constexpr (MODE == GM_PRECISION_STOCHASTIC) {
        return e4m3_code(v, scale, element_bits(key, i) & 0xffffu, true);
    } else {
        return e4m3_code(v, scale, 0u, false);
    }
}

// The word that holds W codes.
template <int W> struct CodeWord;
template <> struct CodeWord<4> { using type = unsigned; };
template <> struct CodeWord<8> { using type = unsigned long long; };

}  // namespace gm

template <typename P, int MODE>
__global__ void __launch_bounds__(GM_BLOCK_SIZE,
                                  gm::has_buffer(MODE)
                                      ? GM_FLOAT8_MIN_BLOCKS_PER_SM_WITH_BUFFER
                                      : GM_FLOAT8_MIN_BLOCKS_PER_SM)
momentum_step_fp8(typename P::storage* __restrict__ param,
                  const typename P::storage* __restrict__ grad,
                  unsigned char* __restrict__ codes, float* __restrict__ scales,
                  typename gm::Buffer<P, MODE>::type* __restrict__ precision_buffer,
                  long long n, const float* __restrict__ group_scalars,
                  const unsigned* __restrict__ group_flags,
                  const long long* __restrict__ range_ends,
                  const int* __restrict__ range_groups, int range_count,
                  float inv_grad_scale, const float* __restrict__ grad_scale,
                  unsigned launch_flags, const long long* __restrict__ counters,
                  unsigned long long seed, long long step_count) {
    using T = typename P::storage;
    using B = typename gm::Buffer<P, MODE>::type;
    constexpr int W = gm::vector_width<T>();
    constexpr int L = GM_FLOAT8_BLOCK / 32;  // elements per lane and block
    constexpr int VECTORS = L / W;  // per lane and block
    using PT = gm::Pack<T, W>;
    using PB = gm::Pack<B, W>;
    using Word = typename gm::CodeWord<W>::type;
    static_assert(L % W == 0, "a lane's elements are whole vectors");
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
    const float inv = grad_scale != nullptr ? 1.0f / *grad_scale : inv_grad_scale;
    const gm::Table<float> table{group_scalars, group_flags, range_ends, range_groups,
                                 range_count,   inv,         launch_flags, counters};
    gm::Cursor<float> cursor;
    const int lane = threadIdx.x & 31;
    const long long warp =
        (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const long long warps = (static_cast<long long>(gridDim.x) * blockDim.x) >> 5;
    const long long blocks = (n + GM_FLOAT8_BLOCK - 1) / GM_FLOAT8_BLOCK;
    // Whole blocks move as words when every array starts on one (a block is 16 bytes'
    // worth of every element size); else, and in the last partial block, element-wise.
    const bool aligned =
        gm::address(param) % GM_VECTOR_BYTES == 0 &&
        gm::address(grad) % GM_VECTOR_BYTES == 0 && gm::address(codes) % W == 0 &&
        (buffer == nullptr || gm::address(buffer) % GM_VECTOR_BYTES == 0);

#pragma unroll 1
    for (long long block = warp; block < blocks; block += warps) {
        const long long begin = block * GM_FLOAT8_BLOCK;
        const bool whole = aligned && begin + GM_FLOAT8_BLOCK <= n;
        const float old_scale = scales[block];
        float v[L];
        bool writes = false;
        if (whole) {
            // Vector k of the lane: elements begin + (k * 32 + lane) * W, W of them.
#pragma unroll
            for (int k = 0; k < VECTORS; ++k) {
                const long long first = begin + (k * 32 + lane) * W;
                PT p = {};
                if constexpr (MODE != GM_PRECISION_MASTER) {
                    p = *reinterpret_cast<const PT*>(param + first);
                }
                const PT g = *reinterpret_cast<const PT*>(grad + first);
                PB b = {};
                if constexpr (gm::has_buffer(MODE)) {
                    b = *reinterpret_cast<const PB*>(buffer + first);
                }
                const Word word = *reinterpret_cast<const Word*>(codes + first);
                cursor.seek(first, table);
                const bool one_range = first + W <= cursor.range.end;
                unsigned padding = 0;  // bit e: element first + e is left alone
#pragma unroll
                for (int e = 0; e < W; ++e) {
                    if (!one_range) cursor.seek(first + e, table);
                    const unsigned code = static_cast<unsigned>(word >> (8 * e)) & 0xffu;
                    v[k * W + e] = gm::step_fp8<P, MODE>(p.x[e], g.x[e], code, old_scale,
                                                         b.x[e], first + e, key, cursor.h);
                    writes |= gm::writes_velocity(cursor.h);
                    if (cursor.h.has(GM_FLAG_LEAVE_ALONE)) padding |= 1u << e;
                }
                if (padding == 0) {
                    *reinterpret_cast<PT*>(param + first) = p;
                    if constexpr (gm::has_buffer(MODE)) {
                        *reinterpret_cast<PB*>(buffer + first) = b;
                    }
                } else {  // a segment's padding: written element by element around it
#pragma unroll
                    for (int e = 0; e < W; ++e) {
                        if (padding & (1u << e)) continue;
                        param[first + e] = p.x[e];
                        if constexpr (gm::has_buffer(MODE)) buffer[first + e] = b.x[e];
                    }
                }
            }
        } else {
            // Element j of the lane: begin + j * 32 + lane.
#pragma unroll
            for (int j = 0; j < L; ++j) {
                const long long i = begin + j * 32 + lane;
                v[j] = 0.0f;
                if (i < n) {
                    cursor.seek(i, table);
                    if (!cursor.h.has(GM_FLAG_LEAVE_ALONE)) {
                        T p{};
                        if constexpr (MODE != GM_PRECISION_MASTER) p = param[i];
                        B b{};
                        if constexpr (gm::has_buffer(MODE)) b = buffer[i];
                        v[j] = gm::step_fp8<P, MODE>(p, grad[i], codes[i], old_scale, b, i,
                                                     key, cursor.h);
                        param[i] = p;
                        if constexpr (gm::has_buffer(MODE)) buffer[i] = b;
                        writes |= gm::writes_velocity(cursor.h);
                    }
                }
            }
        }
        unsigned magnitude = 0;
#pragma unroll
        for (int j = 0; j < L; ++j) {
            const unsigned a = gm::finite_magnitude(v[j]);
            magnitude = a > magnitude ? a : magnitude;
        }
        magnitude = gm::warp_max(magnitude);
        if (gm::warp_max(writes ? 1u : 0u) == 0) continue;  // the whole warp alike
        const float scale = gm::float_of(magnitude) / GM_FLOAT8_LARGEST;
        if (whole) {
#pragma unroll
            for (int k = 0; k < VECTORS; ++k) {
                const long long first = begin + (k * 32 + lane) * W;
                Word word = 0;
#pragma unroll
                for (int e = 0; e < W; ++e) {
                    word |= static_cast<Word>(
                                gm::code_fp8<MODE>(v[k * W + e], scale, first + e, key))
                            << (8 * e);
                }
                *reinterpret_cast<Word*>(codes + first) = word;
            }
        } else {
#pragma unroll
            for (int j = 0; j < L; ++j) {
                const long long i = begin + j * 32 + lane;
                if (i < n) {
                    codes[i] = static_cast<unsigned char>(
                        gm::code_fp8<MODE>(v[j], scale, i, key));
                }
            }
        }
        if (lane == 0) scales[block] = scale;
    }
}

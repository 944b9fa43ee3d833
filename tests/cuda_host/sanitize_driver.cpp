// The host-compiled kernels under AddressSanitizer and UBSan: entry points of every storage
// format and precision mode over odd sizes, every element-aligned start within a 16-byte
// word, every flag combination, one
// group over one range or three groups over ranges with odd ends (words that hold a range
// end; every fourth range GM_NO_GROUP, whose elements must keep their bits), and a few
// grid sizes. Each array, the group table's included, sits in an
// allocation of exactly its own size, so a read or write past its end stops the run; UBSan
// stops it on a misaligned vector access. Each case runs twice, once with the arrays
// aligned alike (vector body) and once misaligned against each other (scalar path only):
// the two must agree bit for bit.
//
// Built by tests/host_kernel.py: g++ -include shim.h -DGM_MODULE_SOURCE="<module source>".
#include GM_MODULE_SOURCE

#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <random>
#include <vector>

namespace {

class Buffer {
  public:
    Buffer(size_t offset, size_t payload) : bytes_(offset + payload), offset_(offset) {
        base_ = static_cast<unsigned char*>(
            ::operator new(bytes_ > 0 ? bytes_ : 1, std::align_val_t{16}));
    }
    ~Buffer() { ::operator delete(base_, std::align_val_t{16}); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    template <typename T> T* at() { return reinterpret_cast<T*>(base_ + offset_); }

  private:
    size_t bytes_, offset_;
    unsigned char* base_;
};

// A value of storage format F from a float.
template <typename F> typename F::storage from_float(float x) {
    return F::nearest(static_cast<typename F::compute>(x));
}

template <typename P, typename V_, int MODE>
struct Case {
    using T = typename P::storage;
    using V = typename V_::storage;
    using B = typename gm::Buffer<P, MODE>::type;
    using C = typename P::compute;
    static constexpr bool buffered = gm::has_buffer(MODE);

    // The group table of a case: with `grouped`, three groups over ranges cut at odd
    // places (group r % 3 for range r, but every fourth range GM_NO_GROUP, as padding
    // is), whose flags and scalars differ from group 0's; else group 0 over one range.
    // `flags` holds launch and group bits alike.
    struct Groups {
        std::vector<C> scalars;
        std::vector<unsigned> flags;
        std::vector<long long> ends;
        std::vector<int> owners;
        std::vector<long long> counters;

        Groups(long long n, unsigned bits, bool grouped) {
            const unsigned group = bits & (GM_FLAG_NESTEROV | GM_FLAG_VELOCITY_INITIALIZED |
                                           GM_FLAG_KEEP_VELOCITY);
            const int count = grouped ? 3 : 1;
            // lr, momentum, grad_coeff, weight_decay, l1, decay of each group.
            static_assert(GM_GROUP_COLUMNS == 6, "one row per line below");
            const C rows[3 * GM_GROUP_COLUMNS] = {
                C(0.05), C(0.9), C(0.7), C(0.01), C(0),    C(1),
                C(0.1),  C(0.5), C(1),   C(0),    C(0.02), C(1),
                C(0.02), C(0.8), C(0.9), C(0),    C(0.01), C(0.999)};
            const unsigned group_bits[3] = {
                group, group ^ GM_FLAG_NESTEROV ^ GM_FLAG_KEEP_VELOCITY,
                group ^ GM_FLAG_VELOCITY_INITIALIZED};
            scalars.assign(rows, rows + count * GM_GROUP_COLUMNS);
            flags.assign(group_bits, group_bits + count);
            if (grouped) {
                for (long long cut : {1LL, 2LL, 5LL, 6LL, 7LL, 11LL, 13LL, n / 2,
                                      n / 2 + 1}) {
                    if (cut < n && (ends.empty() || cut > ends.back())) ends.push_back(cut);
                }
            }
            ends.push_back(n);
            for (size_t r = 0; r < ends.size(); ++r) {
                owners.push_back(r % 4 == 3 ? GM_NO_GROUP : static_cast<int>(r % count));
            }
            // Velocity initialised, step not skipped: read with GM_FLAG_READ_COUNTERS, except
            // group 1's, whose first step the counters decide.
            counters.assign(GM_COUNTER_GROUP_SLOTS + count, 0);
            counters[GM_COUNTER_GROUP_SLOTS] = 1;
            if (grouped) counters[GM_COUNTER_GROUP_SLOTS + 2] = 1;
        }

        // The owner of element i.
        int owner(long long i) const {
            size_t r = 0;
            while (ends[r] <= i) ++r;
            return owners[r];
        }
    };

    // The values of element i: param, grad, velocity and precision buffer.
    static void draw(std::mt19937& rng, T* p, T* g, V* v, B* b) {
        std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
        const float x = uniform(rng);
        *p = from_float<P>(x);
        *g = from_float<P>(uniform(rng));
        *v = from_float<V_>(uniform(rng));
        const float small = uniform(rng) * 0.001f;  // a compensation: below the param's ulp
        if constexpr (MODE == GM_PRECISION_KAHAN) *b = from_float<P>(small);
        if constexpr (MODE == GM_PRECISION_MASTER) *b = x + small;
    }

    // Runs the kernel on arrays at the given byte offsets (the precision buffer, where the
    // mode has one, at `b_off`); returns param, velocity and buffer. Counts in *moved the
    // NO_GROUP elements whose param, velocity or buffer bits changed.
    static std::vector<unsigned char> run(long long n, size_t p_off, size_t g_off,
                                          size_t v_off, size_t b_off, unsigned flags,
                                          bool grouped, unsigned grid, unsigned seed,
                                          long long* moved) {
        Buffer p(p_off, n * sizeof(T)), g(g_off, n * sizeof(T)), v(v_off, n * sizeof(V)),
            b(b_off, buffered ? n * sizeof(B) : 0);
        B* buffer = buffered ? b.at<B>() : nullptr;
        B unused;
        std::mt19937 rng(seed);
        for (long long i = 0; i < n; ++i) {
            draw(rng, p.at<T>() + i, g.at<T>() + i, v.at<V>() + i,
                 buffered ? buffer + i : &unused);
        }
        Groups groups(n, flags, grouped);
        const unsigned launch =
            flags & (GM_FLAG_CLASSIC | GM_FLAG_MAXIMIZE | GM_FLAG_READ_COUNTERS);
        gm_host_launch(grid, 32u, &momentum_step<P, V_, MODE>, p.at<T>(),
                       static_cast<const T*>(g.at<T>()), v.at<V>(), buffer, n,
                       static_cast<const C*>(groups.scalars.data()),
                       static_cast<const unsigned*>(groups.flags.data()),
                       static_cast<const long long*>(groups.ends.data()),
                       static_cast<const int*>(groups.owners.data()),
                       static_cast<int>(groups.ends.size()), C(0.5),
                       static_cast<const C*>(nullptr), launch,
                       static_cast<const long long*>(groups.counters.data()), 7ull, 3ll);
        const size_t each = sizeof(T) + sizeof(V) + (buffered ? sizeof(B) : 0);
        std::vector<unsigned char> out(n * each);
        if (n > 0) {
            std::memcpy(out.data(), p.at<T>(), n * sizeof(T));
            std::memcpy(out.data() + n * sizeof(T), v.at<V>(), n * sizeof(V));
            if (buffered) {
                std::memcpy(out.data() + n * (sizeof(T) + sizeof(V)), buffer, n * sizeof(B));
            }
        }
        // The same draws again: what every NO_GROUP element must still hold.
        std::mt19937 again(seed);
        for (long long i = 0; i < n; ++i) {
            T p0, g0;
            V v0;
            B b0{};
            draw(again, &p0, &g0, &v0, &b0);
            if (groups.owner(i) == GM_NO_GROUP &&
                (std::memcmp(&p0, p.at<T>() + i, sizeof(T)) != 0 ||
                 std::memcmp(&v0, v.at<V>() + i, sizeof(V)) != 0 ||
                 (buffered && std::memcmp(&b0, buffer + i, sizeof(B)) != 0))) {
                ++*moved;
            }
        }
        return out;
    }

    // find_nonfinite over a gradient at `offset`, finite or with one NaN at `bad`, and
    // every NO_GROUP element inf (never read); whether it found a non-finite element.
    static long long check(long long n, size_t offset, long long bad, bool grouped,
                           unsigned grid) {
        Buffer g(offset, n * sizeof(T));
        Groups groups(n, 0u, grouped);
        for (long long i = 0; i < n; ++i) {
            const bool padding = groups.owner(i) == GM_NO_GROUP;
            g.at<T>()[i] = from_float<P>(i == bad ? NAN : padding ? INFINITY : 1.0f);
        }
        long long counters[4] = {0, 0, 0, 0};
        gm_host_launch(grid, 32u, &find_nonfinite<P>, static_cast<const T*>(g.at<T>()), n,
                       static_cast<const long long*>(groups.ends.data()),
                       static_cast<const int*>(groups.owners.data()),
                       static_cast<int>(groups.ends.size()), C(0.5),
                       static_cast<const C*>(nullptr), counters);
        return counters[GM_COUNTER_LAST_STEP_SKIPPED];
    }

    static int all(const char* name, long long* launches) {
        const long long sizes[] = {0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 33, 1023};
        int failures = 0;
        for (long long n : sizes) {
            for (size_t offset = 0; offset < 16; offset += sizeof(T)) {
                // Velocity (and buffer) elements may be wider than param elements (float
                // for 16-bit params): the same element index then sits at a
                // proportionally larger offset.
                const size_t v_offset = offset * sizeof(V) / sizeof(T) % 16;
                const size_t b_offset = offset * sizeof(B) / sizeof(T) % 16;
                const size_t g_apart = (offset + sizeof(T)) % 16;
                for (long long bad : {-1LL, 0LL, 5LL, n / 2, n - 1}) {
                    for (bool grouped : {false, true}) {
                        const long long found = check(n, offset, bad, grouped, 3);
                        *launches += 1;
                        const bool read = bad >= 0 && bad < n &&
                                          Groups(n, 0u, grouped).owner(bad) != GM_NO_GROUP;
                        if (found != read) {
                            std::printf("%s: n=%lld offset=%zu grouped=%d NaN at %lld: "
                                        "found=%lld\n", name, n, offset, grouped, bad,
                                        found);
                            ++failures;
                        }
                    }
                }
                for (unsigned flags = 0; flags < 2 * GM_FLAG_KEEP_VELOCITY; ++flags) {
                    for (bool grouped : {false, true}) {
                        for (unsigned grid : {1u, 3u}) {
                            const unsigned seed = static_cast<unsigned>(n * 131 + offset);
                            long long moved = 0;
                            auto vector = run(n, offset, offset, v_offset, b_offset, flags,
                                              grouped, grid, seed, &moved);
                            auto scalar = run(n, offset, g_apart, 0, 0, flags, grouped,
                                              grid, seed, &moved);
                            *launches += 2;
                            if (vector != scalar || moved) {
                                std::printf("%s: n=%lld offset=%zu flags=%u grouped=%d "
                                            "grid=%u: vector and scalar paths differ, or "
                                            "%lld NO_GROUP elements moved\n",
                                            name, n, offset, flags, grouped, grid, moved);
                                ++failures;
                            }
                        }
                    }
                }
            }
        }
        return failures;
    }
};

}  // namespace

// finish_step over `count` groups with one block of 32 threads (several groups per thread
// past 32): counts, and marks every group's velocity but those of KEEP_VELOCITY groups.
int finish(int count, bool skipped, long long* launches) {
    std::vector<unsigned> flags(count);
    for (int k = 0; k < count; ++k) flags[k] = k % 3 == 1 ? GM_FLAG_KEEP_VELOCITY : 0u;
    std::vector<long long> counters(GM_COUNTER_GROUP_SLOTS + count, 0);
    counters[GM_COUNTER_LAST_STEP_SKIPPED] = skipped;
    gm_host_launch(1u, 32u, &finish_step, counters.data(),
                   static_cast<const unsigned*>(flags.data()), count);
    *launches += 1;
    bool ok = counters[GM_COUNTER_STEP_COUNT] == !skipped &&
              counters[GM_COUNTER_SKIPPED_STEPS] == skipped;
    for (int k = 0; k < count; ++k) {
        ok &= counters[GM_COUNTER_GROUP_SLOTS + k] == (!skipped && k % 3 != 1);
    }
    if (!ok) {
        std::printf("finish_step: %d groups, skipped=%d: wrong counters\n", count, skipped);
    }
    return ok ? 0 : 1;
}

int main() {
    long long launches = 0;
    int failures = 0;
    for (int count : {1, 3, 32, 70}) {
        failures += finish(count, false, &launches) + finish(count, true, &launches);
    }
    using namespace gm;
    failures += Case<Float, Float, GM_PRECISION_NEAREST>::all("float", &launches);
    failures += Case<Double, Double, GM_PRECISION_NEAREST>::all("double", &launches);
    failures += Case<Half, Float, GM_PRECISION_NEAREST>::all("half", &launches);
    failures += Case<BFloat16, Float, GM_PRECISION_STOCHASTIC>::all("bfloat16 stochastic",
                                                                    &launches);
    failures += Case<BFloat16, BFloat16, GM_PRECISION_KAHAN>::all(
        "bfloat16 kahan, bfloat16 velocity", &launches);
    failures += Case<BFloat16, Float, GM_PRECISION_MASTER>::all("bfloat16 master", &launches);
    failures += Case<Half, Half, GM_PRECISION_MASTER>::all("half master, half velocity",
                                                           &launches);
    std::printf("%lld launches, %d failures\n", launches, failures);
    return failures == 0 ? 0 : 1;
}

// The host-compiled kernels under AddressSanitizer and UBSan: every entry point over odd
// sizes, every element-aligned start within a 16-byte word, every flag combination and a
// few grid sizes. Each array sits in an allocation of exactly its own size, so a read or
// write past its end stops the run; UBSan stops it on a misaligned vector access. Each
// case runs twice, once with the three arrays aligned alike (vector body) and once
// misaligned against each other (scalar path only): the two must agree bit for bit.
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

template <typename T> T from_float(float x) { return static_cast<T>(x); }
template <> __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct Case {
    using V = typename gm::Types<T>::velocity;
    using C = typename gm::Types<T>::compute;

    // Runs the kernel on arrays at the given byte offsets; returns param and velocity.
    static std::vector<unsigned char> run(long long n, size_t p_off, size_t g_off,
                                          size_t v_off, unsigned flags, unsigned grid,
                                          unsigned seed) {
        Buffer p(p_off, n * sizeof(T)), g(g_off, n * sizeof(T)), v(v_off, n * sizeof(V));
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
        for (long long i = 0; i < n; ++i) {
            p.at<T>()[i] = from_float<T>(uniform(rng));
            g.at<T>()[i] = from_float<T>(uniform(rng));
            v.at<V>()[i] = static_cast<V>(uniform(rng));
        }
        // Velocity initialised, step not skipped: read when GM_FLAG_COUNTERS is set.
        const long long counters[4] = {0, 1, 0, 0};
        gm_host_launch(grid, 32u, &momentum_step<T>, p.at<T>(),
                       static_cast<const T*>(g.at<T>()), v.at<V>(), n, C(0.05), C(0.9),
                       C(0.7), C(0.01), C(0.5), flags, counters);
        std::vector<unsigned char> out(n * (sizeof(T) + sizeof(V)));
        if (n > 0) {
            std::memcpy(out.data(), p.at<T>(), n * sizeof(T));
            std::memcpy(out.data() + n * sizeof(T), v.at<V>(), n * sizeof(V));
        }
        return out;
    }

    // find_nonfinite over a gradient at `offset`, finite or with one NaN at `bad`.
    static long long check(long long n, size_t offset, long long bad, unsigned grid) {
        Buffer g(offset, n * sizeof(T));
        for (long long i = 0; i < n; ++i) g.at<T>()[i] = from_float<T>(i == bad ? NAN : 1.0f);
        long long counters[4] = {0, 0, 0, 0};
        gm_host_launch(grid, 32u, &find_nonfinite<T>, static_cast<const T*>(g.at<T>()), n,
                       C(0.5), counters);
        return counters[GM_COUNTER_LAST_STEP_SKIPPED];
    }

    static int all(const char* name, long long* launches) {
        const long long sizes[] = {0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 33, 1023};
        int failures = 0;
        for (long long n : sizes) {
            for (size_t offset = 0; offset < 16; offset += sizeof(T)) {
                // Velocity elements may be wider than param elements (float for __half):
                // the same element index then sits at a proportionally larger offset.
                const size_t v_offset = offset * sizeof(V) / sizeof(T) % 16;
                const size_t g_apart = (offset + sizeof(T)) % 16;
                for (long long bad : {-1LL, 0LL, n / 2, n - 1}) {
                    const long long found = check(n, offset, bad, 3);
                    *launches += 1;
                    if (found != (bad >= 0 && bad < n)) {
                        std::printf("%s: n=%lld offset=%zu NaN at %lld: found=%lld\n", name,
                                    n, offset, bad, found);
                        ++failures;
                    }
                }
                for (unsigned flags = 0; flags < 2 * GM_FLAG_COUNTERS; ++flags) {
                    for (unsigned grid : {1u, 3u}) {
                        const unsigned seed = static_cast<unsigned>(n * 131 + offset);
                        auto vector = run(n, offset, offset, v_offset, flags, grid, seed);
                        auto scalar = run(n, offset, g_apart, 0, flags, grid, seed);
                        *launches += 2;
                        if (vector != scalar) {
                            std::printf("%s: n=%lld offset=%zu flags=%u grid=%u: vector "
                                        "and scalar paths differ\n", name, n, offset, flags,
                                        grid);
                            ++failures;
                        }
                    }
                }
            }
        }
        return failures;
    }
};

}  // namespace

int main() {
    long long launches = 0;
    int failures = Case<float>::all("float", &launches);
    failures += Case<double>::all("double", &launches);
    failures += Case<__half>::all("__half", &launches);
    std::printf("%lld launches, %d failures\n", launches, failures);
    return failures == 0 ? 0 : 1;
}

/// \file detail/random.hpp
/// \brief Portable, seedable random numbers: splitmix64, uniforms and Gaussians.
///
/// std::normal_distribution differs between standard libraries, so pissa draws its own numbers:
/// the same seed gives the same numbers on every platform and thread count (float test matrices
/// on AVX-512 CPUs: but for ~1e-9 of the draws, see fill_gaussian).
#pragma once

#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/random_avx512.hpp>
#include <pissa/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace pissa::detail {

/// splitmix64 (Steele, Lea, Flood 2014), the generator of the toy-experiment protocol:
/// state += 0x9E3779B97F4A7C15, then two xor-shift-multiply rounds.
class SplitMix64 {
public:
    explicit SplitMix64(std::uint64_t seed) : m_state(seed) {}

    /// Jumps over the next `draws` outputs (the state is a counter: O(1)).
    void skip(std::uint64_t draws) { m_state += draws * 0x9E3779B97F4A7C15ULL; }

    /// The next 64 random bits.
    std::uint64_t next() {
        m_state += 0x9E3779B97F4A7C15ULL;
        std::uint64_t z = m_state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }

    /// Uniform double in [0, 1) with 53 random bits.
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

    /// Uniform double in (0, 1]: never zero, safe for log().
    double uniform_open_zero() { return static_cast<double>((next() >> 11) + 1) * 0x1.0p-53; }

    /// Standard normal draw by the Box-Muller transform (the cosine branch only, so each draw
    /// consumes exactly two 64-bit outputs and a stream is reproducible element by element).
    double normal() {
        const double u1 = uniform_open_zero();
        const double u2 = uniform();
        constexpr double two_pi = 6.283185307179586476925286766559;
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2);
    }

private:
    std::uint64_t m_state;
};

/// Mixes a seed with a stream index so that independent streams (e.g. one per matrix column)
/// do not overlap: the stream's generator starts from splitmix64(seed ^ f(stream)).
inline std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t stream) {
    SplitMix64 mix(seed ^ (0xD1B54A32D192ED03ULL * (stream + 1)));
    return mix.next();
}

/// Fills `G [rows, cols]` with standard normals from one seeded stream, column by column
/// (element k of the column-major storage is the stream's k-th normal). Fixed chunks of the
/// stream are drawn in parallel, each generator jumped to its chunk's start: the same bits with
/// any thread count, at half the time on two threads (~25 ns a draw: a log, a cos, a sqrt).
/// Float draws take the AVX-512 path where the kernels run (random_avx512.hpp, ~8x faster; the
/// same floats but for ~1e-9 of the draws, which may differ in their last bit).
template <class Scalar>
void fill_gaussian(Matrix<Scalar>& G, Index rows, Index cols, std::uint64_t seed) {
    G.resize(rows, cols);
    constexpr Index kChunk = Index(1) << 14;
    const Index total = rows * cols, chunks = (total + kChunk - 1) / kChunk;
    Scalar* out = G.data();
    [[maybe_unused]] const bool vectorized = std::is_same_v<Scalar, float> && active_kernel_isa() == KernelIsa::avx512;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (chunks > 1)
#endif
    for (Index chunk = 0; chunk < chunks; ++chunk) {
        const Index begin = chunk * kChunk, end = std::min(total, begin + kChunk);
#if PISSA_HAVE_AVX512_KERNELS
        if constexpr (std::is_same_v<Scalar, float>) {
            if (vectorized) {
                avx512::fill_normals(seed, begin, end - begin, out + begin);
                continue;
            }
        }
#endif
        SplitMix64 rng(seed);
        rng.skip(2 * static_cast<std::uint64_t>(begin));  // two draws per normal
        for (Index k = begin; k < end; ++k) out[k] = static_cast<Scalar>(rng.normal());
    }
}

}  // namespace pissa::detail

/// \file detail/random_avx512.hpp
/// \brief fill_gaussian's AVX-512 path: eight Box-Muller draws at a time from the splitmix64
/// stream of detail/random.hpp, `sqrt(-2 log u1) cos(2 pi u2)` evaluated in double precision.
///
/// The scalar draw calls the C library's log and cos (~25 ns a normal): at rank 128 the test
/// matrix of an 11008-row weight took 18 ms, 4% of the whole decomposition. Here the stream's
/// states are advanced and mixed in 64-bit lanes, and log and cos are fdlibm's algorithms (both
/// within 1 ulp): log as `k ln2 + log1p(f)` with its polynomial in `s^2`, `s = f / (2 + f)`,
/// cos by Cody-Waite reduction with a 33 + 33 + 53-bit pi/2 (ample for |x| < 2 pi) and the
/// sin/cos kernels on [-pi/4, pi/4]. The double result differs from the C library's in the last
/// bits of ~6% of the draws (at most a few ulps); rounded to float the two agree except when the
/// exact value lies within an ulp of a double of a float rounding boundary (~1e-9 of the draws).
/// Every operation has its rounding
/// written out (the `_round_` intrinsics), so no compiler flag can fuse or reorder it: the numbers
/// are the same for every build on a CPU that takes this path.
#pragma once

#include <pissa/detail/cpu_features.hpp>

#if PISSA_HAVE_AVX512_KERNELS

#include <pissa/detail/kernels_avx512.hpp>
#include <pissa/types.hpp>

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace pissa::detail::avx512 {

/// Round to nearest, no exceptions: the rounding of every double operation below. (The maskz_
/// forms with kAll8 stand for the plain intrinsics, as in kernels_avx512.hpp.)
inline constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

PISSA_AVX512_TARGET inline __m512d add(__m512d a, __m512d b) {
    return _mm512_maskz_add_round_pd(kAll8, a, b, kNearest);
}
PISSA_AVX512_TARGET inline __m512d sub(__m512d a, __m512d b) {
    return _mm512_maskz_sub_round_pd(kAll8, a, b, kNearest);
}
PISSA_AVX512_TARGET inline __m512d mul(__m512d a, __m512d b) {
    return _mm512_maskz_mul_round_pd(kAll8, a, b, kNearest);
}
PISSA_AVX512_TARGET inline __m512d constant(double c) { return _mm512_set1_pd(c); }
PISSA_AVX512_TARGET inline __m512i constant64(std::uint64_t c) { return _mm512_set1_epi64(std::int64_t(c)); }
PISSA_AVX512_TARGET inline __m512i shift_right(__m512i z, unsigned bits) {
    return _mm512_maskz_srli_epi64(kAll8, z, bits);
}

/// splitmix64's output function of eight states (SplitMix64::next after the increment).
PISSA_AVX512_TARGET inline __m512i splitmix_mix(__m512i z) {
    z = _mm512_maskz_mullo_epi64(kAll8, _mm512_xor_si512(z, shift_right(z, 30)), constant64(0xBF58476D1CE4E5B9ULL));
    z = _mm512_maskz_mullo_epi64(kAll8, _mm512_xor_si512(z, shift_right(z, 27)), constant64(0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, shift_right(z, 31));
}

/// The top 53 bits of each lane as a double in [0, 2^53) (exact).
PISSA_AVX512_TARGET inline __m512d top53(__m512i bits) {
    return _mm512_maskz_cvtepu64_pd(kAll8, shift_right(bits, 11));
}

/// log(u) for doubles u in [2^-53, 1] (fdlibm's e_log.c without its special cases, which such
/// u never reach): u = 2^k (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)).
PISSA_AVX512_TARGET inline __m512d log_unit(__m512d u) {
    // Adding 1 - 0x3fe6a09e (the high word of sqrt(2)/2) to the high word carries into the
    // exponent exactly when the mantissa is >= sqrt(2)/2 relative to the next power of two.
    const __m512i bits =
        _mm512_add_epi64(_mm512_castpd_si512(u), constant64(std::uint64_t(0x3ff00000 - 0x3fe6a09e) << 32));
    const __m512d k = _mm512_maskz_cvtepi64_pd(kAll8, _mm512_sub_epi64(shift_right(bits, 52), constant64(0x3ff)));
    const __m512i mantissa = _mm512_add_epi64(_mm512_and_si512(bits, constant64(0x000fffffffffffffULL)),
                                              constant64(std::uint64_t(0x3fe6a09e) << 32));
    const __m512d f = sub(_mm512_castsi512_pd(mantissa), constant(1.0));
    const __m512d hfsq = mul(mul(constant(0.5), f), f);
    const __m512d s = _mm512_maskz_div_round_pd(kAll8, f, add(constant(2.0), f), kNearest);
    const __m512d z = mul(s, s), w = mul(z, z);
    const __m512d t1 =
        mul(w, add(constant(3.999999999940941908e-01),
                   mul(w, add(constant(2.222219843214978396e-01), mul(w, constant(1.531383769920937332e-01))))));
    const __m512d t2 = mul(
        z,
        add(constant(6.666666666666735130e-01),
            mul(w, add(constant(2.857142874366239149e-01),
                       mul(w, add(constant(1.818357216161805012e-01), mul(w, constant(1.479819860511658591e-01))))))));
    const __m512d R = add(t2, t1);
    // s (hfsq + R) + k ln2_lo - hfsq + f + k ln2_hi, left to right (ln2_hi has 32 bits: k ln2_hi is exact).
    __m512d sum = add(mul(s, add(hfsq, R)), mul(k, constant(1.90821492927058770002e-10)));
    sum = add(sub(sum, hfsq), f);
    return add(sum, mul(k, constant(6.93147180369123816490e-01)));
}

/// cos(x) for doubles x in [0, 2 pi): x = n pi/2 + (y0 + y1) with |y0| <= pi/4, then +-cos or
/// +-sin of y0 + y1 by n mod 4 (fdlibm's __rem_pio2 medium case, always with its second, 118-bit
/// round, and its __kernel_cos / __kernel_sin).
PISSA_AVX512_TARGET inline __m512d cos_turn(__m512d x) {
    const __m512d n = _mm512_maskz_roundscale_round_pd(kAll8, mul(x, constant(6.36619772367581382433e-01)),
                                                       _MM_FROUND_TO_NEAREST_INT, _MM_FROUND_NO_EXC);
    // pio2_1 and pio2_2 have 33 bits and n <= 4 has 3: n pio2_1, n pio2_2 and x - n pio2_1 are exact.
    const __m512d t = sub(x, mul(n, constant(1.57079632673412561417e+00)));
    __m512d w = mul(n, constant(6.07710050630396597660e-11));
    const __m512d r = sub(t, w);
    w = sub(mul(n, constant(2.02226624879595063154e-21)), sub(sub(t, r), w));
    const __m512d y0 = sub(r, w), y1 = sub(sub(r, y0), w);

    const __m512d z = mul(y0, y0), zz = mul(z, z);
    // __kernel_cos(y0, y1)
    const __m512d cr = add(
        mul(z, add(constant(4.16666666666666019037e-02),
                   mul(z, add(constant(-1.38888888888741095749e-03), mul(z, constant(2.48015872894767294178e-05)))))),
        mul(mul(zz, zz),
            add(constant(-2.75573143513906633035e-07),
                mul(z, add(constant(2.08757232129817482790e-09), mul(z, constant(-1.13596475577881948265e-11)))))));
    const __m512d hz = mul(constant(0.5), z), one_minus_hz = sub(constant(1.0), hz);
    const __m512d cos_y =
        add(one_minus_hz, add(sub(sub(constant(1.0), one_minus_hz), hz), sub(mul(z, cr), mul(y0, y1))));
    // __kernel_sin(y0, y1, 1)
    const __m512d sr =
        add(add(constant(8.33333333332248946124e-03),
                mul(z, add(constant(-1.98412698298579493134e-04), mul(z, constant(2.75573137070700676789e-06))))),
            mul(mul(z, zz), add(constant(-2.50507602534068634195e-08), mul(z, constant(1.58969099521155010221e-10)))));
    const __m512d v = mul(z, y0);
    const __m512d sin_y = sub(y0, sub(sub(mul(z, sub(mul(constant(0.5), y1), mul(v, sr))), y1),
                                      mul(v, constant(-1.66666666666666324348e-01))));
    // n mod 4 = 0: cos, 1: -sin, 2: -cos, 3: sin.
    const __m512i quadrant = _mm512_and_si512(_mm512_maskz_cvt_roundpd_epi64(kAll8, n, kNearest), constant64(3));
    const __mmask8 odd = _mm512_test_epi64_mask(quadrant, constant64(1));
    const __mmask8 negative = _mm512_test_epi64_mask(_mm512_add_epi64(quadrant, constant64(1)), constant64(2));
    const __m512i value = _mm512_castpd_si512(_mm512_mask_blend_pd(odd, cos_y, sin_y));
    return _mm512_castsi512_pd(_mm512_mask_xor_epi64(value, negative, value, constant64(0x8000000000000000ULL)));
}

/// out[i] = the stream's normal number `first + i` for i < count (SplitMix64(seed) skipped to
/// draw 2 (first + i), then normal()), rounded to Scalar; 8 at a time.
template <class Scalar>
PISSA_AVX512_TARGET void fill_normals(std::uint64_t seed, Index first, Index count, Scalar* out) {
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>);
    constexpr std::uint64_t gamma = 0x9E3779B97F4A7C15ULL;
    // Normal number j takes the outputs of the states seed + (2j + 1) gamma and seed + (2j + 2) gamma.
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i step = constant64(16 * gamma), next = constant64(gamma);
    __m512i state = _mm512_add_epi64(constant64(seed + (2 * std::uint64_t(first) + 1) * gamma),
                                     _mm512_maskz_mullo_epi64(kAll8, lane, constant64(2 * gamma)));
    const __m512d two_pi = constant(6.283185307179586476925286766559);
    for (Index i = 0; i < count; i += 8) {
        const __m512d u1 = mul(add(top53(splitmix_mix(state)), constant(1.0)), constant(0x1.0p-53));      // (0, 1]
        const __m512d u2 = mul(top53(splitmix_mix(_mm512_add_epi64(state, next))), constant(0x1.0p-53));  // [0, 1)
        state = _mm512_add_epi64(state, step);
        const __m512d radius = _mm512_maskz_sqrt_round_pd(kAll8, mul(constant(-2.0), log_unit(u1)), kNearest);
        const __m512d normal = mul(radius, cos_turn(mul(two_pi, u2)));
        const __mmask8 live = count - i >= 8 ? __mmask8(0xFF) : __mmask8((1u << unsigned(count - i)) - 1u);
        if constexpr (std::is_same_v<Scalar, float>)
            _mm256_mask_storeu_ps(out + i, live, _mm512_maskz_cvt_roundpd_ps(kAll8, normal, kNearest));
        else _mm512_mask_storeu_pd(out + i, live, normal);
    }
}

}  // namespace pissa::detail::avx512

#endif  // PISSA_HAVE_AVX512_KERNELS

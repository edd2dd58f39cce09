/// \file detail/kernels_avx512_bf16.hpp
/// \brief AVX512_BF16 kernels of the skinny products for a bfloat16 W: the skinny operand is
/// rounded to bfloat16 (to nearest even) and every product of two bfloat16 values is accumulated
/// in float32 by `vdpbf16ps`, 32 multiply-adds per instruction where a float32 FMA does 16.
/// Compiled with `__attribute__((target))`, called only after a run-time check
/// (detail/cpu_features.hpp).
///
/// Both operands are packed as pairs: a 32-bit lane holds two bfloat16 values adjacent along the
/// summed index k (the even k in the lower half), and `vdpbf16ps` adds the two products of a lane
/// to a float32 lane. The register tile is the float kernels' (kernels_avx512.hpp): 3 vectors of
/// W x 8 columns of the skinny operand, 24 accumulators, 3 loads + 8 broadcasts per 24
/// instructions, one pair of k per step.
///
/// `Y = W X` (multiply_pair_panel): panels of 48 rows of W. Each `[48, 256]` block of W is
/// transposed at 32-bit granularity into `P[p][i] = (W(i, 2p), W(i, 2p + 1))` (16 x 16 register
/// transposes of pairs), then every group of 8 columns of X runs over it.
///
/// `Z = W^T Y` (multiply_transposed_pair_strip): strips of 192 columns of W, cut as the float
/// kernel's (avx512::StripGrid). Each `[128, 48]` tile of W is packed as
/// `T[t][j] = (W(2t, j), W(2t + 1, j))` (two rows interleaved), then every group of 8 columns of Y
/// runs over it.
///
/// Every output element is a sum over blocks in order of sums over the block's pairs in order
/// (each pair as `vdpbf16ps` adds it); the partition depends only on the shapes, never on the
/// thread count. `vdpbf16ps` reads bfloat16 subnormals as zero and flushes subnormal results.
#pragma once

#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/kernels_avx512.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/types.hpp>

#if PISSA_HAVE_AVX512_KERNELS

#include <Eigen/Core>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace pissa::detail::avx512_bf16 {

using avx512::kGroup;
using avx512::kLanes;
using avx512::kPanelRows;
using avx512::kTileVectors;
using avx512::kTileWidth;

/// Two bfloat16 values adjacent along the summed index, the even one in the lower 16 bits.
using Pair = std::uint32_t;

inline constexpr Index kPairDepth = 128;  ///< multiply: pairs of columns of W per packed block (24 KiB)
inline constexpr Index kPairChunk = 64;   ///< multiply_transposed: pairs of rows of W per packed tile (12 KiB)

/// The raw 16-bit patterns of bfloat16 storage.
inline const std::uint16_t* bits_of(const Eigen::bfloat16* p) { return reinterpret_cast<const std::uint16_t*>(p); }

/// The skinny operand as pairs in groups of `Group` columns: out[(g * pairs + p) * Group + c] =
/// (bf16(src(2p, Group g + c)), bf16(src(2p + 1, Group g + c))) for 2p < rows, Group g + c < q;
/// src `[rows, q]` col-major with leading dimension ld; `pairs` >= ceil(rows / 2) is a group's
/// length. Rounding to nearest even; a missing partner (odd rows) is zero. The other entries of
/// `out` (padding) are left as they are: the caller zero-fills them. Group 8 is this file's
/// register tile, group 16 the AMX B tile (kernels_amx.hpp).
template <int Group>
PISSA_AVX512_BF16_TARGET inline void pack_pair_groups(const float* src, Index ld, Index rows, Index q, Index pairs,
                                                      Pair* out) {
    const Index live_pairs = (rows + 1) / 2;
    const __m512i lane_offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(Group));
    for (Index c = 0; c < q; ++c) {
        const float* column = src + c * ld;
        Pair* dst = out + (c / Group) * pairs * Group + c % Group;
        for (Index k = 0; k < rows; k += 2 * kLanes) {
            const Index left = rows - k;
            const __m512 lo = _mm512_maskz_loadu_ps(avx512::tail_mask(std::min(kLanes, left)), column + k);
            const __m512 hi = _mm512_maskz_loadu_ps(avx512::tail_mask(std::clamp<Index>(left - kLanes, 0, kLanes)),
                                                    column + k + kLanes);
            const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            const Index p0 = k / 2;
            _mm512_mask_i32scatter_epi32(dst + p0 * Group, avx512::tail_mask(std::min(kLanes, live_pairs - p0)),
                                         lane_offsets, packed, 4);
        }
    }
}

/// acc[v][c] += the pair products of w[v] and the broadcast pair x[c]: one step of the register tile.
PISSA_AVX512_BF16_TARGET inline void pair_step(__m512 (&acc)[kTileVectors][kGroup], const __m512i (&w)[kTileVectors],
                                               const Pair* x) {
    PISSA_UNROLL
    for (int c = 0; c < kGroup; ++c) {
        const __m512i b = _mm512_set1_epi32(static_cast<int>(x[c]));
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v)
            acc[v][c] = _mm512_dpbf16_ps(acc[v][c], reinterpret_cast<__m512bh>(w[v]), reinterpret_cast<__m512bh>(b));
    }
}

/// Y(i, c) (+)= sum over p < pairs of the pair products of P[p * 48 + i] and xg[p * 8 + c], for
/// i < rows, c < cols; `first`: Y is overwritten instead of accumulated. Y col-major with leading
/// dimension ldy; P 64-byte aligned.
PISSA_AVX512_BF16_TARGET inline void pair_tile(const Pair* P, const Pair* xg, Index pairs, float* Y, Index ldy,
                                               Index rows, int cols, bool first) {
    __m512 acc[kTileVectors][kGroup];
    avx512::zero_tile(acc);
    for (Index p = 0; p < pairs; ++p) {
        __m512i w[kTileVectors];
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v) w[v] = _mm512_load_si512(P + p * kTileWidth + v * kLanes);
        pair_step(acc, w, xg + p * kGroup);
    }
    avx512::store_tile(acc, Y, ldy, rows, cols, first);
}

// ---------------------------------------------------------------------------------------------
// Y = W X

/// P[p * 48 + i] = (W(r0 + i, j0 + 2p), W(r0 + i, j0 + 2p + 1)) for i < rows, 2p < count
/// (count <= 2 kPairDepth; the partner of an odd last column is zero); zero for rows <= i < 48.
/// While packing, the block at rows [pr0, pr0 + prows) x columns [pj0, pj0 + pcount) is
/// prefetched into L2, a line per row and 32 columns, interleaved with the transposes.
PISSA_AVX512_BF16_TARGET inline void pack_pair_panel(RowMajorView<Eigen::bfloat16> W, Index r0, Index rows, Index j0,
                                                     Index count, Pair* P, Index pr0, Index prows, Index pj0,
                                                     Index pcount) {
    const Index pairs = (count + 1) / 2;
    for (Index p0 = 0; p0 < pairs; p0 += kLanes) {
        const Index columns = std::min<Index>(2 * kLanes, count - 2 * p0);
        const __mmask32 m = columns >= 32 ? ~__mmask32(0) : ((__mmask32(1) << columns) - 1);
        const bool prefetch = 2 * p0 < pcount;
        PISSA_UNROLL
        for (int g = 0; g < kTileVectors; ++g) {
            __m512 r[kLanes];
            for (int i = 0; i < kLanes; ++i) {
                const Index row = g * kLanes + i;
                r[i] = row < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, W.row(r0 + row) + j0 + 2 * p0))
                                  : _mm512_setzero_ps();
                if (prefetch && row < prows)
                    _mm_prefetch(reinterpret_cast<const char*>(W.row(pr0 + row) + pj0 + 2 * p0), _MM_HINT_T1);
            }
            avx512::transpose16(r);
            const Index live = std::min(kLanes, pairs - p0);
            for (Index p = 0; p < live; ++p)
                _mm512_store_ps(reinterpret_cast<float*>(P + (p0 + p) * kTileWidth + g * kLanes), r[p]);
        }
    }
}

/// Rows [r0, r0 + min(48, m - r0)) of `Y = W X`. `xpack`: X as pairs (pack_pair_groups of its n
/// rows); Y col-major with leading dimension ldy; `P`: 64-byte aligned kPairDepth x 48 pairs.
PISSA_AVX512_BF16_TARGET inline void multiply_pair_panel(RowMajorView<Eigen::bfloat16> W, const Pair* xpack, Index q,
                                                         float* Y, Index ldy, Index r0, Pair* P) {
    const Index rows = std::min<Index>(kPanelRows, W.rows - r0), n = W.cols, npairs = (n + 1) / 2;
    const Index groups = (q + kGroup - 1) / kGroup, depth = 2 * kPairDepth;
    for (Index j0 = 0; j0 < n; j0 += depth) {
        const Index count = std::min(depth, n - j0);
        const avx512::BlockAhead ahead = avx512::block_ahead(r0, j0, depth, n);
        const Index prows = std::clamp<Index>(W.rows - ahead.row, 0, kPanelRows);
        pack_pair_panel(W, r0, rows, j0, count, P, ahead.row, prows, ahead.column, std::min(depth, n - ahead.column));
        for (Index g = 0; g < groups; ++g) {
            const int cols = static_cast<int>(std::min<Index>(kGroup, q - g * kGroup));
            pair_tile(P, xpack + (g * npairs + j0 / 2) * kGroup, (count + 1) / 2, Y + g * kGroup * ldy + r0, ldy, rows,
                      cols, j0 == 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Z = W^T Y

/// T[t * 48 + j] = (W(i0 + 2t, c0 + j), W(i0 + 2t + 1, c0 + j)) for 2t < rows, j < width
/// (width <= 48; the partner of an odd last row is zero); zero for width <= j < 48. While
/// packing, rows [pi0, pi0 + prows) x columns [pc0, pc0 + pwidth) are prefetched into L2.
PISSA_AVX512_BF16_TARGET inline void pack_pair_tile(RowMajorView<Eigen::bfloat16> W, Index i0, Index rows, Index c0,
                                                    Index width, Pair* T, Index pi0, Index prows, Index pc0,
                                                    Index pwidth) {
    constexpr Index line = 32;  // bfloat16 values per cache line
    __mmask16 m[kTileVectors];
    PISSA_UNROLL
    for (int v = 0; v < kTileVectors; ++v) m[v] = avx512::tail_mask(std::clamp<Index>(width - v * kLanes, 0, kLanes));
    for (Index i = 0; i < rows; i += 2) {
        const std::uint16_t* even = bits_of(W.row(i0 + i) + c0);
        const std::uint16_t* odd = i + 1 < rows ? bits_of(W.row(i0 + i + 1) + c0) : nullptr;
        for (Index r = i; r < std::min(i + 2, prows); ++r) {
            const Eigen::bfloat16* ahead = W.row(pi0 + r) + pc0;
            for (Index j = 0; j < pwidth; j += line)
                _mm_prefetch(reinterpret_cast<const char*>(ahead + j), _MM_HINT_T1);
        }
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v) {
            // (maskz_ forms: the plain intrinsics trip GCC 12's -Wmaybe-uninitialized, see kernels_avx512.hpp)
            const __m512i lo =
                _mm512_maskz_cvtepu16_epi32(avx512::kAll, _mm256_maskz_loadu_epi16(m[v], even + v * kLanes));
            const __m512i hi = odd != nullptr ? _mm512_maskz_cvtepu16_epi32(
                                                    avx512::kAll, _mm256_maskz_loadu_epi16(m[v], odd + v * kLanes))
                                              : _mm512_setzero_si512();
            _mm512_store_si512(T + (i / 2) * kTileWidth + v * kLanes,
                               _mm512_or_si512(lo, _mm512_maskz_slli_epi32(avx512::kAll, hi, 16)));
        }
    }
}

/// The rows of `Z = W^T Y` in strip u of `grid`. `ypack`: Y as pairs (pack_pair_groups of its m
/// rows); Z col-major with leading dimension ldz; `T`: 64-byte aligned kPairChunk x 48 pairs.
PISSA_AVX512_BF16_TARGET inline void multiply_transposed_pair_strip(RowMajorView<Eigen::bfloat16> W, const Pair* ypack,
                                                                    Index q, float* Z, Index ldz,
                                                                    avx512::StripGrid grid, Index u, Pair* T) {
    const Index m = W.rows, mpairs = (m + 1) / 2, chunk = 2 * kPairChunk;
    const Index groups = (q + kGroup - 1) / kGroup;
    const Index across =
        (std::min(avx512::kStrip, W.cols + grid.shift - u * avx512::kStrip) + kTileWidth - 1) / kTileWidth;
    for (Index i0 = 0; i0 < m; i0 += chunk) {
        const Index rows = std::min(chunk, m - i0);
        // Prefetch the chunk kPrefetchBlocks ahead along this thread's sequence of strips.
        Index pi0 = i0 + avx512::kPrefetchBlocks * chunk, pu = u;
        if (pi0 >= m) {
            pi0 -= (m + chunk - 1) / chunk * chunk;
            ++pu;
        }
        const Index prows = std::clamp<Index>(m - pi0, 0, chunk);
        for (Index t = 0; t < across; ++t) {
            Index c0, width, pc0, pwidth;
            grid.tile_columns(u, t, c0, width);
            grid.tile_columns(pu, t, pc0, pwidth);
            pack_pair_tile(W, i0, rows, c0, width, T, pi0, prows, pc0, std::clamp<Index>(pwidth, 0, kTileWidth));
            for (Index g = 0; g < groups; ++g) {
                const int cols = static_cast<int>(std::min<Index>(kGroup, q - g * kGroup));
                pair_tile(T, ypack + (g * mpairs + i0 / 2) * kGroup, (rows + 1) / 2, Z + g * kGroup * ldz + c0, ldz,
                          width, cols, i0 == 0);
            }
        }
    }
}

}  // namespace pissa::detail::avx512_bf16

#endif  // PISSA_HAVE_AVX512_KERNELS

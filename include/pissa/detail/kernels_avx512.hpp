/// \file detail/kernels_avx512.hpp
/// \brief AVX-512 kernels of the skinny products, float compute, storage float / Eigen::half /
/// Eigen::bfloat16. Compiled with `__attribute__((target))`, called only after a run-time check
/// (detail/cpu_features.hpp); the rest of the program needs no AVX-512 flags.
///
/// The products are GEMM micro-kernels over packed operands: every FMA is an outer product of a
/// 16-lane vector of W with one broadcast value of the skinny operand, the register tile is
/// 48 elements of W (3 vectors) x 8 columns (24 zmm accumulators, 3 vector loads + 8 broadcasts
/// per 24 FMAs), and W is packed a small block at a time into a contiguous L1-resident buffer
/// (so that rows of W whose stride is a multiple of 4 KiB do not fight over the same L1 sets).
///
/// `Y = W X` (multiply_panel): the work unit is a panel of kPanelRows = 48 rows of W. For every
/// chunk of kPanelDepth columns, the `[48, kPanelDepth]` block of W is transposed into
/// `P[k][i]` (16 x 16 register transposes, 16-bit storage widened in the same registers), then
/// for every group of 8 columns of X (packed `[n, 8]` row-major, zero-padded) the tile
/// `Y(i, c) += sum_k P[k][i] X(j0 + k, c)` runs over the chunk, k in order.
///
/// `Y = W X` from 32 columns of X on (64 for 16-bit W; multiply_panel_wide): the same 48-row
/// panels without transposes. The roles are swapped: each FMA multiplies one broadcast element of
/// W with a 16-lane vector of a row of X (packed in row-major blocks of 64 columns), the register
/// tile is 6 rows of W x 4 vectors (6 broadcasts + 4 loads per 24 FMAs; 12 x 2 for a last block
/// of 32), the rows of W read in place a chunk of kWideChunk columns at a time.
///
/// `Z = W^T Y` (multiply_transposed_strip): the work unit is a strip of kStripTiles x 48 columns of
/// W, which owns the same rows of Z. For every chunk of kChunkRows rows, each 48-column tile of the
/// chunk is copied (widened) to a contiguous `[rows, 48]` buffer and `Z(j, c) += sum_i W(i, j) Y(i, c)`
/// runs over its rows in order for every group of 8 columns of Y (packed `[m, 8]` row-major). The
/// tiles start at 16-element boundaries of memory (StripGrid), so that no load straddles two lines.
///
/// `Z = W^T (W Q)` in one pass over W (multiply_gram_panel, q <= 24): the work unit is a panel of
/// kGramRows = 24 rows. `Y_p = W_p Q` as dot products (3 rows of W x 8 rows of Q^T, 16-lane
/// partial sums reduced at the end: no transposes), then `Z += W_p^T Y_p` with the register tile
/// above reading the panel in place from the L2 cache, while the next panel is prefetched. At
/// small q this does the work of both products for ~70% of their time: W comes from memory once.
///
/// Every output element is a sum over chunks in order of sums over the chunk in order; the
/// partition depends only on the shapes, never on the thread count. The next block of W is
/// prefetched while the current one is multiplied.
#pragma once

#include <pissa/detail/cpu_features.hpp>

#if PISSA_HAVE_AVX512_KERNELS

#include <pissa/detail/weight_view.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// The register tiles are arrays indexed by constant-trip loops: they must be unrolled completely
// for the arrays to live in zmm registers (GCC does not at -O2 on its own).
#if defined(__clang__)
#define PISSA_UNROLL _Pragma("unroll")
#else
#define PISSA_UNROLL _Pragma("GCC unroll 16")
#endif

namespace pissa::detail::avx512 {

inline constexpr Index kLanes = 16;
inline constexpr int kTileVectors = 3;                      ///< vectors of W per register tile
inline constexpr Index kTileWidth = kTileVectors * kLanes;  ///< 48 elements of W per register tile
inline constexpr int kGroup = 8;                            ///< columns of X (or Y) per register tile
inline constexpr Index kPanelRows = kTileWidth;             ///< multiply: rows of W per work unit
inline constexpr Index kPanelDepth = 128;                   ///< multiply: columns of W per packed block (24 KiB)
inline constexpr Index kStripTiles = 4;                     ///< multiply_transposed: 48-column tiles per work unit
inline constexpr Index kStrip = kStripTiles * kTileWidth;   ///< multiply_transposed: columns of W per work unit
inline constexpr Index kChunkRows = 64;                     ///< multiply_transposed: rows of W per packed tile (12 KiB)
inline constexpr Index kPrefetchBlocks = 2;                 ///< blocks of W prefetched ahead of the one packed

// The maskz_ forms with an all-ones mask stand for the plain intrinsics, whose GCC 12 definitions
// (_mm512_undefined_*) trip -Wmaybe-uninitialized.
inline constexpr __mmask16 kAll = 0xFFFF;
inline constexpr __mmask8 kAll8 = 0xFF;

/// The first `count` lanes, 0 <= count <= 16.
PISSA_AVX512_TARGET inline __mmask16 tail_mask(Index count) {
    return static_cast<__mmask16>((1u << static_cast<unsigned>(count)) - 1u);
}

PISSA_AVX512_TARGET inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PISSA_AVX512_TARGET inline __m512 load16(const Eigen::bfloat16* p, __mmask16 m) {
    const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, bits), 16));
}
PISSA_AVX512_TARGET inline __m512 load16(const Eigen::half* p, __mmask16 m) {
    return _mm512_maskz_cvtph_ps(kAll, _mm256_maskz_loadu_epi16(m, p));
}

/// Keeps `v` in a register. GCC otherwise folds a load that several FMAs use into each FMA's
/// memory operand: the dot-product tile then issued 3 loads of Q per vector instead of one and ran
/// at 154 instead of 184 GFLOP/s (one core, W in L2).
PISSA_AVX512_TARGET inline void keep_in_register(__m512& v) { __asm__("" : "+v"(v)); }

/// In-register transpose of the 16 x 16 floats r[i] lane j -> r[j] lane i.
PISSA_AVX512_TARGET inline void transpose16(__m512* r) {
    __m512 t[16];
    PISSA_UNROLL
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_maskz_unpacklo_ps(kAll, r[i], r[i + 1]);
        t[i + 1] = _mm512_maskz_unpackhi_ps(kAll, r[i], r[i + 1]);
    }
    PISSA_UNROLL
    for (int i = 0; i < 16; i += 4) {
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, b, d));
    }
    // r[4h + s] now holds, in each 128-bit lane l, row elements 4l + s of rows 4h .. 4h + 3.
    PISSA_UNROLL
    for (int h = 0; h < 16; h += 8) {
        PISSA_UNROLL
        for (int s = 0; s < 4; ++s) {
            t[h + s] = _mm512_maskz_shuffle_f32x4(kAll, r[h + s], r[h + 4 + s], 0x88);
            t[h + 4 + s] = _mm512_maskz_shuffle_f32x4(kAll, r[h + s], r[h + 4 + s], 0xdd);
        }
    }
    PISSA_UNROLL
    for (int s = 0; s < 8; ++s) {
        r[s] = _mm512_maskz_shuffle_f32x4(kAll, t[s], t[s + 8], 0x88);
        r[s + 8] = _mm512_maskz_shuffle_f32x4(kAll, t[s], t[s + 8], 0xdd);
    }
}

// ---------------------------------------------------------------------------------------------
// Y = W X

/// P[k * 48 + i] = float(W(r0 + i, j0 + k)) for i < rows, k < count (count <= kPanelDepth);
/// zero for rows <= i < 48.
/// While packing, the block at rows [pr0, pr0 + prows) x columns [pj0, pj0 + pcount) is
/// prefetched into L2, a line per row and 16 columns, interleaved with the transposes.
template <class Storage>
PISSA_AVX512_TARGET inline void pack_panel(RowMajorView<Storage> W, Index r0, Index rows, Index j0, Index count,
                                           float* P, Index pr0, Index prows, Index pj0, Index pcount) {
    for (Index k0 = 0; k0 < count; k0 += kLanes) {
        const Index kc = std::min(kLanes, count - k0);
        const __mmask16 m = tail_mask(kc);
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v) {
            __m512 r[16];
            PISSA_UNROLL
            for (int i = 0; i < 16; ++i) {
                const Index row = v * kLanes + i;
                r[i] = row < rows ? load16(W.row(r0 + row) + j0 + k0, m) : _mm512_setzero_ps();
            }
            if (k0 < pcount) {
                const Index last = std::min<Index>(prows, (v + 1) * kLanes);
                for (Index i = v * kLanes; i < last; ++i)
                    _mm_prefetch(reinterpret_cast<const char*>(W.row(pr0 + i) + pj0 + k0), _MM_HINT_T1);
            }
            transpose16(r);
            float* dst = P + k0 * kTileWidth + v * kLanes;
            if (kc == kLanes) {
                PISSA_UNROLL
                for (int k = 0; k < 16; ++k) _mm512_store_ps(dst + k * kTileWidth, r[k]);
            } else {
                PISSA_UNROLL
                for (int k = 0; k < 16; ++k)
                    if (k < kc) _mm512_store_ps(dst + k * kTileWidth, r[k]);
            }
        }
    }
}

/// acc[v][c] += w[v] * x[c] for the 3 vectors of W and 8 values of the skinny operand: one step of
/// the register tile.
PISSA_AVX512_TARGET inline void tile_step(__m512 (&acc)[kTileVectors][kGroup], const __m512 (&w)[kTileVectors],
                                          const float* x) {
    PISSA_UNROLL
    for (int c = 0; c < kGroup; ++c) {
        const __m512 b = _mm512_set1_ps(x[c]);
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v) acc[v][c] = _mm512_fmadd_ps(w[v], b, acc[v][c]);
    }
}

/// acc = 0: the start of every register tile.
PISSA_AVX512_TARGET inline void zero_tile(__m512 (&acc)[kTileVectors][kGroup]) {
    PISSA_UNROLL
    for (int v = 0; v < kTileVectors; ++v) {
        PISSA_UNROLL
        for (int c = 0; c < kGroup; ++c) acc[v][c] = _mm512_setzero_ps();
    }
}

/// Y(i, c) (+)= acc[i / 16][c] lane i % 16, for i < rows, c < cols (the end of every register
/// tile); `first`: Y is overwritten instead of accumulated. Y col-major with leading dimension ldy.
PISSA_AVX512_TARGET inline void store_tile(const __m512 (&acc)[kTileVectors][kGroup], float* Y, Index ldy, Index rows,
                                           int cols, bool first) {
    PISSA_UNROLL
    for (int v = 0; v < kTileVectors; ++v) {
        const Index live = std::clamp<Index>(rows - v * kLanes, 0, kLanes);
        if (live == 0) continue;
        const __mmask16 m = tail_mask(live);
        PISSA_UNROLL
        for (int c = 0; c < kGroup; ++c) {
            if (c >= cols) break;
            float* y = Y + c * ldy + v * kLanes;
            const __m512 sum = first ? acc[v][c] : _mm512_add_ps(_mm512_maskz_loadu_ps(m, y), acc[v][c]);
            _mm512_mask_storeu_ps(y, m, sum);
        }
    }
}

/// Y(i, c) (+)= sum over k < count of P[k * 48 + i] xg[k * 8 + c], for i < rows, c < cols;
/// `first`: Y is overwritten instead of accumulated. Y col-major with leading dimension ldy.
PISSA_AVX512_TARGET inline void panel_tile(const float* P, const float* xg, Index count, float* Y, Index ldy,
                                           Index rows, int cols, bool first) {
    __m512 acc[kTileVectors][kGroup];
    zero_tile(acc);
    for (Index k = 0; k < count; ++k) {
        const float* p = P + k * kTileWidth;
        const float* x = xg + k * kGroup;
        __m512 w[kTileVectors];
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v) w[v] = _mm512_load_ps(p + v * kLanes);
        tile_step(acc, w, x);
    }
    store_tile(acc, Y, ldy, rows, cols, first);
}

/// The first row and column of the block kPrefetchBlocks ahead of the block at column `k0` (blocks
/// of `depth` columns of 48-row panels) along a thread's sequence of panels (consecutive under the
/// static schedule): in this panel, or at the start of the next one; column n when there is none.
struct BlockAhead {
    Index row = 0, column = 0;
};
inline BlockAhead block_ahead(Index r0, Index k0, Index depth, Index n) {
    BlockAhead ahead{r0, k0 + kPrefetchBlocks * depth};
    if (ahead.column >= n) {
        ahead.row += kPanelRows;
        ahead.column = std::min(ahead.column - (n + depth - 1) / depth * depth, n);
    }
    return ahead;
}

/// Rows [r0, r0 + min(48, m - r0)) of `Y = W X`. `xpack`: X as ceil(q/8) groups of `[n, 8]`
/// row-major (zero-padded); Y col-major with leading dimension ldy; `P`: 64-byte aligned
/// kPanelDepth x 48 floats.
template <class Storage>
PISSA_AVX512_TARGET void multiply_panel(RowMajorView<Storage> W, const float* xpack, Index q, float* Y, Index ldy,
                                        Index r0, float* P) {
    const Index rows = std::min<Index>(kPanelRows, W.rows - r0), n = W.cols;
    const Index groups = (q + kGroup - 1) / kGroup;
    for (Index j0 = 0; j0 < n; j0 += kPanelDepth) {
        const Index count = std::min(kPanelDepth, n - j0);
        const BlockAhead ahead = block_ahead(r0, j0, kPanelDepth, n);
        const Index prows = std::clamp<Index>(W.rows - ahead.row, 0, kPanelRows);
        pack_panel(W, r0, rows, j0, count, P, ahead.row, prows, ahead.column, std::min(kPanelDepth, n - ahead.column));
        for (Index g = 0; g < groups; ++g) {
            const int cols = static_cast<int>(std::min<Index>(kGroup, q - g * kGroup));
            panel_tile(P, xpack + (g * n + j0) * kGroup, count, Y + g * kGroup * ldy + r0, ldy, rows, cols, j0 == 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Y = W X for q >= 32: broadcast form

inline constexpr Index kWideBlock = 64;   ///< multiply: columns of X per block (4 vectors x 6 rows of W)
inline constexpr Index kWideChunk = 128;  ///< multiply: k per chunk (a 64-column block of X: 32 KiB)

/// multiply: the broadcast kernel from this many columns of X on. 16-bit W costs a conversion per
/// broadcast (6 per 24 FMAs at q >= 64, 12 at q = 32, where it ran 1.37x slower than the packed
/// kernel; float W 0.78x there).
template <class Storage>
constexpr Index wide_min_columns() {
    return std::is_same_v<Storage, float> ? 32 : 64;
}

/// The columns of X as blocks of 64 (the register tile: 4 vectors x 6 rows of W), the last one
/// 32 wide (2 vectors x 12 rows) when at most 32 columns remain; zero-padded to the block width.
/// Block b starts at column 64 b of X and at `n * 64 * b` in the packed buffer.
struct WideBlocks {
    Index q = 0;
    Index count() const { return (q + kWideBlock - 1) / kWideBlock; }
    Index width(Index b) const { return q - b * kWideBlock <= kWideBlock / 2 ? kWideBlock / 2 : kWideBlock; }
    Index padded() const { return (count() - 1) * kWideBlock + width(count() - 1); }
};

/// One element of W as a float broadcast to 16 lanes.
PISSA_AVX512_TARGET inline __m512 broadcast(const float* p) { return _mm512_set1_ps(*p); }
PISSA_AVX512_TARGET inline __m512 broadcast(const Eigen::bfloat16* p) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(int(std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(*p)) << 16)));
}
PISSA_AVX512_TARGET inline __m512 broadcast(const Eigen::half* p) {
    return _mm512_set1_ps(_cvtsh_ss(Eigen::numext::bit_cast<std::uint16_t>(*p)));
}

/// part[r * ldp + c] (+)= sum over k in [k0, k1) of W(row r, k) xb[k * 16 Vectors + c], for r < Rows,
/// c < 16 Vectors: the register tile is Rows x Vectors accumulators, each step broadcasts one
/// element of each of the Rows rows of W and loads one row of the X block. `first`: part is
/// overwritten. While it runs, `ahead_lines` lines from each `ahead[r]` (a line per step, row after
/// row) are prefetched into L2.
template <int Vectors, int Rows, class Storage>
PISSA_AVX512_TARGET inline void broadcast_tile(const Storage* const (&row)[Rows], Index k0, Index k1, const float* xb,
                                               float* part, Index ldp, bool first, const Storage* const (&ahead)[Rows],
                                               Index ahead_lines) {
    constexpr Index line = 64 / Index(sizeof(Storage));
    __m512 acc[Rows][Vectors];
    PISSA_UNROLL
    for (int r = 0; r < Rows; ++r) {
        PISSA_UNROLL
        for (int v = 0; v < Vectors; ++v)
            acc[r][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(part + r * ldp + v * kLanes);
    }
    // The next line to prefetch: line `ahead_line` of row `ahead_row` (counters, not s / ahead_lines
    // and s % ahead_lines: GCC emitted an idiv per step, and Intel's divider shares port 0 with the FMAs).
    int ahead_row = ahead_lines > 0 ? 0 : Rows;
    Index ahead_line = 0;
    for (Index k = k0; k < k1; ++k) {
        if (ahead_row < Rows) {
            _mm_prefetch(reinterpret_cast<const char*>(ahead[ahead_row] + ahead_line * line), _MM_HINT_T1);
            if (++ahead_line == ahead_lines) {
                ahead_line = 0;
                ++ahead_row;
            }
        }
        __m512 x[Vectors];
        PISSA_UNROLL
        for (int v = 0; v < Vectors; ++v) {
            x[v] = _mm512_load_ps(xb + k * (Vectors * kLanes) + v * kLanes);
            keep_in_register(x[v]);
        }
        PISSA_UNROLL
        for (int r = 0; r < Rows; ++r) {
            const __m512 b = broadcast(row[r] + k);
            PISSA_UNROLL
            for (int v = 0; v < Vectors; ++v) acc[r][v] = _mm512_fmadd_ps(b, x[v], acc[r][v]);
        }
    }
    PISSA_UNROLL
    for (int r = 0; r < Rows; ++r) {
        PISSA_UNROLL
        for (int v = 0; v < Vectors; ++v) _mm512_store_ps(part + r * ldp + v * kLanes, acc[r][v]);
    }
}

/// The row tiles of Rows rows covering rows [r0, r0 + rows) of W over columns [k0, k1), against
/// one block of X (`xb`) into `part` (Vectors x 16 columns of it; see broadcast_tile). Rows past
/// the panel repeat its last row (their sums are not used). While they run, `ahead_lines` lines
/// from column `ahead_k` of the rows [ahead_row, ahead_row + ahead_rows) are prefetched.
template <int Vectors, int Rows, class Storage>
PISSA_AVX512_TARGET inline void broadcast_rows(RowMajorView<Storage> W, Index r0, Index rows, Index k0, Index k1,
                                               const float* xb, float* part, Index ldp, bool first, Index ahead_row,
                                               Index ahead_rows, Index ahead_k, Index ahead_lines) {
    for (Index i = 0; i < rows; i += Rows) {
        const Storage* row[Rows];
        const Storage* ahead[Rows];
        const bool prefetch = ahead_lines > 0 && i + Rows <= ahead_rows;
        for (int r = 0; r < Rows; ++r) {
            row[r] = W.row(r0 + std::min<Index>(i + r, rows - 1));
            ahead[r] = prefetch ? W.row(ahead_row + i + r) + ahead_k : row[r];
        }
        broadcast_tile<Vectors, Rows>(row, k0, k1, xb, part + i * ldp, ldp, first, ahead, prefetch ? ahead_lines : 0);
    }
}

/// Rows [r0, r0 + min(48, m - r0)) of `Y = W X` by broadcast_tile, for q >= wide_min_columns.
/// `xpack`: the blocks of X (WideBlocks), each `[n, width]` row-major; `part`: 64-byte aligned
/// 48 x blocks.padded() floats. For every chunk of kWideChunk columns of W, every block runs its
/// row tiles over it (Y(i, c) = sum over k in order); the chunk two ahead along the thread's
/// sequence of panels is prefetched meanwhile. Y col-major with leading dimension ldy.
template <class Storage>
PISSA_AVX512_TARGET void multiply_panel_wide(RowMajorView<Storage> W, const float* xpack, Index q, float* Y, Index ldy,
                                             Index r0, float* part) {
    const Index rows = std::min<Index>(kPanelRows, W.rows - r0), n = W.cols;
    const WideBlocks blocks{q};
    const Index ldp = blocks.padded();
    const Index line = 64 / Index(sizeof(Storage));
    const Index chunks = (n + kWideChunk - 1) / kWideChunk;
    for (Index chunk = 0; chunk < chunks; ++chunk) {
        const Index k0 = chunk * kWideChunk, k1 = std::min(n, k0 + kWideChunk);
        const BlockAhead ahead = block_ahead(r0, k0, kWideChunk, n);
        const Index ahead_rows = std::clamp<Index>(W.rows - ahead.row, 0, kPanelRows);
        const Index ahead_lines = (std::min(n, ahead.column + kWideChunk) - ahead.column + line - 1) / line;
        for (Index b = 0; b < blocks.count(); ++b) {
            const float* xb = xpack + n * kWideBlock * b;
            float* pb = part + b * kWideBlock;
            const Index lines = b == 0 ? ahead_lines : 0;  // the chunk's first block prefetches
            if (blocks.width(b) == kWideBlock)
                broadcast_rows<4, 6>(W, r0, rows, k0, k1, xb, pb, ldp, chunk == 0, ahead.row, ahead_rows, ahead.column,
                                     lines);
            else
                broadcast_rows<2, 12>(W, r0, rows, k0, k1, xb, pb, ldp, chunk == 0, ahead.row, ahead_rows, ahead.column,
                                      lines);
        }
    }
    for (Index c = 0; c < q; ++c)
        for (Index i = 0; i < rows; ++i) Y[c * ldy + r0 + i] = part[i * ldp + c];
}

// ---------------------------------------------------------------------------------------------
// Z = W^T Y

/// How the transposed product cuts the n columns of W into strips (work units) of kStripTiles
/// 48-column tiles. The grid starts `shift` columns left of column 0 (the first tile is narrower),
/// chosen so that the other tiles begin at a 16-element boundary of memory: with a 16-byte aligned
/// W every load straddled two cache lines, which cost 13-28% of the whole product. The cut decides
/// only which tile computes which rows of Z, not the order of any sum: the bits of Z do not depend
/// on it.
struct StripGrid {
    Index n = 0, shift = 0;

    /// Columns to put left of column 0 so that the tiles start at a 16-element boundary of memory,
    /// when every row of W has the same alignment (row stride a multiple of 16); 0 otherwise.
    template <class Storage>
    static Index shift_for(const RowMajorView<Storage>& W) {
        const auto address = reinterpret_cast<std::uintptr_t>(W.data);
        const auto vector_bytes = static_cast<std::uintptr_t>(kLanes) * sizeof(Storage);
        const auto stride_bytes = static_cast<std::uintptr_t>(W.stride) * sizeof(Storage);
        if (address % sizeof(Storage) != 0 || stride_bytes % vector_bytes != 0) return 0;
        const auto lead = static_cast<Index>((vector_bytes - address % vector_bytes) % vector_bytes / sizeof(Storage));
        return (kLanes - lead) % kLanes;
    }

    Index strips() const { return (n + shift + kStrip - 1) / kStrip; }
    Index tiles() const { return (n + shift + kTileWidth - 1) / kTileWidth; }

    /// Columns [c0, c0 + width) of tile t of the whole grid; width <= 0 past the end of W.
    void tile_columns(Index t, Index& c0, Index& width) const {
        const Index begin = t * kTileWidth - shift;
        c0 = std::max<Index>(begin, 0);
        width = std::min(begin + kTileWidth, n) - c0;
    }
    /// Columns [c0, c0 + width) of tile t (from the left) of strip u.
    void tile_columns(Index u, Index t, Index& c0, Index& width) const { tile_columns(u * kStripTiles + t, c0, width); }
};

/// T[i * 48 + j] = float(W(i0 + i, c0 + j)) for i < rows, j < width (width <= 48); zero for
/// width <= j < 48.
/// While copying, rows [pi0, pi0 + prows) x columns [pc0, pc0 + pwidth) are prefetched into L2.
template <class Storage>
PISSA_AVX512_TARGET inline void pack_tile(RowMajorView<Storage> W, Index i0, Index rows, Index c0, Index width,
                                          float* T, Index pi0, Index prows, Index pc0, Index pwidth) {
    const Index line = 64 / Index(sizeof(Storage));
    __mmask16 m[kTileVectors];
    PISSA_UNROLL
    for (int v = 0; v < kTileVectors; ++v) m[v] = tail_mask(std::clamp<Index>(width - v * kLanes, 0, kLanes));
    for (Index i = 0; i < rows; ++i) {
        const Storage* src = W.row(i0 + i) + c0;
        if (i < prows) {
            const Storage* ahead = W.row(pi0 + i) + pc0;
            for (Index j = 0; j < pwidth; j += line)
                _mm_prefetch(reinterpret_cast<const char*>(ahead + j), _MM_HINT_T1);
        }
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v)
            _mm512_store_ps(T + i * kTileWidth + v * kLanes, load16(src + v * kLanes, m[v]));
    }
}

/// Z(j, c) (+)= sum over i < rows of T[i * 48 + j] yg[i * 8 + c], for j < width, c < cols;
/// `first`: Z is overwritten instead of accumulated. Z col-major with leading dimension ldz.
PISSA_AVX512_TARGET inline void strip_tile(const float* T, const float* yg, Index rows, float* Z, Index ldz,
                                           Index width, int cols, bool first) {
    // The same register tile as panel_tile, with the roles of the packed operands unchanged.
    panel_tile(T, yg, rows, Z, ldz, width, cols, first);
}

/// The rows of `Z = W^T Y` in strip u of `grid`. `ypack`: Y as ceil(q/8) groups of `[m, 8]`
/// row-major (zero-padded); Z col-major with leading dimension ldz; `T`: 64-byte aligned
/// kChunkRows x 48 floats. (`grid` by value and the prefetch width clamped to 48: through a
/// reference, or with an unbounded prefetch loop, GCC's code ran the bf16 product 5-13% slower.)
template <class Storage>
PISSA_AVX512_TARGET void multiply_transposed_strip(RowMajorView<Storage> W, const float* ypack, Index q, float* Z,
                                                   Index ldz, StripGrid grid, Index u, float* T) {
    const Index m = W.rows;
    const Index groups = (q + kGroup - 1) / kGroup;
    const Index across = (std::min(kStrip, W.cols + grid.shift - u * kStrip) + kTileWidth - 1) / kTileWidth;
    for (Index i0 = 0; i0 < m; i0 += kChunkRows) {
        const Index rows = std::min(kChunkRows, m - i0);
        // Prefetch kPrefetchBlocks chunks of rows ahead along this thread's sequence (the strips of
        // a thread are consecutive under the static schedule).
        Index pi0 = i0 + kPrefetchBlocks * kChunkRows, pu = u;
        if (pi0 >= m) {
            pi0 -= (m + kChunkRows - 1) / kChunkRows * kChunkRows;
            ++pu;
        }
        const Index prows = std::clamp<Index>(m - pi0, 0, kChunkRows);
        for (Index t = 0; t < across; ++t) {
            Index c0, width, pc0, pwidth;
            grid.tile_columns(u, t, c0, width);
            grid.tile_columns(pu, t, pc0, pwidth);
            pack_tile(W, i0, rows, c0, width, T, pi0, prows, pc0, std::clamp<Index>(pwidth, 0, kTileWidth));
            for (Index g = 0; g < groups; ++g) {
                const int cols = static_cast<int>(std::min<Index>(kGroup, q - g * kGroup));
                strip_tile(T, ypack + (g * m + i0) * kGroup, rows, Z + g * kGroup * ldz + c0, ldz, width, cols,
                           i0 == 0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Z = W^T (W Q) in one pass over W

inline constexpr Index kGramRows = 24;  ///< multiply_gram: rows of W per panel (a multiple of kDotRows)
inline constexpr int kDotRows = 3;      ///< multiply_gram: rows of W per dot-product register tile

/// The sum of the 16 lanes of v, in a fixed tree order (halves, then quarters, ...). (GCC 12's
/// _mm512_reduce_add_ps and _mm512_castps512_ps256 trip -Wuninitialized.)
PISSA_AVX512_TARGET inline float horizontal_sum(__m512 v) {
    const __m256 eight =
        _mm256_add_ps(_mm512_maskz_extractf32x8_ps(kAll8, v, 0), _mm512_maskz_extractf32x8_ps(kAll8, v, 1));
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

/// y[r * 8 + c] = sum over k < n of W(r0 + r, k) qt[c * ldq + k], for r < 3, c < 8: three rows of W
/// against 8 rows of the transposed basis, as 24 sixteen-lane partial sums (k in order within each
/// lane) reduced at the end. Rows past `rows` repeat row r0 (their results are not used); `qt` is
/// 64-byte aligned and zero-padded up to a multiple of 16 columns.
template <class Storage>
PISSA_AVX512_TARGET inline void dot_tile(RowMajorView<Storage> W, Index r0, Index rows, const float* qt, Index ldq,
                                         float* y) {
    const Storage* src[kDotRows];
    PISSA_UNROLL
    for (int r = 0; r < kDotRows; ++r) src[r] = W.row(r0 + (r < rows ? r : 0));
    __m512 acc[kDotRows][kGroup];
    PISSA_UNROLL
    for (int r = 0; r < kDotRows; ++r) {
        PISSA_UNROLL
        for (int c = 0; c < kGroup; ++c) acc[r][c] = _mm512_setzero_ps();
    }
    const Index n = W.cols;
    for (Index k = 0; k < n; k += kLanes) {
        const __mmask16 m = tail_mask(std::min(kLanes, n - k));
        __m512 w[kDotRows];
        PISSA_UNROLL
        for (int r = 0; r < kDotRows; ++r) {
            w[r] = load16(src[r] + k, m);
            keep_in_register(w[r]);
        }
        PISSA_UNROLL
        for (int c = 0; c < kGroup; ++c) {
            __m512 b = _mm512_load_ps(qt + c * ldq + k);
            keep_in_register(b);
            PISSA_UNROLL
            for (int r = 0; r < kDotRows; ++r) acc[r][c] = _mm512_fmadd_ps(w[r], b, acc[r][c]);
        }
    }
    PISSA_UNROLL
    for (int r = 0; r < kDotRows; ++r) {
        PISSA_UNROLL
        for (int c = 0; c < kGroup; ++c) y[r * kGroup + c] = horizontal_sum(acc[r][c]);
    }
}

/// Z(j, c) (+)= sum over i < rows of W(r0 + i, c0 + j) yg[i * 8 + c], for j < width, c < cols:
/// the register tile of panel_tile, reading the rows of W in place (they are in the L2 cache).
/// `first`: Z is overwritten instead of accumulated. Z col-major with leading dimension ldz.
template <class Storage>
PISSA_AVX512_TARGET inline void gram_tile(RowMajorView<Storage> W, Index r0, Index rows, Index c0, Index width,
                                          const float* yg, float* Z, Index ldz, int cols, bool first) {
    __mmask16 m[kTileVectors];
    PISSA_UNROLL
    for (int v = 0; v < kTileVectors; ++v) m[v] = tail_mask(std::clamp<Index>(width - v * kLanes, 0, kLanes));
    __m512 acc[kTileVectors][kGroup];
    zero_tile(acc);
    for (Index i = 0; i < rows; ++i) {
        const Storage* src = W.row(r0 + i) + c0;
        const float* y = yg + i * kGroup;
        __m512 w[kTileVectors];
        PISSA_UNROLL
        for (int v = 0; v < kTileVectors; ++v) w[v] = load16(src + v * kLanes, m[v]);
        tile_step(acc, w, y);
    }
    store_tile(acc, Z, ldz, width, cols, first);
}

/// One panel of `Z = W^T (W Q)`: rows [r0, r0 + min(24, m - r0)) of W add `W_p^T (W_p Q)` to Z
/// (or set it: `first`). First `Y_p = W_p Q` by dot_tile (W streamed from memory, 3 rows at a
/// time), then `W_p^T Y_p` by gram_tile over the columns of W in StripGrid tiles while the panel
/// is still in the L2 cache; meanwhile the same columns of the next panel are prefetched into L2.
/// `qt`: Q^T, ceil(q/8) * 8 rows with leading dimension ldq (see dot_tile); `ypack`: scratch of
/// ceil(q/8) groups of `[24, 8]` floats. Z col-major with leading dimension ldz.
template <class Storage>
PISSA_AVX512_TARGET void multiply_gram_panel(RowMajorView<Storage> W, const float* qt, Index ldq, Index q, float* Z,
                                             Index ldz, StripGrid grid, Index r0, bool first, float* ypack) {
    const Index rows = std::min(kGramRows, W.rows - r0);
    const Index groups = (q + kGroup - 1) / kGroup;
    for (Index g = 0; g < groups; ++g)
        for (Index i = 0; i < rows; i += kDotRows)
            dot_tile(W, r0 + i, rows - i, qt + g * kGroup * ldq, ldq, ypack + (g * kGramRows + i) * kGroup);
    const Index line = 64 / Index(sizeof(Storage));
    const Index next = r0 + kGramRows, next_rows = std::clamp<Index>(W.rows - next, 0, kGramRows);
    for (Index t = 0, tiles = grid.tiles(); t < tiles; ++t) {
        Index c0, width;
        grid.tile_columns(t, c0, width);
        for (Index i = 0; i < next_rows; ++i)
            for (Index j = 0; j < std::min(width, kTileWidth); j += line)
                _mm_prefetch(reinterpret_cast<const char*>(W.row(next + i) + c0 + j), _MM_HINT_T1);
        for (Index g = 0; g < groups; ++g) {
            const int cols = static_cast<int>(std::min<Index>(kGroup, q - g * kGroup));
            gram_tile(W, r0, rows, c0, width, ypack + g * kGramRows * kGroup, Z + g * kGroup * ldz + c0, ldz, cols,
                      first);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The residual: T = S - L R, a rank-r update of a weight in its storage dtype

/// 16 floats rounded to the storage dtype (to nearest even, as Eigen's conversions) and stored
/// at `p` (the first `m` lanes).
PISSA_AVX512_TARGET inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
/// The bits of 16 finite floats rounded to bfloat16 (to nearest even) in the upper halves of the lanes.
PISSA_AVX512_TARGET inline __m512i round_bits_bf16(__m512i bits) {
    const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, bits, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}
/// Stores the upper halves of the lanes of `rounded` (round_bits_bf16) as bfloat16.
PISSA_AVX512_TARGET inline void store_bf16_bits(Eigen::bfloat16* p, __m512i rounded, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_maskz_cvtepi32_epi16(kAll, _mm512_maskz_srli_epi32(kAll, rounded, 16)));
}
PISSA_AVX512_TARGET inline void store16(Eigen::bfloat16* p, __m512 v, __mmask16 m) {
    store_bf16_bits(p, round_bits_bf16(_mm512_castps_si512(v)), m);
}
PISSA_AVX512_TARGET inline void store16(Eigen::half* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_maskz_cvtps_ph(kAll, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/// Rounds `count` floats to bfloat16 (to nearest even, as store16) at `dst`. Returns false if a
/// value is not finite, or rounds to infinity (above bfloat16's largest finite value).
PISSA_AVX512_TARGET inline bool round_to_bf16(const float* src, Eigen::bfloat16* dst, Index count) {
    const __m512i exponent = _mm512_set1_epi32(0x7F800000);
    __mmask16 bad = 0;
    for (Index j = 0; j < count; j += kLanes) {
        const __mmask16 m = tail_mask(std::min<Index>(kLanes, count - j));
        const __m512i bits = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, src + j));
        const __m512i rounded = round_bits_bf16(bits);
        bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(bits, exponent), exponent);
        bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(rounded, exponent), exponent);
        store_bf16_bits(dst + j, rounded, m);
    }
    return bad == 0;
}

/// round_to_bf16 of columns [c0, c0 + count) of `src` (`rows` rows, `ld` floats apart), count <= 16,
/// written transposed: `dst[(c0 + c) * ldd + i] = bf16(src[i * ld + c0 + c])`.
PISSA_AVX512_TARGET inline bool round_to_bf16_transposed(const float* src, Index ld, Index rows, Index c0, Index count,
                                                         Eigen::bfloat16* dst, Index ldd) {
    const __m512i exponent = _mm512_set1_epi32(0x7F800000);
    const __mmask16 columns = tail_mask(count);
    __mmask16 bad = 0;
    for (Index i0 = 0; i0 < rows; i0 += kLanes) {
        const Index live = std::min<Index>(kLanes, rows - i0);
        __m512 r[16];
        for (Index i = 0; i < kLanes; ++i)
            r[i] = i < live ? _mm512_maskz_loadu_ps(columns, src + (i0 + i) * ld + c0) : _mm512_setzero_ps();
        transpose16(r);  // r[c] lane i = src(i0 + i, c0 + c)
        const __mmask16 m = tail_mask(live);
        for (Index c = 0; c < count; ++c) {
            const __m512i bits = _mm512_castps_si512(r[c]);
            const __m512i rounded = round_bits_bf16(bits);
            bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(bits, exponent), exponent);
            bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(rounded, exponent), exponent);
            store_bf16_bits(dst + (c0 + c) * ldd + i0, rounded, m);
        }
    }
    return bad == 0;
}

/// sum += the squares of the first lanes of v (those of `m`), in double.
PISSA_AVX512_TARGET inline void add_squares(__m512d& sum, __m512 v, __mmask16 m) {
    const __m512 live = _mm512_maskz_mov_ps(m, v);
    const __m512d lo = _mm512_maskz_cvtps_pd(kAll8, _mm512_maskz_extractf32x8_ps(kAll8, live, 0));
    const __m512d hi = _mm512_maskz_cvtps_pd(kAll8, _mm512_maskz_extractf32x8_ps(kAll8, live, 1));
    sum = _mm512_fmadd_pd(lo, lo, sum);
    sum = _mm512_fmadd_pd(hi, hi, sum);
}

inline constexpr int kUpdateRows = 6;                                  ///< subtract_low_rank: rows of the register tile
inline constexpr int kUpdateVectors = 4;                               ///< subtract_low_rank: vectors of its columns
inline constexpr Index kUpdateStrip = Index(kUpdateVectors) * kLanes;  ///< subtract_low_rank: columns of a tile

/// The first 64-byte aligned address at or after `p` (buffers of 4-byte elements are
/// over-allocated by 16 of them).
template <class T>
T* aligned_64(T* p) {
    static_assert(64 % sizeof(T) == 0);
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    return p + ((64 - address % 64) % 64) / sizeof(T);
}

/// `R [r, cols]` (row-major, leading dimension ldr) as subtract_low_rank reads it: strip after
/// strip of 64 columns, each `[r, 64]` row-major and zero-padded, so that a step of the register
/// tile loads 4 aligned vectors from one 256-byte row. Returns the 64-byte aligned start in `out`.
inline const float* pack_update_strips(const float* R, Index ldr, Index r, Index cols, std::vector<float>& out) {
    const Index strips = (cols + kUpdateStrip - 1) / kUpdateStrip;
    out.assign(static_cast<std::size_t>(strips * r * kUpdateStrip + kLanes), 0.0f);
    float* base = aligned_64(out.data());
    for (Index s = 0; s < strips; ++s) {
        const Index j0 = s * kUpdateStrip, width = std::min(kUpdateStrip, cols - j0);
        for (Index k = 0; k < r; ++k) std::copy_n(R + k * ldr + j0, width, base + (s * r + k) * kUpdateStrip);
    }
    return base;
}

/// One register tile of subtract_low_rank: `live` rows (source[i], target[i]; the entries past
/// `live` repeat the last live row, computed and not stored, so every loop has a fixed trip count
/// and the 24 accumulators stay in registers) x the columns of `m`. `l` holds the tile's 6 values
/// of L per k, `strip` its rows of R (packed, 64 per k).
template <class Storage>
PISSA_AVX512_TARGET inline void subtract_tile(const Storage* const (&source)[kUpdateRows],
                                              Storage* const (&target)[kUpdateRows], int live,
                                              const __mmask16 (&m)[kUpdateVectors], const float* l, const float* strip,
                                              Index r, __m512d& weight_sum, __m512d& residual_sum) {
    __m512 acc[kUpdateRows][kUpdateVectors];
    PISSA_UNROLL
    for (int i = 0; i < kUpdateRows; ++i) {
        PISSA_UNROLL
        for (int v = 0; v < kUpdateVectors; ++v) acc[i][v] = load16(source[i] + v * kLanes, m[v]);
    }
    for (Index k = 0; k < r; ++k) {
        __m512 x[kUpdateVectors];
        PISSA_UNROLL
        for (int v = 0; v < kUpdateVectors; ++v) {
            x[v] = _mm512_load_ps(strip + k * kUpdateStrip + v * kLanes);
            keep_in_register(x[v]);
        }
        PISSA_UNROLL
        for (int i = 0; i < kUpdateRows; ++i) {
            const __m512 b = _mm512_set1_ps(l[k * kUpdateRows + i]);
            PISSA_UNROLL
            for (int v = 0; v < kUpdateVectors; ++v) acc[i][v] = _mm512_fnmadd_ps(b, x[v], acc[i][v]);
        }
    }
    // The squares after the update (the source re-read from L1 before the target overwrites it):
    // two running sums live across the k loop would spill the accumulators.
    PISSA_UNROLL
    for (int i = 0; i < kUpdateRows; ++i) {
        if (i < live) {
            PISSA_UNROLL
            for (int v = 0; v < kUpdateVectors; ++v) {
                add_squares(weight_sum, load16(source[i] + v * kLanes, m[v]), m[v]);
                store16(target[i] + v * kLanes, acc[i][v], m[v]);
                add_squares(residual_sum, load16(target[i] + v * kLanes, m[v]), m[v]);
            }
        }
    }
}

/// Rows [0, rows) of `target = source - L R`, source and target row-major in `Storage` (they may be
/// the same memory), L `[rows, r]` col-major with leading dimension ldl, R `[r, cols]` as
/// pack_update_strips left it (float). The register tile is 6 rows x 64 columns: the source
/// widened into 24 accumulators, then for every k one row of the strip (4 loads) against 6
/// broadcast values of L (packed here, 6 per k). Each element is the same chain of fused
/// multiply-subtracts, k = 0, 1, ..., wherever its tile lies. `weight_sq` / `residual_sq` += the
/// squares of the source and of the stored target.
template <class Storage>
PISSA_AVX512_TARGET void subtract_low_rank(const Storage* source, Index source_stride, Storage* target,
                                           Index target_stride, Index rows, Index cols, const float* L, Index ldl,
                                           const float* strips, Index r, double& weight_sq, double& residual_sq) {
    const Index tiles = (rows + kUpdateRows - 1) / kUpdateRows;
    std::vector<float> l_packed(static_cast<std::size_t>(tiles * r * kUpdateRows));
    for (Index t = 0; t < tiles; ++t) {
        for (Index k = 0; k < r; ++k) {
            for (int i = 0; i < kUpdateRows; ++i)
                l_packed[static_cast<std::size_t>((t * r + k) * kUpdateRows + i)] =
                    L[std::min(t * kUpdateRows + i, rows - 1) + k * ldl];
        }
    }
    __m512d weight_sum = _mm512_setzero_pd(), residual_sum = _mm512_setzero_pd();
    for (Index j0 = 0; j0 < cols; j0 += kUpdateStrip) {
        __mmask16 m[kUpdateVectors];
        PISSA_UNROLL
        for (int v = 0; v < kUpdateVectors; ++v) m[v] = tail_mask(std::clamp<Index>(cols - j0 - v * kLanes, 0, kLanes));
        const float* strip = strips + (j0 / kUpdateStrip) * r * kUpdateStrip;
        for (Index t = 0; t < tiles; ++t) {
            const Index i0 = t * kUpdateRows;
            const int live = int(std::min<Index>(kUpdateRows, rows - i0));
            const Storage* s[kUpdateRows];
            Storage* d[kUpdateRows];
            for (int i = 0; i < kUpdateRows; ++i) {
                const Index row = i0 + std::min(i, live - 1);
                s[i] = source + row * source_stride + j0;
                d[i] = target + row * target_stride + j0;
            }
            subtract_tile(s, d, live, m, l_packed.data() + t * r * kUpdateRows, strip, r, weight_sum, residual_sum);
        }
    }
    alignas(64) double w[8], t[8];
    _mm512_store_pd(w, weight_sum);
    _mm512_store_pd(t, residual_sum);
    for (int e = 0; e < 8; ++e) {
        weight_sq += w[e];
        residual_sq += t[e];
    }
}

}  // namespace pissa::detail::avx512

#endif  // PISSA_HAVE_AVX512_KERNELS

/// \file detail/kernels_amx.hpp
/// \brief AMX kernels of the skinny products for a bfloat16 W: the skinny operand is rounded to
/// bfloat16 (to nearest even) and the tile unit multiplies bfloat16 pairs with float32
/// accumulation (`tdpbf16ps`: a [16, 32] x [32, 16] product per instruction). Called only after
/// a run-time check (detail/cpu_features.hpp: CPUID, the OS's tile state and Linux's per-process
/// permission); the instructions are written as inline assembly, so no compiler flag is needed.
///
/// Every tile is 16 rows of 64 bytes (one configuration for all kernels): C tiles hold [16, 16]
/// floats, A tiles [16, 32] bfloat16, B tiles [16, 16] pairs of bfloat16 adjacent along the summed
/// index k (the even k in the lower half), i.e. a [32, 16] operand in the layout `tdpbf16ps` reads.
/// Tiles 0-3 accumulate, 4-5 hold A, 6-7 hold B.
///
/// `Y = W X` (multiply_panel): a work unit is a panel of 32 rows of W. W is the A operand read in
/// place (rows of W are rows of A, 32 columns at a time); X is packed once per product as B tiles
/// (avx512_bf16::pack_pair_groups, 16 columns per group). For every pair of 16-column groups of X, the four C
/// tiles (2 row tiles x 2 column groups) run over all of W's columns, then are written to Y.
///
/// `Z = W^T Y` as `Z^T = Y^T W` (multiply_transposed_strip): a work unit is a strip of 32 columns
/// of W. Y^T is the A operand (packed once per product as bfloat16 rows, pack_transposed); W is
/// the B operand: each chunk of 512 rows of the strip is packed as pairs of rows
/// (`T[t][j] = (W(2t, j), W(2t + 1, j))`), then every pair of 16-column groups of Y runs over it,
/// its C tiles kept in a per-strip buffer between chunks.
///
/// `Z = W^T Y` for q <= 16 (multiply_transposed_direct): the same strips, W read in place as B
/// tiles (16 rows, 32 columns: pairs of adjacent columns) and Y^T doubled as the A operand (the
/// row for column c of Y and column parity s holds Y's values at the parity s of each pair, zeros
/// at the other), so that C(2c + s, p) = Z(2p + s, c). Half of the tile products are with zeros,
/// but packing W as row pairs moves W through the core twice, which costs more at small q
/// (4096 x 4096, q = 16, 2 threads: 0.9 ms against 1.4 ms for the packed kernel, `Y = W X`
/// 0.65 ms). The strip's C tiles wait in a buffer between chunks of 32 rows; strips are up to
/// 2048 columns wide, as many as the threads need (direct_strip_width).
///
/// Every output element is a sum over k in order, 32 (the direct kernel: 16) at a time as
/// `tdpbf16ps` adds them; the partition depends only on the shapes, never on the thread count.
/// Like `vdpbf16ps`, the tile unit reads bfloat16 subnormals as zero and flushes subnormal
/// results.
#pragma once

#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/kernels_avx512.hpp>
#include <pissa/detail/kernels_avx512_bf16.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/types.hpp>

#if PISSA_HAVE_AMX_KERNELS

#include <Eigen/Core>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// The tile instructions, with a memory clobber (GCC 12's _tile_loadd has none, so stores to a
// buffer could be moved past the load that reads it). Tile numbers are literals.
#define PISSA_TILE_LOAD(tile, base, stride)                                                        \
    __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #tile "|tileloadd\t%%tmm" #tile ", [%0+%1*1]}" \
                     :                                                                             \
                     : "r"(static_cast<const void*>(base)), "r"(static_cast<long>(stride))         \
                     : "memory")
#define PISSA_TILE_STORE(tile, base, stride)                                                         \
    __asm__ volatile("{tilestored\t%%tmm" #tile ", (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm" #tile "}" \
                     :                                                                               \
                     : "r"(static_cast<void*>(base)), "r"(static_cast<long>(stride))                 \
                     : "memory")
#define PISSA_TILE_ZERO(tile) __asm__ volatile("tilezero\t%%tmm" #tile::)
#define PISSA_TILE_DOT(c, a, b)                                                                                        \
    __asm__ volatile("{tdpbf16ps\t%%tmm" #b ", %%tmm" #a ", %%tmm" #c "|tdpbf16ps\t%%tmm" #c ", %%tmm" #a ", %%tmm" #b \
                     "}" ::)

namespace pissa::detail::amx {

using avx512_bf16::Pair;

inline constexpr Index kTileRows = 16;          ///< rows of every tile
inline constexpr Index kTileDepth = 32;         ///< bfloat16 values of k per A row (64 bytes)
inline constexpr Index kPanelRows = 32;         ///< Y = W X: rows of W per work unit (two row tiles)
inline constexpr Index kStripCols = 512;        ///< Z = W^T Y: columns of W per work unit (32 column tiles)
inline constexpr Index kChunkRows = 256;        ///< Z = W^T Y: rows of a strip per packed chunk (256 KiB)
inline constexpr Index kDirectChunkRows = 32;   ///< Z = W^T Y, q <= 16: rows of W per pass over a strip
inline constexpr Index kDirectMaxStrip = 2048;  ///< Z = W^T Y, q <= 16: most columns per strip

/// Rounds `n` up to a multiple of kTileDepth (the padded length of a packed k dimension).
constexpr Index padded_depth(Index n) { return (n + kTileDepth - 1) / kTileDepth * kTileDepth; }
/// Groups of 16 columns of a skinny operand with q columns.
constexpr Index column_groups(Index q) { return (q + kTileRows - 1) / kTileRows; }

/// The palette-1 configuration with tiles 0-7 all 16 rows x 64 bytes.
struct alignas(64) TileConfig {
    std::uint8_t palette = 1;
    std::uint8_t start_row = 0;
    std::uint8_t reserved[14] = {};
    std::uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

/// Loads the tile configuration into this thread's tile state; TileScope releases it.
struct TileScope {
    TileScope() {
        static const TileConfig config{};
        __asm__ volatile("ldtilecfg\t%0" ::"m"(config));
    }
    ~TileScope() { __asm__ volatile("tilerelease" ::); }
    TileScope(const TileScope&) = delete;
    TileScope& operator=(const TileScope&) = delete;
};

/// A tiles of a transposed skinny operand: out[c * ld_out + i] = bf16(src(i, c)) for i < rows,
/// c < q; src `[rows, q]` col-major with leading dimension ld. Padding left as it is.
PISSA_AVX512_BF16_TARGET inline void pack_transposed(const float* src, Index ld, Index rows, Index q, Index ld_out,
                                                     std::uint16_t* out) {
    for (Index c = 0; c < q; ++c) {
        const float* column = src + c * ld;
        std::uint16_t* dst = out + c * ld_out;
        for (Index i = 0; i < rows; i += 16) {
            const __mmask16 m = avx512::tail_mask(std::min<Index>(16, rows - i));
            const __m256i v = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, column + i)));
            _mm256_mask_storeu_epi16(dst + i, m, v);
        }
    }
}

/// Writes C tiles 0..(2 Groups - 1) of multiply_panel (tile 2 g + t: column group g, row tile t)
/// for rows [r0, r0 + rows) and columns [c0, c0 + cols) to Y (col-major, leading dimension ldy),
/// through `buffer` (4 x 256 floats, 64-byte aligned): a 16 x 16 transpose per tile.
template <int Groups>
PISSA_AVX512_TARGET inline void store_panel(float* buffer, float* Y, Index ldy, Index r0, Index rows, Index c0,
                                            Index cols) {
    PISSA_TILE_STORE(0, buffer, 64);
    PISSA_TILE_STORE(1, buffer + 256, 64);
    if constexpr (Groups == 2) {
        PISSA_TILE_STORE(2, buffer + 512, 64);
        PISSA_TILE_STORE(3, buffer + 768, 64);
    }
    for (int tile = 0; tile < 2 * Groups; ++tile) {
        const Index group = tile / 2, first_row = (tile % 2) * kTileRows;
        const Index live_rows = std::clamp<Index>(rows - first_row, 0, kTileRows);
        const Index live_cols = std::clamp<Index>(cols - group * kTileRows, 0, kTileRows);
        if (live_rows == 0 || live_cols == 0) continue;
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(buffer + tile * 256 + i * 16);
        avx512::transpose16(r);  // r[c] lane i = C(i, c)
        const __mmask16 m = avx512::tail_mask(live_rows);
        for (Index c = 0; c < live_cols; ++c)
            _mm512_mask_storeu_ps(Y + (c0 + group * kTileRows + c) * ldy + r0 + first_row, m, r[c]);
    }
}

/// C tiles 0..(2 Groups - 1) += A (two row tiles: `a` and 16 rows below, `stride` elements
/// apart) times the B tiles of `Groups` column groups (`b`, groups `pairs` pairs apart), over
/// `count` values of k (a multiple of 32); `a` and `b` start at the first of them.
template <int Groups>
inline void panel_steps(const Eigen::bfloat16* a, Index stride, const Pair* b, Index pairs, Index count) {
    const long a_stride = static_cast<long>(stride * 2);
    const Eigen::bfloat16* a1 = a + kTileRows * stride;
    for (Index k = 0; k < count; k += kTileDepth) {
        PISSA_TILE_LOAD(4, a + k, a_stride);
        PISSA_TILE_LOAD(5, a1 + k, a_stride);
        PISSA_TILE_LOAD(6, b + k / 2 * kTileRows, 64);
        PISSA_TILE_DOT(0, 4, 6);
        PISSA_TILE_DOT(1, 5, 6);
        if constexpr (Groups == 2) {
            PISSA_TILE_LOAD(7, b + (pairs + k / 2) * kTileRows, 64);
            PISSA_TILE_DOT(2, 4, 7);
            PISSA_TILE_DOT(3, 5, 7);
        }
    }
}

/// Scratch of one thread for multiply_panel.
struct PanelScratch {
    std::vector<Eigen::bfloat16> rows;  ///< a last, partial panel, zero-padded to [32, padded_depth(n)]
    std::vector<Eigen::bfloat16> tail;  ///< the last columns when n % 32 != 0, zero-padded to [32, 32]
    alignas(64) float out[4 * 256];     ///< C tiles on their way to Y
};

/// Rows [r0, r0 + min(32, m - r0)) of `Y = W X`. `xpack`: X's B tiles (pack_pair_groups, groups
/// `pairs` = padded_depth(n) / 2 long); Y col-major with leading dimension ldy.
template <int Groups>
inline void panel_product(const Eigen::bfloat16* a, Index stride, Index full, const Eigen::bfloat16* tail,
                          const Pair* b, Index pairs) {
    panel_steps<Groups>(a, stride, b, pairs, full);
    if (tail != nullptr) panel_steps<Groups>(tail, kTileDepth, b + full / 2 * kTileRows, pairs, kTileDepth);
}

inline void multiply_panel(RowMajorView<Eigen::bfloat16> W, const Pair* xpack, Index pairs, Index q, float* Y,
                           Index ldy, Index r0, PanelScratch& scratch) {
    const Index rows = std::min(kPanelRows, W.rows - r0), n = W.cols;
    const Eigen::bfloat16* a = W.row(r0);
    const Eigen::bfloat16* tail = nullptr;
    Index stride = W.stride, full = n / kTileDepth * kTileDepth;
    if (rows < kPanelRows) {  // the partial panel, copied into zero-padded rows
        stride = padded_depth(n);
        scratch.rows.assign(static_cast<std::size_t>(kPanelRows * stride), Eigen::bfloat16(0.0f));
        for (Index i = 0; i < rows; ++i)
            std::memcpy(scratch.rows.data() + i * stride, W.row(r0 + i), sizeof(Eigen::bfloat16) * std::size_t(n));
        a = scratch.rows.data();
        full = stride;
    } else if (full < n) {  // the last columns, zero-padded to a whole tile
        scratch.tail.assign(static_cast<std::size_t>(kPanelRows * kTileDepth), Eigen::bfloat16(0.0f));
        for (Index i = 0; i < kPanelRows; ++i)
            std::memcpy(scratch.tail.data() + i * kTileDepth, W.row(r0 + i) + full,
                        sizeof(Eigen::bfloat16) * std::size_t(n - full));
        tail = scratch.tail.data();
    }
    const Index groups = column_groups(q);
    for (Index g = 0; g < groups; g += 2) {
        const Pair* b = xpack + g * pairs * kTileRows;
        PISSA_TILE_ZERO(0);
        PISSA_TILE_ZERO(1);
        if (g + 1 < groups) {
            PISSA_TILE_ZERO(2);
            PISSA_TILE_ZERO(3);
            panel_product<2>(a, stride, full, tail, b, pairs);
            store_panel<2>(scratch.out, Y, ldy, r0, rows, g * kTileRows, q - g * kTileRows);
        } else {
            panel_product<1>(a, stride, full, tail, b, pairs);
            store_panel<1>(scratch.out, Y, ldy, r0, rows, g * kTileRows, q - g * kTileRows);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Z = W^T Y, as Z^T = Y^T W

/// The column of W (within its block of 32) that lane n of tile t (0 or 1) of pack_row_pairs
/// holds: the interleave works within 128-bit lanes, so tile 0 holds columns 0-3, 8-11, 16-19,
/// 24-27 and tile 1 the others.
constexpr Index packed_column(Index t, Index n) { return 8 * (n / 4) + 4 * t + n % 4; }

/// T[t * kStripCols + 32 b + 16 h + n] = (W(i0 + 2t, c), W(i0 + 2t + 1, c)) with
/// c = c0 + 32 b + packed_column(h, n), for c < c0 + width (width <= kStripCols) and rows
/// i0 + 2t (+ 1) < i0 + rows; zero elsewhere, for 2t < rows rounded up to 32.
PISSA_AVX512_TARGET inline void pack_row_pairs(RowMajorView<Eigen::bfloat16> W, Index i0, Index rows, Index c0,
                                               Index width, Pair* T) {
    constexpr int kBlocks = int(kStripCols / 32);
    __mmask32 m[kBlocks];
    for (int b = 0; b < kBlocks; ++b) {
        const Index live = std::clamp<Index>(width - 32 * b, 0, 32);
        m[b] = live >= 32 ? ~__mmask32(0) : ((__mmask32(1) << live) - 1);
    }
    const int blocks = int((width + 31) / 32);
    const Index padded = padded_depth(rows);
    for (Index i = 0; i < padded; i += 2) {
        Pair* dst = T + i / 2 * kStripCols;
        const bool has_even = i < rows, has_odd = i + 1 < rows;
        const Eigen::bfloat16* even_row = W.row(i0 + (has_even ? i : 0)) + c0;
        const Eigen::bfloat16* odd_row = W.row(i0 + (has_odd ? i + 1 : 0)) + c0;
        for (int b = 0; b < kBlocks; ++b) {
            const __m512i even =
                _mm512_maskz_loadu_epi16(b < blocks && has_even ? m[b] : __mmask32(0), even_row + 32 * b);
            const __m512i odd = _mm512_maskz_loadu_epi16(b < blocks && has_odd ? m[b] : __mmask32(0), odd_row + 32 * b);
            _mm512_store_si512(dst + 32 * b, _mm512_unpacklo_epi16(even, odd));
            _mm512_store_si512(dst + 32 * b + 16, _mm512_unpackhi_epi16(even, odd));
        }
    }
}

/// C tiles 0-3 before a chunk of rows: zero for the first chunk, else the sums so far, read from
/// `c[t]` for tile t (a null address: a tile the chunk does not use).
inline void start_sums(bool first, float* const (&c)[4]) {
    if (first) {
        PISSA_TILE_ZERO(0);
        PISSA_TILE_ZERO(1);
        PISSA_TILE_ZERO(2);
        PISSA_TILE_ZERO(3);
        return;
    }
    if (c[0] != nullptr) PISSA_TILE_LOAD(0, c[0], 64);
    if (c[1] != nullptr) PISSA_TILE_LOAD(1, c[1], 64);
    if (c[2] != nullptr) PISSA_TILE_LOAD(2, c[2], 64);
    if (c[3] != nullptr) PISSA_TILE_LOAD(3, c[3], 64);
}

/// C tiles 0-3 after a chunk of rows, to `c[t]` for tile t (null: not used).
inline void keep_sums(float* const (&c)[4]) {
    if (c[0] != nullptr) PISSA_TILE_STORE(0, c[0], 64);
    if (c[1] != nullptr) PISSA_TILE_STORE(1, c[1], 64);
    if (c[2] != nullptr) PISSA_TILE_STORE(2, c[2], 64);
    if (c[3] != nullptr) PISSA_TILE_STORE(3, c[3], 64);
}

/// C tiles 0..(2 Groups - 1) (tile 2 g + t: column group g of Y, column tile t of 32 columns of
/// the strip) += Y^T's rows (`a`: 16 rows per group, `stride` elements apart) times the packed
/// strip (`T` at those 32 columns), over `count` rows of W (a multiple of 32); `a` starts at the
/// first of them.
template <int Groups>
inline void strip_steps(const std::uint16_t* a, Index stride, const Pair* T, Index count) {
    const long a_stride = static_cast<long>(stride * 2);
    constexpr long b_stride = kStripCols * 4;
    const std::uint16_t* a1 = a + kTileRows * stride;
    for (Index k = 0; k < count; k += kTileDepth) {
        PISSA_TILE_LOAD(6, T + k / 2 * kStripCols, b_stride);
        PISSA_TILE_LOAD(7, T + k / 2 * kStripCols + 16, b_stride);
        PISSA_TILE_LOAD(4, a + k, a_stride);
        PISSA_TILE_DOT(0, 4, 6);
        PISSA_TILE_DOT(1, 4, 7);
        if constexpr (Groups == 2) {
            PISSA_TILE_LOAD(5, a1 + k, a_stride);
            PISSA_TILE_DOT(2, 5, 6);
            PISSA_TILE_DOT(3, 5, 7);
        }
    }
}

/// Scratch of one thread for multiply_transposed_strip.
struct StripScratch {
    std::vector<Pair> pairs;  ///< a packed chunk of the strip (pack_row_pairs), kChunkRows / 2 x kStripCols
    std::vector<float> sums;  ///< the strip's C tiles between chunks: per 32 columns, 2 per column group of Y
};

/// Rows [j0, j0 + min(kStripCols, n - j0)) of `Z = W^T Y`. `yt`: Y^T as bfloat16 rows
/// (pack_transposed, column_groups(q) * 16 rows, `ldyt` = padded_depth(m) apart, zero-padded); Z
/// col-major with leading dimension ldz.
PISSA_AVX512_TARGET inline void multiply_transposed_strip(RowMajorView<Eigen::bfloat16> W, const std::uint16_t* yt,
                                                          Index ldyt, Index q, float* Z, Index ldz, Index j0,
                                                          StripScratch& scratch) {
    const Index m = W.rows, width = std::min(kStripCols, W.cols - j0), groups = column_groups(q);
    const Index blocks = (width + 31) / 32;  // 32-column blocks of the strip, 2 tiles each
    const Index block_floats = groups * 2 * 256;
    scratch.pairs.resize(static_cast<std::size_t>(kChunkRows / 2 * kStripCols + 16));
    scratch.sums.resize(static_cast<std::size_t>(blocks * block_floats + 16));
    Pair* T = scratch.pairs.data() + ((64 - reinterpret_cast<std::uintptr_t>(scratch.pairs.data()) % 64) % 64) / 4;
    float* sums = scratch.sums.data() + ((64 - reinterpret_cast<std::uintptr_t>(scratch.sums.data()) % 64) % 64) / 4;
    for (Index i0 = 0; i0 < m; i0 += kChunkRows) {
        const Index rows = std::min(kChunkRows, m - i0), count = padded_depth(rows);
        pack_row_pairs(W, i0, rows, j0, width, T);
        for (Index b = 0; b < blocks; ++b) {
            for (Index g = 0; g < groups; g += 2) {
                float* c = sums + b * block_floats + g * 2 * 256;
                const std::uint16_t* a = yt + g * kTileRows * ldyt + i0;
                const bool two = g + 1 < groups;
                float* const tiles[4] = {c, c + 256, two ? c + 512 : nullptr, two ? c + 768 : nullptr};
                start_sums(i0 == 0, tiles);
                if (two) strip_steps<2>(a, ldyt, T + 32 * b, count);
                else strip_steps<1>(a, ldyt, T + 32 * b, count);
                keep_sums(tiles);
            }
        }
    }
    // C tile (block b, group g, tile t) row c' = Z^T row 16 g + c' at the columns
    // j0 + 32 b + packed_column(t, n): the two tiles' rows interleaved 4 by 4.
    for (Index b = 0; b < blocks; ++b) {
        const Index live = std::min<Index>(width - 32 * b, 32);
        for (Index c = 0; c < q; ++c) {
            const float* row = sums + b * block_floats + (c / kTileRows) * 512 + (c % kTileRows) * kTileRows;
            float* z = Z + c * ldz + j0 + 32 * b;
            for (Index n = 0; n < kTileRows; ++n) {
                for (Index t = 0; t < 2; ++t) {
                    const Index column = packed_column(t, n);
                    if (column < live) z[column] = row[t * 256 + n];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Z = W^T Y for q <= 16, as Z^T = Y^T W with W read in place

/// Rows of the doubled Y^T of multiply_transposed_direct: `out[a * ld + i]` (pairs) =
/// (bf16(Y(i, a / 2)), 0) for even a and (0, bf16(Y(i, a / 2))) for odd a, i < rows, a < 2 q;
/// src `[rows, q]` col-major with leading dimension ldy. Padding left as it is.
PISSA_AVX512_BF16_TARGET inline void pack_parity_rows(const float* src, Index ldy, Index rows, Index q, Index ld,
                                                      Pair* out) {
    for (Index a = 0; a < 2 * q; ++a) {
        const float* column = src + (a / 2) * ldy;
        Pair* dst = out + a * ld;
        const unsigned shift = a % 2 == 0 ? 0 : 16;
        for (Index i = 0; i < rows; i += 16) {
            const __mmask16 m = avx512::tail_mask(std::min<Index>(16, rows - i));
            const __m256i half = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, column + i)));
            // (The maskz forms: GCC 12 warns about the undefined source of the unmasked ones.)
            const __m512i wide = _mm512_maskz_cvtepu16_epi32(avx512::kAll, half);
            _mm512_mask_storeu_epi32(dst + i, m, _mm512_maskz_slli_epi32(avx512::kAll, wide, shift));
        }
    }
}

/// C tiles (tile 2 g + d: group g of the doubled Y^T, block d of the two) += the doubled Y^T's
/// rows (`a`: 16 per group, `ld` pairs apart) times 16 rows of W (`b0`, `b1`: the two 32-column
/// blocks, `stride0`/`stride1` bytes between rows), over `count` rows (a multiple of 16).
template <int Groups, bool TwoBlocks>
inline void direct_steps(const Pair* a, Index ld, const Eigen::bfloat16* b0, long stride0, const Eigen::bfloat16* b1,
                         long stride1, Index count) {
    const long a_stride = static_cast<long>(ld * 4);
    for (Index k = 0; k < count; k += kTileRows) {
        PISSA_TILE_LOAD(6, b0 + k * (stride0 / 2), stride0);
        if constexpr (TwoBlocks) PISSA_TILE_LOAD(7, b1 + k * (stride1 / 2), stride1);
        PISSA_TILE_LOAD(4, a + k, a_stride);
        PISSA_TILE_DOT(0, 4, 6);
        if constexpr (TwoBlocks) PISSA_TILE_DOT(1, 4, 7);
        if constexpr (Groups == 2) {
            PISSA_TILE_LOAD(5, a + kTileRows * ld + k, a_stride);
            PISSA_TILE_DOT(2, 5, 6);
            if constexpr (TwoBlocks) PISSA_TILE_DOT(3, 5, 7);
        }
    }
}

/// Scratch of one thread for multiply_transposed_direct.
struct DirectScratch {
    std::vector<float> sums;            ///< the strip's C tiles between chunks: per 32 columns, one per group
    std::vector<Eigen::bfloat16> edge;  ///< W's last rows or columns, zero-padded to whole tiles
};

/// Columns per strip of multiply_transposed_direct for `threads` threads: as wide as
/// kDirectMaxStrip allows with a multiple of `threads` strips of about equal width (a whole
/// multiple of 32 columns). Wider strips read more of each row of W per visit (4 KiB pages cost
/// a TLB entry per row and chunk); the sums do not depend on the width.
constexpr Index direct_strip_width(Index n, Index threads) {
    const Index per_round = threads * kDirectMaxStrip;
    const Index strips = threads * ((n + per_round - 1) / per_round);
    return std::max<Index>(32, ((n + strips - 1) / strips + 31) / 32 * 32);
}

/// Rows [j0, j0 + min(strip, n - j0)) of `Z = W^T Y` for q <= 16, with no packing of W:
/// a row of W, 32 values, is read as 16 pairs of adjacent columns (a B tile row), and the A operand
/// is Y^T doubled (pack_parity_rows, `ld` pairs per row, zero-padded to whole tiles), so that the
/// pair product of row 2c + s picks column 2 n + s of the pair: C(2c + s, n) = Z(j + 2n + s, c).
/// Twice the tile work of packing W as row pairs, which at q <= 16 is far below the cost of
/// moving W. Every element is the sum over the rows of W in order, 16 per tdpbf16ps.
PISSA_AVX512_TARGET inline void multiply_transposed_direct(RowMajorView<Eigen::bfloat16> W, const Pair* yd, Index ld,
                                                           Index q, float* Z, Index ldz, Index j0, Index strip,
                                                           DirectScratch& scratch) {
    const Index m = W.rows, width = std::min(strip, W.cols - j0), groups = column_groups(2 * q);
    const Index blocks = (width + 31) / 32;
    scratch.sums.resize(static_cast<std::size_t>(blocks * groups * 256 + 16));
    scratch.edge.resize(static_cast<std::size_t>(2 * kDirectChunkRows * 32 + 32));
    float* sums = scratch.sums.data() + ((64 - reinterpret_cast<std::uintptr_t>(scratch.sums.data()) % 64) % 64) / 4;
    Eigen::bfloat16* edge =
        scratch.edge.data() + ((64 - reinterpret_cast<std::uintptr_t>(scratch.edge.data()) % 64) % 64) / 2;
    const long w_stride = static_cast<long>(W.stride * 2);
    for (Index i0 = 0; i0 < m; i0 += kDirectChunkRows) {
        const Index rows = std::min(kDirectChunkRows, m - i0), count = (rows + kTileRows - 1) / kTileRows * kTileRows;
        for (Index b = 0; b < blocks; b += 2) {
            const bool two = b + 1 < blocks;
            // A block that runs past W's last row or column is multiplied from a zero-padded copy.
            const Eigen::bfloat16* src[2];
            long stride[2];
            for (Index d = 0; d < (two ? 2 : 1); ++d) {
                const Index c = j0 + 32 * (b + d), live = std::min<Index>(32, W.cols - c);
                if (rows == count && live == 32) {
                    src[d] = W.row(i0) + c;
                    stride[d] = w_stride;
                    continue;
                }
                Eigen::bfloat16* copy = edge + d * kDirectChunkRows * 32;
                std::fill(copy, copy + count * 32, Eigen::bfloat16(0.0f));
                for (Index i = 0; i < rows; ++i)
                    std::memcpy(copy + i * 32, W.row(i0 + i) + c, sizeof(Eigen::bfloat16) * std::size_t(live));
                src[d] = copy;
                stride[d] = 64;
            }
            float* c0 = sums + b * groups * 256;
            float* c1 = c0 + groups * 256;
            float* const tiles[4] = {c0, two ? c1 : nullptr, groups == 2 ? c0 + 256 : nullptr,
                                     groups == 2 && two ? c1 + 256 : nullptr};
            start_sums(i0 == 0, tiles);
            const Pair* a = yd + i0;
            if (groups == 2) {
                if (two) direct_steps<2, true>(a, ld, src[0], stride[0], src[1], stride[1], count);
                else direct_steps<2, false>(a, ld, src[0], stride[0], nullptr, 0, count);
            } else {
                if (two) direct_steps<1, true>(a, ld, src[0], stride[0], src[1], stride[1], count);
                else direct_steps<1, false>(a, ld, src[0], stride[0], nullptr, 0, count);
            }
            keep_sums(tiles);
        }
    }
    for (Index b = 0; b < blocks; ++b) {
        const Index live = std::min<Index>(width - 32 * b, 32);
        for (Index row = 0; row < std::min<Index>(2 * q, groups * kTileRows); ++row) {
            const float* c = sums + (b * groups + row / kTileRows) * 256 + (row % kTileRows) * kTileRows;
            float* z = Z + (row / 2) * ldz + j0 + 32 * b;
            for (Index n = row % 2; n < live; n += 2) z[n] = c[n / 2];
        }
    }
}

}  // namespace pissa::detail::amx

#endif  // PISSA_HAVE_AMX_KERNELS

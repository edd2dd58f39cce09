/// \file detail/kernels_avx512.hpp
/// \brief AVX-512 kernels of the two skinny products, float compute, storage float / Eigen::half /
/// Eigen::bfloat16. Compiled with `__attribute__((target))`, called only after a run-time check
/// (detail/cpu_features.hpp); the rest of the program needs no AVX-512 flags.
///
/// `Y = W X` (multiply_rows): the work unit is 8 rows of W. Each output `Y(i, k)` is a dot
/// product of row i of W with column k of X, accumulated in 16 float lanes over the columns of W
/// in order (chunks of kDepth columns, register tile 4 rows x 6 columns of X, partial sums parked
/// in a small buffer between chunks), then reduced across lanes in a fixed order.
///
/// `Z = W^T Y` (multiply_transposed_strip): the work unit is a strip of kStrip columns of W, which
/// owns the same rows of Z. For every row i of W in order, `Z(j, k) += W(i, j) Y(i, k)`
/// (register tile 64 columns of W x 6 columns of Y, Y packed so that its 6 values of row i are
/// adjacent; partial sums live in Z itself between chunks of kChunkRows rows).
///
/// 16-bit storage is widened on the fly (bfloat16: shift left by 16; half: vcvtph2ps), a few rows
/// at a time into a small float buffer that stays in L1/L2, never as a copy of W. The partition
/// and summation order depend only on the shapes, never on the thread count.
#pragma once

#include <pissa/detail/cpu_features.hpp>

#if PISSA_HAVE_AVX512_KERNELS

#include <pissa/detail/weight_view.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#define PISSA_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// The register tiles are arrays indexed by constant-trip loops: they must be unrolled completely
// for the arrays to live in zmm registers (GCC does not at -O2 on its own).
#if defined(__clang__)
#define PISSA_UNROLL _Pragma("unroll")
#else
#define PISSA_UNROLL _Pragma("GCC unroll 16")
#endif

namespace pissa::detail::avx512 {

inline constexpr Index kLanes = 16;
inline constexpr int kRowTile = 4;        ///< multiply: rows of W per register tile
inline constexpr Index kRowUnit = 8;      ///< multiply: rows of W per work unit
inline constexpr int kColTile = 6;        ///< columns of X (or Y) per register tile
inline constexpr Index kDepth = 512;      ///< multiply: columns of W per chunk (W and X chunks stay in L1)
inline constexpr Index kSuperCols = 24;   ///< multiply: columns of X whose partial sums are parked at once
inline constexpr Index kStrip = 512;      ///< multiply_transposed: columns of W per work unit
inline constexpr int kStripVectors = 4;   ///< multiply_transposed: 64 columns of W per register tile
inline constexpr Index kChunkRows = 64;   ///< multiply_transposed: rows of W per chunk

// The maskz_ forms with an all-ones mask stand for the plain intrinsics, whose GCC 12 definitions
// (_mm512_undefined_*) trip -Wmaybe-uninitialized.
inline constexpr __mmask16 kAll = 0xFFFF;

PISSA_AVX512_TARGET inline __mmask16 tail_mask(Index count) {
    return static_cast<__mmask16>((1u << static_cast<unsigned>(count)) - 1u);
}

PISSA_AVX512_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PISSA_AVX512_TARGET inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PISSA_AVX512_TARGET inline __m512 load16(const Eigen::bfloat16* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, bits), 16));
}
PISSA_AVX512_TARGET inline __m512 load16(const Eigen::bfloat16* p, __mmask16 m) {
    const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, bits), 16));
}
PISSA_AVX512_TARGET inline __m512 load16(const Eigen::half* p) {
    return _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
PISSA_AVX512_TARGET inline __m512 load16(const Eigen::half* p, __mmask16 m) {
    return _mm512_maskz_cvtph_ps(kAll, _mm256_maskz_loadu_epi16(m, p));
}

/// dst[0, count) = float(src[0, count)), exactly.
template <class Storage>
PISSA_AVX512_TARGET inline void widen(const Storage* src, Index count, float* dst) {
    Index j = 0;
    for (; j + kLanes <= count; j += kLanes) _mm512_storeu_ps(dst + j, load16(src + j));
    if (j < count) {
        const __mmask16 m = tail_mask(count - j);
        _mm512_mask_storeu_ps(dst + j, m, load16(src + j, m));
    }
}

/// Sum of the 16 lanes at `lanes`, as a fixed pairwise tree.
inline float reduce16(const float* lanes) {
    float t[8];
    for (int i = 0; i < 8; ++i) t[i] = lanes[i] + lanes[i + 8];
    for (int i = 0; i < 4; ++i) t[i] += t[i + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

// ---------------------------------------------------------------------------------------------
// Y = W X

/// acc[r][c] (16 lanes each, parked at `park`) += sum over j < count of w[r][j] * x[c][j].
template <int R, int C>
PISSA_AVX512_TARGET inline void dot_tile(const float* const* w, const float* const* x, Index count, bool first,
                                         float* park) {
    __m512 acc[R][C];
    PISSA_UNROLL
    for (int r = 0; r < R; ++r)
        PISSA_UNROLL
        for (int c = 0; c < C; ++c)
            acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(park + (r * C + c) * kLanes);
    Index j = 0;
    for (; j + kLanes <= count; j += kLanes) {
        __m512 xv[C];
        PISSA_UNROLL
        for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_ps(x[c] + j);
        PISSA_UNROLL
        for (int r = 0; r < R; ++r) {
            const __m512 wv = _mm512_loadu_ps(w[r] + j);
            PISSA_UNROLL
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    }
    if (j < count) {
        const __mmask16 m = tail_mask(count - j);
        __m512 xv[C];
        PISSA_UNROLL
        for (int c = 0; c < C; ++c) xv[c] = _mm512_maskz_loadu_ps(m, x[c] + j);
        PISSA_UNROLL
        for (int r = 0; r < R; ++r) {
            const __m512 wv = _mm512_maskz_loadu_ps(m, w[r] + j);
            PISSA_UNROLL
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    }
    PISSA_UNROLL
    for (int r = 0; r < R; ++r)
        PISSA_UNROLL
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(park + (r * C + c) * kLanes, acc[r][c]);
}

template <int R>
PISSA_AVX512_TARGET inline void dot_tile_c(int C, const float* const* w, const float* const* x, Index count,
                                           bool first, float* park) {
    switch (C) {
        case 1: dot_tile<R, 1>(w, x, count, first, park); break;
        case 2: dot_tile<R, 2>(w, x, count, first, park); break;
        case 3: dot_tile<R, 3>(w, x, count, first, park); break;
        case 4: dot_tile<R, 4>(w, x, count, first, park); break;
        case 5: dot_tile<R, 5>(w, x, count, first, park); break;
        default: dot_tile<R, 6>(w, x, count, first, park); break;
    }
}

PISSA_AVX512_TARGET inline void dot_tile_rc(int R, int C, const float* const* w, const float* const* x, Index count,
                                            bool first, float* park) {
    switch (R) {
        case 1: dot_tile_c<1>(C, w, x, count, first, park); break;
        case 2: dot_tile_c<2>(C, w, x, count, first, park); break;
        case 3: dot_tile_c<3>(C, w, x, count, first, park); break;
        default: dot_tile_c<4>(C, w, x, count, first, park); break;
    }
}

/// Rows [r0, r0 + min(kRowUnit, m - r0)) of `Y = W X`. X `[n, q]` col-major with leading
/// dimension ldx, Y col-major with leading dimension ldy. `wide`: kRowUnit kDepth floats (16-bit
/// storage only); `park`: kRowUnit kSuperCols 16 floats. Loop order: columns of X in groups of
/// kSuperCols, then chunks of kDepth columns of W, then 6 columns of X, then 4 rows of W: the
/// chunk of X (6 x kDepth) is reused by the 4 row tiles from L1, the chunk of W by the groups.
template <class Storage>
PISSA_AVX512_TARGET void multiply_rows(const RowMajorView<Storage>& W, const float* X, Index ldx, Index q, float* Y,
                                       Index ldy, Index r0, float* wide, float* park) {
    const Index rows = std::min<Index>(kRowUnit, W.rows - r0);
    const Index n = W.cols;
    const Index tiles = (rows + kRowTile - 1) / kRowTile;
    constexpr Index tile_park = kSuperCols * kRowTile * kLanes;
    for (Index s0 = 0; s0 < q; s0 += kSuperCols) {
        const Index sc = std::min(kSuperCols, q - s0);
        for (Index j0 = 0; j0 < n; j0 += kDepth) {
            const Index count = std::min(kDepth, n - j0);
            const float* base;
            Index ldw;
            if constexpr (std::is_same_v<Storage, float>) {
                base = W.row(r0) + j0;
                ldw = W.stride;
            } else {
                for (Index i = 0; i < rows; ++i) widen(W.row(r0 + i) + j0, count, wide + i * kDepth);
                base = wide;
                ldw = kDepth;
            }
            for (Index c0 = 0; c0 < sc; c0 += kColTile) {
                const int C = static_cast<int>(std::min<Index>(kColTile, sc - c0));
                const float* x[kColTile] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
                for (int c = 0; c < C; ++c) x[c] = X + (s0 + c0 + c) * ldx + j0;
                for (Index t = 0; t < tiles; ++t) {
                    const int R = static_cast<int>(std::min<Index>(kRowTile, rows - t * kRowTile));
                    const float* w[kRowTile] = {nullptr, nullptr, nullptr, nullptr};
                    for (int r = 0; r < R; ++r) w[r] = base + (t * kRowTile + r) * ldw;
                    dot_tile_rc(R, C, w, x, count, j0 == 0, park + t * tile_park + c0 * kRowTile * kLanes);
                }
            }
        }
        for (Index t = 0; t < tiles; ++t) {
            const int R = static_cast<int>(std::min<Index>(kRowTile, rows - t * kRowTile));
            for (Index c0 = 0; c0 < sc; c0 += kColTile) {
                const int C = static_cast<int>(std::min<Index>(kColTile, sc - c0));
                const float* tile = park + t * tile_park + c0 * kRowTile * kLanes;
                for (int r = 0; r < R; ++r)
                    for (int c = 0; c < C; ++c)
                        Y[(s0 + c0 + c) * ldy + r0 + t * kRowTile + r] = reduce16(tile + (r * C + c) * kLanes);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Z = W^T Y

/// z[:, c] (V vectors of 16 rows, the last one masked by `last`) += sum over i < rows of
/// w[i * ldw + :] * yp[i * 6 + c]; starts from zero when `first`.
template <int V, int C>
PISSA_AVX512_TARGET inline void axpy_tile(const float* w, Index ldw, const float* yp, Index rows, float* z, Index ldz,
                                          __mmask16 last, bool first) {
    __m512 acc[V][C];
    PISSA_UNROLL
    for (int c = 0; c < C; ++c)
        PISSA_UNROLL
        for (int v = 0; v < V; ++v)
            acc[v][c] = first ? _mm512_setzero_ps()
                              : (v == V - 1 ? _mm512_maskz_loadu_ps(last, z + c * ldz + v * kLanes)
                                            : _mm512_loadu_ps(z + c * ldz + v * kLanes));
    for (Index i = 0; i < rows; ++i) {
        const float* wr = w + i * ldw;
        __m512 wv[V];
        PISSA_UNROLL
        for (int v = 0; v < V; ++v)
            wv[v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, wr + v * kLanes) : _mm512_loadu_ps(wr + v * kLanes);
        const float* yr = yp + i * kColTile;
        PISSA_UNROLL
        for (int c = 0; c < C; ++c) {
            const __m512 b = _mm512_set1_ps(yr[c]);
            PISSA_UNROLL
            for (int v = 0; v < V; ++v) acc[v][c] = _mm512_fmadd_ps(wv[v], b, acc[v][c]);
        }
    }
    PISSA_UNROLL
    for (int c = 0; c < C; ++c)
        PISSA_UNROLL
        for (int v = 0; v < V; ++v) {
            if (v == V - 1) _mm512_mask_storeu_ps(z + c * ldz + v * kLanes, last, acc[v][c]);
            else _mm512_storeu_ps(z + c * ldz + v * kLanes, acc[v][c]);
        }
}

template <int V>
PISSA_AVX512_TARGET inline void axpy_tile_c(int C, const float* w, Index ldw, const float* yp, Index rows, float* z,
                                            Index ldz, __mmask16 last, bool first) {
    switch (C) {
        case 1: axpy_tile<V, 1>(w, ldw, yp, rows, z, ldz, last, first); break;
        case 2: axpy_tile<V, 2>(w, ldw, yp, rows, z, ldz, last, first); break;
        case 3: axpy_tile<V, 3>(w, ldw, yp, rows, z, ldz, last, first); break;
        case 4: axpy_tile<V, 4>(w, ldw, yp, rows, z, ldz, last, first); break;
        case 5: axpy_tile<V, 5>(w, ldw, yp, rows, z, ldz, last, first); break;
        default: axpy_tile<V, 6>(w, ldw, yp, rows, z, ldz, last, first); break;
    }
}

PISSA_AVX512_TARGET inline void axpy_tile_vc(int V, int C, const float* w, Index ldw, const float* yp, Index rows,
                                             float* z, Index ldz, __mmask16 last, bool first) {
    switch (V) {
        case 1: axpy_tile_c<1>(C, w, ldw, yp, rows, z, ldz, last, first); break;
        case 2: axpy_tile_c<2>(C, w, ldw, yp, rows, z, ldz, last, first); break;
        case 3: axpy_tile_c<3>(C, w, ldw, yp, rows, z, ldz, last, first); break;
        default: axpy_tile_c<4>(C, w, ldw, yp, rows, z, ldz, last, first); break;
    }
}

/// Rows [j0, j0 + min(kStrip, n - j0)) of `Z = W^T Y`. `packed`: Y as ceil(q/6) groups of
/// `[m, 6]` row-major (zero-padded); Z col-major with leading dimension ldz; `wide`:
/// kChunkRows kStrip floats (16-bit storage only).
template <class Storage>
PISSA_AVX512_TARGET void multiply_transposed_strip(const RowMajorView<Storage>& W, const float* packed, Index q,
                                                   float* Z, Index ldz, Index j0, float* wide) {
    const Index m = W.rows, width = std::min(kStrip, W.cols - j0);
    const Index groups = (q + kColTile - 1) / kColTile;
    for (Index i0 = 0; i0 < m; i0 += kChunkRows) {
        const Index rows = std::min(kChunkRows, m - i0);
        const float* w;
        Index ldw;
        if constexpr (std::is_same_v<Storage, float>) {
            w = W.row(i0) + j0;
            ldw = W.stride;
        } else {
            for (Index i = 0; i < rows; ++i) widen(W.row(i0 + i) + j0, width, wide + i * kStrip);
            w = wide;
            ldw = kStrip;
        }
        for (Index v0 = 0; v0 < width; v0 += kStripVectors * kLanes) {
            const Index cols = std::min<Index>(kStripVectors * kLanes, width - v0);
            const int V = static_cast<int>((cols + kLanes - 1) / kLanes);
            const __mmask16 last = tail_mask(cols - (V - 1) * kLanes);
            for (Index g = 0; g < groups; ++g) {
                const int C = static_cast<int>(std::min<Index>(kColTile, q - g * kColTile));
                axpy_tile_vc(V, C, w + v0, ldw, packed + (g * m + i0) * kColTile, rows,
                             Z + g * kColTile * ldz + j0 + v0, ldz, last, i0 == 0);
            }
        }
    }
}

}  // namespace pissa::detail::avx512

#endif  // PISSA_HAVE_AVX512_KERNELS

/// \file detail/skinny_gemm.hpp
/// \brief The two products every decomposition is made of: `Y = W X` and `Z = W^T Y`, with `W`
/// large `[m, n]` (a row-major view in its storage dtype) and `X`, `Y` skinny (q << n columns);
/// and `Z = W^T (W Q)`, the fused power step, in one pass over W where the kernels allow.
///
/// Two kernel families, chosen at run time (detail/cpu_features.hpp): the AVX-512 kernels of
/// detail/kernels_avx512.hpp (float compute: storage float, Eigen::half, Eigen::bfloat16; W is
/// streamed once per product, 16-bit values widened a few rows at a time) and portable kernels
/// (Eigen GEMM over fixed blocks; all storage types, and double everywhere). For a bfloat16 W,
/// multiply_bf16 / multiply_transposed_bf16 round the skinny operand to bfloat16 instead and run
/// on AMX (detail/kernels_amx.hpp) or AVX512_BF16 (detail/kernels_avx512_bf16.hpp) where the CPU
/// has them: the randomized SVD's ProductPrecision.
///
/// Determinism: the work is split into blocks whose sizes do not depend on the thread count, and
/// each output element is computed by exactly one block in a fixed order, so the result has the
/// same bits with 1 or N OpenMP threads (for a given kernel family: AVX-512 and portable kernels
/// round differently).
#pragma once

#include <pissa/cancel.hpp>
#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/huge_pages.hpp>
#include <pissa/detail/kernels_amx.hpp>
#include <pissa/detail/kernels_avx512.hpp>
#include <pissa/detail/kernels_avx512_bf16.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pissa::detail {

/// Scratch memory of the products, reused across the passes of one decomposition (a
/// WeightOperator refers to one). A multi-megabyte buffer allocated per pass gets fresh pages from
/// the OS each time, a page fault per 4 KiB: 12 us each on a measured 2-core VM, i.e. ~16 ms for the
/// 5.6 MB packed Y of one `W^T Y` at 11008 x 128.
struct KernelWorkspace {
    std::vector<float> packed;          ///< the skinny operand, packed in groups of 8 columns (or transposed)
    std::vector<float> partial;         ///< multiply_gram: the sums of panel groups 1.. (group 0 sums into Z)
    std::vector<std::uint32_t> pairs;   ///< the bfloat16 products: the skinny operand as bfloat16 pairs
    std::vector<std::uint16_t> halves;  ///< the AMX `W^T Y`: Y^T in bfloat16
};

/// multiply_gram runs in one pass over W (AVX-512) up to this many columns of Q; beyond, as two
/// products, which are as fast there (4096 x 4096 float, one pass / two products, BM_multiply_gram:
/// q = 8 0.66, q = 16 0.80, q = 24 0.95, q = 32 1.05; q = 64 in one pass 1.2).
inline constexpr Index kGramMaxColumns = 24;
/// multiply_gram: panels of W are summed in at most this many groups (contiguous runs of panels,
/// one partial Z each, added in order at the end), whatever the thread count.
inline constexpr Index kGramGroups = 8;

/// Rows of W handled as one unit of work (and widened to the compute type at once).
inline constexpr Index kRowBlock = 64;
/// Columns of W handled as one unit of work in the transposed product.
inline constexpr Index kColBlock = 256;

/// Widens rows [r0, r0 + nr) x cols [c0, c0 + nc) of `W` into `out` (compute scalar).
template <class Storage, class Scalar>
void load_block(const RowMajorView<Storage>& W, Index r0, Index nr, Index c0, Index nc, RowMatrix<Scalar>& out) {
    out.resize(nr, nc);
    for (Index i = 0; i < nr; ++i) {
        const Storage* src = W.row(r0 + i) + c0;
        Scalar* dst = out.data() + i * nc;
        for (Index j = 0; j < nc; ++j) dst[j] = static_cast<Scalar>(src[j]);
    }
}

/// Portable `Y = W X`: W `[m, n]`, X `[n, q]`, Y `[m, q]` (resized).
template <class Storage, class Scalar>
void multiply_portable(const RowMajorView<Storage>& W, const Matrix<Scalar>& X, Matrix<Scalar>& Y) {
    PISSA_ASSERT(X.rows() == W.cols);
    Y.resize(W.rows, X.cols());
    const Index blocks = (W.rows + kRowBlock - 1) / kRowBlock;
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        RowMatrix<Scalar> tile;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index b = 0; b < blocks; ++b) {
            const Index r0 = b * kRowBlock, nr = std::min(kRowBlock, W.rows - r0);
            if constexpr (std::is_same_v<Storage, Scalar>) {
                Eigen::Map<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>> block(W.row(r0), nr, W.cols,
                                                                                   Eigen::OuterStride<>(W.stride));
                Y.middleRows(r0, nr).noalias() = block * X;
            } else {
                load_block(W, r0, nr, 0, W.cols, tile);
                Y.middleRows(r0, nr).noalias() = tile * X;
            }
        }
    }
}

/// Portable `Z = W^T Y`: W `[m, n]`, Y `[m, q]`, Z `[n, q]` (resized). Each block of W's columns
/// owns its rows of Z and sums over all rows of W in order.
template <class Storage, class Scalar>
void multiply_transposed_portable(const RowMajorView<Storage>& W, const Matrix<Scalar>& Y, Matrix<Scalar>& Z) {
    PISSA_ASSERT(Y.rows() == W.rows);
    Z.resize(W.cols, Y.cols());
    const Index blocks = (W.cols + kColBlock - 1) / kColBlock;
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        RowMatrix<Scalar> tile;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index b = 0; b < blocks; ++b) {
            const Index c0 = b * kColBlock, nc = std::min(kColBlock, W.cols - c0);
            auto z = Z.middleRows(c0, nc);
            z.setZero();
            for (Index r0 = 0; r0 < W.rows; r0 += kRowBlock) {
                const Index nr = std::min(kRowBlock, W.rows - r0);
                load_block(W, r0, nr, c0, nc, tile);
                z.noalias() += tile.transpose() * Y.middleRows(r0, nr);
            }
        }
    }
}

#if PISSA_HAVE_AVX512_KERNELS
using avx512::aligned_64;

/// `src [rows, q]` (col-major, leading dimension ld) as ceil(q/8) groups of `[rows, 8]` row-major,
/// zero-padded: the 8 values of a row of a group are adjacent (the broadcasts of the kernels).
inline void pack_groups(const float* src, Index ld, Index rows, Index q, std::vector<float>& out) {
    const Index groups = (q + avx512::kGroup - 1) / avx512::kGroup;
    out.assign(static_cast<std::size_t>(groups * rows * avx512::kGroup), 0.0f);
    for (Index g = 0; g < groups; ++g) {
        const Index c0 = g * avx512::kGroup, cols = std::min<Index>(avx512::kGroup, q - c0);
        float* dst = out.data() + g * rows * avx512::kGroup;
        for (Index c = 0; c < cols; ++c) {
            const float* column = src + (c0 + c) * ld;
            for (Index i = 0; i < rows; ++i) dst[i * avx512::kGroup + c] = column[i];
        }
    }
}

/// `src [rows, q]` (col-major, leading dimension ld) as the blocks of avx512::WideBlocks, each
/// `[rows, width]` row-major and zero-padded, one after the other; 64-byte aligned in `out`.
inline const float* pack_wide_blocks(const float* src, Index ld, Index rows, Index q, std::vector<float>& out) {
    const avx512::WideBlocks blocks{q};
    out.assign(static_cast<std::size_t>(rows * blocks.padded() + avx512::kLanes), 0.0f);
    float* base = aligned_64(out.data());
    for (Index b = 0; b < blocks.count(); ++b) {
        const Index c0 = b * avx512::kWideBlock, width = blocks.width(b), cols = std::min(width, q - c0);
        float* dst = base + rows * avx512::kWideBlock * b;
        for (Index c = 0; c < cols; ++c) {
            const float* column = src + (c0 + c) * ld;
            for (Index i = 0; i < rows; ++i) dst[i * width + c] = column[i];
        }
    }
    return base;
}

/// AVX-512 `Y = W X` (float compute); work unit: a panel of kPanelRows rows of W, static schedule.
/// From wide_min_columns columns of X on, the broadcast kernel (multiply_panel_wide: no transposes
/// of W; 212 vs 168 GFLOP/s on one core at q = 64, W in L2); below, the packed kernel.
template <class Storage>
void multiply_avx512(const RowMajorView<Storage>& W, const Matrix<float>& X, Matrix<float>& Y,
                     KernelWorkspace& workspace) {
    const Index m = W.rows, n = W.cols, q = X.cols();
    const Index units = (m + avx512::kPanelRows - 1) / avx512::kPanelRows;
    if (q >= avx512::wide_min_columns<Storage>()) {
        const float* xpack = pack_wide_blocks(X.data(), X.rows(), n, q, workspace.packed);
        const Index ldp = avx512::WideBlocks{q}.padded();
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
        {
            std::vector<float> part(static_cast<std::size_t>(avx512::kPanelRows * ldp + avx512::kLanes));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (Index u = 0; u < units; ++u)
                avx512::multiply_panel_wide(W, xpack, q, Y.data(), Y.rows(), u * avx512::kPanelRows,
                                            aligned_64(part.data()));
        }
        return;
    }
    std::vector<float>& xpack = workspace.packed;
    pack_groups(X.data(), X.rows(), n, q, xpack);
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
    {
        std::vector<float> panel(static_cast<std::size_t>(avx512::kPanelDepth * avx512::kPanelRows + avx512::kLanes));
        float* P = aligned_64(panel.data());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index u = 0; u < units; ++u)
            avx512::multiply_panel(W, xpack.data(), q, Y.data(), Y.rows(), u * avx512::kPanelRows, P);
    }
}

/// AVX-512 `Z = W^T Y` (float compute); work unit: a strip of kStrip columns of W (rows of Z),
/// static schedule.
template <class Storage>
void multiply_transposed_avx512(const RowMajorView<Storage>& W, const Matrix<float>& Y, Matrix<float>& Z,
                                KernelWorkspace& workspace) {
    const Index m = W.rows, n = W.cols, q = Y.cols();
    const avx512::StripGrid grid{n, avx512::StripGrid::shift_for(W)};
    const Index units = grid.strips();
    std::vector<float>& ypack = workspace.packed;
    pack_groups(Y.data(), Y.rows(), m, q, ypack);
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
    {
        std::vector<float> tile(static_cast<std::size_t>(avx512::kChunkRows * avx512::kTileWidth + avx512::kLanes));
        float* T = aligned_64(tile.data());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index u = 0; u < units; ++u)
            avx512::multiply_transposed_strip(W, ypack.data(), q, Z.data(), Z.rows(), grid, u, T);
    }
}

/// AVX-512 `Z = W^T (W Q)` in one pass over W (float compute), q <= kGramMaxColumns. The panels
/// of kGramRows rows are cut into kGramGroups contiguous groups; a thread sums a group's panels in
/// order into its own partial Z (group 0 into Z), and the partials are added to Z in group order:
/// the bits do not depend on the thread count.
template <class Storage>
void multiply_gram_avx512(const RowMajorView<Storage>& W, const Matrix<float>& Q, Matrix<float>& Z,
                          KernelWorkspace& workspace) {
    const Index m = W.rows, n = W.cols, q = Q.cols();
    const Index padded_q = (q + avx512::kGroup - 1) / avx512::kGroup * avx512::kGroup;
    // Q^T, rows zero-padded to a multiple of 16 columns; the extra 16 keep its rows (and so the 8
    // streams of a dot_tile) off the same L1 sets when n is a multiple of 1024.
    const Index ldq = (n + avx512::kLanes - 1) / avx512::kLanes * avx512::kLanes + avx512::kLanes;
    std::vector<float>& qt_buffer = workspace.packed;
    qt_buffer.assign(static_cast<std::size_t>(padded_q * ldq + avx512::kLanes), 0.0f);
    float* qt = aligned_64(qt_buffer.data());
    for (Index c = 0; c < q; ++c)
        for (Index k = 0; k < n; ++k) qt[c * ldq + k] = Q(k, c);
    const Index panels = (m + avx512::kGramRows - 1) / avx512::kGramRows;
    const Index groups = std::min(panels, kGramGroups);
    workspace.partial.resize(static_cast<std::size_t>((groups - 1) * n * q));
    const avx512::StripGrid grid{n, avx512::StripGrid::shift_for(W)};
#ifdef _OPENMP
#pragma omp parallel if (groups > 1)
#endif
    {
        std::vector<float> ypack(static_cast<std::size_t>(padded_q * avx512::kGramRows));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index g = 0; g < groups; ++g) {
            float* sum = g == 0 ? Z.data() : workspace.partial.data() + (g - 1) * n * q;
            const Index first = g * panels / groups, last = (g + 1) * panels / groups;
            for (Index p = first; p < last; ++p)
                avx512::multiply_gram_panel(W, qt, ldq, q, sum, n, grid, p * avx512::kGramRows, p == first,
                                            ypack.data());
        }
        // Z += the partials of groups 1.., in group order, element by element.
        const Index size = n * q, chunk = 4096;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index e0 = 0; e0 < size; e0 += chunk) {
            const Index e1 = std::min(size, e0 + chunk);
            float* z = Z.data();
            for (Index g = 1; g < groups; ++g) {
                const float* part = workspace.partial.data() + (g - 1) * size;
                for (Index e = e0; e < e1; ++e) z[e] += part[e];
            }
        }
    }
}

/// `src [rows, q]` (col-major, leading dimension ld) as bfloat16 pairs in groups of `Group`
/// columns, each `pairs` >= ceil(rows / 2) long (avx512_bf16::pack_pair_groups), zero-padded,
/// 64-byte aligned in `out`.
template <int Group>
const std::uint32_t* pack_pairs(const float* src, Index ld, Index rows, Index q, Index pairs,
                                std::vector<std::uint32_t>& out) {
    const Index groups = (q + Group - 1) / Group;
    out.assign(static_cast<std::size_t>(groups * pairs * Group + avx512::kLanes), 0u);
    std::uint32_t* base = aligned_64(out.data());
    avx512_bf16::pack_pair_groups<Group>(src, ld, rows, q, pairs, base);
    return base;
}

#if PISSA_HAVE_AMX_KERNELS
/// AMX `Y = W X` for a bfloat16 W, X rounded to bfloat16 (kernels_amx.hpp); work unit: a panel of
/// amx::kPanelRows rows of W, static schedule.
inline void multiply_amx(const RowMajorView<Eigen::bfloat16>& W, const Matrix<float>& X, Matrix<float>& Y,
                         KernelWorkspace& workspace) {
    const Index n = W.cols, q = X.cols(), pairs = amx::padded_depth(n) / 2;
    const std::uint32_t* xpack = pack_pairs<int(amx::kTileRows)>(X.data(), X.rows(), n, q, pairs, workspace.pairs);
    const Index units = (W.rows + amx::kPanelRows - 1) / amx::kPanelRows;
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
    {
        const amx::TileScope tiles;
        amx::PanelScratch scratch;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index u = 0; u < units; ++u)
            amx::multiply_panel(W, xpack, pairs, q, Y.data(), Y.rows(), u * amx::kPanelRows, scratch);
    }
}

/// Runs `strip(u, scratch)` for the strips u < units of an AMX `Z = W^T Y` (static schedule),
/// each thread with its tile configuration and a `Scratch` of its own.
template <class Scratch, class Strip>
void amx_strips(Index units, const Strip& strip) {
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
    {
        const amx::TileScope tiles;
        Scratch scratch;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index u = 0; u < units; ++u) strip(u, scratch);
    }
}

/// AMX `Z = W^T Y` for a bfloat16 W, Y rounded to bfloat16 (kernels_amx.hpp): W read in place up
/// to 16 columns of Y, packed as row pairs beyond; work unit: a strip of columns of W.
inline void multiply_transposed_amx(const RowMajorView<Eigen::bfloat16>& W, const Matrix<float>& Y, Matrix<float>& Z,
                                    KernelWorkspace& workspace) {
    const Index m = W.rows, q = Y.cols();
    if (q <= amx::kTileRows) {
        const Index ld = (m + amx::kTileRows - 1) / amx::kTileRows * amx::kTileRows;
        workspace.pairs.assign(static_cast<std::size_t>(amx::column_groups(2 * q) * amx::kTileRows * ld + 16), 0u);
        std::uint32_t* yd = aligned_64(workspace.pairs.data());
        amx::pack_parity_rows(Y.data(), Y.rows(), m, q, ld, yd);
#ifdef _OPENMP
        const Index threads = omp_in_parallel() ? 1 : omp_get_max_threads();
#else
        const Index threads = 1;
#endif
        const Index strip = amx::direct_strip_width(W.cols, threads);
        amx_strips<amx::DirectScratch>((W.cols + strip - 1) / strip, [&](Index u, amx::DirectScratch& scratch) {
            amx::multiply_transposed_direct(W, yd, ld, q, Z.data(), Z.rows(), u * strip, strip, scratch);
        });
        return;
    }
    const Index units = (W.cols + amx::kStripCols - 1) / amx::kStripCols;
    const Index ldyt = amx::padded_depth(m);
    workspace.halves.assign(static_cast<std::size_t>(amx::column_groups(q) * amx::kTileRows * ldyt + 32), 0);
    std::uint16_t* yt = aligned_64(workspace.halves.data());
    amx::pack_transposed(Y.data(), Y.rows(), m, q, ldyt, yt);
    amx_strips<amx::StripScratch>(units, [&](Index u, amx::StripScratch& scratch) {
        amx::multiply_transposed_strip(W, yt, ldyt, q, Z.data(), Z.rows(), u * amx::kStripCols, scratch);
    });
}
#endif

/// AVX512_BF16 `Y = W X` for a bfloat16 W, X rounded to bfloat16; work unit: a panel of
/// kPanelRows rows of W, static schedule.
inline void multiply_bf16_avx512(const RowMajorView<Eigen::bfloat16>& W, const Matrix<float>& X, Matrix<float>& Y,
                                 KernelWorkspace& workspace) {
    const Index n = W.cols, q = X.cols();
    const Index units = (W.rows + avx512::kPanelRows - 1) / avx512::kPanelRows;
    const std::uint32_t* xpack = pack_pairs<avx512::kGroup>(X.data(), X.rows(), n, q, (n + 1) / 2, workspace.pairs);
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
    {
        std::vector<std::uint32_t> panel(
            static_cast<std::size_t>(avx512_bf16::kPairDepth * avx512::kPanelRows + avx512::kLanes));
        std::uint32_t* P = aligned_64(panel.data());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index u = 0; u < units; ++u)
            avx512_bf16::multiply_pair_panel(W, xpack, q, Y.data(), Y.rows(), u * avx512::kPanelRows, P);
    }
}

/// AVX512_BF16 `Z = W^T Y` for a bfloat16 W, Y rounded to bfloat16; work unit: a strip of
/// kStrip columns of W (rows of Z), static schedule.
inline void multiply_transposed_bf16_avx512(const RowMajorView<Eigen::bfloat16>& W, const Matrix<float>& Y,
                                            Matrix<float>& Z, KernelWorkspace& workspace) {
    const Index m = W.rows, q = Y.cols();
    const avx512::StripGrid grid{W.cols, avx512::StripGrid::shift_for(W)};
    const Index units = grid.strips();
    const std::uint32_t* ypack = pack_pairs<avx512::kGroup>(Y.data(), Y.rows(), m, q, (m + 1) / 2, workspace.pairs);
#ifdef _OPENMP
#pragma omp parallel if (units > 1)
#endif
    {
        std::vector<std::uint32_t> tile(
            static_cast<std::size_t>(avx512_bf16::kPairChunk * avx512::kTileWidth + avx512::kLanes));
        std::uint32_t* T = aligned_64(tile.data());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Index u = 0; u < units; ++u)
            avx512_bf16::multiply_transposed_pair_strip(W, ypack, q, Z.data(), Z.rows(), grid, u, T);
    }
}
#endif

/// Whether the AVX-512 kernels serve this (storage, compute scalar) pair right now.
template <class Storage, class Scalar>
bool use_avx512_kernels() {
    if constexpr (std::is_same_v<Scalar, float> && !std::is_same_v<Storage, double>) {
        return PISSA_HAVE_AVX512_KERNELS && active_kernel_isa() == KernelIsa::avx512;
    } else {
        return false;
    }
}

/// `Y = W X`: W `[m, n]`, X `[n, q]`, Y `[m, q]` (resized).
template <class Storage, class Scalar>
void multiply(const RowMajorView<Storage>& W, const Matrix<Scalar>& X, Matrix<Scalar>& Y,
              [[maybe_unused]] KernelWorkspace& workspace) {
    PISSA_ASSERT(X.rows() == W.cols);
    PISSA_ASSERT(X.data() != Y.data() || X.size() == 0);
#if PISSA_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<Scalar, float> && !std::is_same_v<Storage, double>) {
        if (use_avx512_kernels<Storage, Scalar>()) {
            Y.resize(W.rows, X.cols());
            if (W.cols == 0) Y.setZero();
            else if (Y.size() > 0) multiply_avx512(W, X, Y, workspace);
            return;
        }
    }
#endif
    multiply_portable(W, X, Y);
}

/// `Y = W X` with a workspace of its own (one-off products).
template <class Storage, class Scalar>
void multiply(const RowMajorView<Storage>& W, const Matrix<Scalar>& X, Matrix<Scalar>& Y) {
    KernelWorkspace workspace;
    multiply(W, X, Y, workspace);
}

/// `Z = W^T Y`: W `[m, n]`, Y `[m, q]`, Z `[n, q]` (resized).
template <class Storage, class Scalar>
void multiply_transposed(const RowMajorView<Storage>& W, const Matrix<Scalar>& Y, Matrix<Scalar>& Z,
                         [[maybe_unused]] KernelWorkspace& workspace) {
    PISSA_ASSERT(Y.rows() == W.rows);
    PISSA_ASSERT(Y.data() != Z.data() || Y.size() == 0);
#if PISSA_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<Scalar, float> && !std::is_same_v<Storage, double>) {
        if (use_avx512_kernels<Storage, Scalar>()) {
            Z.resize(W.cols, Y.cols());
            if (W.rows == 0) Z.setZero();
            else if (Z.size() > 0) multiply_transposed_avx512(W, Y, Z, workspace);
            return;
        }
    }
#endif
    multiply_transposed_portable(W, Y, Z);
}

/// `Z = W^T Y` with a workspace of its own (one-off products).
template <class Storage, class Scalar>
void multiply_transposed(const RowMajorView<Storage>& W, const Matrix<Scalar>& Y, Matrix<Scalar>& Z) {
    KernelWorkspace workspace;
    multiply_transposed(W, Y, Z, workspace);
}

/// Whether the bfloat16 products (kernels_avx512_bf16.hpp) can serve this (storage, compute
/// scalar) pair right now: a bfloat16 W, float compute, the AVX-512 kernels active and a CPU with
/// AVX512_BF16.
template <class Storage, class Scalar>
bool bf16_products_available() {
    if constexpr (std::is_same_v<Storage, Eigen::bfloat16> && std::is_same_v<Scalar, float>) {
        return use_avx512_kernels<Storage, Scalar>() && cpu_supports_bf16_products();
    } else {
        return false;
    }
}

/// `Y = W X` with the skinny operand rounded to bfloat16 and float32 accumulation where
/// bf16_products_available(), otherwise multiply().
template <class Storage, class Scalar>
void multiply_bf16(const RowMajorView<Storage>& W, const Matrix<Scalar>& X, Matrix<Scalar>& Y,
                   KernelWorkspace& workspace) {
#if PISSA_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<Storage, Eigen::bfloat16> && std::is_same_v<Scalar, float>) {
        if (bf16_products_available<Storage, Scalar>()) {
            PISSA_ASSERT(X.rows() == W.cols);
            Y.resize(W.rows, X.cols());
            if (W.cols == 0) Y.setZero();
            else if (Y.size() > 0 && cpu_supports_amx_bf16()) multiply_amx(W, X, Y, workspace);
            else if (Y.size() > 0) multiply_bf16_avx512(W, X, Y, workspace);
            return;
        }
    }
#endif
    multiply(W, X, Y, workspace);
}

/// `Z = W^T Y` with the skinny operand rounded to bfloat16 and float32 accumulation where
/// bf16_products_available(), otherwise multiply_transposed().
template <class Storage, class Scalar>
void multiply_transposed_bf16(const RowMajorView<Storage>& W, const Matrix<Scalar>& Y, Matrix<Scalar>& Z,
                              KernelWorkspace& workspace) {
#if PISSA_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<Storage, Eigen::bfloat16> && std::is_same_v<Scalar, float>) {
        if (bf16_products_available<Storage, Scalar>()) {
            PISSA_ASSERT(Y.rows() == W.rows);
            Z.resize(W.cols, Y.cols());
            if (W.rows == 0) Z.setZero();
            else if (Z.size() > 0 && cpu_supports_amx_bf16()) multiply_transposed_amx(W, Y, Z, workspace);
            else if (Z.size() > 0) multiply_transposed_bf16_avx512(W, Y, Z, workspace);
            return;
        }
    }
#endif
    multiply_transposed(W, Y, Z, workspace);
}

/// A float32 W rounded to bfloat16 (to nearest even), for the products that ProductPrecision lets
/// round W: half W's bytes per pass, and the bfloat16 kernels (AMX) multiply it. Kept between the
/// decompositions of a reused RandomizedSvd, so same-shaped weights reuse the memory.
struct RoundedWeight {
    std::unique_ptr<std::uint16_t[]> storage;  ///< uninitialised until written (no page touched twice)
    std::size_t capacity = 0;
    PreparedWeight<Eigen::bfloat16> weight;  ///< views `storage`: W row-major, whatever the source's layout
};

/// Rounds W into `out` (W row-major, also from a column-major source: the products then run the
/// same kernels in the same roles for both layouts, which give the same bits) on the AVX-512
/// kernels, which the bfloat16 products need (bf16_products_available). Returns false, leaving
/// `out` unusable, where a value is not finite in bfloat16: W has a NaN or Inf, or a float above
/// bfloat16's largest finite value (3.39e38), which the float32 products still handle.
inline bool round_weight_bf16([[maybe_unused]] const PreparedWeight<float>& W, [[maybe_unused]] RoundedWeight& out) {
#if PISSA_HAVE_AVX512_KERNELS
    PISSA_ASSERT(active_kernel_isa() == KernelIsa::avx512);
    const RowMajorView<float>& v = W.view;
    const std::size_t size = std::size_t(v.rows) * std::size_t(v.cols);
    if (size > out.capacity) {
        out.storage.reset();
        out.storage.reset(new std::uint16_t[size]);
        out.capacity = size;
        advise_huge_pages(out.storage.get(), sizeof(std::uint16_t) * size);
    }
    auto* data = reinterpret_cast<Eigen::bfloat16*>(out.storage.get());
    out.weight.transposed = false;
    bool finite = true;
    if (W.transposed) {  // v is W^T: its columns are W's rows
        out.weight.view = {data, v.cols, v.rows, v.rows};
        const Index blocks = (v.cols + avx512::kLanes - 1) / avx512::kLanes;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(&& : finite) if (size > (std::size_t(1) << 16))
#endif
        for (Index b = 0; b < blocks; ++b) {
            const Index c0 = b * avx512::kLanes, count = std::min(avx512::kLanes, v.cols - c0);
            finite = avx512::round_to_bf16_transposed(v.data, v.stride, v.rows, c0, count, data, v.rows) && finite;
        }
        return finite;
    }
    out.weight.view = {data, v.rows, v.cols, v.cols};
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(&& : finite) if (size > (std::size_t(1) << 16))
#endif
    for (Index i = 0; i < v.rows; ++i) finite = avx512::round_to_bf16(v.row(i), data + i * v.cols, v.cols) && finite;
    return finite;
#else
    return false;
#endif
}

/// `Z = W^T (W Q)`: W `[m, n]`, Q `[n, q]`, Z `[n, q]` (resized); `Y` `[m, q]` is scratch. One pass
/// over W with the AVX-512 kernels for q <= kGramMaxColumns (each panel of W multiplied by Q, then
/// by its transpose while it is in the L2 cache); otherwise the two products `Y = W Q`,
/// `Z = W^T Y`. The two ways round differently.
template <class Storage, class Scalar>
void multiply_gram(const RowMajorView<Storage>& W, const Matrix<Scalar>& Q, Matrix<Scalar>& Z, Matrix<Scalar>& Y,
                   KernelWorkspace& workspace) {
    PISSA_ASSERT(Q.rows() == W.cols);
    PISSA_ASSERT(Q.data() != Z.data() || Q.size() == 0);
#if PISSA_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<Scalar, float> && !std::is_same_v<Storage, double>) {
        if (use_avx512_kernels<Storage, Scalar>() && Q.cols() <= kGramMaxColumns) {
            Z.resize(W.cols, Q.cols());
            if (W.rows == 0) Z.setZero();
            else if (Z.size() > 0) multiply_gram_avx512(W, Q, Z, workspace);
            return;
        }
    }
#endif
    multiply(W, Q, Y, workspace);
    multiply_transposed(W, Y, Z, workspace);
}

/// `W` as an operator for the decompositions: `apply` is `W X`, `apply_transposed` is `W^T Y`,
/// whichever way round the prepared view stores it (a column-major W is viewed as row-major W^T).
/// Each pass over W first checks for a cancellation request (cancel.hpp).
template <class Storage>
struct WeightOperator {
    const PreparedWeight<Storage>& weight;
    KernelWorkspace& workspace;  ///< reused by every product of the decomposition
    /// The products round the skinny operand to bfloat16 (multiply_bf16) where the kernels allow;
    /// otherwise they are float32 products of the widened W.
    bool bf16_products = false;

    Index rows() const { return weight.transposed ? weight.view.cols : weight.view.rows; }
    Index cols() const { return weight.transposed ? weight.view.rows : weight.view.cols; }

    /// `Y = W X`, X `[cols, q]`.
    template <class Scalar>
    void apply(const Matrix<Scalar>& X, Matrix<Scalar>& Y) const {
        throw_if_cancelled();
        if (bf16_products) {
            if (weight.transposed) multiply_transposed_bf16(weight.view, X, Y, workspace);
            else multiply_bf16(weight.view, X, Y, workspace);
        } else if (weight.transposed) {
            multiply_transposed(weight.view, X, Y, workspace);
        } else {
            multiply(weight.view, X, Y, workspace);
        }
    }
    /// `Z = W^T Y`, Y `[rows, q]`.
    template <class Scalar>
    void apply_transposed(const Matrix<Scalar>& Y, Matrix<Scalar>& Z) const {
        throw_if_cancelled();
        if (bf16_products) {
            if (weight.transposed) multiply_bf16(weight.view, Y, Z, workspace);
            else multiply_transposed_bf16(weight.view, Y, Z, workspace);
        } else if (weight.transposed) {
            multiply(weight.view, Y, Z, workspace);
        } else {
            multiply_transposed(weight.view, Y, Z, workspace);
        }
    }
    /// `Z = W^T (W Q)`, Q `[cols, q]`; `Y` `[rows, q]` is scratch. In one pass over W when the view
    /// is W itself (multiply_gram); a transposed view (column-major W) and the bfloat16 products
    /// take the two products.
    template <class Scalar>
    void apply_gram(const Matrix<Scalar>& Q, Matrix<Scalar>& Z, Matrix<Scalar>& Y) const {
        throw_if_cancelled();
        if (weight.transposed || bf16_products) {
            apply(Q, Y);
            apply_transposed(Y, Z);
        } else {
            multiply_gram(weight.view, Q, Z, Y, workspace);
        }
    }
};

}  // namespace pissa::detail

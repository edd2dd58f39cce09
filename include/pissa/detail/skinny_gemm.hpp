/// \file detail/skinny_gemm.hpp
/// \brief The two products every decomposition is made of: `Y = W X` and `Z = W^T Y`, with `W`
/// large `[m, n]` (a row-major view in its storage dtype) and `X`, `Y` skinny (q << n columns).
///
/// Determinism: the work is split into blocks whose sizes do not depend on the thread count, and
/// each output element is computed by exactly one block in a fixed order, so the result has the
/// same bits with 1 or N OpenMP threads.
#pragma once

#include <pissa/detail/weight_view.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <algorithm>

namespace pissa::detail {

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

/// `Y = W X`: W `[m, n]`, X `[n, q]`, Y `[m, q]` (resized).
template <class Storage, class Scalar>
void multiply(const RowMajorView<Storage>& W, const Matrix<Scalar>& X, Matrix<Scalar>& Y) {
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

/// `Z = W^T Y`: W `[m, n]`, Y `[m, q]`, Z `[n, q]` (resized). Each block of W's columns owns its
/// rows of Z and sums over all rows of W in order.
template <class Storage, class Scalar>
void multiply_transposed(const RowMajorView<Storage>& W, const Matrix<Scalar>& Y, Matrix<Scalar>& Z) {
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

/// `W` as an operator for the decompositions: `apply` is `W X`, `apply_transposed` is `W^T Y`,
/// whichever way round the prepared view stores it (a column-major W is viewed as row-major W^T).
template <class Storage>
struct WeightOperator {
    const PreparedWeight<Storage>& weight;

    Index rows() const { return weight.transposed ? weight.view.cols : weight.view.rows; }
    Index cols() const { return weight.transposed ? weight.view.rows : weight.view.cols; }

    /// `Y = W X`, X `[cols, q]`.
    template <class Scalar>
    void apply(const Matrix<Scalar>& X, Matrix<Scalar>& Y) const {
        if (weight.transposed) multiply_transposed(weight.view, X, Y);
        else multiply(weight.view, X, Y);
    }
    /// `Z = W^T Y`, Y `[rows, q]`.
    template <class Scalar>
    void apply_transposed(const Matrix<Scalar>& Y, Matrix<Scalar>& Z) const {
        if (weight.transposed) multiply(weight.view, Y, Z);
        else multiply_transposed(weight.view, Y, Z);
    }
};

}  // namespace pissa::detail

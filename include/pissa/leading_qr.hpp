/// \file leading_qr.hpp
/// \brief The leading part of a QR decomposition, `W ≈ Q_r R_r`: what OLoRA starts an adapter from.
///
/// With the thin QR `W = Q R` (`W [m, n]`, Q orthonormal columns, R upper trapezoidal), column i of
/// Q depends only on W's first i + 1 columns, and `R = Q^T W`. So the first r columns of Q are the
/// QR of the panel `W[:, :r]` (Householder, O(m r^2)) and the first r rows of R are `Q_r^T W`
/// (one O(m n r) product): no decomposition of all of W, unlike a full QR (O(m n min(m, n))).
/// `Q_r R_r` is the projection of W onto the span of its first r columns.
///
/// Sign convention: `diag(R_r) >= 0` (each pair (q_i, row i of R) negated when needed), the
/// decomposition being unique under it when W's first r columns are independent. LAPACK's
/// Householder QR (torch.linalg.qr, peft's olora) does not fix signs, so its factors may differ
/// from these by the signs of pairs; `Q_r R_r` is the same.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>
#include <Eigen/QR>

#include <algorithm>
#include <cmath>

namespace pissa {

/// `Q [m, r]` with orthonormal columns and `R [r, n] = Q^T W` with a non-negative diagonal.
template <class Scalar>
struct LeadingQr {
    Matrix<Scalar> Q;
    Matrix<Scalar> R;
};

/// The first r columns of Q and rows of R of `W = Q R` (see the file comment), computed in
/// `compute_scalar_t` of W's scalar (float32 for 16-bit storage, as peft's olora).
/// \param W  any Eigen dense expression (a Map over a checkpoint's bf16 buffer, a transpose, ...);
///           it is read in row blocks, never copied whole.
/// \param rank  r, 1 <= r <= min(m, n).
/// \throws pissa::invalid_argument for rank outside [1, min(m, n)], an empty W or a non-finite
///         entry (naming its row and column); pissa::numerical_error if a finite W overflows Q^T W.
template <class Derived>
LeadingQr<compute_scalar_t<typename Derived::Scalar>> leading_qr(const Eigen::MatrixBase<Derived>& W, Index rank) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    const Index m = W.rows(), n = W.cols();
    detail::require(m > 0 && n > 0, "leading_qr: the weight matrix is empty (", m, " x ", n, ")");
    detail::require(rank >= 1 && rank <= std::min(m, n),
                    "leading_qr: rank must satisfy 1 <= r <= min(m, n) = ", std::min(m, n), " for a ", m, " x ", n,
                    " matrix, got r = ", rank);
    LeadingQr<Scalar> result;
    const Matrix<Scalar> panel = W.leftCols(rank).template cast<Scalar>();
    const Eigen::HouseholderQR<Matrix<Scalar>> qr(panel);
    result.Q = qr.householderQ() * Matrix<Scalar>::Identity(m, rank);
    // R_r = Q_r^T W, accumulated over row blocks so that a 16-bit W is widened a block at a time.
    result.R = Matrix<Scalar>::Zero(rank, n);
    const Index block = 256;
    for (Index r0 = 0; r0 < m; r0 += block) {
        const Index rows = std::min(block, m - r0);
        const Matrix<Scalar> slice = W.middleRows(r0, rows).template cast<Scalar>();
        result.R.noalias() += result.Q.middleRows(r0, rows).transpose() * slice;
    }
    // A NaN or infinity anywhere in W reaches R (each column of R sums a column of W against Q), so
    // W is scanned, to name the entry, only when R is not finite.
    if (!result.R.allFinite() || !result.Q.allFinite()) {
        for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < n; ++j)
                detail::require(std::isfinite(static_cast<double>(W(i, j))),
                                "leading_qr: the weight matrix contains a non-finite value (",
                                static_cast<double>(W(i, j)), ") at row ", i, ", column ", j);
        throw numerical_error("leading_qr: Q^T W overflowed the compute type; rescale W");
    }
    for (Index i = 0; i < rank; ++i) {
        result.R.row(i).head(i).setZero();  // exactly zero below the diagonal, as R is
        if (result.R(i, i) < 0) {
            result.Q.col(i) = -result.Q.col(i);
            result.R.row(i) = -result.R.row(i);
        }
    }
    return result;
}

}  // namespace pissa

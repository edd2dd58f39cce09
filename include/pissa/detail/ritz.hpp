/// \file detail/ritz.hpp
/// \brief The last step of both iterative SVDs: singular triplets of `W` restricted to a subspace.
///
/// Given an orthonormal basis `K [n, w]` and its image `P = W K [m, w]` (m >= w), the thin QR
/// `P = Qp Rp` and the SVD of the small `Rp = Ur diag(S) Vr^T` give `W (K Vr) = (Qp Ur) diag(S)`:
/// the Rayleigh-Ritz triplets. Going through the QR costs O(m w^2) + O(w^3) instead of a
/// bidiagonalisation of the whole tall P (about 4x cheaper at w = 128).
#pragma once

#include <pissa/detail/serial_eigen.hpp>
#include <pissa/detail/validate.hpp>
#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

namespace pissa::detail {

/// Rayleigh-Ritz triplets: `U = (Qp Ur)[:, :keep_u]` `[m, keep_u]`, all w singular values `S`
/// (descending) and `V = K Vr[:, :keep_v]` `[n, keep_v]`. Runs serially (see serial_eigen.hpp).
/// \throws pissa::numerical_error naming `what` when the small SVD fails or P is not finite.
template <class Scalar>
void ritz_triplets(const Matrix<Scalar>& basis, const Matrix<Scalar>& image, Index keep_u, Index keep_v,
                   const char* what, Matrix<Scalar>& U, Vector<Scalar>& S, Matrix<Scalar>& V) {
    const Index m = image.rows(), w = image.cols();
    PISSA_ASSERT(m >= w && basis.cols() == w && keep_u <= w && keep_v <= w);
    run_serial_eigen([&] {
        Eigen::HouseholderQR<Matrix<Scalar>> qr(image);
        const Matrix<Scalar> R = qr.matrixQR().topRows(w).template triangularView<Eigen::Upper>();
        Eigen::BDCSVD<Matrix<Scalar>> small(R, Eigen::ComputeFullU | Eigen::ComputeFullV);
        if (small.info() != Eigen::Success || !R.allFinite())
            throw numerical_error(concat(what, ": the small SVD of the projected matrix [", m, " x ", w,
                                         "] failed (non-finite values from an overflow in W?)"));
        U.setZero(m, keep_u);
        U.topRows(w) = small.matrixU().leftCols(keep_u);
        U.applyOnTheLeft(qr.householderQ());
        S = small.singularValues();
        V.noalias() = basis * small.matrixV().leftCols(keep_v);
    });
}

}  // namespace pissa::detail

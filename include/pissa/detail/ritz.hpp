/// \file detail/ritz.hpp
/// \brief The last step of both iterative SVDs: singular triplets of `W` restricted to a subspace.
///
/// Given an orthonormal basis `K [n, w]` and its image `P = W K [m, w]` (m >= w), the thin QR
/// `P = Qp Rp` and the SVD of the small `Rp = Ur diag(S) Vr^T` give `W (K Vr) = (Qp Ur) diag(S)`:
/// the Rayleigh-Ritz triplets. Going through the QR costs O(m w^2) + O(w^3) instead of a
/// bidiagonalisation of the whole tall P (about 4x cheaper at w = 128). The QR is a TallQr
/// (Householder), or for the fused power iteration CholeskyQR2 with the products `Qp Ur`, `K Vr` on
/// the skinny-product kernels.
#pragma once

#include <pissa/detail/bdcsvd.hpp>
#include <pissa/detail/cholesky_qr.hpp>
#include <pissa/detail/serial_eigen.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/tall_qr.hpp>
#include <pissa/detail/validate.hpp>
#include <pissa/errors.hpp>
#include <pissa/types.hpp>

namespace pissa::detail {

/// The SVD of the small triangular factor `R [w, w]` of `P [m, w]` into `small`.
/// \throws pissa::numerical_error naming `what` when it fails or R is not finite.
template <class Scalar>
void small_svd(const Matrix<Scalar>& R, Index m, const char* what, Eigen::BDCSVD<Matrix<Scalar>>& small) {
    small.compute(R, Eigen::ComputeFullU | Eigen::ComputeFullV);
    if (small.info() != Eigen::Success || !R.allFinite())
        throw numerical_error(concat(what, ": the small SVD of the projected matrix [", m, " x ", R.cols(),
                                     "] failed (non-finite values from an overflow in W?)"));
}

/// Rayleigh-Ritz triplets: `U = (Qp Ur)[:, :keep_u]` `[m, keep_u]`, all w singular values `S`
/// (descending) and `V = K Vr[:, :keep_v]` `[n, keep_v]`. The QR of P is a TallQr (two threads for
/// large blocks; `qr` is reused storage); the small SVD and `K Vr` run serially (serial_eigen.hpp).
/// \throws pissa::numerical_error naming `what` when the small SVD fails or P is not finite.
template <class Scalar>
void ritz_triplets(const Matrix<Scalar>& basis, const Matrix<Scalar>& image, Index keep_u, Index keep_v,
                   const char* what, Matrix<Scalar>& U, Vector<Scalar>& S, Matrix<Scalar>& V, TallQr<Scalar>& qr) {
    const Index m = image.rows();
    PISSA_ASSERT(m >= image.cols() && basis.cols() == image.cols() && keep_u <= image.cols() && keep_v <= image.cols());
    qr.factor(image);
    Eigen::BDCSVD<Matrix<Scalar>> small;
    run_serial_eigen([&] {
        small_svd<Scalar>(qr.r(), m, what, small);
        S = small.singularValues();
        V.noalias() = basis * small.matrixV().leftCols(keep_v);
    });
    qr.apply_q(small.matrixU().leftCols(keep_u), U);
}

/// ritz_triplets with the QR of P by CholeskyQR2 (`cholesky`, falling back to `qr`; P is
/// overwritten by its orthonormal factor Qp) and the products `Qp Ur`, `K Vr` by the skinny-product
/// kernels: for the fused power iteration, where the level-3 steps outrun Householder QR.
template <class Scalar>
void ritz_triplets(const Matrix<Scalar>& basis, Matrix<Scalar>& image, Index keep_u, Index keep_v, const char* what,
                   Matrix<Scalar>& U, Vector<Scalar>& S, Matrix<Scalar>& V, CholeskyQr2<Scalar>& cholesky,
                   TallQr<Scalar>& qr, KernelWorkspace& workspace) {
    const Index m = image.rows(), w = image.cols();
    PISSA_ASSERT(m >= w && basis.cols() == w && keep_u <= w && keep_v <= w);
    cholesky.orthonormalize(image, qr);  // image = Qp
    Eigen::BDCSVD<Matrix<Scalar>> small;
    Matrix<Scalar> left, right;
    run_serial_eigen([&] {
        small_svd<Scalar>(cholesky.used_fallback() ? qr.r() : cholesky.r(), m, what, small);
        S = small.singularValues();
        left = small.matrixU().leftCols(keep_u);
        right = small.matrixV().leftCols(keep_v);
    });
    // Qp Ur and K Vr as transposed products over the row-major views Qp^T [w, m] and K^T [w, n].
    multiply_transposed(RowMajorView<Scalar>{image.data(), w, m, m}, left, U, workspace);
    multiply_transposed(RowMajorView<Scalar>{basis.data(), w, basis.rows(), basis.rows()}, right, V, workspace);
}

/// ritz_triplets with storage of its own (one-off calls).
template <class Scalar>
void ritz_triplets(const Matrix<Scalar>& basis, const Matrix<Scalar>& image, Index keep_u, Index keep_v,
                   const char* what, Matrix<Scalar>& U, Vector<Scalar>& S, Matrix<Scalar>& V) {
    TallQr<Scalar> qr;
    ritz_triplets(basis, image, keep_u, keep_v, what, U, S, V, qr);
}

}  // namespace pissa::detail

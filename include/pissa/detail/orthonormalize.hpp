/// \file detail/orthonormalize.hpp
/// \brief Orthonormal basis of a skinny matrix's columns: CholeskyQR2 in double precision, with the
/// thin `Q` of a Householder QR (as `torch.linalg.qr(X).Q` returns it in torch.svd_lowrank) as the
/// fallback for ill-conditioned or rank-deficient input.
///
/// CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa, Yamamoto 2014): `G = X^T X = U^T U`,
/// `Q1 = X U^-1`, then once more on Q1. Gram matrices (as GEMMs) and triangular solves are level-3
/// products, about twice as fast as Householder's panels for [4096, 128] float. The first Gram
/// matrix is accumulated in double, so the first pass leaves `Q1^T Q1 = I + O(1e-16 cond(X)^2 +
/// 6e-8 cond(X))`; the second pass restores orthonormality to rounding whenever `Q1` is well
/// conditioned, which is checked (`max |Q1^T Q1 - I| <= 0.1`), as is the first factorisation (no
/// pivot below 1e-6 of the largest). Otherwise (cond(X) beyond ~1e5, rank-deficient X) the
/// Householder QR runs on the original X, as before.
/// Everything is serial Eigen code, so the result does not depend on the thread count.
#pragma once

#include <pissa/detail/serial_eigen.hpp>
#include <pissa/types.hpp>

#include <Eigen/Cholesky>
#include <Eigen/QR>

#include <type_traits>

namespace pissa::detail {

/// Replaces `X [k, q]` (k >= q) by the thin `Q` of its Householder QR.
template <class Scalar>
void orthonormalize_householder(Matrix<Scalar>& X) {
    const Index k = X.rows(), q = X.cols();
    Eigen::HouseholderQR<Matrix<Scalar>> qr(X);
    X.setIdentity(k, q);
    X.applyOnTheLeft(qr.householderQ());
}

/// CholeskyQR2 of `X [k, q]` in place: `G1 = X^T X` in double, `U1 = chol(G1)`, `Q1 = X U1^-1`,
/// then `G2 = Q1^T Q1`, `U2 = chol(G2)`, `Q = Q1 U2^-1` in Scalar (Q1 is nearly orthonormal: the
/// second pass needs no extra precision). Returns false, leaving X untouched, when a check fails:
/// a Cholesky factorisation fails, a pivot of U1 is below 1e-6 of the largest (X rank deficient or
/// nearly), or max |G2 - I| > 0.1 (Q1 too far from orthonormal for one more pass to repair).
template <class Scalar>
bool cholesky_qr2(Matrix<Scalar>& X) {
    const Index q = X.cols();
    Matrix<double> G(q, q);
    if constexpr (std::is_same_v<Scalar, double>) {
        G.noalias() = X.transpose() * X;
    } else {
        const Matrix<double> Xd = X.template cast<double>();
        G.noalias() = Xd.transpose() * Xd;
    }
    if (!G.allFinite()) return false;
    Eigen::LLT<Matrix<double>, Eigen::Lower> first(G);
    if (first.info() != Eigen::Success) return false;
    const auto pivots = first.matrixLLT().diagonal();
    if (!(pivots.minCoeff() > 1e-6 * pivots.maxCoeff())) return false;

    Matrix<Scalar> Q = X;
    const Matrix<Scalar> U1 = first.matrixU().toDenseMatrix().template cast<Scalar>();
    U1.template triangularView<Eigen::Upper>().template solveInPlace<Eigen::OnTheRight>(Q);
    Matrix<Scalar> G2(q, q);
    G2.noalias() = Q.transpose() * Q;
    G2.diagonal().array() -= Scalar(1);
    if (!(G2.cwiseAbs().maxCoeff() <= Scalar(0.1))) return false;
    G2.diagonal().array() += Scalar(1);
    Eigen::LLT<Matrix<Scalar>, Eigen::Lower> second(G2);
    if (second.info() != Eigen::Success) return false;
    const Matrix<Scalar> U2 = second.matrixU().toDenseMatrix();  // a plain upper matrix: the fast solve path
    U2.template triangularView<Eigen::Upper>().template solveInPlace<Eigen::OnTheRight>(Q);
    if (!Q.allFinite()) return false;
    X.swap(Q);
    return true;
}

/// Replaces `X [k, q]` (k >= q) by orthonormal columns that span the columns of X (a
/// rank-deficient X still gets orthonormal columns, from the Householder fallback).
template <class Scalar>
void orthonormalize(Matrix<Scalar>& X) {
    run_serial_eigen([&] {
        if (X.cols() == 0) return;
        if (!cholesky_qr2(X)) orthonormalize_householder(X);
    });
}

}  // namespace pissa::detail

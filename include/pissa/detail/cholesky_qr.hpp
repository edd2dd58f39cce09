/// \file detail/cholesky_qr.hpp
/// \brief Orthonormal basis of a tall block by CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa,
/// Yamamoto 2014), for the fused power iteration of the randomized SVD.
///
/// One CholeskyQR step: the Gram matrix `G = X^T X`, its Cholesky factor `G = R^T R` (in double),
/// then `Q = X R^-1`. In precision u the columns of Q are orthonormal only to about
/// `u cond(X)^2`; a second step on Q brings them to O(u) whenever the first one left
/// `||Q^T Q - I|| < 1` (cond(X) up to about u^-1/2, 4096 in float). Both Gram matrices and both
/// `X R^-1` are skinny products on the kernels of skinny_gemm.hpp, which choose AVX-512 at run
/// time; Householder QR (TallQr) is Eigen code compiled for the consumer's flags, SSE2 in a
/// plain `-O2` build. Measured on [4096, 128] float, two threads: 3.1 ms against 3.4 with
/// `-march=native` (BM_orthonormalize), and the fused randomized SVD 0.87x in a `-O2` build
/// (README, "The kernels").
///
/// CholeskyQR2 fails where X is too ill-conditioned (the first Cholesky breaks down, or the
/// second Gram matrix is too far from I); then X, left as it was, is orthonormalised by
/// Householder QR instead. Either way the result spans the columns of X (Householder also for a
/// rank-deficient X). Every step has a fixed order of operations: the bits do not depend on the
/// thread count.
#pragma once

#include <pissa/detail/serial_eigen.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/tall_qr.hpp>
#include <pissa/types.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>

namespace pissa::detail {

/// CholeskyQR2 with a Householder fallback. Keep one object per block shape: its buffers (about
/// 3 k q values) are reused from call to call.
template <class Scalar>
class CholeskyQr2 {
public:
    /// Largest `||Q1^T Q1 - I||_F` after the first step for which the second one is run; beyond,
    /// Householder QR takes over.
    static constexpr double kMaxFirstStepDeparture = 0.5;

    /// Replaces `X [k, q]` (k >= q) by orthonormal columns spanning it: CholeskyQR2, or
    /// `fallback.orthonormalize` where X is too ill-conditioned for it (used_fallback()).
    void orthonormalize(Matrix<Scalar>& X, TallQr<Scalar>& fallback) {
        const Index q = X.cols();
        gram(X);
        bool ok = factor();
        if (ok) {
            m_r = m_step_r;     // R1
            apply(X, m_first);  // Q1 = X R1^-1; X stays as it is for the fallback
            gram(m_first);      // how far Q1 is from orthonormal columns
            ok = (m_gram.template cast<double>() - Eigen::MatrixXd::Identity(q, q)).norm() <= kMaxFirstStepDeparture &&
                 factor();
        }
        m_used_fallback = !ok;
        if (!ok) {
            fallback.orthonormalize(X);
            return;
        }
        apply(m_first, X);              // Q = Q1 R2^-1
        m_r = (m_step_r * m_r).eval();  // R = R2 R1, upper triangular
    }

    /// Whether the last orthonormalize() fell back to Householder QR.
    bool used_fallback() const { return m_used_fallback; }

    /// The upper-triangular `R [q, q]` of `X = Q R` from the last orthonormalize() that did not
    /// fall back (`R = R2 R1`, the product of the two steps' Cholesky factors).
    Matrix<Scalar> r() const { return m_r.template cast<Scalar>(); }

private:
    /// Blocks of at least this many rows have their Gram matrix computed in two halves.
    static constexpr Index kTwoHalvesRows = 512;

    /// m_gram = X^T X. The columns of X are the rows of a row-major `[q, k]` view, so this is the
    /// product `W X` with W = X^T; its q rows are too few row panels to give two threads work,
    /// so the k rows of X are cut in two halves (by the shape alone) whose Gram matrices are
    /// computed at the same time and added.
    void gram(const Matrix<Scalar>& X) {
        const Index k = X.rows(), q = X.cols();
        if (k < kTwoHalvesRows) {
            multiply(RowMajorView<Scalar>{X.data(), q, k, k}, X, m_gram, m_workspace[0]);
            return;
        }
        const Index top = k / 2;
        m_half[0] = X.topRows(top);
        m_half[1] = X.bottomRows(k - top);
        const auto half = [&](int h) {
            const Index first = h == 0 ? 0 : top;
            multiply(RowMajorView<Scalar>{X.data() + first, q, m_half[h].rows(), k}, m_half[h], m_half_gram[h],
                     m_workspace[h]);
        };
        if (use_avx512_kernels<Scalar, Scalar>()) {
            run_serial_eigen_pair([&] { half(0); }, [&] { half(1); });
        } else {
            // The portable kernels parallelise each product themselves; nested inside a parallel
            // region, the Eigen GEMM they call would choose a thread-count-dependent blocking.
            half(0);
            half(1);
        }
        m_gram = m_half_gram[0] + m_half_gram[1];
    }

    /// The Cholesky factor `R` of m_gram (`G = R^T R`, in double) into m_step_r and `R^-1` into
    /// m_inverse; false when the factorisation breaks down.
    bool factor() {
        const Index q = m_gram.cols();
        bool ok = false;
        run_serial_eigen([&] {
            m_llt.compute(m_gram.template cast<double>());  // reads the lower triangle of G
            if (m_llt.info() != Eigen::Success) return;
            m_step_r = m_llt.matrixU();
            Eigen::MatrixXd inverse = Eigen::MatrixXd::Identity(q, q);
            m_llt.matrixU().solveInPlace(inverse);  // R^-1, upper triangular
            m_inverse = inverse.cast<Scalar>();
            ok = m_inverse.allFinite();
        });
        return ok;
    }

    /// out = X R^-1 = (X^T)^T R^-1: the transposed product over the row-major view X^T [q, k].
    void apply(const Matrix<Scalar>& X, Matrix<Scalar>& out) {
        multiply_transposed(RowMajorView<Scalar>{X.data(), X.cols(), X.rows(), X.rows()}, m_inverse, out,
                            m_workspace[0]);
    }

    Matrix<Scalar> m_first, m_gram, m_inverse;  ///< Q1, a Gram matrix, R^-1 of the last factor()
    Matrix<Scalar> m_half[2], m_half_gram[2];
    KernelWorkspace m_workspace[2];
    Eigen::LLT<Eigen::MatrixXd> m_llt;
    Eigen::MatrixXd m_step_r, m_r;  ///< R of the last step; R2 R1
    bool m_used_fallback = false;
};

}  // namespace pissa::detail

/// \file detail/tall_qr.hpp
/// \brief Thin QR of a tall, skinny block `X [k, q]` (k >= q), kept in factored form: the
/// triangular `R [q, q]` and the product of `Q [k, q]` with small matrices.
///
/// Large blocks are factored as a two-block TSQR (Demmel, Grigori, Hoemmen, Langou 2012): the two
/// halves of the rows are factored at the same time on two threads, `X = [Q1 R1; Q2 R2]`, then the
/// stacked triangles `[R1; R2] = Qs R` (a `[2q, q]` QR), so that `Q = diag(Q1, Q2) Qs`; `Q C` is
/// `Qs C` split in two and each half's reflectors applied to its part. It is as stable as one
/// Householder QR (a product of orthogonal transformations) and halves the serial time between
/// the passes over W ([4096, 128] float: 5.0 -> 3.2 ms; [11008, 128]: 16.5 -> 8.1 ms). The split
/// depends only on the shape, so the bits do not depend on the thread count.
///
/// One object serves all the factorisations of a decomposition: its storage is reused instead of
/// allocated per call. Multi-megabyte allocations freed and made again get fresh pages from the
/// OS, a page fault per 4 KiB (12 us each on a measured 2-core VM).
#pragma once

#include <pissa/detail/serial_eigen.hpp>
#include <pissa/types.hpp>

#include <Eigen/QR>

namespace pissa::detail {

template <class Scalar>
class TallQr {
public:
    /// Blocks of at least this many elements (and k >= 4q) are factored in two halves.
    static constexpr Index kTwoBlockElements = Index(1) << 18;

    /// Factors `X [k, q]`, k >= q. X is not kept (it may be overwritten next).
    void factor(const Matrix<Scalar>& X) {
        m_rows = X.rows();
        m_cols = X.cols();
        m_split = m_rows * m_cols >= kTwoBlockElements && m_rows >= 4 * m_cols;
        if (!m_split) {
            run_serial_eigen([&] { m_whole.compute(X); });
            return;
        }
        const Index q = m_cols, top_rows = m_rows / 2;
        run_serial_eigen_pair([&] { m_top.compute(X.topRows(top_rows)); },
                              [&] { m_bottom.compute(X.bottomRows(m_rows - top_rows)); });
        run_serial_eigen([&] {
            m_stacked.setZero(2 * q, q);
            m_stacked.topRows(q).template triangularView<Eigen::Upper>() = m_top.matrixQR().topRows(q);
            m_stacked.bottomRows(q).template triangularView<Eigen::Upper>() = m_bottom.matrixQR().topRows(q);
            m_whole.compute(m_stacked);
        });
    }

    /// The upper-triangular `R [q, q]` of `X = Q R`.
    Matrix<Scalar> r() const { return m_whole.matrixQR().topRows(m_cols).template triangularView<Eigen::Upper>(); }

    /// `out [k, c] = Q C` for `C [q, c]` (C = I gives the orthonormal columns of Q).
    template <class Small>
    void apply_q(const Eigen::MatrixBase<Small>& C, Matrix<Scalar>& out) {
        const Index q = m_cols, c = C.cols();
        if (!m_split) {
            run_serial_eigen([&] {
                out.setZero(m_rows, c);
                out.topRows(q) = C;
                out.applyOnTheLeft(m_whole.householderQ());
            });
            return;
        }
        run_serial_eigen([&] {  // Qs C  [2q, c]
            m_small.setZero(2 * q, c);
            m_small.topRows(q) = C;
            m_small.applyOnTheLeft(m_whole.householderQ());
        });
        const Index top_rows = m_rows / 2;
        out.resize(m_rows, c);
        auto half = [&](Index first_row, Index rows, const Eigen::HouseholderQR<Matrix<Scalar>>& qr, Index part) {
            auto block = out.middleRows(first_row, rows);
            block.setZero();
            block.topRows(q) = m_small.middleRows(part * q, q);
            block.applyOnTheLeft(qr.householderQ());
        };
        run_serial_eigen_pair([&] { half(0, top_rows, m_top, 0); },
                              [&] { half(top_rows, m_rows - top_rows, m_bottom, 1); });
    }

    /// Replaces `X [k, q]` (k >= q) by the orthonormal columns of its thin Q (`Q I`): they span the
    /// columns of X, and a rank-deficient X still gets orthonormal columns.
    void orthonormalize(Matrix<Scalar>& X) {
        factor(X);
        apply_q(Matrix<Scalar>::Identity(m_cols, m_cols), X);
    }

private:
    Index m_rows = 0, m_cols = 0;
    bool m_split = false;
    Eigen::HouseholderQR<Matrix<Scalar>> m_whole;  ///< X itself, or the stacked triangles
    Eigen::HouseholderQR<Matrix<Scalar>> m_top, m_bottom;
    Matrix<Scalar> m_stacked, m_small;
};

}  // namespace pissa::detail

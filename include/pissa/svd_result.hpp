/// \file svd_result.hpp
/// \brief The result type and the accessors shared by the exact and randomized truncated SVDs.
#pragma once

#include <pissa/types.hpp>

#include <Eigen/Core>

#include <cmath>

#include <stdexcept>
#include <string>

namespace pissa {

/// How an iterative decomposition ended. For a direct method: iterations = 1, converged = true.
struct ConvergenceReport {
    int iterations = 0;         ///< restarts (block Krylov) or power iterations (randomized)
    double residual_bound = 0;  ///< max_i ||W^T u_i - s_i v_i|| / s_1 over kept triplets, when measured
    bool converged = false;     ///< the stopping test passed (always true for direct and randomized SVD)
};

/// Top-r singular triplets `W ≈ U diag(S) V^T`, S descending, signs canonical (canonicalize_signs).
template <class Scalar>
struct SvdResult {
    Matrix<Scalar> U;  ///< [m, r], orthonormal columns
    Vector<Scalar> S;  ///< [r], descending, >= 0
    Matrix<Scalar> V;  ///< [n, r], orthonormal columns
    ConvergenceReport report;
};

/// The sign convention every decomposition of pissa applies to its result: each pair (u_i, v_i)
/// is negated, if needed, so that the entry of largest magnitude of u_i (the first one on a tie)
/// is positive. Negating both keeps `U diag(S) V^T`; fixing the sign makes the factors themselves
/// (PiSSA's A and B, not only B A) agree, up to rounding, whichever algorithm, orientation or
/// package computed them. A tie between two entries of nearly equal magnitude can still resolve
/// differently under different rounding; products are the safe thing to compare.
template <class Scalar>
void canonicalize_signs(SvdResult<Scalar>& svd) {
    for (Index i = 0; i < svd.U.cols(); ++i) {
        Index at = 0;
        Scalar largest = -1;
        for (Index k = 0; k < svd.U.rows(); ++k)
            if (std::abs(svd.U(k, i)) > largest) {
                largest = std::abs(svd.U(k, i));
                at = k;
            }
        if (svd.U(at, i) < 0) {
            svd.U.col(i) = -svd.U.col(i);
            svd.V.col(i) = -svd.V.col(i);
        }
    }
}

/// What TruncatedSvd and RandomizedSvd share, as Eigen's SVDBase is shared by its SVDs: the same
/// accessors after compute(), each throwing std::logic_error before it.
template <class Scalar>
class SvdBase {
public:
    const Vector<Scalar>& singular_values() const { return checked().S; }  ///< S_r [r], descending
    const Matrix<Scalar>& matrix_u() const { return checked().U; }         ///< U_r [m, r]
    const Matrix<Scalar>& matrix_v() const { return checked().V; }         ///< V_r [n, r]
    const ConvergenceReport& report() const { return checked().report; }   ///< iterations, residual bound
    const SvdResult<Scalar>& result() const { return checked(); }          ///< all of it
    /// Eigen::Success when the result met its convergence test, NoConvergence otherwise.
    Eigen::ComputationInfo info() const { return checked().report.converged ? Eigen::Success : Eigen::NoConvergence; }
    /// True once compute() has succeeded.
    bool computed() const { return m_computed; }

protected:
    explicit SvdBase(const char* name) : m_name(name) {}
    const SvdResult<Scalar>& checked() const {
        if (!m_computed) throw std::logic_error(std::string(m_name) + ": call compute() first");
        return m_result;
    }
    SvdResult<Scalar> m_result;
    bool m_computed = false;

private:
    const char* m_name;
};

}  // namespace pissa

/// \file svd_result.hpp
/// \brief The result type shared by the exact and randomized truncated SVDs.
#pragma once

#include <pissa/types.hpp>

namespace pissa {

/// How an iterative decomposition ended. For a direct method: iterations = 1, converged = true.
struct ConvergenceReport {
    int iterations = 0;          ///< restarts (block Krylov) or power iterations (randomized)
    double residual_bound = 0;   ///< max_i ||W^T u_i - s_i v_i|| / s_1 over kept triplets, when measured
    bool converged = false;      ///< the stopping test passed (always true for direct and randomized SVD)
};

/// Top-r singular triplets `W ≈ U diag(S) V^T`, S descending. Signs of (u_i, v_i) pairs are
/// arbitrary: compare products such as `U diag(S) V^T`, never raw vectors.
template <class Scalar>
struct SvdResult {
    Matrix<Scalar> U;  ///< [m, r], orthonormal columns
    Vector<Scalar> S;  ///< [r], descending, >= 0
    Matrix<Scalar> V;  ///< [n, r], orthonormal columns
    ConvergenceReport report;
};

}  // namespace pissa

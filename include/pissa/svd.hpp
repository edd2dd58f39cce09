/// \file svd.hpp
/// \brief Exact truncated SVD: the top-r singular triplets `W ≈ U_r diag(S_r) V_r^T`.
///
/// This is what peft's `init_lora_weights="pissa"` needs (peft computes a full
/// `torch.linalg.svd` and keeps the first r triplets). Two algorithms give the same triplets:
/// - `ExactSvdAlgorithm::full`: Eigen's divide-and-conquer BDCSVD of the whole matrix, then truncation.
/// - `ExactSvdAlgorithm::block_krylov`: a restarted block Krylov iteration on `W^T W` that only ever
///   multiplies `W` and `W^T` by skinny blocks and stops at a residual test
///   (`||W^T u_i - s_i v_i|| <= tol * s_1` for every kept triplet; `W v_i = s_i u_i` holds by
///   construction), far cheaper than a full SVD when `r << min(m, n)`.
/// `automatic` picks block_krylov when r is small against min(m, n) (and falls back to full if the
/// iteration stalls above its tolerance), full otherwise.
#pragma once

#include <pissa/detail/bdcsvd.hpp>
#include <pissa/detail/block_krylov.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/validate.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/errors.hpp>
#include <pissa/svd_result.hpp>
#include <pissa/types.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace pissa {

/// How the exact truncated SVD is computed; see the file comment.
enum class ExactSvdAlgorithm { automatic, full, block_krylov };

/// Options of the exact truncated SVD.
struct ExactSvdOptions {
    ExactSvdAlgorithm algorithm = ExactSvdAlgorithm::automatic;
    /// block_krylov stops when every kept triplet has `||W^T u_i - s_i v_i|| <= tolerance * s_1`.
    /// \warning Below ~10 machine epsilons of the compute scalar the test may never pass; the
    /// iteration then stops when the residual stagnates (or at `max_iterations`) and reports
    /// `converged == false` with the bound it reached.
    double tolerance = -1.0;   ///< <= 0: 100 * epsilon of the compute scalar (1.2e-5 float, 2.2e-14 double)
    int max_iterations = 100;  ///< restarts of the block Krylov iteration
    std::uint64_t seed = 0;    ///< start block of the Krylov iteration (the result does not depend on it
                               ///< beyond the tolerance)
};

/// Throws pissa::invalid_argument for options outside their ranges.
inline void require_valid(const ExactSvdOptions& options) {
    detail::require(options.max_iterations >= 1, "truncated_svd: max_iterations must be >= 1, got ",
                    options.max_iterations);
}

namespace detail {

/// Full thin SVD (BDCSVD) of the compute-scalar copy of W, truncated to the top `rank` triplets.
template <class Scalar, class Derived>
SvdResult<Scalar> full_truncated_svd(const Eigen::MatrixBase<Derived>& W, Index rank) {
    const Matrix<Scalar> dense = W.template cast<Scalar>();
    if (!dense.allFinite()) {
        for (Index j = 0; j < dense.cols(); ++j)
            for (Index i = 0; i < dense.rows(); ++i)
                require((std::isfinite)(dense(i, j)), "truncated_svd: the weight matrix contains a non-finite value (",
                        dense(i, j), ") at row ", i, ", column ", j);
    }
    Eigen::BDCSVD<Matrix<Scalar>> svd(dense, Eigen::ComputeThinU | Eigen::ComputeThinV);
    if (svd.info() != Eigen::Success)
        throw numerical_error(
            concat("truncated_svd: Eigen's BDCSVD failed on a ", W.rows(), " x ", W.cols(), " matrix"));
    SvdResult<Scalar> out;
    out.U = svd.matrixU().leftCols(rank);
    out.S = svd.singularValues().head(rank);
    out.V = svd.matrixV().leftCols(rank);
    out.report = {1, 0.0, true};
    canonicalize_signs(out);
    return out;
}

/// The rule of ExactSvdAlgorithm::automatic: Krylov pays off when the kept rank is a small part
/// of the matrix (its basis of up to ~9 r columns stays far below min(m, n)). On noise-like spectra
/// at r = min(m, n) / 8 it was measured slower than BDCSVD, hence the factor 16.
inline bool prefer_block_krylov(Index rows, Index cols, Index rank) {
    const Index k = std::min(rows, cols);
    return k >= 256 && 16 * rank < k;
}

}  // namespace detail

/// Top-`rank` singular triplets of `W [m, n]`, singular values descending.
///
/// \param W     any Eigen dense expression (row- or column-major, a Map over foreign memory, 16-bit
///              storage); computation is in `compute_scalar_t<Scalar>` (float for half/bfloat16).
/// \param rank  1 <= rank <= min(m, n)
/// \param options the algorithm (automatic, full, block_krylov), the Krylov tolerance and limits
/// \throws pissa::invalid_argument for a rank out of range, an empty or non-finite W;
///         pissa::numerical_error when the decomposition fails.
template <class Derived>
SvdResult<compute_scalar_t<typename Derived::Scalar>> truncated_svd(const Eigen::MatrixBase<Derived>& W, Index rank,
                                                                    const ExactSvdOptions& options = {}) {
    using Storage = typename Derived::Scalar;
    using Scalar = compute_scalar_t<Storage>;
    static_assert(is_supported_storage_v<Storage>, "pissa: W must hold float, double, Eigen::half or Eigen::bfloat16");
    detail::check_rank(W.rows(), W.cols(), rank, "truncated_svd");
    require_valid(options);
    const bool krylov =
        options.algorithm == ExactSvdAlgorithm::block_krylov ||
        (options.algorithm == ExactSvdAlgorithm::automatic && detail::prefer_block_krylov(W.rows(), W.cols(), rank));
    if (!krylov) return detail::full_truncated_svd<Scalar>(W, rank);

    detail::PreparedWeight<Storage> prepared;
    detail::prepare_weight(W, prepared);

    const double tolerance = options.tolerance > 0 ? options.tolerance : 100.0 * std::numeric_limits<Scalar>::epsilon();
    detail::KernelWorkspace kernels;
    SvdResult<Scalar> result = detail::block_krylov_svd<Scalar>(detail::WeightOperator<Storage>{prepared, kernels},
                                                                rank, tolerance, options.max_iterations, options.seed);
    canonicalize_signs(result);
    if (result.report.converged || options.algorithm == ExactSvdAlgorithm::block_krylov) return result;
    // automatic promises the exact triplets: when the iteration stalls above the tolerance (a very
    // flat spectrum), fall back to the full decomposition and say how far Krylov had got.
    SvdResult<Scalar> full = detail::full_truncated_svd<Scalar>(W, rank);
    full.report.iterations = result.report.iterations;
    return full;
}

/// Object form of truncated_svd, shaped like Eigen's and Spectra's decompositions:
/// `TruncatedSvd<float> svd; svd.compute(W, r); svd.singular_values();`
template <class Scalar>
class TruncatedSvd : public SvdBase<Scalar> {
    static_assert(std::is_floating_point_v<Scalar>, "pissa::TruncatedSvd: Scalar must be float or double");

public:
    explicit TruncatedSvd(ExactSvdOptions options = {}) : SvdBase<Scalar>("pissa::TruncatedSvd"), m_options(options) {}

    /// Computes the top-`rank` triplets of W (see truncated_svd); returns *this.
    template <class Derived>
    TruncatedSvd& compute(const Eigen::MatrixBase<Derived>& W, Index rank) {
        static_assert(std::is_same_v<compute_scalar_t<typename Derived::Scalar>, Scalar>,
                      "pissa::TruncatedSvd: W's compute scalar must match the class's Scalar");
        this->m_computed = false;  // a throwing call leaves no stale result behind
        this->m_result = truncated_svd(W, rank, m_options);
        this->m_computed = true;
        return *this;
    }

private:
    ExactSvdOptions m_options;
};

}  // namespace pissa

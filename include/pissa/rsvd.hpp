/// \file rsvd.hpp
/// \brief Randomized truncated SVD with peft's `init_lora_weights="pissa_niter_K"` semantics.
///
/// peft calls `torch.svd_lowrank(W, q=r, niter=K)` (Halko, Martinsson, Tropp 2011, Alg. 4.4 with
/// Alg. 5.1). For `W [m, n]` with n > q torch works on `W^T`, and so does this function:
///
///     G ~ N(0, 1) [m, q]                       q = r + oversampling (peft: oversampling = 0)
///     Q = qr(W^T G)                            [n, q]
///     K times:  P = qr(W Q);  Q = qr(W^T P)    an orthonormalisation after every product
///     B = W Q = Ub diag(S) Vb^T                small SVD of [m, q] (detail/ritz.hpp)
///     U = Ub[:, :r],  V = Q Vb[:, :r]
///
/// That is 2K + 2 passes over W. With `fused_power_iteration` each power step is
/// `Q = qr(W^T (W Q))` (one orthonormalisation per step instead of two), which is what a kernel
/// that keeps a block of W in cache for both products computes; it is a different algorithm
/// (less robust in float32 when niter is large and the spectrum decays fast), so it is opt-in.
///
/// The Gaussian draws come from pissa's own splitmix64 stream (not torch's generator), so the
/// result is a deterministic function of (W, rank, options) on every platform and thread count.
#pragma once

#include <pissa/detail/block_krylov.hpp>
#include <pissa/detail/orthonormalize.hpp>
#include <pissa/detail/ritz.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/validate.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/errors.hpp>
#include <pissa/svd_result.hpp>
#include <pissa/types.hpp>

#include <cstdint>
#include <utility>

namespace pissa {

/// Options of the randomized SVD; the defaults are peft's `pissa_niter_4`.
struct RandomizedSvdOptions {
    int niter = 4;              ///< power iterations K >= 0 (peft: the K of "pissa_niter_K")
    Index oversampling = 0;     ///< extra test vectors p >= 0, q = r + p capped at min(m, n)
    std::uint64_t seed = 0;     ///< seed of the Gaussian test matrix
    bool fused_power_iteration = false;  ///< Q = qr(W^T (W Q)) per step; see the file comment
};

/// Throws pissa::invalid_argument for options outside their ranges.
inline void require_valid(const RandomizedSvdOptions& options) {
    detail::require(options.niter >= 0, "randomized_svd: niter must be >= 0, got ", options.niter);
    detail::require(options.oversampling >= 0, "randomized_svd: oversampling must be >= 0, got ",
                    options.oversampling);
}

namespace detail {

/// The algorithm of the file comment.
template <class Scalar, class Storage>
SvdResult<Scalar> randomized_svd(const WeightOperator<Storage>& W, Index rank, const RandomizedSvdOptions& options) {
    const Index q = std::min(std::min(W.rows(), W.cols()), rank + options.oversampling);
    Matrix<Scalar> G, Q, P;
    fill_gaussian(G, W.rows(), q, options.seed);
    W.apply_transposed(G, Q);
    require_finite_product(W, Q, "randomized_svd");
    orthonormalize(Q);
    for (int it = 0; it < options.niter; ++it) {
        W.apply(Q, P);
        if (!options.fused_power_iteration) orthonormalize(P);
        W.apply_transposed(P, Q);
        orthonormalize(Q);
    }
    W.apply(Q, P);  // B = W Q  [m, q]
    SvdResult<Scalar> out;
    ritz_triplets(Q, P, rank, rank, "randomized_svd", out.U, out.S, out.V);
    out.S.conservativeResize(rank);
    out.report = {options.niter, -1.0, true};
    return out;
}

}  // namespace detail

/// Randomized top-`rank` triplets of `W [m, n]` (see the file comment), S descending.
///
/// \param W     any Eigen dense expression; computation in `compute_scalar_t<Scalar>`.
/// \param rank  1 <= rank <= min(m, n)
/// \throws pissa::invalid_argument for a rank out of range, negative niter or oversampling, an
///         empty or non-finite W; pissa::numerical_error if the small SVD fails.
/// \warning The test matrix comes from pissa's generator, not torch's: the same seed does not
///          reproduce torch.svd_lowrank's bits, only its distribution.
template <class Derived>
SvdResult<compute_scalar_t<typename Derived::Scalar>> randomized_svd(const Eigen::MatrixBase<Derived>& W, Index rank,
                                                                     const RandomizedSvdOptions& options = {}) {
    using Storage = typename Derived::Scalar;
    using Scalar = compute_scalar_t<Storage>;
    static_assert(is_supported_storage_v<Storage>, "pissa: W must hold float, double, Eigen::half or Eigen::bfloat16");
    detail::check_rank(W.rows(), W.cols(), rank, "randomized_svd");
    require_valid(options);
    detail::PreparedWeight<Storage> prepared;
    detail::prepare_weight(W, prepared);
    return detail::randomized_svd<Scalar>(detail::WeightOperator<Storage>{prepared}, rank, options);
}

}  // namespace pissa

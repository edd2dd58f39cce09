/// \file convert.hpp
/// \brief Converting a trained PiSSA adapter into a plain LoRA that applies to the original weight.
///
/// PiSSA trains `A, B` on the residual base `W_res`, initialised as `A0, B0` with
/// `W = W_res + s B0 A0`. The fine-tuned layer is `W_res + s B A = W + s (B A - B0 A0)`, so
///
///     A' = [A ; A0]    [2r, in]   (rows of A, then rows of A0)
///     B' = [B , -B0]   [out, 2r]  (columns of B, then minus the columns of B0)
///
/// gives `s' B' A' = s (B A - B0 A0)` with the rank-2r scaling `s' = s`: lora_alpha doubles
/// (`2a / 2r = a / r`) or, with rsLoRA, is multiplied by sqrt(2) (`sqrt(2) a / sqrt(2r) = a / sqrt(r)`).
/// This is peft's `save_pretrained(..., path_initial_model_for_weight_conversion=...)` (PISSA.md,
/// "Converting a trained PiSSA adapter to plain LoRA"). The converted adapter is applied to the
/// original, unmodified `W`.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/lora.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <cmath>
#include <type_traits>

namespace pissa {

/// The rank-2r LoRA `A' = [A; A0]`, `B' = [B, -B0]` of a trained PiSSA adapter (see the file
/// comment); scaling unchanged when the hyper-parameters are converted by convert_lora_alpha().
/// \param A   trained A `[r, in]`        \param B   trained B `[out, r]`
/// \param A0  initial A `[r0, in]`       \param B0  initial B `[out, r0]` (r0 == r for peft adapters)
/// \param scaling  the trained adapter's `s`, which the converted adapter keeps
/// \throws pissa::invalid_argument when the shapes do not fit together (the message gives them all).
template <class DA, class DB, class DA0, class DB0>
LoraAdapter<typename DA::Scalar> pissa_to_lora(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
                                               const Eigen::MatrixBase<DA0>& A0, const Eigen::MatrixBase<DB0>& B0,
                                               double scaling) {
    using Scalar = typename DA::Scalar;
    static_assert(std::is_floating_point_v<Scalar>, "pissa_to_lora: adapters are float or double");
    detail::require(B.cols() == A.rows() && B0.cols() == A0.rows() && A.cols() == A0.cols() && B.rows() == B0.rows(),
                    "pissa_to_lora: shapes must be A [r, in], B [out, r], A0 [r0, in], B0 [out, r0]; got A [", A.rows(),
                    ", ", A.cols(), "], B [", B.rows(), ", ", B.cols(), "], A0 [", A0.rows(), ", ", A0.cols(),
                    "], B0 [", B0.rows(), ", ", B0.cols(), "]");
    LoraAdapter<Scalar> out;
    out.scaling = static_cast<Scalar>(scaling);
    out.A.resize(A.rows() + A0.rows(), A.cols());
    out.A.topRows(A.rows()) = A.template cast<Scalar>();
    out.A.bottomRows(A0.rows()) = A0.template cast<Scalar>();
    out.B.resize(B.rows(), B.cols() + B0.cols());
    out.B.leftCols(B.cols()) = B.template cast<Scalar>();
    out.B.rightCols(B0.cols()) = -B0.template cast<Scalar>();
    return out;
}

/// The rank-2r LoRA of a trained adapter and its initial state, with the trained adapter's scaling
/// (which the converted adapter keeps when its lora_alpha comes from convert_lora_alpha()).
template <class Scalar>
LoraAdapter<Scalar> pissa_to_lora(const LoraAdapter<Scalar>& trained, const LoraAdapter<Scalar>& initial) {
    return pissa_to_lora(trained.A, trained.B, initial.A, initial.B, trained.scaling);
}

/// lora_alpha for the rank-2r converted adapter: `2 a`, or `sqrt(2) a` with rsLoRA, so that the
/// scaling of rank 2r equals the trained adapter's scaling of rank r.
/// \throws pissa::invalid_argument for a non-finite or non-positive alpha.
inline double convert_lora_alpha(double lora_alpha, bool use_rslora) {
    detail::require(std::isfinite(lora_alpha) && lora_alpha > 0, "convert_lora_alpha: lora_alpha must be > 0, got ",
                    lora_alpha);
    return use_rslora ? lora_alpha * std::sqrt(2.0) : 2.0 * lora_alpha;
}

}  // namespace pissa

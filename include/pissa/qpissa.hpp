/// \file qpissa.hpp
/// \brief Quantised PiSSA (QPiSSA), the LoftQ baseline and plain QLoRA on an NF4 base weight.
///
/// All three keep a frozen NF4 base `Q` and a trainable adapter, and approximate
/// `W ≈ deq(Q) + s B A` (`W [out, in]`, A `[r, in]`, B `[out, r]`). They differ in what is quantised:
///
/// - **QLoRA**: `Q = Q(W)`, adapter zero (B = 0), so the error is `W - deq(Q(W))`.
/// - **QPiSSA** (PiSSA paper Sec. 4.2; reference `utils/init_qpissa.py` of GraphPKU/PiSSA), `T` times:
///
///       target = W                                  (first iteration)
///       repeat T times:
///           (A, B) = PiSSA split of target          rank r, top-r SVD of target
///           W_res  = W - s B A
///           Q      = Q(W_res)
///           target = W - deq(Q)
///
///   The result is the adapter and `Q` of the last iteration; `T = 1` is the plain PiSSA residual
///   quantised. The error is `W - deq(Q(W_res)) - s B A`.
/// - **LoftQ** (Li et al. 2023; peft `utils/loftq_utils.py: loftq_init`), `T` times:
///
///       res = W                                     (first iteration)
///       repeat T times:
///           Q      = Q(res)
///           (A, B) = rank-r SVD split of W - deq(Q) the quantisation error
///           res    = W - s B A
///
///   The result is the last `Q` and the adapter fitted to it.
///
/// The SVD is the one configured in `PissaConfig` (exact by default; the reference scripts call
/// `torch.linalg.svd`). NF4 follows bitsandbytes (quant_nf4.hpp); the reference scripts use
/// `compress_statistics=False`, i.e. no double quantisation, which is Nf4Options' default.
/// Computation is in `compute_scalar_t<Storage>` (float for float and 16-bit weights); the base
/// is quantised from that precision, as the scripts quantise their float32 residual.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/init.hpp>
#include <pissa/quant_nf4.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <vector>

namespace pissa {

/// Configuration of QPiSSA and LoftQ.
struct QuantInitConfig {
    PissaConfig pissa{};  ///< rank, lora_alpha, rsLoRA, SVD method, fan_in_fan_out
    int iterations = 1;   ///< T >= 1 alternating iterations (the paper reports T = 1 and T = 5)
    Nf4Options nf4{};     ///< block size (64), double quantisation (off)
};

/// Throws pissa::invalid_argument for a configuration outside its ranges.
inline void require_valid(const QuantInitConfig& config) {
    require_valid(config.pissa);
    require_valid(config.nf4);
    detail::require(config.iterations >= 1, "quantized init: iterations must be >= 1, got ", config.iterations);
}

/// An NF4 base plus an adapter: `W ≈ deq(base) + s B A`.
template <class Scalar>
struct QuantizedInit {
    /// NF4 base in W's STORED layout (`[out, in]`, or `[in, out]` with fan_in_fan_out), row-major
    /// flattening, exactly what bitsandbytes would store for that tensor.
    Nf4Tensor base;
    /// A `[r, in]`, B `[out, r]`, scaling s; rank 0 (empty A and B) for QLoRA. Its quality report
    /// describes the last split, i.e. of the matrix the adapter was fitted to, not of W.
    PissaAdapter<Scalar> adapter;
    /// `||W - deq(base_t) - s B_t A_t||_F` after each iteration t = 1..T (one entry for QLoRA).
    std::vector<double> error_history;
    /// W was stored `[in, out]` (base is then `[in, out]` too, and `s B A` is applied transposed).
    bool fan_in_fan_out = false;
};

namespace detail {

/// `s B A` in the stored layout of W.
template <class Scalar>
Matrix<Scalar> stored_low_rank(const PissaAdapter<Scalar>& adapter, Index rows, Index cols, bool fan_in_fan_out) {
    if (adapter.A.rows() == 0) return Matrix<Scalar>::Zero(rows, cols);
    if (fan_in_fan_out) return (adapter.A.transpose() * adapter.scaling) * adapter.B.transpose();
    return (adapter.B * adapter.scaling) * adapter.A;
}

/// The adapter half of a PiSSA split (drops the residual, keeps A, B, s, S_r, reports).
template <class Scalar>
PissaAdapter<Scalar> take_adapter(PissaResult<Scalar, Scalar>&& split) {
    return static_cast<PissaAdapter<Scalar>&&>(split);
}

template <class Scalar>
double frobenius(const Matrix<Scalar>& M) {
    return M.template cast<double>().norm();
}

}  // namespace detail

/// Plain QLoRA: `base = Q(W)` and an empty adapter (rank 0; B = 0 in LoRA terms).
/// \param W the stored weight (any Eigen expression of float, double, Eigen::half or Eigen::bfloat16)
/// \param nf4 the NF4 options (block size, double quantisation)
/// \throws pissa::invalid_argument for an empty or non-finite W or invalid NF4 options.
template <class Derived>
QuantizedInit<compute_scalar_t<typename Derived::Scalar>> qlora_init(const Eigen::MatrixBase<Derived>& W,
                                                                     const Nf4Options& nf4 = {}) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    require_valid(nf4);
    const Matrix<Scalar> w = W.template cast<Scalar>();
    QuantizedInit<Scalar> out;
    out.base = quantize_nf4(w, nf4);
    out.adapter.A.resize(0, w.cols());
    out.adapter.B.resize(w.rows(), 0);
    out.error_history.push_back(detail::frobenius<Scalar>(w - dequantize_nf4<Scalar>(out.base)));
    return out;
}

/// QPiSSA initialisation with `config.iterations` alternating steps (see the file comment).
/// \param W the stored weight: `[out, in]`, or `[in, out]` with `config.pissa.fan_in_fan_out`
/// \param config the PiSSA split, the NF4 options and the number of iterations T
/// \returns the NF4 base `Q(W_res)` (stored layout), the adapter of the last iteration, the error history
/// \throws pissa::invalid_argument for a bad configuration, rank out of range, empty or non-finite W;
///         pissa::numerical_error if an SVD fails.
template <class Derived>
QuantizedInit<compute_scalar_t<typename Derived::Scalar>> qpissa_init(const Eigen::MatrixBase<Derived>& W,
                                                                      const QuantInitConfig& config) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    require_valid(config);
    const Matrix<Scalar> w = W.template cast<Scalar>();
    QuantizedInit<Scalar> out;
    out.fan_in_fan_out = config.pissa.fan_in_fan_out;
    Matrix<Scalar> target = w;
    for (int t = 0; t < config.iterations; ++t) {
        auto split = init(target, config.pissa);  // split.residual = target - s B A (stored layout)
        // W_res = W - s B A = (W - target) + (target - s B A)
        Matrix<Scalar> residual = (t == 0) ? std::move(split.residual) : Matrix<Scalar>(w - target + split.residual);
        out.adapter = detail::take_adapter(std::move(split));
        out.base = quantize_nf4(residual, config.nf4);
        const Matrix<Scalar> dequantized = dequantize_nf4<Scalar>(out.base);
        out.error_history.push_back(detail::frobenius<Scalar>(residual - dequantized));
        if (t + 1 < config.iterations) target = w - dequantized;
    }
    return out;
}

/// LoftQ initialisation with `config.iterations` alternating steps (see the file comment).
/// \param W the stored weight: `[out, in]`, or `[in, out]` with `config.pissa.fan_in_fan_out`
/// \param config the PiSSA split, the NF4 options and the number of iterations T
/// \returns the last NF4 base and the adapter fitted to its quantisation error, the error history
/// \throws as qpissa_init.
template <class Derived>
QuantizedInit<compute_scalar_t<typename Derived::Scalar>> loftq_init(const Eigen::MatrixBase<Derived>& W,
                                                                     const QuantInitConfig& config) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    require_valid(config);
    const Matrix<Scalar> w = W.template cast<Scalar>();
    QuantizedInit<Scalar> out;
    out.fan_in_fan_out = config.pissa.fan_in_fan_out;
    Matrix<Scalar> residual = w;
    for (int t = 0; t < config.iterations; ++t) {
        out.base = quantize_nf4(residual, config.nf4);
        const Matrix<Scalar> dequantized = dequantize_nf4<Scalar>(out.base);
        auto split = init(Matrix<Scalar>(w - dequantized), config.pissa);
        // split.residual = W - deq - s B A: exactly the error of this iteration.
        out.error_history.push_back(detail::frobenius<Scalar>(split.residual));
        if (t + 1 < config.iterations) residual = dequantized + split.residual;  // W - s B A
        out.adapter = detail::take_adapter(std::move(split));
    }
    return out;
}

}  // namespace pissa

/// \file lora_backward.hpp
/// \brief Gradients of the LoRA layer `y = x W^T + s (x A^T) B^T (+ b)` through the rank-r bottleneck.
///
/// With `t = x A^T` `[batch, r]` and `G = dL/dy` `[batch, out]`:
///   - `dL/dB = s G^T t`                 `[out, r]`   (= s (G^T x) A^T)
///   - `dL/dA = s (G B)^T x`             `[r, in]`    (= s B^T (G^T x))
///   - `dL/dx = G W + s (G B) A`         `[batch, in]` (optional, for stacking layers)
///   - `dL/db = column sums of G`        `[out]`       (optional, when the bias trains)
/// `G^T x` is the gradient of the full weight; it is `[out, in]` and never formed here: the cost is
/// `batch * r * (in + out)` multiply-adds, plus `batch * out * in` for `dL/dx`.
#pragma once

#include <pissa/lora.hpp>

#include <Eigen/Core>

namespace pissa {

/// What lora_backward computes besides the adapter gradients.
struct LoraBackwardOptions {
    bool input_gradient = false;  ///< compute dL/dx (needed when a layer below trains)
    bool bias_gradient = false;   ///< compute dL/db (when the layer's bias trains)
};

/// Gradients of a LoRA layer, in the compute scalar of `x`.
template <class Scalar>
struct LoraGradients {
    Matrix<Scalar> dA;     ///< [r, in]
    Matrix<Scalar> dB;     ///< [out, r]
    Matrix<Scalar> dx;     ///< [batch, in]; empty unless options.input_gradient
    Vector<Scalar> dbias;  ///< [out]; empty unless options.bias_gradient
};

/// Backward pass of `y = x W^T + s (x A^T) B^T (+ b)` given `dy = dL/dy`.
///
/// \param x `[batch, in]` (the layer's input in the forward pass), \param W `[out, in]` (only read
/// for dL/dx; any storage), \param A `[r, in]`, \param B `[out, r]`, \param scaling `s`,
/// \param dy `[batch, out]`.
/// \param options which further gradients to compute (dL/dx, dL/db).
/// \throws pissa::invalid_argument when the shapes disagree (the message lists them), r < 1, or
///         the scaling is not finite.
template <class DX, class DW, class DA, class DB, class DY>
LoraGradients<compute_scalar_t<typename DX::Scalar>> lora_backward(const Eigen::MatrixBase<DX>& x,
                                                                   const Eigen::MatrixBase<DW>& W,
                                                                   const Eigen::MatrixBase<DA>& A,
                                                                   const Eigen::MatrixBase<DB>& B, double scaling,
                                                                   const Eigen::MatrixBase<DY>& dy,
                                                                   const LoraBackwardOptions& options = {}) {
    using Scalar = compute_scalar_t<typename DX::Scalar>;
    static_assert(std::is_floating_point_v<Scalar>, "lora_backward: x must hold float, double or 16-bit floats");
    detail::check_lora_shapes(x.rows(), x.cols(), W.rows(), W.cols(), A.rows(), A.cols(), B.rows(), B.cols(), scaling,
                              "lora_backward");
    detail::require(dy.rows() == x.rows() && dy.cols() == W.rows(), "lora_backward: dy must be [batch, out] = [",
                    x.rows(), ", ", W.rows(), "], got [", dy.rows(), ", ", dy.cols(), "]");
    const auto& xc = detail::as_compute<Scalar>(x);
    const auto& Ac = detail::as_compute<Scalar>(A);
    const auto& G = detail::as_compute<Scalar>(dy);
    const Scalar s = static_cast<Scalar>(scaling);

    const Matrix<Scalar> t = xc * Ac.transpose();                               // [batch, r]
    const Matrix<Scalar> sGB = s * (G * detail::as_compute<Scalar>(B)).eval();  // [batch, r]
    LoraGradients<Scalar> grads;
    grads.dB.noalias() = s * (G.transpose() * t);  // [out, r]
    grads.dA.noalias() = sGB.transpose() * xc;     // [r, in]
    if (options.input_gradient) {
        grads.dx.noalias() = G * detail::as_compute<Scalar>(W);  // [batch, in]
        grads.dx.noalias() += sGB * Ac;
    }
    if (options.bias_gradient) grads.dbias = G.colwise().sum().transpose();
    return grads;
}

/// Overload for an adapter object.
template <class DX, class DW, class Scalar, class DY>
LoraGradients<compute_scalar_t<typename DX::Scalar>> lora_backward(const Eigen::MatrixBase<DX>& x,
                                                                   const Eigen::MatrixBase<DW>& W,
                                                                   const LoraAdapter<Scalar>& adapter,
                                                                   const Eigen::MatrixBase<DY>& dy,
                                                                   const LoraBackwardOptions& options = {}) {
    return lora_backward(x, W, adapter.A, adapter.B, static_cast<double>(adapter.scaling), dy, options);
}

}  // namespace pissa

/// \file lora.hpp
/// \brief The LoRA layer: forward pass through the rank-r bottleneck, plain LoRA initialisation
/// (as peft does it), and merge / unmerge of an adapter into its base weight.
///
/// Notation (see PISSA.md): a linear layer stores `W` `[out, in]` and computes `y = x W^T + b` for a
/// batch `x` `[batch, in]`. A LoRA adapter of rank `r` adds `s (x A^T) B^T` with `A` `[r, in]`,
/// `B` `[out, r]` and the scaling `s` (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA).
/// The forward pass never forms the `[out, in]` matrix `W + s B A`: it costs
/// `batch * r * (in + out)` multiply-adds on top of the base product.
///
/// `W` may be any Eigen expression (row- or column-major, a Map over checkpoint memory) stored in
/// float, double, Eigen::half or Eigen::bfloat16; 16-bit storage is computed in float, as peft does.
/// The gradients of the layer are in <pissa/lora_backward.hpp>.
#pragma once

#include <pissa/detail/random.hpp>
#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace pissa {

/// The LoRA scaling `s` (peft's `scaling`): `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
/// rsLoRA (`use_rslora`), which keeps the update's magnitude from shrinking as the rank grows.
/// The one place this formula lives.
inline double lora_scaling(double lora_alpha, Index rank, bool use_rslora) {
    const double r = static_cast<double>(rank);
    return use_rslora ? lora_alpha / std::sqrt(r) : lora_alpha / r;
}

/// A LoRA adapter: `A` `[r, in]`, `B` `[out, r]`, scaling `s`; the layer adds `s (x A^T) B^T`.
template <class Scalar>
struct LoraAdapter {
    Matrix<Scalar> A;    ///< [r, in]
    Matrix<Scalar> B;    ///< [out, r]
    Scalar scaling = 0;  ///< s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA)
};

namespace detail {

/// `W` as a matrix of the compute scalar: the expression itself when the scalars agree (no copy),
/// otherwise a cast (one evaluated temporary inside the product, never a stored copy of `W + s B A`).
template <class Scalar, class Derived>
decltype(auto) as_compute(const Eigen::MatrixBase<Derived>& W) {
    if constexpr (std::is_same_v<typename Derived::Scalar, Scalar>) {
        return W.derived();
    } else {
        return W.derived().template cast<Scalar>();
    }
}

/// Checks the shapes of a LoRA layer: x `[batch, in]`, W `[out, in]`, A `[r, in]`, B `[out, r]`,
/// r >= 1, s finite. Throws pissa::invalid_argument naming every shape.
inline void check_lora_shapes(Index x_rows, Index x_cols, Index w_rows, Index w_cols, Index a_rows, Index a_cols,
                              Index b_rows, Index b_cols, double scaling, const char* where) {
    const auto shapes = concat(" (x [", x_rows, ", ", x_cols, "], W [", w_rows, ", ", w_cols, "], A [", a_rows, ", ",
                               a_cols, "], B [", b_rows, ", ", b_cols, "])");
    require(a_rows >= 1, where, ": adapter rank must be >= 1, got A with ", a_rows, " rows", shapes);
    require(b_cols == a_rows, where, ": rank mismatch, B has ", b_cols, " columns but A has ", a_rows, " rows", shapes);
    require(a_cols == w_cols, where, ": A must be [r, in] with in = W.cols() = ", w_cols, shapes);
    require(b_rows == w_rows, where, ": B must be [out, r] with out = W.rows() = ", w_rows, shapes);
    require(x_cols == w_cols, where, ": x must be [batch, in] with in = W.cols() = ", w_cols, shapes);
    require(x_rows >= 0, where, ": negative batch size", shapes);
    require(std::isfinite(scaling), where, ": scaling must be finite, got ", scaling);
}

inline void check_bias(Index bias_size, Index out, const char* where) {
    require(bias_size == out, where, ": bias must have out = W.rows() = ", out, " entries, got ", bias_size);
}

}  // namespace detail

/// LoRA forward pass without bias: `y = x W^T + s (x A^T) B^T`, `[batch, out]`.
///
/// \param x `[batch, in]`; its scalar (or the compute scalar of a 16-bit x) is the result's scalar.
/// \param W `[out, in]`, the frozen base weight (for PiSSA: the residual `W_res`), any storage.
/// \param A `[r, in]`, \param B `[out, r]`, \param scaling `s` (finite).
/// \throws pissa::invalid_argument on any shape mismatch (the message lists all four shapes),
///         r < 1 or a non-finite scaling.
template <class DX, class DW, class DA, class DB>
Matrix<compute_scalar_t<typename DX::Scalar>> lora_forward(const Eigen::MatrixBase<DX>& x,
                                                           const Eigen::MatrixBase<DW>& W,
                                                           const Eigen::MatrixBase<DA>& A,
                                                           const Eigen::MatrixBase<DB>& B, double scaling) {
    using Scalar = compute_scalar_t<typename DX::Scalar>;
    static_assert(std::is_floating_point_v<Scalar>, "lora_forward: x must hold float, double or 16-bit floats");
    detail::check_lora_shapes(x.rows(), x.cols(), W.rows(), W.cols(), A.rows(), A.cols(), B.rows(), B.cols(), scaling,
                              "lora_forward");
    const auto& xc = detail::as_compute<Scalar>(x);
    Matrix<Scalar> y = xc * detail::as_compute<Scalar>(W).transpose();
    const Matrix<Scalar> t = xc * detail::as_compute<Scalar>(A).transpose();  // [batch, r]: the bottleneck
    y.noalias() += static_cast<Scalar>(scaling) * t * detail::as_compute<Scalar>(B).transpose();
    return y;
}

/// LoRA forward pass with bias: `y = x W^T + s (x A^T) B^T + bias`, bias `[out]` (any vector
/// expression, row or column). Throws as the form without bias, and when `bias.size() != out`.
template <class DX, class DW, class DA, class DB, class DBias>
Matrix<compute_scalar_t<typename DX::Scalar>> lora_forward(const Eigen::MatrixBase<DX>& x,
                                                           const Eigen::MatrixBase<DW>& W,
                                                           const Eigen::MatrixBase<DA>& A,
                                                           const Eigen::MatrixBase<DB>& B, double scaling,
                                                           const Eigen::MatrixBase<DBias>& bias) {
    using Scalar = compute_scalar_t<typename DX::Scalar>;
    detail::check_bias(bias.size(), W.rows(), "lora_forward");
    Matrix<Scalar> y = lora_forward(x, W, A, B, scaling);
    Vector<Scalar> b(bias.size());
    for (Index i = 0; i < bias.size(); ++i) b(i) = static_cast<Scalar>(bias.derived().coeff(i));
    y.rowwise() += b.transpose();
    return y;
}

/// Forward overloads for an adapter object: `x W^T + s (x A^T) B^T (+ bias)`.
template <class DX, class DW, class Scalar>
Matrix<compute_scalar_t<typename DX::Scalar>> lora_forward(const Eigen::MatrixBase<DX>& x,
                                                           const Eigen::MatrixBase<DW>& W,
                                                           const LoraAdapter<Scalar>& adapter) {
    return lora_forward(x, W, adapter.A, adapter.B, static_cast<double>(adapter.scaling));
}
template <class DX, class DW, class Scalar, class DBias>
Matrix<compute_scalar_t<typename DX::Scalar>> lora_forward(const Eigen::MatrixBase<DX>& x,
                                                           const Eigen::MatrixBase<DW>& W,
                                                           const LoraAdapter<Scalar>& adapter,
                                                           const Eigen::MatrixBase<DBias>& bias) {
    return lora_forward(x, W, adapter.A, adapter.B, static_cast<double>(adapter.scaling), bias);
}

/// Plain LoRA initialisation as peft does it: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (torch's
/// `kaiming_uniform_(a = sqrt(5))` on a `[r, in]` weight), `B = 0`, `s = lora_alpha / r`
/// (or `lora_alpha / sqrt(r)` with rsLoRA). The layer's output is unchanged at step 0.
///
/// `A` is drawn row by row (row-major order, as torch fills `[r, in]`) from
/// `detail::SplitMix64{seed}`: the same seed gives the same adapter on every platform.
/// \throws pissa::invalid_argument when `rank < 1`, `out < 1`, `in < 1` or `lora_alpha` is not
///         finite and positive.
template <class Scalar = float>
LoraAdapter<Scalar> lora_init(Index out, Index in, Index rank, double lora_alpha, std::uint64_t seed,
                              bool use_rslora = false) {
    static_assert(std::is_floating_point_v<Scalar>, "lora_init: Scalar must be float or double");
    detail::require(out >= 1 && in >= 1, "lora_init: layer shape must be positive, got [out, in] = [", out, ", ", in,
                    "]");
    detail::require(rank >= 1, "lora_init: rank must be >= 1, got ", rank);
    detail::require(std::isfinite(lora_alpha) && lora_alpha > 0, "lora_init: lora_alpha must be finite and > 0, got ",
                    lora_alpha);
    LoraAdapter<Scalar> adapter;
    adapter.A.resize(rank, in);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    detail::SplitMix64 rng(seed);
    for (Index i = 0; i < rank; ++i)
        for (Index j = 0; j < in; ++j) adapter.A(i, j) = static_cast<Scalar>(bound * (2.0 * rng.uniform() - 1.0));
    adapter.B = Matrix<Scalar>::Zero(out, rank);
    adapter.scaling = static_cast<Scalar>(lora_scaling(lora_alpha, rank, use_rslora));
    return adapter;
}

namespace detail {

/// W += sign * s * B A, in blocks of rows (so a 16-bit W is widened 64 rows at a time), computed in
/// the compute scalar and rounded back to W's storage.
template <class DW, class DA, class DB>
void add_low_rank(Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
                  double scaling, double sign, const char* where) {
    using Storage = typename DW::Scalar;
    using Scalar = compute_scalar_t<Storage>;
    static_assert(is_supported_storage_v<Storage>, "merge: W must be float, double, Eigen::half or Eigen::bfloat16");
    detail::require(A.rows() >= 1, where, ": adapter rank must be >= 1, got A with ", A.rows(), " rows");
    detail::require(B.cols() == A.rows() && B.rows() == W.rows() && A.cols() == W.cols(), where,
                    ": shapes must be W [out, in], B [out, r], A [r, in]; got W [", W.rows(), ", ", W.cols(), "], B [",
                    B.rows(), ", ", B.cols(), "], A [", A.rows(), ", ", A.cols(), "]");
    detail::require(std::isfinite(scaling), where, ": scaling must be finite, got ", scaling);
    const Matrix<Scalar> Ac = A.template cast<Scalar>();
    const Matrix<Scalar> sB = (static_cast<Scalar>(sign * scaling) * B.template cast<Scalar>()).eval();
    constexpr Index block = 64;
    for (Index row = 0; row < W.rows(); row += block) {
        const Index h = std::min(block, W.rows() - row);
        Matrix<Scalar> rows = W.derived().middleRows(row, h).template cast<Scalar>();
        rows.noalias() += sB.middleRows(row, h) * Ac;
        if constexpr (std::is_same_v<Storage, Scalar>) {
            W.derived().middleRows(row, h) = rows;
        } else {
            W.derived().middleRows(row, h) = rows.template cast<Storage>();
        }
    }
}

}  // namespace detail

/// Merges an adapter into its base weight in place: `W += s B A` (computed in float for 16-bit W,
/// rounded back to W's storage). After merging, `x W^T` equals the LoRA forward pass.
/// \throws pissa::invalid_argument on a shape mismatch, rank < 1 or a non-finite scaling.
template <class DW, class DA, class DB>
void lora_merge(Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
                double scaling) {
    detail::add_low_rank(W, A, B, scaling, +1.0, "lora_merge");
}

/// Undoes lora_merge: `W -= s B A`. Merge then unmerge gives back W to rounding: one rounding of
/// the storage type per entry and step, relative to max(|W_ij|, |s (B A)_ij|).
/// \throws pissa::invalid_argument as lora_merge.
template <class DW, class DA, class DB>
void lora_unmerge(Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
                  double scaling) {
    detail::add_low_rank(W, A, B, scaling, -1.0, "lora_unmerge");
}

/// Overloads for an adapter object.
template <class DW, class Scalar>
void lora_merge(Eigen::MatrixBase<DW>& W, const LoraAdapter<Scalar>& adapter) {
    lora_merge(W, adapter.A, adapter.B, static_cast<double>(adapter.scaling));
}
template <class DW, class Scalar>
void lora_unmerge(Eigen::MatrixBase<DW>& W, const LoraAdapter<Scalar>& adapter) {
    lora_unmerge(W, adapter.A, adapter.B, static_cast<double>(adapter.scaling));
}

}  // namespace pissa

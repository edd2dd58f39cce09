/// \file quant_error.hpp
/// \brief Quantisation error of an NF4 base plus adapter, in Frobenius and nuclear norm, and the
/// reduction against QLoRA that the PiSSA paper reports (its Table 4 uses the nuclear norm).
///
///     E = W - (deq(Q) + s B A)                       [out, in] (stored layout)
///     error_F = ||E||_F,   error_* = ||E||_* = sum_i sigma_i(E)
///     reduction = 1 - error(method) / error(QLoRA),  error(QLoRA) = ||W - deq(Q(W))||
///
/// The nuclear norm needs every singular value of E: it is computed with Eigen's divide-and-conquer
/// BDCSVD asking for singular values only (no U, no V), which skips the accumulation of the
/// orthogonal factors, the dominant cost of a full SVD. That is O(m n min(m, n)) flops: seconds
/// for 1024 x 1024, about a minute for 4096 x 4096 on one core. It runs in the compute scalar
/// (float for float and 16-bit weights) and is summed in double.
#pragma once

#include <pissa/detail/bdcsvd.hpp>
#include <pissa/errors.hpp>
#include <pissa/qpissa.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <utility>

namespace pissa {

/// Which norm a quantisation error is measured in.
enum class QuantErrorNorm { frobenius, nuclear };

/// Nuclear norm `sum_i sigma_i(M)` of any dense matrix, from Eigen::BDCSVD singular values only.
/// \throws pissa::invalid_argument for a non-finite M; pissa::numerical_error if BDCSVD fails.
template <class Derived>
double nuclear_norm(const Eigen::MatrixBase<Derived>& M) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    const Matrix<Scalar> dense = M.template cast<Scalar>();
    if (dense.size() == 0) return 0.0;
    detail::require(dense.allFinite(), "nuclear_norm: the ", dense.rows(), " x ", dense.cols(),
                    " matrix has non-finite values");
    Eigen::BDCSVD<Matrix<Scalar>> svd(dense);  // no ComputeThinU/V: singular values only
    if (svd.info() != Eigen::Success)
        throw numerical_error(
            detail::concat("nuclear_norm: Eigen's BDCSVD failed on a ", dense.rows(), " x ", dense.cols(), " matrix"));
    return svd.singularValues().template cast<double>().sum();
}

/// `E = W - deq(q.base) - s B A` in W's stored layout and the compute scalar.
/// \throws pissa::invalid_argument when W's shape is not the base's.
template <class Derived, class Scalar>
Matrix<Scalar> quantization_error_matrix(const Eigen::MatrixBase<Derived>& W, const QuantizedInit<Scalar>& q) {
    detail::require(W.rows() == q.base.rows && W.cols() == q.base.cols, "quantization_error: W is ", W.rows(), " x ",
                    W.cols(), " but the quantised base is ", q.base.rows, " x ", q.base.cols);
    Matrix<Scalar> error = W.template cast<Scalar>();
    error -= dequantize_nf4<Scalar>(q.base);
    error -= detail::stored_low_rank(q.adapter, W.rows(), W.cols(), q.fan_in_fan_out);
    return error;
}

/// `||W - deq(q.base) - s B A||` in the chosen norm.
/// \throws as quantization_error_matrix and nuclear_norm.
template <class Derived, class Scalar>
double quantization_error(const Eigen::MatrixBase<Derived>& W, const QuantizedInit<Scalar>& q,
                          QuantErrorNorm norm = QuantErrorNorm::frobenius) {
    const Matrix<Scalar> error = quantization_error_matrix(W, q);
    return norm == QuantErrorNorm::nuclear ? nuclear_norm(error) : error.template cast<double>().norm();
}

/// The paper's "error reduction ratio": `1 - error / qlora_error` (0.194 means 19.4% less error).
/// \throws pissa::invalid_argument for qlora_error <= 0.
inline double error_reduction(double error, double qlora_error) {
    detail::require(qlora_error > 0, "error_reduction: the QLoRA error must be > 0, got ", qlora_error);
    return 1.0 - error / qlora_error;
}

/// Errors of QLoRA, LoftQ and QPiSSA on one weight, in both norms (nuclear only when asked).
struct QuantErrorComparison {
    double qlora_frobenius = 0, loftq_frobenius = 0, qpissa_frobenius = 0;
    double qlora_nuclear = -1, loftq_nuclear = -1, qpissa_nuclear = -1;  ///< < 0: not computed

    /// The three errors in one norm: {qlora, loftq, qpissa}.
    struct Triple {
        double qlora, loftq, qpissa;
        double loftq_reduction() const { return error_reduction(loftq, qlora); }
        double qpissa_reduction() const { return error_reduction(qpissa, qlora); }
    };
    Triple frobenius() const { return {qlora_frobenius, loftq_frobenius, qpissa_frobenius}; }
    /// \throws pissa::invalid_argument when the nuclear norms were not computed.
    Triple nuclear() const {
        detail::require(qlora_nuclear >= 0, "QuantErrorComparison: the nuclear norms were not computed");
        return {qlora_nuclear, loftq_nuclear, qpissa_nuclear};
    }
    Triple in(QuantErrorNorm norm) const { return norm == QuantErrorNorm::nuclear ? nuclear() : frobenius(); }
};

/// Runs QLoRA, LoftQ and QPiSSA (same rank, iterations and NF4 options) on W and measures each.
/// \param W the stored weight, as for qpissa_init
/// \param config the rank, iterations and NF4 options shared by the three methods
/// \param with_nuclear also compute the three nuclear norms (three singular-value-only SVDs of W's size)
/// \param qpissa when not null, receives the QPiSSA initialisation (the NF4 base and the adapter)
/// \throws as qpissa_init, loftq_init and nuclear_norm.
template <class Derived>
QuantErrorComparison compare_quantization_errors(
    const Eigen::MatrixBase<Derived>& W, const QuantInitConfig& config, bool with_nuclear = true,
    QuantizedInit<compute_scalar_t<typename Derived::Scalar>>* qpissa = nullptr) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    QuantErrorComparison out;
    auto measure = [&](const QuantizedInit<Scalar>& q, double& fro, double& nuc) {
        const Matrix<Scalar> error = quantization_error_matrix(W, q);
        fro = error.template cast<double>().norm();
        if (with_nuclear) nuc = nuclear_norm(error);
    };
    // W as given (its storage type and layout): the same splits as qlora_init, loftq_init and
    // qpissa_init called on it, bit for bit.
    QuantizedInit<Scalar> qlora = qlora_init(W, config.nf4);
    qlora.fan_in_fan_out = config.pissa.fan_in_fan_out;
    measure(qlora, out.qlora_frobenius, out.qlora_nuclear);
    measure(loftq_init(W, config), out.loftq_frobenius, out.loftq_nuclear);
    QuantizedInit<Scalar> split = qpissa_init(W, config);
    measure(split, out.qpissa_frobenius, out.qpissa_nuclear);
    if (qpissa) *qpissa = std::move(split);
    return out;
}

}  // namespace pissa

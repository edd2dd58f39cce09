/// \file init.hpp
/// \brief PiSSA initialisation: split a pretrained weight into a principal adapter and a residual.
///
/// With `W [out, in]` and the top-r triplets `W ≈ U_r diag(S_r) V_r^T`, scaling `s`
/// (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA) and `S' = S_r / s`:
///
///     A = diag(sqrt(S')) V_r^T   [r, in]
///     B = U_r diag(sqrt(S'))     [out, r]
///     W_res = W - s B A          [out, in], cast back to W's storage dtype
///
/// exactly as peft's `init_lora_weights="pissa"` / `"pissa_niter_K"` (PiSSA paper, Eq. 2-4).
/// `W_res` is computed from the very A and B returned, so `W_res + s B A == W` up to the storage
/// rounding even when the randomized SVD is inexact.
///
/// Two siblings that also need nothing but the weight share the residual step:
/// - MiLoRA (`components = minor`): the r smallest triplets instead of the largest, so training
///   adapts the directions the pretrained weight uses least. Finding them needs the full exact
///   decomposition (O(m n min(m, n)), e.g. a few seconds for 4096 x 4096 on a few cores, against
///   a fraction of a second for the randomized top-r); the randomized method is refused.
/// - OLoRA (`init = olora`, peft's `init_lora_weights="olora"`): `W ≈ Q_r R_r` from the leading QR
///   (leading_qr.hpp), `B = Q_r`, `A = R_r` (no square roots, no division by s), `W_res = W - s B A`.
#pragma once

#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/huge_pages.hpp>
#include <pissa/detail/kernels_avx512.hpp>
#include <pissa/errors.hpp>
#include <pissa/leading_qr.hpp>
#include <pissa/lora.hpp>
#include <pissa/quality.hpp>
#include <pissa/rsvd.hpp>
#include <pissa/svd.hpp>
#include <pissa/svd_result.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

namespace pissa {

/// How the top-r triplets are found: peft's "pissa" (exact) or "pissa_niter_K" (randomized).
enum class SvdMethod { exact, randomized };

/// Which factorisation an adapter starts from: PiSSA's singular triplets (peft's "pissa" /
/// "pissa_niter_K") or OLoRA's leading QR (peft's "olora").
enum class InitMethod { pissa, olora };

/// Which r singular triplets a PiSSA split keeps: the largest (PiSSA) or the smallest (MiLoRA).
enum class Components { principal, minor };

/// Configuration of a PiSSA split, named as in peft's LoraConfig.
struct PissaConfig {
    Index rank = 8;           ///< r, 1 <= r <= min(out, in)
    double lora_alpha = 8;    ///< > 0
    bool use_rslora = false;  ///< scaling alpha / sqrt(r) instead of alpha / r
    SvdMethod method = SvdMethod::exact;
    RandomizedSvdOptions randomized{};    ///< used when method == randomized (niter, oversampling, seed)
    ExactSvdOptions exact{};              ///< used when method == exact
    bool fan_in_fan_out = false;          ///< W is stored [in, out] (GPT-2 Conv1D); the math uses its transpose
    InitMethod init = InitMethod::pissa;  ///< olora: the leading QR instead of the SVD
    Components components = Components::principal;  ///< minor: MiLoRA (needs method == exact)

    /// The LoRA scaling s: alpha / r, or alpha / sqrt(r) with rsLoRA.
    double scaling() const { return lora_scaling(lora_alpha, rank, use_rslora); }
};

/// The scalings init accepts (see require_valid).
inline constexpr double min_scaling = 1e-12, max_scaling = 1e12;

/// Throws pissa::invalid_argument for a configuration outside its ranges, including a scaling
/// outside [min_scaling, max_scaling] (the rank against the matrix is checked by init itself).
inline void require_valid(const PissaConfig& config) {
    detail::require(config.rank >= 1, "pissa::init: rank must be >= 1, got ", config.rank);
    detail::require(std::isfinite(config.lora_alpha) && config.lora_alpha > 0,
                    "pissa::init: lora_alpha must be a finite number > 0, got ", config.lora_alpha);
    // A and B hold sqrt(S / s) in float32: a scaling far outside [1e-12, 1e12] underflows or
    // overflows them (a zero or NaN adapter) long before any real lora_alpha / r gets there.
    const double s = config.rank >= 1 ? config.scaling() : 1.0;
    detail::require(s >= min_scaling && s <= max_scaling, "pissa::init: the scaling lora_alpha / ",
                    config.use_rslora ? "sqrt(r)" : "r", " = ", s, " (lora_alpha ", config.lora_alpha, ", r ",
                    config.rank, ") is outside [", min_scaling, ", ", max_scaling,
                    "], where float32 adapters cannot represent the split");
    require_valid(config.randomized);
    require_valid(config.exact);
    detail::require(config.components == Components::principal || config.init == InitMethod::pissa,
                    "pissa::init: minor components (MiLoRA) are singular triplets; OLoRA has none");
    detail::require(config.components == Components::principal || config.init == InitMethod::olora ||
                        config.method == SvdMethod::exact,
                    "pissa::init: minor components (MiLoRA) need the exact decomposition: the randomized SVD "
                    "finds the largest triplets only");
}

/// The trainable half of a PiSSA split (float32 for 16-bit storage, as peft keeps adapters): a
/// LoraAdapter (`A [r, in]`, `B [out, r]`, `scaling`), so lora_forward / lora_merge take it as is,
/// plus what the decomposition found.
template <class Scalar>
struct PissaAdapter : LoraAdapter<Scalar> {
    Vector<Scalar> singular_values;  ///< the kept S (not divided by s), descending; empty for OLoRA
    QualityReport quality;
    ConvergenceReport convergence;  ///< of the SVD that produced S_r
};

/// An adapter plus the residual `W - s B A` in W's stored layout and dtype.
template <class Scalar, class Storage>
struct PissaResult : PissaAdapter<Scalar> {
    Matrix<Storage> residual;  ///< [out, in], or [in, out] with fan_in_fan_out
};

namespace detail {

/// The top-r triplets of the [out, in] view of the stored weight, by the configured method; the
/// randomized SVD on `workspace`'s buffers when given (kept from one weight to the next).
template <class Derived>
SvdResult<compute_scalar_t<typename Derived::Scalar>> pissa_svd(
    const Eigen::MatrixBase<Derived>& stored, const PissaConfig& config,
    RandomizedSvdWorkspace<compute_scalar_t<typename Derived::Scalar>>* workspace = nullptr) {
    const Index out = config.fan_in_fan_out ? stored.cols() : stored.rows();
    const Index in = config.fan_in_fan_out ? stored.rows() : stored.cols();
    check_rank(out, in, config.rank, "pissa::init");
    auto decompose = [&](const auto& W) {
        if (config.components == Components::minor) {  // all triplets, the last r kept
            auto all = truncated_svd(W, std::min(out, in), config.exact);
            SvdResult<compute_scalar_t<typename Derived::Scalar>> minor;
            minor.U = all.U.rightCols(config.rank);
            minor.S = all.S.tail(config.rank);
            minor.V = all.V.rightCols(config.rank);
            minor.report = all.report;
            return minor;
        }
        if (config.method == SvdMethod::exact) return truncated_svd(W, config.rank, config.exact);
        if (workspace == nullptr) return randomized_svd(W, config.rank, config.randomized);
        SvdResult<compute_scalar_t<typename Derived::Scalar>> svd;
        randomized_svd(W, config.rank, config.randomized, *workspace, svd);
        return svd;
    };
    return config.fan_in_fan_out ? decompose(stored.transpose()) : decompose(stored);
}

/// A, B and the scaling from the triplets (file comment, steps 3-4).
template <class Scalar>
PissaAdapter<Scalar> adapter_from_svd(SvdResult<Scalar>&& svd, const PissaConfig& config) {
    PissaAdapter<Scalar> adapter;
    adapter.scaling = static_cast<Scalar>(config.scaling());
    const Vector<Scalar> root = (svd.S / adapter.scaling).cwiseSqrt();
    adapter.A = root.asDiagonal() * svd.V.transpose();
    adapter.B = svd.U * root.asDiagonal();
    adapter.singular_values = std::move(svd.S);
    adapter.convergence = svd.report;
    return adapter;
}

/// A = R_r, B = Q_r and the scaling from the leading QR of the [out, in] view (OLoRA).
template <class Derived>
PissaAdapter<compute_scalar_t<typename Derived::Scalar>> olora_adapter(const Eigen::MatrixBase<Derived>& stored,
                                                                       const PissaConfig& config) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    const Index out = config.fan_in_fan_out ? stored.cols() : stored.rows();
    const Index in = config.fan_in_fan_out ? stored.rows() : stored.cols();
    check_rank(out, in, config.rank, "pissa::init");
    auto qr = config.fan_in_fan_out ? leading_qr(stored.transpose(), config.rank) : leading_qr(stored, config.rank);
    PissaAdapter<Scalar> adapter;
    adapter.scaling = static_cast<Scalar>(config.scaling());
    adapter.A = std::move(qr.R);
    adapter.B = std::move(qr.Q);
    adapter.convergence.iterations = 1;
    adapter.convergence.converged = true;
    return adapter;
}

/// The adapter of a split, by the configured method (file comment); see pissa_svd for `workspace`.
template <class Derived>
PissaAdapter<compute_scalar_t<typename Derived::Scalar>> initial_adapter(
    const Eigen::MatrixBase<Derived>& stored, const PissaConfig& config,
    RandomizedSvdWorkspace<compute_scalar_t<typename Derived::Scalar>>* workspace = nullptr) {
    if (config.init == InitMethod::olora) return olora_adapter(stored, config);
    return adapter_from_svd(pissa_svd(stored, config, workspace), config);
}

#if PISSA_HAVE_AVX512_KERNELS
/// write_residual's block loop by the AVX-512 rank-r update (kernels_avx512.hpp): Eigen's GEMM is
/// compiled for the consumer's baseline ISA (no -march on pissa) and at r = 128 costs as much as
/// the SVD. Each element is the same chain of fused multiply-subtracts whatever the layout, so
/// init() and init_in_place() give the same bits: a row-major source is updated by row blocks
/// (into a column-major target through a row-major staging block), a column-major one as its
/// row-major transpose by column blocks. Fills the per-block squared norms; returns false (and
/// does nothing) for double, a column-major source with a row-major target, or without AVX-512.
template <class Scalar, class SourceDerived, class TargetDerived>
bool write_residual_avx512(const Eigen::MatrixBase<SourceDerived>& source, Eigen::MatrixBase<TargetDerived>& target,
                           const Matrix<Scalar>& left, const Matrix<Scalar>& right, std::vector<double>& weight_sq,
                           std::vector<double>& residual_sq) {
    using Storage = typename TargetDerived::Scalar;
    constexpr bool source_rows = SourceDerived::IsRowMajor, target_rows = TargetDerived::IsRowMajor;
    constexpr bool direct = (int(Eigen::internal::traits<SourceDerived>::Flags) & Eigen::DirectAccessBit) != 0 &&
                            (int(Eigen::internal::traits<TargetDerived>::Flags) & Eigen::DirectAccessBit) != 0;
    if constexpr (!std::is_same_v<Scalar, float> || std::is_same_v<Storage, double> ||
                  !std::is_same_v<typename SourceDerived::Scalar, Storage> || !direct ||
                  (!source_rows && target_rows)) {
        return false;
    } else {
        if (active_kernel_isa() != KernelIsa::avx512 || source.derived().innerStride() != 1 ||
            target.derived().innerStride() != 1 || source.size() == 0)
            return false;
        // The row-major view [rows, cols] = view - L R: L col-major (leading dimension ldl), R
        // packed in strips. For a column-major source the view is W^T = W^T - right^T left^T.
        const RowMatrix<float> right_rows = right;
        const Index rows = source_rows ? source.rows() : source.cols();
        const Index cols = source_rows ? source.cols() : source.rows();
        const float* L = source_rows ? left.data() : right_rows.data();
        const Index ldl = source_rows ? left.rows() : right_rows.cols();
        std::vector<float> strip_buffer;
        const float* strips =
            source_rows
                ? avx512::pack_update_strips(right_rows.data(), right_rows.cols(), left.cols(), cols, strip_buffer)
                : avx512::pack_update_strips(left.data(), left.rows(), left.cols(), cols, strip_buffer);
        const Storage* source_data = source.derived().data();
        Storage* target_data = target.derived().data();
        const Index source_stride = source.derived().outerStride(), target_stride = target.derived().outerStride();
        const Index block = 64, blocks = (rows + block - 1) / block;
        weight_sq.assign(static_cast<std::size_t>(blocks), 0.0);
        residual_sq.assign(weight_sq.size(), 0.0);
#ifdef _OPENMP
#pragma omp parallel
#endif
        {
            constexpr bool staged = source_rows && !target_rows;
            std::vector<Storage> staging(staged ? static_cast<std::size_t>(block * cols) : 0);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (Index b = 0; b < blocks; ++b) {
                const Index r0 = b * block, nr = std::min(block, rows - r0);
                Storage* out = staged ? staging.data() : target_data + r0 * target_stride;
                const auto i = static_cast<std::size_t>(b);
                avx512::subtract_low_rank(source_data + r0 * source_stride, source_stride, out,
                                          staged ? cols : target_stride, nr, cols, L + r0, ldl, strips, left.cols(),
                                          weight_sq[i], residual_sq[i]);
                if constexpr (staged)
                    target.middleRows(r0, nr) = Eigen::Map<const RowMatrix<Storage>>(staging.data(), nr, cols);
            }
        }
        return true;
    }
}
#endif

/// Writes `target = source - s B A` (stored layout) block by block, and fills the quality report.
/// `target` may alias `source` (the in-place form). Blocks are fixed-size and norms are summed in
/// block order, so the result does not depend on the thread count.
template <class Scalar, class SourceDerived, class TargetDerived>
void write_residual(const Eigen::MatrixBase<SourceDerived>& source, Eigen::MatrixBase<TargetDerived>& target,
                    PissaAdapter<Scalar>& adapter, bool fan_in_fan_out) {
    using Storage = typename TargetDerived::Scalar;
    // Stored low-rank term: left [rows, r] * right [r, cols].
    const Matrix<Scalar> left = fan_in_fan_out ? Matrix<Scalar>(adapter.A.transpose() * adapter.scaling)
                                               : Matrix<Scalar>(adapter.B * adapter.scaling);
    const Matrix<Scalar> right = fan_in_fan_out ? Matrix<Scalar>(adapter.B.transpose()) : adapter.A;
    std::vector<double> weight_sq, residual_sq;
    bool done = false;
#if PISSA_HAVE_AVX512_KERNELS
    done = write_residual_avx512(source, target, left, right, weight_sq, residual_sq);
#endif
    if (!done) {
        const Index rows = source.rows(), block = 64;
        const Index blocks = (rows + block - 1) / block;
        weight_sq.assign(static_cast<std::size_t>(blocks), 0.0);
        residual_sq.assign(weight_sq.size(), 0.0);
#ifdef _OPENMP
#pragma omp parallel
#endif
        {
            // Row-major like the weights the tool streams (no transposing copies), and reused from
            // block to block (no fresh pages per block).
            RowMatrix<Scalar> residual;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (Index b = 0; b < blocks; ++b) {
                const Index r0 = b * block, nr = std::min(block, rows - r0);
                residual = source.middleRows(r0, nr).template cast<Scalar>();
                weight_sq[static_cast<std::size_t>(b)] = residual.template cast<double>().squaredNorm();
                residual.noalias() -= left.middleRows(r0, nr) * right;
                target.middleRows(r0, nr) = residual.template cast<Storage>();  // source rows r0.. already read
                residual_sq[static_cast<std::size_t>(b)] =
                    target.middleRows(r0, nr).template cast<double>().squaredNorm();
            }
        }
    }
    double weight_total = 0, residual_total = 0;
    for (std::size_t b = 0; b < weight_sq.size(); ++b) {
        weight_total += weight_sq[b];
        residual_total += residual_sq[b];
    }
    // ||s B A||_F^2 = s^2 tr((B^T B)(A A^T)), from r x r matrices only.
    const Matrix<double> btb = (adapter.B.transpose() * adapter.B).template cast<double>();
    const Matrix<double> aat = (adapter.A * adapter.A.transpose()).template cast<double>();
    const double s = static_cast<double>(adapter.scaling);
    const double adapter_sq = s * s * (btb.cwiseProduct(aat.transpose())).sum();
    QualityReport& q = adapter.quality;
    q.singular_values.assign(adapter.singular_values.data(),
                             adapter.singular_values.data() + adapter.singular_values.size());
    q.weight_norm = std::sqrt(weight_total);
    q.residual_norm = std::sqrt(residual_total);
    q.adapter_energy_fraction = weight_total > 0 ? std::min(1.0, adapter_sq / weight_total) : 0.0;
}

/// init_in_place, the randomized SVD on `workspace`'s buffers when given (see pissa_svd): a model's
/// many weights reuse one set instead of faulting in fresh pages for each.
template <class Derived>
PissaAdapter<compute_scalar_t<typename Derived::Scalar>> init_in_place(
    Eigen::MatrixBase<Derived>& W, const PissaConfig& config,
    RandomizedSvdWorkspace<compute_scalar_t<typename Derived::Scalar>>* workspace) {
    require_valid(config);
    auto adapter = initial_adapter(W, config, workspace);
    write_residual(W, W, adapter, config.fan_in_fan_out);
    return adapter;
}

}  // namespace detail

/// PiSSA split of a pretrained weight (see the file comment).
///
/// \param W       the stored weight: `[out, in]`, or `[in, out]` with `config.fan_in_fan_out`; any
///                Eigen expression of float, double, Eigen::half or Eigen::bfloat16 (16-bit storage
///                is decomposed in float32 and the residual rounded back, as peft does).
/// \param config  rank, lora_alpha, rsLoRA, method and its options, fan_in_fan_out
/// \returns A `[r, in]`, B `[out, r]`, the scaling, S_r, the quality report and the residual.
/// \throws pissa::invalid_argument for rank <= 0 or > min(out, in), lora_alpha <= 0, niter < 0,
///         a non-finite or empty W; pissa::numerical_error if the SVD fails.
template <class Derived>
PissaResult<compute_scalar_t<typename Derived::Scalar>, typename Derived::Scalar> init(
    const Eigen::MatrixBase<Derived>& W, const PissaConfig& config) {
    using Storage = typename Derived::Scalar;
    using Scalar = compute_scalar_t<Storage>;
    require_valid(config);
    PissaResult<Scalar, Storage> result;
    static_cast<PissaAdapter<Scalar>&>(result) = detail::initial_adapter(W, config);
    result.residual.resize(W.rows(), W.cols());
    detail::advise_huge_pages(result.residual.data(), sizeof(Storage) * std::size_t(result.residual.size()));
    detail::write_residual(W, result.residual, result, config.fan_in_fan_out);
    return result;
}

/// In-place PiSSA split for large weights: overwrites `W` (e.g. an Eigen::Map over a checkpoint
/// buffer) with its residual, in its own dtype and layout, and returns the adapter. No copy of W
/// is made beyond what the SVD method needs (none for the randomized and block Krylov methods on
/// directly addressable W, but the bfloat16 copy of a float32 W that the randomized SVD's
/// bfloat16 products multiply).
/// \throws as init; W is left untouched when anything is thrown.
template <class Derived>
PissaAdapter<compute_scalar_t<typename Derived::Scalar>> init_in_place(Eigen::MatrixBase<Derived>& W,
                                                                       const PissaConfig& config) {
    return detail::init_in_place(W, config, nullptr);
}

}  // namespace pissa

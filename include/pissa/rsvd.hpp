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
/// That is 2K + 2 passes over W. Each `qr` is Householder QR, or CholeskyQR2
/// (detail/cholesky_qr.hpp: two Gram matrices and two triangular updates, skinny products all)
/// where that is faster (detail::prefer_cholesky_qr), with Householder QR where the block is too
/// ill-conditioned for it: the same orthonormal columns up to rounding and signs.
///
/// With `fused_power_iteration` each power step is `Q = qr(W^T (W Q))` (one orthonormalisation
/// per step instead of two), and for a row-major W with q <= 24 on the AVX-512 kernels
/// `W^T (W Q)` is computed in ONE pass over W (detail::multiply_gram): K + 2 passes in all. It is
/// a different algorithm (less robust in float32 when niter is large and the spectrum decays
/// fast: the power step squares the condition of the basis before it is orthonormalised), so it
/// is opt-in. Its orthonormalisations are CholeskyQR2 on every CPU.
///
/// The products can round to bfloat16 and multiply on the AMX tile unit (ProductPrecision; the
/// default where AMX is present): for a bfloat16 W the skinny operand is rounded (W is stored in
/// bfloat16 anyway); a float32 W is rounded to bfloat16 once, and that copy makes every product
/// but the last two (`W^T P` of the last power step, so that Q lies in W's own row space, and
/// `B = W Q`), which are float32. The sums, the orthonormalisations and the small SVD stay float32.
/// The error against the optimum moves by less than 1e-4 relative (docs/math.md).
///
/// The Gaussian draws come from pissa's own splitmix64 stream (not torch's generator), so the
/// result is a deterministic function of (W, rank, options) on every platform and thread count.
#pragma once

#include <pissa/detail/cholesky_qr.hpp>
#include <pissa/detail/random.hpp>
#include <pissa/detail/ritz.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/tall_qr.hpp>
#include <pissa/detail/validate.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/errors.hpp>
#include <pissa/svd_result.hpp>
#include <pissa/types.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace pissa {

/// The arithmetic of the randomized SVD's products with W. Sums are float32 in every mode.
enum class ProductPrecision {
    /// `bfloat16` where the CPU has AMX (about 5x the float32 products' speed at q = 128 there),
    /// `float32` elsewhere. The default.
    automatic,
    /// W widened to float32 and float32 products, as torch.svd_lowrank computes.
    float32,
    /// Operands rounded to bfloat16, float32 accumulation: AMX (`tdpbf16ps`) where present, else
    /// AVX512_BF16 (`vdpbf16ps`; on the Intel Xeon measured it is 0.75x the float32 products'
    /// speed, see docs/performance.md), else float32. A bfloat16 W: the skinny operand is rounded,
    /// W used as stored. A float32 W: a bfloat16 copy of W makes every product but the last two,
    /// which are float32 (see the file comment). float16 and double W: float32 (double) products.
    /// The error against the Eckart-Young optimum moves by less than 1e-4 relative on the
    /// measured shapes (docs/math.md, "Products in bfloat16").
    bfloat16,
};

/// "auto", "float32" or "bfloat16": the option's name on the command line, in Python and in
/// adapter metadata.
inline const char* product_precision_name(ProductPrecision p) {
    return p == ProductPrecision::float32 ? "float32" : p == ProductPrecision::bfloat16 ? "bfloat16" : "auto";
}

/// The ProductPrecision named `name` (product_precision_name); pissa::invalid_argument otherwise.
inline ProductPrecision parse_product_precision(const std::string& name) {
    for (const ProductPrecision p :
         {ProductPrecision::automatic, ProductPrecision::float32, ProductPrecision::bfloat16})
        if (name == product_precision_name(p)) return p;
    throw invalid_argument("products must be auto, float32 or bfloat16, got '" + name + "'");
}

/// Options of the randomized SVD; the defaults are peft's `pissa_niter_4`.
struct RandomizedSvdOptions {
    int niter = 4;                       ///< power iterations K >= 0 (peft: the K of "pissa_niter_K")
    Index oversampling = 0;              ///< extra test vectors p >= 0, q = r + p capped at min(m, n)
    std::uint64_t seed = 0;              ///< seed of the Gaussian test matrix
    bool fused_power_iteration = false;  ///< Q = qr(W^T (W Q)) per step; see the file comment
    ProductPrecision products = ProductPrecision::automatic;  ///< see ProductPrecision
};

/// Whether randomized_svd with these options multiplies a `Storage` W (or, for float, its
/// bfloat16 copy) in bfloat16 on this machine.
template <class Storage>
bool uses_bf16_products(const RandomizedSvdOptions& options) {
    using Multiplied = std::conditional_t<std::is_same_v<Storage, float>, Eigen::bfloat16, Storage>;
    if (!detail::bf16_products_available<Multiplied, compute_scalar_t<Storage>>()) return false;
    return options.products == ProductPrecision::bfloat16 ||
           (options.products == ProductPrecision::automatic && detail::cpu_supports_amx_bf16());
}

/// Throws pissa::invalid_argument for options outside their ranges.
inline void require_valid(const RandomizedSvdOptions& options) {
    detail::require(options.niter >= 0, "randomized_svd: niter must be >= 0, got ", options.niter);
    detail::require(options.oversampling >= 0, "randomized_svd: oversampling must be >= 0, got ", options.oversampling);
}

namespace detail {

/// What randomized_svd allocates, kept between calls by RandomizedSvd (about 8 q (m + n) floats,
/// plus about 3 q (m + n) where CholeskyQR2 runs; the fused power step adds Z and up to 7 partial
/// sums of it, 8 q n; a float32 W with bfloat16 products its rounded copy, m n bfloat16).
template <class Scalar>
struct RandomizedSvdWorkspace {
    KernelWorkspace kernels;
    Matrix<Scalar> G, Q, P;                              ///< test matrix [m, q], basis [n, q], image [m, q]
    Matrix<Scalar> Z;                                    ///< W^T (W Q) [n, q] of the fused power step
    TallQr<Scalar> qr_image, qr_basis;                   ///< factorisations of P and Q
    CholeskyQr2<Scalar> cholesky_image, cholesky_basis;  ///< the same by CholeskyQR2 (see randomized_svd)
    RoundedWeight rounded;                               ///< a float32 W in bfloat16, for the range finder
};

/// Whether the standard path orthonormalises by CholeskyQR2: where its four skinny products run on
/// the AVX-512 kernels and Eigen's own code (Householder QR) is not compiled for AVX-512. Built
/// for the baseline ISA, Householder QR takes twice as long ([11008, 128] float: 20.5 against
/// 10.5 ms, two threads) and at rank 128 outweighed the products of a bfloat16 W; with
/// `-march=native` it is as fast (8.7 against 9.7 ms) and stays.
template <class Scalar>
bool prefer_cholesky_qr() {
#if defined(EIGEN_VECTORIZE_AVX512)
    return false;
#else
    return use_avx512_kernels<Scalar, Scalar>();
#endif
}

/// The range finder of the file comment: Q = qr(W^T G), then the K power steps; the basis goes
/// to `ws.Q`. `rough` makes every product but the last; `exact` (W as stored) the last,
/// `Q = qr(W^T P)`, so that Q lies in the row space of W itself: then `B = W Q` captures W to
/// float32 precision whatever `rough` rounded (W rounded to bfloat16 misses 2^-9 of W's norm).
template <class Scalar, class Rough, class Exact>
void find_range(const Rough& rough, const Exact& exact, Index q, const RandomizedSvdOptions& options, bool cholesky,
                RandomizedSvdWorkspace<Scalar>& ws) {
    constexpr bool distinct = !std::is_same_v<Rough, Exact>;
    PISSA_ASSERT(!distinct || options.niter > 0);
    fill_gaussian(ws.G, rough.rows(), q, options.seed);
    rough.apply_transposed(ws.G, ws.Q);
    require_finite_product(rough, ws.Q, "randomized_svd");
    const auto orthonormalize = [&](Matrix<Scalar>& X, CholeskyQr2<Scalar>& cholesky_qr, TallQr<Scalar>& qr) {
        if (cholesky) cholesky_qr.orthonormalize(X, qr);
        else qr.orthonormalize(X);
    };
    orthonormalize(ws.Q, ws.cholesky_basis, ws.qr_basis);
    for (int it = 0; it < options.niter; ++it) {
        const bool last = it + 1 == options.niter;
        if (options.fused_power_iteration) {
            if (distinct && last) {
                rough.apply(ws.Q, ws.P);
                exact.apply_transposed(ws.P, ws.Z);
            } else {
                rough.apply_gram(ws.Q, ws.Z, ws.P);
            }
            ws.Q.swap(ws.Z);
        } else {
            rough.apply(ws.Q, ws.P);
            orthonormalize(ws.P, ws.cholesky_image, ws.qr_image);
            if (last) exact.apply_transposed(ws.P, ws.Q);
            else rough.apply_transposed(ws.P, ws.Q);
        }
        orthonormalize(ws.Q, ws.cholesky_basis, ws.qr_basis);
    }
}

/// The algorithm of the file comment; the triplets go to `out`.
template <class Scalar, class Storage>
void randomized_svd(const PreparedWeight<Storage>& weight, Index rank, const RandomizedSvdOptions& options,
                    RandomizedSvdWorkspace<Scalar>& ws, SvdResult<Scalar>& out) {
    const bool bf16 = uses_bf16_products<Storage>(options);
    // A float32 W is multiplied in bfloat16 only through its rounded copy, by the range finder.
    const WeightOperator<Storage> W{weight, ws.kernels, bf16 && !std::is_same_v<Storage, float>};
    const Index q = std::min(std::min(W.rows(), W.cols()), rank + options.oversampling);
    const bool cholesky = options.fused_power_iteration || prefer_cholesky_qr<Scalar>();
    if constexpr (std::is_same_v<Storage, float>) {
        if (bf16 && options.niter > 0 && round_weight_bf16(weight, ws.rounded))
            find_range(WeightOperator<Eigen::bfloat16>{ws.rounded.weight, ws.kernels, true}, W, q, options, cholesky,
                       ws);
        else find_range(W, W, q, options, cholesky, ws);
    } else {
        find_range(W, W, q, options, cholesky, ws);
    }
    W.apply(ws.Q, ws.P);  // B = W Q  [m, q]
    if (cholesky)
        ritz_triplets(ws.Q, ws.P, rank, rank, "randomized_svd", out.U, out.S, out.V, ws.cholesky_image, ws.qr_image,
                      ws.kernels);
    else ritz_triplets(ws.Q, ws.P, rank, rank, "randomized_svd", out.U, out.S, out.V, ws.qr_image);
    out.S.conservativeResize(rank);
    out.report = {options.niter, -1.0, true};
    canonicalize_signs(out);
}

/// Checks the arguments of randomized_svd (public forms).
template <class Derived>
void check_randomized_svd_arguments(const Eigen::MatrixBase<Derived>& W, Index rank,
                                    const RandomizedSvdOptions& options) {
    static_assert(is_supported_storage_v<typename Derived::Scalar>,
                  "pissa: W must hold float, double, Eigen::half or Eigen::bfloat16");
    check_rank(W.rows(), W.cols(), rank, "randomized_svd");
    require_valid(options);
}

/// randomized_svd on the buffers of `workspace`, kept between calls (what RandomizedSvd does for
/// one set of options; the checkpoint pipeline varies the seed and rank per module).
template <class Derived>
void randomized_svd(const Eigen::MatrixBase<Derived>& W, Index rank, const RandomizedSvdOptions& options,
                    RandomizedSvdWorkspace<compute_scalar_t<typename Derived::Scalar>>& workspace,
                    SvdResult<compute_scalar_t<typename Derived::Scalar>>& out) {
    check_randomized_svd_arguments(W, rank, options);
    PreparedWeight<typename Derived::Scalar> prepared;
    prepare_weight(W, prepared);
    randomized_svd(prepared, rank, options, workspace, out);
}

}  // namespace detail

/// Randomized top-`rank` triplets of `W [m, n]` (see the file comment), S descending.
///
/// \param W     any Eigen dense expression; computation in `compute_scalar_t<Scalar>`.
/// \param rank  1 <= rank <= min(m, n)
/// \param options niter, oversampling, seed, fused_power_iteration, products
/// \throws pissa::invalid_argument for a rank out of range, negative niter or oversampling, an
///         empty or non-finite W; pissa::numerical_error if the small SVD fails.
/// \warning The test matrix comes from pissa's generator, not torch's: the same seed does not
///          reproduce torch.svd_lowrank's bits, only its distribution.
template <class Derived>
SvdResult<compute_scalar_t<typename Derived::Scalar>> randomized_svd(const Eigen::MatrixBase<Derived>& W, Index rank,
                                                                     const RandomizedSvdOptions& options = {}) {
    using Scalar = compute_scalar_t<typename Derived::Scalar>;
    detail::RandomizedSvdWorkspace<Scalar> workspace;
    SvdResult<Scalar> result;
    detail::randomized_svd(W, rank, options, workspace, result);
    return result;
}

/// Object form of randomized_svd, for many matrices in a row (a model's layers): the buffers of
/// the decomposition and of the result are kept between compute() calls, so same-shaped matrices
/// reuse them. Fresh multi-megabyte buffers cost a page fault per 4 KiB; on a measured 2-core VM
/// (12 us a fault) that is 25% of a 4096 x 4096, r = 128 decomposition.
///
///     RandomizedSvd<float> svd(options);
///     for (auto& W : weights) use(svd.compute(W, r).matrix_u(), svd.singular_values(), svd.matrix_v());
template <class Scalar>
class RandomizedSvd : public SvdBase<Scalar> {
    static_assert(std::is_floating_point_v<Scalar>, "pissa::RandomizedSvd: Scalar must be float or double");

public:
    explicit RandomizedSvd(RandomizedSvdOptions options = {})
        : SvdBase<Scalar>("pissa::RandomizedSvd"), m_options(options) {
        require_valid(options);
    }

    /// Computes the top-`rank` triplets of W (see randomized_svd); returns *this.
    template <class Derived>
    RandomizedSvd& compute(const Eigen::MatrixBase<Derived>& W, Index rank) {
        static_assert(std::is_same_v<compute_scalar_t<typename Derived::Scalar>, Scalar>,
                      "pissa::RandomizedSvd: W's compute scalar must match the class's Scalar");
        this->m_computed = false;  // a throwing call leaves no stale result behind
        detail::randomized_svd(W, rank, m_options, m_workspace, this->m_result);
        this->m_computed = true;
        return *this;
    }

private:
    RandomizedSvdOptions m_options;
    detail::RandomizedSvdWorkspace<Scalar> m_workspace;
};

}  // namespace pissa

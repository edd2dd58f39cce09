// The skinny products Y = W X, Z = W^T Y and Z = W^T (W Q) (detail/skinny_gemm.hpp), both kernel
// families, every storage dtype: against a double-precision reference on odd shapes (m, n not
// multiples of the tiles, q = 1..130), row strides larger than the row, empty operands, and bit
// identity across thread counts and placements of W in memory. The orthonormalisation between them
// (detail/orthonormalize.hpp, detail/tall_qr.hpp: one Householder QR or the two-block TSQR) on well
// conditioned, ill-conditioned and rank-deficient input; CholeskyQR2 (detail/cholesky_qr.hpp) on
// both kernel families, its Householder fallback and its bits across thread counts; the parallel Gaussian fill
// (detail/random.hpp) against the sequential stream. The bfloat16 products of a bfloat16 W (AVX512_BF16
// and AMX kernels, each called directly where the CPU has it): exact products of the operands as
// rounded, float32 sums, on odd shapes and strides, and the same bits on any thread count.
#include "support.hpp"

#include <pissa/detail/cholesky_qr.hpp>
#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/orthonormalize.hpp>
#include <pissa/detail/random.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/tall_qr.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace pissa_test;
using pissa::detail::KernelIsa;
using pissa::detail::RowMajorView;

namespace {

/// The families this machine can run: portable always, avx512 when supported.
std::vector<KernelIsa> families() {
    std::vector<KernelIsa> out{KernelIsa::portable};
    if (pissa::detail::cpu_supports_avx512_kernels()) out.push_back(KernelIsa::avx512);
    return out;
}

/// Restores automatic kernel selection when it goes out of scope.
struct IsaScope {
    explicit IsaScope(KernelIsa isa) { pissa::detail::set_kernel_isa_override(isa); }
    ~IsaScope() { pissa::detail::set_kernel_isa_override(KernelIsa::portable, true); }
};

/// A row-major [m, n] weight in Storage with row stride `stride` >= n; the padding holds NaN so
/// that a kernel reading past the row shows up.
template <class Storage>
struct StridedWeight {
    std::vector<Storage> data;
    RowMajorView<Storage> view;
    Matrix<double> exact;  // the stored values, widened

    StridedWeight(Index m, Index n, Index stride, std::uint64_t seed) : exact(m, n) {
        data.assign(static_cast<std::size_t>(std::max<Index>(1, m * stride)),
                    Storage(std::numeric_limits<float>::quiet_NaN()));
        const Matrix<double> g = gaussian<double>(m, n, seed);
        for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < n; ++j) {
                data[static_cast<std::size_t>(i * stride + j)] = static_cast<Storage>(g(i, j));
                exact(i, j) = static_cast<double>(data[static_cast<std::size_t>(i * stride + j)]);
            }
        view = {data.data(), m, n, stride};
    }
};

/// max over entries of |got - want| / bound: the error against the sum of |terms| of each entry.
template <class Scalar>
double worst_scaled_error(const Matrix<Scalar>& got, const Matrix<double>& want, const Matrix<double>& bound) {
    REQUIRE(got.rows() == want.rows());
    REQUIRE(got.cols() == want.cols());
    double worst = 0;
    for (Index k = 0; k < want.cols(); ++k)
        for (Index i = 0; i < want.rows(); ++i) {
            const double err = std::abs(static_cast<double>(got(i, k)) - want(i, k));
            if (!std::isfinite(err)) return std::numeric_limits<double>::infinity();
            worst = std::max(worst, err / (bound(i, k) + 1e-300));
        }
    return worst;
}

/// The error of A B against (|A| |B|)(i, k).
template <class Scalar>
double scaled_error(const Matrix<Scalar>& got, const Matrix<double>& A, const Matrix<double>& B) {
    return worst_scaled_error(got, A * B, A.cwiseAbs() * B.cwiseAbs());
}

/// The error of W^T (W Q) against (|W|^T |W| |Q|)(i, k).
template <class Scalar>
double scaled_gram_error(const Matrix<Scalar>& got, const Matrix<double>& W, const Matrix<double>& Q) {
    return worst_scaled_error(got, W.transpose() * (W * Q), W.cwiseAbs().transpose() * (W.cwiseAbs() * Q.cwiseAbs()));
}

template <class Storage>
void check_products(const StridedWeight<Storage>& W, Index q, std::uint64_t seed) {
    using Scalar = pissa::compute_scalar_t<Storage>;
    const double tolerance = 50 * eps<Scalar>();  // far below the O(1) error of a wrong index or sign
    const Index m = W.view.rows, n = W.view.cols;
    const Matrix<Scalar> X = gaussian<Scalar>(n, q, seed);
    const Matrix<Scalar> Yin = gaussian<Scalar>(m, q, seed + 1);
    Matrix<Scalar> Y, Z;
    pissa::detail::multiply(W.view, X, Y);
    pissa::detail::multiply_transposed(W.view, Yin, Z);
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(q);
    CAPTURE(W.view.stride);
    CHECK(scaled_error(Y, W.exact, X.template cast<double>()) <= tolerance);
    CHECK(scaled_error(Z, W.exact.transpose(), Yin.template cast<double>()) <= tolerance);
}

/// Calls `check(view)` with a copy of the dense W at every element offset within a 64-byte line,
/// the memory around it NaN (a kernel reading outside W shows up).
template <class Storage, class Check>
void at_every_offset(const StridedWeight<Storage>& W, Check&& check) {
    const Index m = W.view.rows, n = W.view.cols, line = 64 / Index(sizeof(Storage));
    REQUIRE(W.view.stride == n);
    std::vector<Storage> buffer(static_cast<std::size_t>(m * n + 3 * line),
                                Storage(std::numeric_limits<float>::quiet_NaN()));
    // The first element of `buffer` at or after a 64-byte boundary.
    const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
    const Index aligned = Index((64 - address % 64) % 64 / sizeof(Storage));
    for (Index offset = 0; offset < line; ++offset) {
        CAPTURE(offset);
        Storage* start = buffer.data() + aligned + offset;
        std::copy(W.data.begin(), W.data.begin() + m * n, start);
        check(RowMajorView<Storage>{start, m, n, n});
        std::fill(start, start + m * n, Storage(std::numeric_limits<float>::quiet_NaN()));
    }
}

/// Z = W^T (W Q) by multiply_gram (one pass over W on the AVX-512 kernels for q <= 24).
template <class Storage, class Scalar>
Matrix<Scalar> gram(const RowMajorView<Storage>& W, const Matrix<Scalar>& Q) {
    pissa::detail::KernelWorkspace workspace;
    Matrix<Scalar> Z, scratch;
    pissa::detail::multiply_gram(W, Q, Z, scratch, workspace);
    return Z;
}

}  // namespace

TEST_CASE_TEMPLATE("skinny products match a double reference on odd shapes", Storage, float, double, Eigen::half,
                   Eigen::bfloat16) {
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        // Shapes around the tile sizes: 16 lanes, 48-row panels and 48-column tiles, 128-column blocks,
        // 192-column strips, 64-row chunks, 8-column groups, prefetches two blocks ahead across panels/strips.
        for (const auto& [m, n] : {std::pair<Index, Index>{1, 1},
                                   {3, 17},
                                   {4, 16},
                                   {5, 33},
                                   {65, 63},
                                   {131, 257},
                                   {37, 529},
                                   {70, 300},
                                   {48, 128},
                                   {49, 129},
                                   {97, 193},
                                   {200, 385}}) {
            for (const Index q : {1, 2, 5, 6, 7, 13, 48, 49, 50, 65, 97}) {
                const StridedWeight<Storage> W(m, n, n, std::uint64_t(m * 1000 + n));
                check_products(W, q, std::uint64_t(q));
            }
        }
    }
}

TEST_CASE_TEMPLATE("skinny products for every q from 1 to 130 and row strides beyond the row", Storage, float,
                   Eigen::bfloat16, Eigen::half) {
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        const StridedWeight<Storage> dense(23, 85, 85, 7);
        const StridedWeight<Storage> strided(23, 85, 101, 7);  // padding is NaN: must never be read
        for (Index q = 1; q <= 130; ++q) {
            if (q % 7 == 1) check_products(dense, q, std::uint64_t(100 + q));
            check_products(strided, q, std::uint64_t(300 + q));
        }
        const StridedWeight<Storage> wide(9, 700, 733, 11);
        check_products(wide, 17, 5);
    }
}

TEST_CASE_TEMPLATE("skinny products of empty operands", Storage, float, Eigen::bfloat16) {
    using Scalar = pissa::compute_scalar_t<Storage>;
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        const StridedWeight<Storage> no_cols(6, 0, 0, 1);
        Matrix<Scalar> Y, Z;
        pissa::detail::multiply(no_cols.view, Matrix<Scalar>(0, 3), Y);
        CHECK(Y.rows() == 6);
        CHECK(Y.cols() == 3);
        CHECK(Y.isZero(0));
        pissa::detail::multiply_transposed(no_cols.view, Matrix<Scalar>(Matrix<Scalar>::Ones(6, 3)), Z);
        CHECK(Z.rows() == 0);
        const StridedWeight<Storage> W(6, 5, 5, 2);
        pissa::detail::multiply(W.view, Matrix<Scalar>(5, 0), Y);
        CHECK(Y.rows() == 6);
        CHECK(Y.cols() == 0);
    }
}

TEST_CASE_TEMPLATE("skinny products are bit-identical across 1, 2 and 3 threads" *
                       doctest::skip(!pissa_test::built_with_openmp),
                   Storage, float, Eigen::bfloat16, Eigen::half, double) {
#ifdef _OPENMP
    using Scalar = pissa::compute_scalar_t<Storage>;
    // Several work units per thread in both products (8-row units, 512-column strips).
    const StridedWeight<Storage> W(301, 1100, 1111, 3);
    const int saved = omp_get_max_threads();
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        for (const Index q : {19, 70}) {  // the packed and the broadcast W X kernels
            CAPTURE(q);
            const Matrix<Scalar> X = gaussian<Scalar>(1100, q, 4);
            const Matrix<Scalar> Yin = gaussian<Scalar>(301, q, 5);
            std::vector<Matrix<Scalar>> Ys, Zs;
            for (const int threads : {1, 2, 3}) {
                omp_set_num_threads(threads);
                Matrix<Scalar> Y, Z;
                pissa::detail::multiply(W.view, X, Y);
                pissa::detail::multiply_transposed(W.view, Yin, Z);
                Ys.push_back(Y);
                Zs.push_back(Z);
            }
            omp_set_num_threads(saved);
            CHECK(Ys[0] == Ys[1]);
            CHECK(Ys[0] == Ys[2]);
            CHECK(Zs[0] == Zs[1]);
            CHECK(Zs[0] == Zs[2]);
            CHECK(scaled_error(Ys[0], W.exact, X.template cast<double>()) <= 50 * eps<Scalar>());
        }
    }
#endif
}

TEST_CASE_TEMPLATE("skinny products have the same bits wherever W sits in memory", Storage, float, Eigen::bfloat16,
                   Eigen::half) {
    // The AVX-512 W^T Y cuts its tiles at 16-element boundaries of memory (the first tile of a row is
    // narrower): W placed at every element offset within a 64-byte line, with the memory around it
    // NaN, must give the same bits as W at offset 0 and stay accurate. n = 448 and 400 keep every row
    // at the same alignment (the tiles move); n = 449 does not (they stay put).
    using Scalar = pissa::compute_scalar_t<Storage>;
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        for (const Index n : {448, 400, 449}) {
            const Index m = 131;
            const StridedWeight<Storage> W(m, n, n, std::uint64_t(n));
            for (const Index q : {1, 9, 16, 17, 40, 70}) {
                const Matrix<Scalar> X = gaussian<Scalar>(n, q, std::uint64_t(q));
                const Matrix<Scalar> Yin = gaussian<Scalar>(m, q, std::uint64_t(q + 50));
                Matrix<Scalar> Y0, Z0;
                pissa::detail::multiply(W.view, X, Y0);
                pissa::detail::multiply_transposed(W.view, Yin, Z0);
                CHECK(scaled_error(Z0, W.exact.transpose(), Yin.template cast<double>()) <= 50 * eps<Scalar>());
                CAPTURE(n);
                CAPTURE(q);
                at_every_offset(W, [&](const RowMajorView<Storage>& moved) {
                    Matrix<Scalar> Y, Z;
                    pissa::detail::multiply(moved, X, Y);
                    pissa::detail::multiply_transposed(moved, Yin, Z);
                    CHECK(Y == Y0);
                    CHECK(Z == Z0);
                });
            }
        }
    }
}

TEST_CASE_TEMPLATE("W^T (W Q) in one pass matches a double reference on odd shapes and strides", Storage, float, double,
                   Eigen::half, Eigen::bfloat16) {
    using Scalar = pissa::compute_scalar_t<Storage>;
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        // Around the one-pass kernel's sizes: 3-row dot tiles, 24-row panels, up to 8 panel groups,
        // 16-lane k steps and their tail, 48-column tiles, 8-column groups; q = 25 and 33 take two products.
        for (const auto& [m, n] : {std::pair<Index, Index>{1, 1},
                                   {2, 5},
                                   {3, 17},
                                   {23, 16},
                                   {24, 48},
                                   {25, 49},
                                   {70, 47},
                                   {49, 100},
                                   {200, 385},
                                   {301, 129}}) {
            for (const Index stride : {n, n + 5}) {  // the padding is NaN: it must never be read
                const StridedWeight<Storage> W(m, n, stride, std::uint64_t(m * 1000 + n));
                for (const Index q : {1, 7, 8, 9, 16, 17, 24, 25, 33}) {
                    CAPTURE(m);
                    CAPTURE(n);
                    CAPTURE(stride);
                    CAPTURE(q);
                    const Matrix<Scalar> Q = gaussian<Scalar>(n, q, std::uint64_t(q));
                    CHECK(scaled_gram_error(gram(W.view, Q), W.exact, Q.template cast<double>()) <= 50 * eps<Scalar>());
                }
            }
        }
    }
}

TEST_CASE_TEMPLATE("W^T (W Q) of empty operands", Storage, float, Eigen::bfloat16) {
    using Scalar = pissa::compute_scalar_t<Storage>;
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        const StridedWeight<Storage> no_rows(0, 5, 5, 1);
        const Matrix<Scalar> Z = gram(no_rows.view, Matrix<Scalar>(Matrix<Scalar>::Ones(5, 3)));
        CHECK(Z.rows() == 5);
        CHECK(Z.cols() == 3);
        CHECK(Z.isZero(0));
        const StridedWeight<Storage> no_cols(6, 0, 0, 1);
        CHECK(gram(no_cols.view, Matrix<Scalar>(0, 3)).rows() == 0);
        const StridedWeight<Storage> W(6, 5, 5, 2);
        CHECK(gram(W.view, Matrix<Scalar>(5, 0)).cols() == 0);
    }
}

TEST_CASE_TEMPLATE("W^T (W Q) is bit-identical across 1, 2 and 3 threads and wherever W sits", Storage, float,
                   Eigen::bfloat16, Eigen::half) {
    using Scalar = pissa::compute_scalar_t<Storage>;
    // 301 rows: 13 panels in 8 groups, summed by however many threads there are.
    const Index m = 301, n = 448;
    const StridedWeight<Storage> W(m, n, n, 9);
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        for (const Index q : {9, 16}) {
            CAPTURE(q);
            const Matrix<Scalar> Q = gaussian<Scalar>(n, q, std::uint64_t(q));
            const Matrix<Scalar> Z0 = gram(W.view, Q);
            CHECK(scaled_gram_error(Z0, W.exact, Q.template cast<double>()) <= 50 * eps<Scalar>());
#ifdef _OPENMP
            const int saved = omp_get_max_threads();
            for (const int threads : {1, 2, 3}) {
                omp_set_num_threads(threads);
                CHECK(gram(W.view, Q) == Z0);
            }
            omp_set_num_threads(saved);
#endif
            // W at every element offset within a 64-byte line (the column tiles follow memory).
            at_every_offset(W, [&](const RowMajorView<Storage>& moved) { CHECK(gram(moved, Q) == Z0); });
        }
    }
}

namespace {

/// X's columns orthonormalised: Q^T Q = I and Q Q^T X = X (Q spans X) to `tolerance`, relative.
template <class Scalar>
void check_orthonormalize(const Matrix<Scalar>& X, double tolerance) {
    Matrix<Scalar> Q = X;
    pissa::detail::orthonormalize(Q);
    REQUIRE(Q.rows() == X.rows());
    REQUIRE(Q.cols() == X.cols());
    const Matrix<double> Qd = Q.template cast<double>(), Xd = X.template cast<double>();
    const Matrix<double> gram = Qd.transpose() * Qd;
    CHECK((gram - Matrix<double>::Identity(X.cols(), X.cols())).cwiseAbs().maxCoeff() <= tolerance);
    CHECK((Qd * (Qd.transpose() * Xd) - Xd).norm() <= tolerance * Xd.norm());
}

}  // namespace

namespace {

using Bf16Product = void (*)(const RowMajorView<Eigen::bfloat16>&, const Matrix<float>&, Matrix<float>&,
                             pissa::detail::KernelWorkspace&);

/// A bfloat16 product kernel family, its two products called directly.
struct Bf16Kernels {
    std::string name;
    Bf16Product multiply, multiply_transposed;
};

/// The family of the products `Multiply` (`Y = W X`) and `Transposed` (`Z = W^T Y`), which expect
/// their output sized.
template <auto Multiply, auto Transposed>
Bf16Kernels bf16_family(const char* name) {
    return {name,
            [](const RowMajorView<Eigen::bfloat16>& W, const Matrix<float>& X, Matrix<float>& Y,
               pissa::detail::KernelWorkspace& workspace) {
                Y.resize(W.rows, X.cols());
                Multiply(W, X, Y, workspace);
            },
            [](const RowMajorView<Eigen::bfloat16>& W, const Matrix<float>& Y, Matrix<float>& Z,
               pissa::detail::KernelWorkspace& workspace) {
                Z.resize(W.cols, Y.cols());
                Transposed(W, Y, Z, workspace);
            }};
}

/// The bfloat16 product kernels this machine can run.
std::vector<Bf16Kernels> bf16_kernel_families() {
    std::vector<Bf16Kernels> out;
#if PISSA_HAVE_AVX512_KERNELS
    if (pissa::detail::cpu_supports_bf16_products())
        out.push_back(bf16_family<pissa::detail::multiply_bf16_avx512, pissa::detail::multiply_transposed_bf16_avx512>(
            "vdpbf16ps"));
#endif
#if PISSA_HAVE_AMX_KERNELS
    if (pissa::detail::cpu_supports_amx_bf16())
        out.push_back(bf16_family<pissa::detail::multiply_amx, pissa::detail::multiply_transposed_amx>("amx"));
#endif
    return out;
}

/// X as the bfloat16 products see it: rounded to bfloat16 (to nearest even), widened to double.
Matrix<double> rounded_to_bf16(const Matrix<float>& X) {
    return X.cast<Eigen::bfloat16>().cast<float>().cast<double>();
}

void check_bf16_products(const Bf16Kernels& kernels, const StridedWeight<Eigen::bfloat16>& W, Index q,
                         std::uint64_t seed) {
    const Index m = W.view.rows, n = W.view.cols;
    const Matrix<float> X = gaussian<float>(n, q, seed);
    const Matrix<float> Yin = gaussian<float>(m, q, seed + 1);
    pissa::detail::KernelWorkspace workspace;
    Matrix<float> Y, Z;
    kernels.multiply(W.view, X, Y, workspace);
    kernels.multiply_transposed(W.view, Yin, Z, workspace);
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(q);
    CAPTURE(W.view.stride);
    // The products of the rounded operands are exact in float32; only the float32 sums round.
    CHECK(scaled_error(Y, W.exact, rounded_to_bf16(X)) <= 50 * eps<float>());
    CHECK(scaled_error(Z, W.exact.transpose(), rounded_to_bf16(Yin)) <= 50 * eps<float>());
}

}  // namespace

TEST_CASE("bfloat16 products: exact products of the rounded operands, float32 sums, on odd shapes and strides") {
    const std::vector<Bf16Kernels> families = bf16_kernel_families();
    if (families.empty()) MESSAGE("no bfloat16 product kernels on this CPU (AVX512_BF16 or AMX)");
    for (const Bf16Kernels& kernels : families) {
        CAPTURE(kernels.name);
        // Around the tiles: 16-row tiles, 32-row panels and 32-value k steps (AMX), 48-row panels and
        // 256-column blocks (AVX512_BF16), 512-column strips of 256-row chunks (AMX; 32-row chunks
        // and W read in place up to q = 16), 192-column strips of 128-row chunks (AVX512_BF16); odd
        // m and n leave a pair without a partner.
        for (const auto& [m, n] : {std::pair<Index, Index>{1, 1},
                                   {3, 17},
                                   {31, 33},
                                   {32, 32},
                                   {33, 63},
                                   {47, 513},
                                   {97, 515},
                                   {257, 600},
                                   {300, 1030},
                                   {70, 300}}) {
            for (const Index q : {1, 7, 16, 17, 33, 64, 130}) {
                check_bf16_products(kernels, StridedWeight<Eigen::bfloat16>(m, n, n, std::uint64_t(m * 1000 + n)), q,
                                    std::uint64_t(q));
            }
            // Row stride beyond the row: the padding is NaN and must never be read.
            for (const Index q : {16, 17})
                check_bf16_products(kernels, StridedWeight<Eigen::bfloat16>(m, n, n + 13, 9), q, 3);
        }
    }
}

TEST_CASE("bfloat16 products are bit-identical across 1, 2 and 3 threads and through the dispatch" *
          doctest::skip(!pissa_test::built_with_openmp)) {
#ifdef _OPENMP
    const StridedWeight<Eigen::bfloat16> W(301, 1100, 1111, 3);
    const int saved = omp_get_max_threads();
    for (const Bf16Kernels& kernels : bf16_kernel_families()) {
        CAPTURE(kernels.name);
        for (const Index q : {5, 16, 19, 70}) {
            CAPTURE(q);
            const Matrix<float> X = gaussian<float>(1100, q, 4);
            const Matrix<float> Yin = gaussian<float>(301, q, 5);
            std::vector<Matrix<float>> Ys, Zs;
            for (const int threads : {1, 2, 3}) {
                omp_set_num_threads(threads);
                pissa::detail::KernelWorkspace workspace;
                Matrix<float> Y, Z;
                kernels.multiply(W.view, X, Y, workspace);
                kernels.multiply_transposed(W.view, Yin, Z, workspace);
                Ys.push_back(Y);
                Zs.push_back(Z);
            }
            omp_set_num_threads(saved);
            CHECK(Ys[0] == Ys[1]);
            CHECK(Ys[0] == Ys[2]);
            CHECK(Zs[0] == Zs[1]);
            CHECK(Zs[0] == Zs[2]);
        }
    }
    // The dispatch runs the AMX kernels where present, else the AVX512_BF16 ones, else float32.
    const Matrix<float> X = gaussian<float>(1100, 16, 6);
    pissa::detail::KernelWorkspace workspace;
    Matrix<float> dispatched, direct;
    pissa::detail::multiply_bf16(W.view, X, dispatched, workspace);
    const std::vector<Bf16Kernels> families = bf16_kernel_families();
    if (families.empty()) pissa::detail::multiply(W.view, X, direct, workspace);
    else families.back().multiply(W.view, X, direct, workspace);
    CHECK(dispatched == direct);
#endif
}

TEST_CASE("a float32 W rounded to bfloat16: Eigen's rounding, every row length, and what it cannot hold") {
    if (pissa::detail::active_kernel_isa() != pissa::detail::KernelIsa::avx512) {
        MESSAGE("no AVX-512 kernels on this CPU: the bfloat16 copy is never made");
        return;
    }
    // Row lengths around the 16-lane vector, a stride beyond the row, values across the ranges
    // that round differently (ties to even included).
    for (const Index cols : {Index(1), Index(15), Index(16), Index(17), Index(333)}) {
        CAPTURE(cols);
        Matrix<float> values = gaussian<float>(37, cols, 8) * 1e3f;
        values(0, 0) = 1.0f + std::ldexp(1.0f, -8);         // a tie: rounds to even (1.0)
        values(1, 0) = 1.0f + 3.0f * std::ldexp(1.0f, -8);  // a tie: rounds up
        values(2, 0) = std::numeric_limits<float>::denorm_min();
        pissa::RowMatrix<float> storage = pissa::RowMatrix<float>::Zero(37, cols + 5);
        storage.leftCols(cols) = values;
        pissa::detail::PreparedWeight<float> W;
        W.view = {storage.data(), 37, cols, cols + 5};
        pissa::detail::RoundedWeight rounded;
        REQUIRE(pissa::detail::round_weight_bf16(W, rounded));
        for (Index i = 0; i < 37; ++i)
            for (Index j = 0; j < cols; ++j)
                REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(rounded.weight.view.row(i)[j]) ==
                        Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(values(i, j))));
        // NaN, infinity and a float that rounds past bfloat16's largest finite value are refused,
        // wherever they sit; the largest float that rounds to a finite bfloat16 is not.
        storage(36, cols - 1) = 3.38e38f;
        CHECK(pissa::detail::round_weight_bf16(W, rounded));
        for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(),
                                std::numeric_limits<float>::max()}) {
            storage(36, cols - 1) = bad;
            CHECK_FALSE(pissa::detail::round_weight_bf16(W, rounded));
        }
        storage(36, cols) = std::numeric_limits<float>::quiet_NaN();  // past the row: not read
        storage(36, cols - 1) = 1.0f;
        CHECK(pissa::detail::round_weight_bf16(W, rounded));

        // A column-major W (prepared as a view of W^T) gives the same row-major copy of W.
        pissa::RowMatrix<float> transposed = pissa::RowMatrix<float>::Zero(cols, 37 + 3);
        transposed.leftCols(37) = values.transpose();
        transposed.rightCols(3).setConstant(std::numeric_limits<float>::quiet_NaN());  // past the rows: not read
        pissa::detail::PreparedWeight<float> Wt;
        Wt.view = {transposed.data(), cols, 37, 37 + 3};
        Wt.transposed = true;
        pissa::detail::RoundedWeight from_columns;
        REQUIRE(pissa::detail::round_weight_bf16(Wt, from_columns));
        CHECK_FALSE(from_columns.weight.transposed);
        REQUIRE(from_columns.weight.view.rows == 37);
        REQUIRE(from_columns.weight.view.cols == cols);
        for (Index i = 0; i < 37; ++i)
            for (Index j = 0; j < cols; ++j)
                REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(from_columns.weight.view.row(i)[j]) ==
                        Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(values(i, j))));
        transposed(cols - 1, 36) = std::numeric_limits<float>::infinity();
        CHECK_FALSE(pissa::detail::round_weight_bf16(Wt, from_columns));
    }
}

TEST_CASE_TEMPLATE("orthonormalize: well conditioned, ill conditioned and rank deficient columns", Scalar, float,
                   double) {
    const double tolerance = 200 * eps<Scalar>();
    const Index k = 300;
    for (const Index q : {1, 5, 48, 130}) {
        CAPTURE(q);
        check_orthonormalize(gaussian<Scalar>(k, q, std::uint64_t(q)), tolerance);
        // Column scales from 1 to 1e-9.
        Matrix<Scalar> ill = gaussian<Scalar>(k, q, std::uint64_t(q + 1));
        for (Index c = 0; c < q; ++c)
            ill.col(c) *= Scalar(std::pow(10.0, -9.0 * double(c) / double(std::max<Index>(1, q - 1))));
        check_orthonormalize(ill, tolerance);
    }
    // Rank deficient: a repeated column and a zero column still give orthonormal Q spanning X.
    Matrix<Scalar> deficient = gaussian<Scalar>(k, 6, 9);
    deficient.col(3) = deficient.col(1);
    deficient.col(5).setZero();
    check_orthonormalize(deficient, tolerance);
}

TEST_CASE_TEMPLATE("orthonormalize and TallQr on blocks large enough for the two-block TSQR", Scalar, float, double) {
    using pissa::detail::TallQr;
    const double tolerance = 200 * eps<Scalar>();
    const Index k = 2100;
    for (const Index q : {125, 130}) {  // 262,500 and 273,000 elements: two blocks
        CAPTURE(q);
        REQUIRE(k * q >= TallQr<Scalar>::kTwoBlockElements);
        check_orthonormalize(gaussian<Scalar>(k, q, std::uint64_t(q)), tolerance);
        Matrix<Scalar> ill = gaussian<Scalar>(k, q, std::uint64_t(q + 1));
        for (Index c = 0; c < q; ++c) ill.col(c) *= Scalar(std::pow(10.0, -9.0 * double(c) / double(q - 1)));
        check_orthonormalize(ill, tolerance);
        Matrix<Scalar> deficient = gaussian<Scalar>(k, q, std::uint64_t(q + 2));
        deficient.col(7) = deficient.col(3);
        deficient.col(q - 1).setZero();
        check_orthonormalize(deficient, tolerance);
    }
    // Q R reproduces X, and Q C is Q times C, on both paths (one block: 300 x 40).
    for (const Index rows : {Index(300), k}) {
        CAPTURE(rows);
        const Index q = 125;
        const Matrix<Scalar> X = gaussian<Scalar>(rows, std::min(q, rows / 4), 31);
        TallQr<Scalar> qr;
        qr.factor(X);
        const Matrix<Scalar> R = qr.r();
        CHECK(R.isUpperTriangular());
        Matrix<Scalar> QR, Q, QC;
        qr.apply_q(R, QR);
        CHECK((QR - X).norm() <= tolerance * X.norm());
        qr.apply_q(Matrix<Scalar>::Identity(X.cols(), X.cols()), Q);
        const Matrix<Scalar> C = gaussian<Scalar>(X.cols(), 3, 32);
        qr.apply_q(C, QC);
        CHECK((QC - Q * C).norm() <= tolerance * C.norm());
    }
}

#ifdef _OPENMP
namespace {

/// `work()` (a float matrix) with 1, 2 and 3 OpenMP threads: the same bits each time.
template <class Work>
void check_same_bits_across_threads(const Work& work) {
    const int saved = omp_get_max_threads();
    std::vector<Matrix<float>> results;
    for (const int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        results.push_back(work());
    }
    omp_set_num_threads(saved);
    CHECK(results[0] == results[1]);
    CHECK(results[0] == results[2]);
}

}  // namespace
#endif

TEST_CASE("the two-block TSQR is bit-identical across 1, 2 and 3 threads" *
          doctest::skip(!pissa_test::built_with_openmp)) {
#ifdef _OPENMP
    const Matrix<float> X = gaussian<float>(2100, 130, 41);
    check_same_bits_across_threads([&] {
        Matrix<float> Q = X;
        pissa::detail::orthonormalize(Q);
        return Q;
    });
#endif
}

namespace {

/// CholeskyQr2 on X: orthonormal columns spanning X to `tolerance` (as check_orthonormalize);
/// returns whether it fell back to Householder QR.
template <class Scalar>
bool check_cholesky_qr(const Matrix<Scalar>& X, double tolerance) {
    pissa::detail::CholeskyQr2<Scalar> cholesky;
    pissa::detail::TallQr<Scalar> fallback;
    Matrix<Scalar> Q = X;
    cholesky.orthonormalize(Q, fallback);
    REQUIRE(Q.rows() == X.rows());
    REQUIRE(Q.cols() == X.cols());
    const Matrix<double> Qd = Q.template cast<double>(), Xd = X.template cast<double>();
    CHECK((Qd.transpose() * Qd - Matrix<double>::Identity(X.cols(), X.cols())).cwiseAbs().maxCoeff() <= tolerance);
    CHECK((Qd * (Qd.transpose() * Xd) - Xd).norm() <= tolerance * Xd.norm());
    return cholesky.used_fallback();
}

}  // namespace

TEST_CASE_TEMPLATE("CholeskyQR2: orthonormal columns spanning X; Householder QR where X is too ill-conditioned", Scalar,
                   float, double) {
    const double tolerance = 200 * eps<Scalar>();
    // Condition numbers CholeskyQR2 handles in this precision (u^-1/2 is 4096 in float) and
    // far beyond them.
    const double fine = std::is_same_v<Scalar, float> ? 1e2 : 1e6, hopeless = 1e12;
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        // 300 rows: one Gram product; 2101: two halves, the second one row longer.
        for (const Index k : {Index(300), Index(2101)}) {
            for (const Index q : {1, 5, 48, 130}) {
                CAPTURE(k);
                CAPTURE(q);
                CHECK_FALSE(check_cholesky_qr(gaussian<Scalar>(k, q, std::uint64_t(q)), tolerance));
                for (const double condition : {fine, hopeless}) {
                    CAPTURE(condition);
                    // Singular values from 1 to 1 / condition, singular vectors mixing all columns
                    // (a mere column scaling would not trouble CholeskyQR).
                    Vector<double> sigma(q);
                    for (Index c = 0; c < q; ++c)
                        sigma(c) = std::pow(condition, -double(c) / double(std::max<Index>(1, q - 1)));
                    const Matrix<Scalar> ill = with_spectrum<Scalar>(k, q, sigma, std::uint64_t(q + 1));
                    const bool fell_back = check_cholesky_qr(ill, tolerance);
                    if (q > 1) CHECK(fell_back == (condition == hopeless));
                }
            }
            // Rank deficient: a repeated column and a zero column; Householder QR takes over.
            Matrix<Scalar> deficient = gaussian<Scalar>(k, 6, 9);
            deficient.col(3) = deficient.col(1);
            deficient.col(5).setZero();
            CHECK(check_cholesky_qr(deficient, tolerance));
        }
    }
}

TEST_CASE("CholeskyQR2 is bit-identical across 1, 2 and 3 threads" * doctest::skip(!pissa_test::built_with_openmp)) {
#ifdef _OPENMP
    Matrix<float> X = gaussian<float>(2101, 70, 43);
    for (Index c = 0; c < X.cols(); ++c) X.col(c) *= float(std::pow(10.0, -double(c) / 69.0));
    for (const KernelIsa isa : families()) {
        IsaScope scope(isa);
        CAPTURE(pissa::detail::kernel_isa_name(isa));
        check_same_bits_across_threads([&] {
            pissa::detail::CholeskyQr2<float> cholesky;
            pissa::detail::TallQr<float> fallback;
            Matrix<float> Q = X;
            cholesky.orthonormalize(Q, fallback);
            CHECK_FALSE(cholesky.used_fallback());
            return Q;
        });
    }
#endif
}

TEST_CASE("the parallel Gaussian fill is the sequential stream, with any thread count") {
    // 3 chunks of the stream, the last one partial.
    const Index rows = 301, cols = 130;
    Matrix<double> sequential(rows, cols);
    pissa::detail::SplitMix64 rng(77);
    for (Index j = 0; j < cols; ++j)
        for (Index i = 0; i < rows; ++i) sequential(i, j) = rng.normal();
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    for (const int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
#else
    {
#endif
        Matrix<double> G;
        pissa::detail::fill_gaussian(G, rows, cols, 77);
        CHECK(G == sequential);
        Matrix<float> Gf;
        pissa::detail::fill_gaussian(Gf, rows, cols, 77);
        CHECK(Gf == sequential.cast<float>());
    }
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
}

TEST_CASE("the AVX-512 Gaussian draws are the C library's to a few ulps, and the same floats" *
          doctest::skip(!pissa::detail::cpu_supports_avx512_kernels())) {
#if PISSA_HAVE_AVX512_KERNELS
    // An odd start and count: lanes of a partial last vector, states away from the stream's start.
    const Index first = 12345, count = (Index(1) << 16) + 5;
    std::vector<double> vectorized(static_cast<std::size_t>(count));
    pissa::detail::avx512::fill_normals(2024, first, count, vectorized.data());
    pissa::detail::SplitMix64 rng(2024);
    rng.skip(2 * std::uint64_t(first));
    double worst = 0;
    for (Index i = 0; i < count; ++i) {
        const double expected = rng.normal();
        worst = std::max(worst, std::abs(vectorized[std::size_t(i)] - expected) / std::max(1.0, std::abs(expected)));
    }
    CHECK(worst <= 2e-15);
    // Rounded to float, the two paths agree (a last-bit difference is possible, ~1e-9 a draw,
    // but none occurs in these 2^20 draws).
    Matrix<float> fast, reference;
    {
        IsaScope scope(KernelIsa::avx512);
        pissa::detail::fill_gaussian(fast, 1024, 1024, 7);
    }
    {
        IsaScope scope(KernelIsa::portable);
        pissa::detail::fill_gaussian(reference, 1024, 1024, 7);
    }
    CHECK(fast == reference);
#endif
}

TEST_CASE("the kernel family follows the CPU and the override") {
    const KernelIsa automatic = pissa::detail::active_kernel_isa();
    MESSAGE("kernels in use: " << std::string(pissa::detail::kernel_isa_name(automatic)));
    if (std::getenv("PISSA_KERNELS") == nullptr)
        CHECK((automatic == KernelIsa::avx512) == pissa::detail::cpu_supports_avx512_kernels());
    {
        IsaScope scope(KernelIsa::portable);
        CHECK(pissa::detail::active_kernel_isa() == KernelIsa::portable);
        CHECK_FALSE(pissa::detail::use_avx512_kernels<float, float>());
    }
    CHECK(pissa::detail::active_kernel_isa() == automatic);
    CHECK_FALSE(pissa::detail::use_avx512_kernels<double, double>());
}

TEST_CASE("the AVX-512 kernels are tested wherever the CPU has AVX-512 (the kernel loops cover both families)") {
    // The kernels' CPU check (cpuid) against the operating system's list of CPU flags: on a machine
    // with the instructions, an x86-64 GCC or clang build must contain and select the AVX-512
    // family (else every family loop above silently tests the portable kernels only).
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line, flags;
    while (flags.empty() && std::getline(cpuinfo, line))
        if (line.rfind("flags", 0) == 0) flags = line + " ";
    if (flags.empty()) return;  // not Linux: nothing independent to compare with
    bool listed = true;
    for (const char* flag : {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx2"})
        listed = listed && flags.find(std::string(" ") + flag + " ") != std::string::npos;
    MESSAGE("the CPU lists the AVX-512 kernels' instructions: " << (listed ? "yes" : "no"));
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PISSA_NO_AVX512)
    CHECK(pissa::detail::cpu_supports_avx512_kernels() == listed);
    CHECK((families().size() == 2) == listed);
#endif
}

TEST_CASE("the test programs are built with OpenMP wherever CMake found it") {
    // CMake defines PISSA_TEST_OPENMP_FOUND when it found OpenMP for the tests: the thread-count
    // tests then run rather than skip.
#ifdef PISSA_TEST_OPENMP_FOUND
    CHECK(pissa_test::built_with_openmp);
#else
    CHECK_FALSE(pissa_test::built_with_openmp);
#endif
}

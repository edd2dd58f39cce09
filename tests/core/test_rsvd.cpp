// Randomized SVD (peft's pissa_niter_K): accuracy rising with niter, agreement with the exact
// result, determinism (seed, thread count), options, the bfloat16 products' accuracy and bad input.
#include "support.hpp"

#include <pissa/rsvd.hpp>
#include <pissa/svd.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace pissa_test;

namespace {

/// ||U S V^T||_F^2 / sum_{i<=r} sigma_i^2 for orthonormal U, V is sum S_i^2 / sum sigma_i^2.
template <class S>
double captured_energy(const Matrix<S>& W, const pissa::SvdResult<S>& svd, const Vector<double>& sigma) {
    // Energy of the projection of W onto the found subspace: ||U^T W V||_F^2 — independent of how
    // the small SVD rounded S.
    const Matrix<double> projected = (svd.U.transpose() * W * svd.V).template cast<double>();
    return projected.squaredNorm() / sigma.head(svd.S.size()).squaredNorm();
}

}  // namespace

TEST_CASE_TEMPLATE("captured energy rises with niter and reaches the exact result", S, float, double) {
    // A slowly decaying spectrum with a clear gap after sigma_8.
    const Index m = 200, n = 150, r = 8;
    Vector<double> sigma(n);
    for (Index i = 0; i < n; ++i) sigma(i) = i < r ? 10.0 - 0.5 * double(i) : 1.0 * std::pow(0.98, double(i - r));
    const Matrix<S> W = with_spectrum<S>(m, n, sigma, 21);
    double previous = 0, first = 0;
    for (const int niter : {0, 1, 2, 4}) {
        pissa::RandomizedSvdOptions options;
        options.niter = niter;
        const auto svd = pissa::randomized_svd(W, r, options);
        const double energy = captured_energy(W, svd, sigma);
        INFO("niter " << niter << " captured energy " << energy);
        CHECK(energy >= previous - 10 * eps<S>());  // monotone up to rounding once saturated
        CHECK(energy <= 1.0 + 1e-5);
        if (niter == 0) first = energy;
        previous = energy;
    }
    CHECK(first < 0.999);     // niter = 0 is visibly inexact on this spectrum ...
    CHECK(previous > first);  // ... and the power iterations improve it
    pissa::RandomizedSvdOptions many;
    many.niter = 30;
    const auto svd = pissa::randomized_svd(W, r, many);
    const double sv_error = relative_error(svd.S, sigma.head(r));
    INFO("niter 30: singular value error " << sv_error);
    CHECK(sv_error < 1e-4);
    CHECK(sv_error < (std::is_same_v<S, double> ? 1e-10 : 1e-5));
    const auto exact = pissa::truncated_svd(W, r);
    const Matrix<S> p_random = svd.U * svd.S.asDiagonal() * svd.V.transpose();
    const Matrix<S> p_exact = exact.U * exact.S.asDiagonal() * exact.V.transpose();
    CHECK(relative_error(p_random, p_exact) < 1e-4);
}

TEST_CASE_TEMPLATE("randomized SVD returns orthonormal factors and exact results at full rank", S, float, double) {
    for (const auto& [m, n] : {std::pair<Index, Index>{30, 30}, {45, 20}, {20, 45}, {700, 300}}) {
        const Index k = std::min(m, n);
        const Matrix<S> W = gaussian<S>(m, n, 4);
        // bfloat16: a float W's range finder runs on its rounded copy (where the CPU has the
        // kernels); the last two products keep the full-rank result exact.
        for (const Index r : {Index(1), k / 2, k})
            for (const bool fused : {false, true})  // fused: CholeskyQR2 and the kernels' Ritz products
                for (const auto products : {pissa::ProductPrecision::float32, pissa::ProductPrecision::bfloat16}) {
                    CAPTURE(m);
                    CAPTURE(n);
                    CAPTURE(r);
                    CAPTURE(fused);
                    CAPTURE(pissa::product_precision_name(products));
                    pissa::RandomizedSvdOptions options;
                    options.fused_power_iteration = fused;
                    options.products = products;
                    const auto svd = pissa::randomized_svd(W, r, options);
                    REQUIRE(svd.U.rows() == m);
                    REQUIRE(svd.V.rows() == n);
                    REQUIRE(svd.S.size() == r);
                    CHECK(relative_error(Matrix<S>(svd.U.transpose() * svd.U), Matrix<S>::Identity(r, r), 1.0) <
                          100 * eps<S>());
                    CHECK(relative_error(Matrix<S>(svd.V.transpose() * svd.V), Matrix<S>::Identity(r, r), 1.0) <
                          100 * eps<S>());
                    for (Index i = 0; i + 1 < r; ++i) CHECK(svd.S(i) >= svd.S(i + 1));
                    if (r == k) {  // q = min(m, n): the range is the whole space and the result is exact
                        const Matrix<S> product = svd.U * svd.S.asDiagonal() * svd.V.transpose();
                        CHECK(relative_error(product, W) < 100 * eps<S>());
                    }
                }
    }
}

TEST_CASE_TEMPLATE("a rank-deficient W: orthonormal factors and W itself, fused or not", S, float, double) {
    // W of exact rank 3 at r = 8: the blocks to orthonormalise are rank-deficient, where CholeskyQR2
    // (the standard path's on the AVX-512 kernels, the fused path's everywhere) breaks down and
    // Householder QR takes over; the factors must still be orthonormal and B A must still be W.
    const Index m = 300, n = 200, r = 8;
    const Matrix<S> W = gaussian<S>(m, 3, 5) * gaussian<S>(3, n, 6);
    for (const bool fused : {false, true}) {
        CAPTURE(fused);
        pissa::RandomizedSvdOptions options;
        options.fused_power_iteration = fused;
        const auto svd = pissa::randomized_svd(W, r, options);
        REQUIRE(svd.U.allFinite());
        REQUIRE(svd.V.allFinite());
        CHECK(relative_error(Matrix<S>(svd.U.transpose() * svd.U), Matrix<S>::Identity(r, r), 1.0) < 1000 * eps<S>());
        CHECK(relative_error(Matrix<S>(svd.V.transpose() * svd.V), Matrix<S>::Identity(r, r), 1.0) < 1000 * eps<S>());
        CHECK(relative_error(Matrix<S>(svd.U * svd.S.asDiagonal() * svd.V.transpose()), W) < 1000 * eps<S>());
        CHECK(svd.S(3) < 1000 * eps<S>() * svd.S(0));
    }
}

TEST_CASE_TEMPLATE("same seed, same bits; another seed, another draw", S, float, double) {
    const Matrix<S> W = gaussian<S>(90, 70, 8);
    pissa::RandomizedSvdOptions options;
    options.seed = 42;
    const auto a = pissa::randomized_svd(W, 6, options);
    const auto b = pissa::randomized_svd(W, 6, options);
    CHECK(a.U == b.U);
    CHECK(a.S == b.S);
    CHECK(a.V == b.V);
    options.seed = 43;
    const auto c = pissa::randomized_svd(W, 6, options);
    CHECK(c.S != a.S);
}

TEST_CASE("bit-identical results across 1 and 2 threads" * doctest::skip(!pissa_test::built_with_openmp)) {
#ifdef _OPENMP
    // Large enough that every kernel splits its work into several blocks.
    const Matrix<float> W = gaussian<float>(700, 530, 13);
    const pissa::RowMatrix<Eigen::bfloat16> W16 = W.cast<Eigen::bfloat16>();
    const int saved = omp_get_max_threads();
    auto run = [&](int threads) {
        omp_set_num_threads(threads);
        pissa::RandomizedSvdOptions options;
        options.seed = 5;
        pissa::ExactSvdOptions krylov;
        krylov.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
        return std::make_tuple(pissa::randomized_svd(W, 16, options), pissa::randomized_svd(W16, 16, options),
                               pissa::truncated_svd(W, 16, krylov));
    };
    const auto one = run(1);
    const auto two = run(2);
    omp_set_num_threads(saved);
    CHECK(std::get<0>(one).U == std::get<0>(two).U);
    CHECK(std::get<0>(one).S == std::get<0>(two).S);
    CHECK(std::get<0>(one).V == std::get<0>(two).V);
    CHECK(std::get<1>(one).S == std::get<1>(two).S);
    CHECK(std::get<1>(one).V == std::get<1>(two).V);
    CHECK(std::get<2>(one).S == std::get<2>(two).S);
    CHECK(std::get<2>(one).U == std::get<2>(two).U);
#endif
}

TEST_CASE("bit-identical across 1 and 2 threads on blocks large enough for the two-block TSQR, fused or not" *
          doctest::skip(!pissa_test::built_with_openmp)) {
#ifdef _OPENMP
    const Matrix<float> W = gaussian<float>(2100, 600, 23);
    const int saved = omp_get_max_threads();
    std::vector<pissa::SvdResult<float>> results;
    for (const bool fused : {false, true}) {  // fused: CholeskyQR2's Gram matrices in two halves
        for (const int threads : {1, 2}) {
            omp_set_num_threads(threads);
            pissa::RandomizedSvdOptions options;
            options.niter = 2;
            options.fused_power_iteration = fused;
            results.push_back(pissa::randomized_svd(W, 130, options));
        }
    }
    omp_set_num_threads(saved);
    for (const std::size_t first : {0, 2}) {
        CAPTURE(first);
        CHECK(results[first].U == results[first + 1].U);
        CHECK(results[first].S == results[first + 1].S);
        CHECK(results[first].V == results[first + 1].V);
    }
    // the two algorithms span nearly the same subspace: the same leading singular values
    CHECK(relative_error(results[2].S.head(16), results[0].S.head(16)) < 1e-3);
#endif
}

TEST_CASE_TEMPLATE("the RandomizedSvd object gives randomized_svd's bits and reuses its buffers across shapes", S,
                   float, double) {
    pissa::RandomizedSvdOptions options;
    options.seed = 3;
    options.oversampling = 4;
    pissa::RandomizedSvd<S> svd(options);
    CHECK_THROWS_AS(svd.singular_values(), std::logic_error);
    const Matrix<S> A = gaussian<S>(90, 70, 1);
    const Matrix<S> B = gaussian<S>(50, 120, 2);
    const pissa::RowMatrix<S> C = gaussian<S>(130, 40, 3);
    for (int round = 0; round < 2; ++round) {  // the second round runs on buffers of other shapes
        CAPTURE(round);
        const auto a = pissa::randomized_svd(A, 9, options);
        svd.compute(A, 9);
        CHECK(svd.matrix_u() == a.U);
        CHECK(svd.singular_values() == a.S);
        CHECK(svd.matrix_v() == a.V);
        const auto b = pissa::randomized_svd(B, 5, options);
        CHECK(svd.compute(B, 5).singular_values() == b.S);
        CHECK(svd.matrix_u() == b.U);
        CHECK(svd.result().V == b.V);
        const auto c = pissa::randomized_svd(C, 12, options);
        svd.compute(C, 12);
        CHECK(svd.singular_values() == c.S);
        CHECK(svd.matrix_v() == c.V);
    }
    CHECK_THROWS_WITH_AS(svd.compute(A, 71), doctest::Contains("min(m, n) = 70"), pissa::invalid_argument);
    CHECK_THROWS_AS(svd.singular_values(), std::logic_error);  // a failed compute leaves no stale result
    pissa::RandomizedSvdOptions negative;
    negative.niter = -2;
    CHECK_THROWS_WITH_AS(pissa::RandomizedSvd<S>{negative}, doctest::Contains("niter must be >= 0, got -2"),
                         pissa::invalid_argument);
}

TEST_CASE_TEMPLATE("oversampling and the fused power iteration", S, float, double) {
    const Index m = 160, n = 120, r = 6;
    Vector<double> sigma(n);
    for (Index i = 0; i < n; ++i) sigma(i) = std::pow(0.93, double(i));
    const Matrix<S> W = with_spectrum<S>(m, n, sigma, 31);
    pissa::RandomizedSvdOptions plain;
    plain.niter = 1;
    pissa::RandomizedSvdOptions oversampled = plain;
    oversampled.oversampling = 10;
    const double e_plain = captured_energy(W, pissa::randomized_svd(W, r, plain), sigma);
    const double e_over = captured_energy(W, pissa::randomized_svd(W, r, oversampled), sigma);
    INFO("plain " << e_plain << " oversampled " << e_over);
    CHECK(e_over > e_plain);
    const auto over = pissa::randomized_svd(W, r, oversampled);
    CHECK(over.S.size() == r);  // oversampled columns are dropped after the small SVD
    pissa::RandomizedSvdOptions fused;
    fused.niter = 4;
    fused.fused_power_iteration = true;
    pissa::RandomizedSvdOptions standard;
    standard.niter = 4;
    const double e_fused = captured_energy(W, pissa::randomized_svd(W, r, fused), sigma);
    const double e_standard = captured_energy(W, pissa::randomized_svd(W, r, standard), sigma);
    INFO("fused " << e_fused << " standard " << e_standard);
    CHECK(std::abs(e_fused - e_standard) < 1e-3);
}

TEST_CASE_TEMPLATE("row-major maps and column-major matrices give the same result", S, float, double) {
    const Matrix<S> W = gaussian<S>(64, 48, 17);
    const pissa::RowMatrix<S> row_major = W;
    const Eigen::Map<const pissa::RowMatrix<S>> mapped(row_major.data(), 64, 48);
    const auto a = pissa::randomized_svd(W, 4);
    const auto b = pissa::randomized_svd(mapped, 4);
    const Matrix<S> pa = a.U * a.S.asDiagonal() * a.V.transpose();
    const Matrix<S> pb = b.U * b.S.asDiagonal() * b.V.transpose();
    CHECK(relative_error(pb, pa) < 1000 * eps<S>());
}

TEST_CASE_TEMPLATE("the fused power step: one pass over a row-major W, two products over a column-major one", Storage,
                   float, Eigen::bfloat16) {
    // A row-major float / bf16 W takes the one-pass W^T (W Q) (AVX-512 kernels, q <= 24), its
    // column-major copy the two products: the same algorithm, rounded differently.
    const Index m = 300, n = 200, r = 12;
    Vector<double> sigma(n);
    for (Index i = 0; i < n; ++i) sigma(i) = std::pow(0.9, double(i));
    const Matrix<Storage> col_major = with_spectrum<float>(m, n, sigma, 41).cast<Storage>();
    const pissa::RowMatrix<Storage> row_major = col_major;
    pissa::RandomizedSvdOptions fused;
    fused.fused_power_iteration = true;
    const auto a = pissa::randomized_svd(row_major, r, fused);
    const auto b = pissa::randomized_svd(col_major, r, fused);
    // A bfloat16 W's two products may round Q to bfloat16 (AMX, AVX512_BF16) where the one pass
    // keeps it in float32: the two then agree to that rounding (2^-9), far inside the
    // algorithm's own error here (1.7e-2 from the optimum: niter 4 on a slowly decaying spectrum).
    const bool bf16 = std::is_same_v<Storage, Eigen::bfloat16>;
    CHECK(relative_error(a.S, b.S) < (bf16 ? 0x1p-9 : 1e-5));
    const Matrix<float> pa = a.U * a.S.asDiagonal() * a.V.transpose();
    const Matrix<float> pb = b.U * b.S.asDiagonal() * b.V.transpose();
    CHECK(relative_error(pa, pb) < (bf16 ? 0x1p-9 : 1e-4));
    // and as accurate as the standard algorithm
    const Matrix<float> widened = col_major.template cast<float>();
    CHECK(std::abs(captured_energy(widened, a, sigma) -
                   captured_energy(widened, pissa::randomized_svd(row_major, r), sigma)) < 1e-3);
}

TEST_CASE("bfloat16 products: the error against the Eckart-Young optimum moves by less than 1e-3 relative") {
    // A bfloat16 W with a decaying head over a noise floor (like a trained weight), row- and
    // column-major: err / opt with the products in bfloat16 against float32, over several seeds.
    const Index m = 700, n = 520, r = 16;
    Vector<double> sigma(n);
    for (Index i = 0; i < n; ++i) sigma(i) = 0.05 + std::exp(-double(i) / 20.0);
    const pissa::RowMatrix<Eigen::bfloat16> W = with_spectrum<float>(m, n, sigma, 61).cast<Eigen::bfloat16>();
    const Matrix<Eigen::bfloat16> W_col = W;
    const Matrix<double> exact = W.cast<float>().cast<double>();
    const double opt = std::sqrt(exact.squaredNorm() - pissa::truncated_svd(exact, r).S.squaredNorm());
    const auto error = [&](const pissa::SvdResult<float>& svd) {
        return (exact - (svd.U * svd.S.asDiagonal() * svd.V.transpose()).cast<double>()).norm();
    };
    CHECK(pissa::uses_bf16_products<Eigen::bfloat16>({}) == pissa::detail::cpu_supports_amx_bf16());
    for (std::uint64_t seed = 0; seed < 5; ++seed) {
        CAPTURE(seed);
        pissa::RandomizedSvdOptions f32, bf16;
        f32.seed = bf16.seed = seed;
        f32.products = pissa::ProductPrecision::float32;
        bf16.products = pissa::ProductPrecision::bfloat16;
        const double reference = error(pissa::randomized_svd(W, r, f32));
        CHECK(reference / opt < 1.05);
        for (const double e : {error(pissa::randomized_svd(W, r, bf16)), error(pissa::randomized_svd(W_col, r, bf16))})
            CHECK(std::abs(e - reference) / reference < 1e-3);
    }
}

TEST_CASE("a float32 W with bfloat16 products: the range finder on W rounded to bfloat16, B = W Q in float32") {
    // Same bound as a bfloat16 W, row- and column-major; the last product is float32, so the
    // result is as accurate as the float32 products' on a W that bfloat16 cannot hold.
    const Index m = 700, n = 520, r = 16;
    Vector<double> sigma(n);
    for (Index i = 0; i < n; ++i) sigma(i) = 0.05 + std::exp(-double(i) / 20.0);
    const pissa::RowMatrix<float> W = with_spectrum<float>(m, n, sigma, 62);
    const Matrix<float> W_col = W;
    const Matrix<double> exact = W.cast<double>();
    const double opt = std::sqrt(exact.squaredNorm() - pissa::truncated_svd(exact, r).S.squaredNorm());
    const auto error = [&](const pissa::SvdResult<float>& svd) {
        return (exact - (svd.U * svd.S.asDiagonal() * svd.V.transpose()).cast<double>()).norm();
    };
    pissa::RandomizedSvdOptions f32, bf16;
    f32.products = pissa::ProductPrecision::float32;
    bf16.products = pissa::ProductPrecision::bfloat16;
    CHECK(pissa::uses_bf16_products<float>({}) == pissa::detail::cpu_supports_amx_bf16());
    CHECK(pissa::uses_bf16_products<float>(bf16) == pissa::detail::bf16_products_available<Eigen::bfloat16, float>());
    CHECK(!pissa::uses_bf16_products<float>(f32));
    CHECK(!pissa::uses_bf16_products<Eigen::half>(bf16));
    for (std::uint64_t seed = 0; seed < 5; ++seed) {
        CAPTURE(seed);
        f32.seed = bf16.seed = seed;
        const double reference = error(pissa::randomized_svd(W, r, f32));
        CHECK(reference / opt < 1.05);
        for (const double e : {error(pissa::randomized_svd(W, r, bf16)), error(pissa::randomized_svd(W_col, r, bf16))})
            CHECK(std::abs(e - reference) / reference < 1e-3);
    }
    // A reused object gives the bits of the function (the rounded copy is reused, not stale).
    pissa::RandomizedSvd<float> reused(bf16);
    reused.compute(W_col.topRows(300), r);
    CHECK(reused.compute(W, r).matrix_u() == pissa::randomized_svd(W, r, bf16).U);

    // A float beyond bfloat16's largest finite value (3.39e38) cannot be rounded: the float32
    // products take over, and report the overflow of W's squares as they do, not NaN factors.
    Matrix<float> large = W.cast<float>() * 1e-30f;
    large(3, 5) = std::numeric_limits<float>::max();
    for (const auto& options : {f32, bf16})
        CHECK_THROWS_WITH_AS(pissa::randomized_svd(large, 2, options),
                             doctest::Contains("non-finite values from an overflow"), pissa::numerical_error);
    // and a NaN is still named where it is
    large(3, 5) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(large, 2, bf16), doctest::Contains("at row 3, column 5"),
                         pissa::invalid_argument);
}

TEST_CASE("a finite W whose squares overflow float: a clear error from both algorithms, not NaN factors") {
    // ||W|| ~ 1e21: W Q is finite, but W^T (W Q) (fused: CholeskyQR2 breaks down and Householder QR
    // gets the non-finite block) and the column norms of Householder QR (standard) overflow; the
    // small SVD reports it.
    const Matrix<float> W = (gaussian<double>(60, 40, 51) * 1e20).cast<float>();
    REQUIRE(W.allFinite());
    for (const bool fused : {true, false}) {
        CAPTURE(fused);
        pissa::RandomizedSvdOptions options;
        options.fused_power_iteration = fused;
        CHECK_THROWS_WITH_AS(pissa::randomized_svd(W, 4, options),
                             doctest::Contains("non-finite values from an overflow"), pissa::numerical_error);
    }
}

TEST_CASE_TEMPLATE("randomized_svd rejects bad input with a clear message", S, float, double) {
    Matrix<S> W = gaussian<S>(10, 7, 2);
    pissa::RandomizedSvdOptions negative;
    negative.niter = -1;
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(W, 2, negative), doctest::Contains("niter must be >= 0, got -1"),
                         pissa::invalid_argument);
    pissa::RandomizedSvdOptions bad_oversampling;
    bad_oversampling.oversampling = -3;
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(W, 2, bad_oversampling), doctest::Contains("oversampling"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(W, 0), doctest::Contains("got r = 0"), pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(W, 8), doctest::Contains("min(m, n) = 7"), pissa::invalid_argument);
    W(9, 6) = -std::numeric_limits<S>::infinity();
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(W, 2), doctest::Contains("row 9, column 6"), pissa::invalid_argument);
    W(9, 6) = std::numeric_limits<S>::quiet_NaN();
    const pissa::RowMatrix<S> row_major = W;
    CHECK_THROWS_WITH_AS(pissa::randomized_svd(row_major, 2), doctest::Contains("row 9, column 6"),
                         pissa::invalid_argument);
}

// Exact truncated SVD: orthonormality, ordering, agreement with Eigen's BDCSVD and the
// Eckart-Young optimum, for both algorithms, every input layout and dtype, and every bad input.
#include "support.hpp"

#include <pissa/rsvd.hpp>
#include <pissa/svd.hpp>

#include <Eigen/SVD>

#include <cmath>

using namespace pissa_test;

namespace {

struct Shape {
    Index m, n;
};
const Shape kSvdShapes[] = {{40, 40}, {60, 24}, {24, 60}};

/// The singular values of a test matrix with a clear gap everywhere: 10, 9.5, 9, ...
Vector<double> stepped_spectrum(Index k) {
    Vector<double> s(k);
    for (Index i = 0; i < k; ++i) s(i) = 10.0 - 0.4 * static_cast<double>(i) * 10.0 / static_cast<double>(k);
    return s;
}

/// Checks one truncated SVD against the known spectrum `sigma` of W.
template <class S>
void check_against_exact(const Matrix<S>& W, const pissa::SvdResult<S>& svd, const Vector<double>& sigma, Index r) {
    const double tol = 200 * eps<S>();
    const Index m = W.rows(), n = W.cols();
    REQUIRE(svd.U.rows() == m);
    REQUIRE(svd.U.cols() == r);
    REQUIRE(svd.V.rows() == n);
    REQUIRE(svd.V.cols() == r);
    REQUIRE(svd.S.size() == r);
    // Orthonormal columns.
    CHECK(relative_error(Matrix<S>(svd.U.transpose() * svd.U), Matrix<S>::Identity(r, r), 1.0) < tol);
    CHECK(relative_error(Matrix<S>(svd.V.transpose() * svd.V), Matrix<S>::Identity(r, r), 1.0) < tol);
    // Singular values: descending and equal to the known ones.
    for (Index i = 0; i + 1 < r; ++i) CHECK(svd.S(i) >= svd.S(i + 1));
    const double sv_error = relative_error(svd.S, sigma.head(r));
    INFO("singular value error " << sv_error);
    CHECK(sv_error < tol);
    // Eckart-Young: ||W - U S V^T||_F^2 == sum_{i>r} sigma_i^2.
    const Matrix<double> approx = (svd.U * svd.S.asDiagonal() * svd.V.transpose()).template cast<double>();
    const double tail = std::sqrt(sigma.tail(sigma.size() - r).squaredNorm());
    const double residual = (W.template cast<double>() - approx).norm();
    INFO("residual " << residual << " optimum " << tail);
    CHECK(std::abs(residual - tail) < tol * sigma(0) * std::sqrt(double(sigma.size())));
    // The same product as BDCSVD of the same matrix (unique because the spectrum has gaps).
    Eigen::BDCSVD<Matrix<double>> reference(W.template cast<double>(), Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Matrix<double> best = reference.matrixU().leftCols(r) * reference.singularValues().head(r).asDiagonal() *
                                reference.matrixV().leftCols(r).transpose();
    // Perturbation theory (Wedin): the subspaces move by about residual / gap, so the tolerance
    // scales with sigma_1 / (sigma_r - sigma_{r+1}).
    const double gap = r < sigma.size() ? sigma(r - 1) - sigma(r) : sigma(r - 1);
    CHECK(relative_error(approx, best) < 50 * eps<S>() * sigma(0) / gap);
}

}  // namespace

TEST_CASE_TEMPLATE("truncated_svd matches the exact decomposition on square, tall and wide shapes", S, float, double) {
    for (const Shape shape : kSvdShapes) {
        const Index k = std::min(shape.m, shape.n);
        const Vector<double> sigma = stepped_spectrum(k);
        const Matrix<S> W = with_spectrum<S>(shape.m, shape.n, sigma, 7);
        for (const Index r : {Index(1), k / 2, k}) {
            for (const auto algorithm : {pissa::ExactSvdAlgorithm::full, pissa::ExactSvdAlgorithm::block_krylov,
                                         pissa::ExactSvdAlgorithm::automatic}) {
                CAPTURE(shape.m);
                CAPTURE(shape.n);
                CAPTURE(r);
                CAPTURE(static_cast<int>(algorithm));
                pissa::ExactSvdOptions options;
                options.algorithm = algorithm;
                const auto svd = pissa::truncated_svd(W, r, options);
                CHECK(svd.report.converged);
                check_against_exact(W, svd, sigma, r);
            }
        }
    }
}

TEST_CASE_TEMPLATE("block Krylov converges on an LLM-like spectrum and reports its residual bound", S, float, double) {
    // A slowly decaying spectrum over a flat bulk: the hard case for subspace iteration.
    const Index m = 320, n = 288, k = 288, r = 16;
    Vector<double> sigma(k);
    for (Index i = 0; i < k; ++i) sigma(i) = 1.0 + 20.0 * std::pow(0.85, double(i));
    const Matrix<S> W = with_spectrum<S>(m, n, sigma, 11);
    pissa::ExactSvdOptions options;
    options.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
    const auto svd = pissa::truncated_svd(W, r, options);
    INFO("iterations " << svd.report.iterations << ", residual bound " << svd.report.residual_bound);
    CHECK(svd.report.converged);
    CHECK(svd.report.iterations >= 1);
    CHECK(svd.report.residual_bound <= 100 * eps<S>());
    CHECK(relative_error(svd.S, sigma.head(r)) < 50 * eps<S>());
    // The bound is real: recompute ||W^T u_i - s_i v_i|| / s_1 here.
    const Matrix<S> defect = W.transpose() * svd.U - svd.V * svd.S.asDiagonal();
    CHECK(defect.colwise().norm().maxCoeff() / svd.S(0) <= 2 * svd.report.residual_bound + 10 * eps<S>());
}

TEST_CASE("automatic picks block Krylov for small ranks of large matrices, full SVD otherwise") {
    CHECK(pissa::detail::prefer_block_krylov(4096, 4096, 16));
    CHECK(pissa::detail::prefer_block_krylov(4096, 4096, 128));
    CHECK_FALSE(pissa::detail::prefer_block_krylov(1024, 1024, 64));
    CHECK_FALSE(pissa::detail::prefer_block_krylov(4096, 4096, 1024));
    CHECK_FALSE(pissa::detail::prefer_block_krylov(100, 100, 2));
}

TEST_CASE("automatic on min(m, n) >= 256: the Krylov path, and the full SVD where Krylov stalls") {
    // A spectrum with a gap after the kept rank: automatic takes block Krylov (a residual bound is
    // measured, which the full SVD never reports) and lands on the full SVD's triplets.
    Vector<double> sigma(280);
    for (Index i = 0; i < sigma.size(); ++i) sigma(i) = i < 4 ? 10.0 - double(i) : std::pow(0.99, double(i));
    const Matrix<double> W = with_spectrum<double>(300, 280, sigma, 17);
    REQUIRE(pissa::detail::prefer_block_krylov(300, 280, 4));
    pissa::ExactSvdOptions full_options;
    full_options.algorithm = pissa::ExactSvdAlgorithm::full;
    const auto full = pissa::truncated_svd(W, 4, full_options);
    const auto krylov = pissa::truncated_svd(W, 4);
    CHECK(krylov.report.converged);
    CHECK(krylov.report.residual_bound > 0);
    CHECK(relative_error(krylov.S, full.S) < 1e-12);
    CHECK(relative_error(Matrix<double>(krylov.U * krylov.S.asDiagonal() * krylov.V.transpose()),
                         Matrix<double>(full.U * full.S.asDiagonal() * full.V.transpose())) < 1e-10);
    // Gaussian noise has no gap: two restarts do not reach the tolerance, and automatic (which
    // promises the exact triplets) falls back to the full SVD, reporting the restarts it made.
    const Matrix<double> noise = pissa_test::gaussian<double>(300, 280, 18);
    pissa::ExactSvdOptions stalled;
    stalled.max_iterations = 2;
    const auto fallback = pissa::truncated_svd(noise, 4, stalled);
    const auto direct = pissa::truncated_svd(noise, 4, full_options);
    CHECK(fallback.report.converged);
    CHECK(fallback.report.iterations == 2);
    CHECK(fallback.S == direct.S);
    CHECK(fallback.U == direct.U);
    CHECK(fallback.V == direct.V);
    // block_krylov itself, asked for the same, reports that it did not converge.
    stalled.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
    CHECK_FALSE(pissa::truncated_svd(noise, 4, stalled).report.converged);
}

TEST_CASE_TEMPLATE("row-major maps, column-major matrices and expressions give the same triplets", S, float, double) {
    const Vector<double> sigma = stepped_spectrum(30);
    const Matrix<S> W = with_spectrum<S>(50, 30, sigma, 3);
    const pissa::RowMatrix<S> row_major = W;
    const Eigen::Map<const pissa::RowMatrix<S>> mapped(row_major.data(), 50, 30);
    for (const auto algorithm : {pissa::ExactSvdAlgorithm::full, pissa::ExactSvdAlgorithm::block_krylov}) {
        pissa::ExactSvdOptions options;
        options.algorithm = algorithm;
        const auto a = pissa::truncated_svd(W, 5, options);
        const auto b = pissa::truncated_svd(mapped, 5, options);
        const auto c = pissa::truncated_svd(W * S(2), 5, options);  // an expression without storage
        const Matrix<S> pa = a.U * a.S.asDiagonal() * a.V.transpose();
        const Matrix<S> pb = b.U * b.S.asDiagonal() * b.V.transpose();
        const Matrix<S> pc = c.U * c.S.asDiagonal() * c.V.transpose();
        // Both runs stop at the residual tolerance; the rank-5 subspaces then agree to about
        // tolerance * sigma_1 / (sigma_5 - sigma_6) (Wedin).
        const double tol = 50 * eps<S>() * sigma(0) / (sigma(4) - sigma(5));
        CHECK(relative_error(pb, pa) < tol);
        CHECK(relative_error(pc, Matrix<S>(2 * pa)) < tol);
    }
}

TEST_CASE("16-bit storage is decomposed in float32") {
    const Vector<double> sigma = stepped_spectrum(24);
    const Matrix<float> W = with_spectrum<float>(40, 24, sigma, 5);
    const pissa::RowMatrix<Eigen::bfloat16> bf = W.cast<Eigen::bfloat16>();
    const pissa::RowMatrix<Eigen::half> hf = W.cast<Eigen::half>();
    const auto from_bf = pissa::truncated_svd(bf, 4);
    const auto from_hf = pissa::truncated_svd(hf, 4);
    static_assert(std::is_same_v<decltype(from_bf.S)::Scalar, float>);
    const auto ref_bf = pissa::truncated_svd(Matrix<float>(bf.cast<float>()), 4);
    const auto ref_hf = pissa::truncated_svd(Matrix<float>(hf.cast<float>()), 4);
    CHECK(relative_error(from_bf.S, ref_bf.S) < 1e-6);
    CHECK(relative_error(from_hf.S, ref_hf.S) < 1e-6);
    // And bfloat16 rounding (8 bits of mantissa) moves the spectrum by about 2^-9 relative.
    CHECK(relative_error(from_bf.S, sigma.head(4)) < 1e-2);
}

TEST_CASE("TruncatedSvd object API") {
    const Matrix<double> W = with_spectrum<double>(30, 20, stepped_spectrum(20), 9);
    pissa::TruncatedSvd<double> svd;
    CHECK_THROWS_AS(svd.singular_values(), std::logic_error);
    svd.compute(W, 3);
    CHECK(svd.info() == Eigen::Success);
    CHECK(svd.singular_values().size() == 3);
    CHECK(svd.matrix_u().cols() == 3);
    CHECK(svd.matrix_v().rows() == 20);
    CHECK(svd.report().converged);
}

TEST_CASE_TEMPLATE("truncated_svd rejects bad input with a clear message", S, float, double) {
    Matrix<S> W = gaussian<S>(12, 8, 1);
    CHECK_THROWS_WITH_AS(pissa::truncated_svd(W, 0), doctest::Contains("1 <= r <= min(m, n) = 8"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(pissa::truncated_svd(W, 9), doctest::Contains("got r = 9"), pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(pissa::truncated_svd(Matrix<S>(0, 5), 1), doctest::Contains("empty"), pissa::invalid_argument);
    pissa::ExactSvdOptions bad_iterations;
    bad_iterations.max_iterations = 0;
    CHECK_THROWS_WITH_AS(pissa::truncated_svd(W, 2, bad_iterations), doctest::Contains("max_iterations"),
                         pissa::invalid_argument);
    for (const auto algorithm : {pissa::ExactSvdAlgorithm::full, pissa::ExactSvdAlgorithm::block_krylov}) {
        pissa::ExactSvdOptions options;
        options.algorithm = algorithm;
        Matrix<S> bad = W;
        bad(3, 5) = std::numeric_limits<S>::quiet_NaN();
        CHECK_THROWS_WITH_AS(pissa::truncated_svd(bad, 2, options), doctest::Contains("row 3, column 5"),
                             pissa::invalid_argument);
        bad(3, 5) = std::numeric_limits<S>::infinity();
        CHECK_THROWS_WITH_AS(pissa::truncated_svd(bad, 2, options), doctest::Contains("non-finite"),
                             pissa::invalid_argument);
        // Also found through a row-major map (the view is transposed internally).
        const pissa::RowMatrix<S> row_major = bad;
        CHECK_THROWS_WITH_AS(pissa::truncated_svd(row_major, 2, options), doctest::Contains("row 3, column 5"),
                             pissa::invalid_argument);
    }
}

// Tests for svd_result.hpp: canonicalize_signs on a result by hand, and the sign convention applied
// by every decomposition (svd.hpp, rsvd.hpp) so that their factors agree, not only their products.
#include "support.hpp"

#include <pissa/rsvd.hpp>
#include <pissa/svd.hpp>
#include <pissa/svd_result.hpp>

#include <cmath>
#include <type_traits>

using namespace pissa_test;

TEST_CASE_TEMPLATE("canonicalize_signs negates the pairs whose largest |u| entry is negative, first on a tie", S, float,
                   double) {
    pissa::SvdResult<S> svd;
    svd.U.resize(3, 3);
    svd.V.resize(2, 3);
    svd.S.resize(3);
    svd.U << 1, -4, 2,  //
        -3, 1, -2,      //
        2, 2, 1;
    svd.V << 5, 6, 7,  //
        -1, 0, 3;
    svd.S << 3, 2, 1;
    const Matrix<S> product = svd.U * svd.S.asDiagonal() * svd.V.transpose();
    pissa::canonicalize_signs(svd);
    Matrix<S> U(3, 3), V(2, 3);
    U << -1, 4, 2,  //
        3, -1, -2,  //
        -2, -2, 1;
    V << -5, -6, 7,  //
        1, 0, 3;
    // Column 0: largest |u| is -3, negated; column 1: -4, negated; column 2: a tie 2 / -2, the first wins.
    CHECK(svd.U == U);
    CHECK(svd.V == V);
    CHECK(svd.S == Vector<S>((Vector<S>(3) << 3, 2, 1).finished()));
    CHECK(Matrix<S>(svd.U * svd.S.asDiagonal() * svd.V.transpose()) == product);
    // Applied twice, nothing changes.
    pissa::canonicalize_signs(svd);
    CHECK(svd.U == U);
    CHECK(svd.V == V);
}

TEST_CASE_TEMPLATE("every decomposition fixes the signs: each u_i's largest entry is positive", S, float, double) {
    // Halving singular values over a noise floor: gaps that fix every vector, and a randomized
    // SVD (oversampled) that converges to the exact triplets.
    Vector<double> sigma = Vector<double>::Constant(280, 0.01);
    for (Index i = 0; i < 10; ++i) sigma(i) = 10 * std::pow(0.5, static_cast<double>(i));
    const Matrix<S> W = with_spectrum<S>(300, 280, sigma, 17);  // min(m, n) >= 256: Krylov is a real path
    auto check = [](const pissa::SvdResult<S>& svd, const char* what) {
        for (Index i = 0; i < svd.U.cols(); ++i) {
            Index at = 0;
            svd.U.col(i).cwiseAbs().maxCoeff(&at);
            INFO(what, " column ", i);
            CHECK(svd.U(at, i) > 0);
        }
    };
    pissa::ExactSvdOptions full, krylov;
    full.algorithm = pissa::ExactSvdAlgorithm::full;
    krylov.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
    pissa::RandomizedSvdOptions randomized;
    randomized.niter = 6;
    randomized.oversampling = 8;
    // float32 products: with bfloat16 ones the weakest vectors agree to ~1e-3 only (the rounding
    // perturbs the basis to first order, the captured energy to second order; docs/math.md).
    randomized.products = pissa::ProductPrecision::float32;
    pissa::RandomizedSvdOptions fused = randomized;
    fused.fused_power_iteration = true;
    const auto a = pissa::truncated_svd(W, 8, full);
    const auto b = pissa::truncated_svd(W, 8, krylov);
    const auto c = pissa::randomized_svd(W, 8, randomized);
    const auto d = pissa::randomized_svd(W, 8, fused);
    const pissa::RowMatrix<S> row_major = W;  // the kernels' other orientation
    const auto e = pissa::randomized_svd(row_major, 8, randomized);
    const auto f = pissa::truncated_svd(row_major.transpose(), 8, full);  // W^T: U and V change roles
    check(a, "full");
    check(b, "block Krylov");
    check(c, "randomized");
    check(d, "randomized, fused");
    check(e, "randomized, row-major");
    check(f, "full, transposed");
    // The factors themselves agree, not only their products (the spectrum has clear gaps).
    const double tol = std::is_same_v<S, float> ? 2e-4 : 1e-8;
    for (const auto* other : {&b, &c, &d, &e}) {
        CHECK(relative_error(other->U, a.U) < tol);
        CHECK(relative_error(other->V, a.V) < tol);
    }
}

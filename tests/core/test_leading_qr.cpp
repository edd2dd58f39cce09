// The leading QR (leading_qr.hpp): Q_r orthonormal, R_r = Q_r^T W upper trapezoidal with a
// non-negative diagonal, Q_r R_r the projection onto W's first r columns, equal to the first r
// columns / rows of a full Householder QR up to the signs of pairs; bad input refused.
#include "support.hpp"

#include <pissa/leading_qr.hpp>

using namespace pissa_test;

TEST_CASE_TEMPLATE("leading_qr agrees with a full Householder QR and is canonical", S, float, double) {
    for (const auto& shape : {std::pair<Index, Index>{40, 25}, {25, 40}, {300, 290}}) {
        const Index m = shape.first, n = shape.second;
        const Matrix<S> W = gaussian<S>(m, n, 7);
        const Matrix<double> Wd = W.template cast<double>();
        const Eigen::HouseholderQR<Matrix<double>> full(Wd);
        const Index k = std::min(m, n);
        const Matrix<double> Qfull = full.householderQ() * Matrix<double>::Identity(m, k);
        const Matrix<double> Rfull = full.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
        for (const Index r : {Index(1), k / 3, k}) {
            CAPTURE(m);
            CAPTURE(n);
            CAPTURE(r);
            const auto qr = pissa::leading_qr(W, r);
            REQUIRE(qr.Q.rows() == m);
            REQUIRE(qr.Q.cols() == r);
            REQUIRE(qr.R.rows() == r);
            REQUIRE(qr.R.cols() == n);
            const double tol = 200 * eps<S>() * std::sqrt(double(m));
            CHECK((Matrix<S>(qr.Q.transpose() * qr.Q) - Matrix<S>::Identity(r, r)).norm() < tol);
            for (Index i = 0; i < r; ++i) {
                CHECK(qr.R(i, i) >= 0);
                for (Index j = 0; j < i; ++j) CHECK(qr.R(i, j) == 0);
            }
            // The product is the full QR's leading part (signs cancel in each pair).
            const Matrix<double> expected = Qfull.leftCols(r) * Rfull.topRows(r);
            CHECK(relative_error(Matrix<double>((qr.Q * qr.R).template cast<double>()), expected) < tol);
            // Factor by factor, after fixing the full QR's signs the same way.
            for (Index i = 0; i < r; ++i) {
                const double sign = Rfull(i, i) < 0 ? -1 : 1;
                CHECK(relative_error(Matrix<double>(qr.Q.col(i).template cast<double>()),
                                     Matrix<double>(sign * Qfull.col(i))) < tol * 10);
            }
            if (r == k && m >= n) CHECK(relative_error(Matrix<S>(qr.Q * qr.R), W) < tol);
        }
    }
}

TEST_CASE("leading_qr reads 16-bit storage and transposed views without copying them whole") {
    const Matrix<float> W = gaussian<float>(70, 30, 3);
    const Matrix<Eigen::bfloat16> stored = W.cast<Eigen::bfloat16>();
    const auto a = pissa::leading_qr(stored, 5);
    const auto b = pissa::leading_qr(Matrix<float>(stored.cast<float>()), 5);
    CHECK(relative_error(a.R, b.R) < 1e-5);
    const auto t = pissa::leading_qr(stored.transpose(), 4);
    const auto u = pissa::leading_qr(Matrix<float>(stored.cast<float>().transpose()), 4);
    CHECK(t.Q.rows() == 30);
    CHECK(relative_error(t.Q, u.Q) < 1e-5);
    CHECK(relative_error(t.R, u.R) < 1e-5);
}

TEST_CASE("leading_qr refuses bad input naming the problem") {
    Matrix<float> W = gaussian<float>(6, 4, 1);
    CHECK_THROWS_WITH_AS(pissa::leading_qr(W, 0), doctest::Contains("1 <= r <= min(m, n) = 4"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(pissa::leading_qr(W, 5), doctest::Contains("got r = 5"), pissa::invalid_argument);
    W(2, 3) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(pissa::leading_qr(W, 2), doctest::Contains("row 2, column 3"), pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(pissa::leading_qr(Matrix<float>(0, 3), 1), doctest::Contains("empty"),
                         pissa::invalid_argument);
}

// Tests for bdcsvd_instances.hpp: the test programs are built as the header asks (every source with
// PISSA_EXTERN_BDCSVD, the instances compiled once by pissa_bdcsvd, which includes the header), and
// the instances it compiles decompose, directly and through the full truncated SVD. This file does
// not include the header itself: it belongs in exactly one translation unit of a program.
#include "support.hpp"

#include <pissa/detail/bdcsvd.hpp>
#include <pissa/svd.hpp>

#include <Eigen/SVD>

#ifndef PISSA_EXTERN_BDCSVD
#error "the test programs link pissa_bdcsvd and must be compiled with PISSA_EXTERN_BDCSVD"
#endif

using namespace pissa_test;

TEST_CASE_TEMPLATE("the compiled BDCSVD instances find a known spectrum, as the full truncated SVD", S, float, double) {
    Vector<double> sigma(6);
    sigma << 9, 5, 3, 2, 1, 0.5;
    const Matrix<S> W = with_spectrum<S>(40, 25, sigma, 3);
    const Eigen::BDCSVD<Matrix<S>> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
    REQUIRE(svd.info() == Eigen::Success);
    CHECK(relative_error(svd.singularValues().head(6), sigma) < 100 * eps<S>());
    CHECK(svd.singularValues().tail(19).norm() < 100 * eps<S>() * sigma(0));
    const Matrix<S> rebuilt = svd.matrixU() * svd.singularValues().asDiagonal() * svd.matrixV().transpose();
    CHECK(relative_error(rebuilt, W) < 100 * eps<S>());
    pissa::ExactSvdOptions full;
    full.algorithm = pissa::ExactSvdAlgorithm::full;
    const auto truncated = pissa::truncated_svd(W, 4, full);
    CHECK(relative_error(truncated.S, svd.singularValues().head(4)) < 10 * eps<S>());
}

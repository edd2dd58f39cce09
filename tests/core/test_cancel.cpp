// cancel.hpp: a cancellation request stops the decompositions at their next pass over W with
// pissa::cancelled, leaves in-place arguments untouched, and clears.
#include "support.hpp"

#include <pissa/pissa.hpp>

#include <doctest/doctest.h>

namespace {

struct ClearCancellation {
    ~ClearCancellation() { pissa::clear_cancellation(); }
};

pissa::RowMatrix<float> test_weight() {
    pissa::RowMatrix<float> W(96, 64);
    for (pissa::Index i = 0; i < W.rows(); ++i)
        for (pissa::Index j = 0; j < W.cols(); ++j) W(i, j) = static_cast<float>((i * 7 + j * 3) % 11) - 5.0f;
    return W;
}

}  // namespace

TEST_CASE("a cancellation request stops every decomposition with pissa::cancelled") {
    ClearCancellation clear;
    const pissa::RowMatrix<float> W = test_weight();
    CHECK_FALSE(pissa::cancellation_requested());
    pissa::request_cancellation();
    CHECK(pissa::cancellation_requested());
    pissa::RandomizedSvdOptions randomized;
    CHECK_THROWS_AS(pissa::randomized_svd(W, 4, randomized), pissa::cancelled);
    pissa::ExactSvdOptions krylov;
    krylov.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
    CHECK_THROWS_AS(pissa::truncated_svd(W, 4, krylov), pissa::cancelled);

    pissa::PissaConfig config;
    config.rank = 4;
    config.method = pissa::SvdMethod::randomized;
    pissa::RowMatrix<float> in_place = W;
    CHECK_THROWS_AS(pissa::init_in_place(in_place, config), pissa::cancelled);
    CHECK(in_place == W);  // untouched

    pissa::clear_cancellation();
    CHECK_FALSE(pissa::cancellation_requested());
    const auto split = pissa::init_in_place(in_place, config);
    CHECK(split.A.rows() == 4);
}

TEST_CASE("pissa::cancelled is neither bad input nor a numerical failure") {
    // The tool maps invalid_argument to exit 2 and anything else after a signal to 128 + signal.
    const pissa::cancelled e("pissa: cancelled");
    CHECK(dynamic_cast<const std::invalid_argument*>(static_cast<const std::exception*>(&e)) == nullptr);
    CHECK(dynamic_cast<const pissa::numerical_error*>(static_cast<const std::exception*>(&e)) == nullptr);
}

TEST_CASE("scalings outside [min_scaling, max_scaling] are refused before any work") {
    pissa::RowMatrix<float> W = test_weight();
    pissa::PissaConfig config;
    config.rank = 4;
    for (double alpha : {1e40, 1e39, 1e-39, 1e-13}) {
        config.lora_alpha = alpha;
        CHECK_THROWS_WITH_AS(pissa::init(W, config), doctest::Contains("is outside [1e-12, 1e+12]"),
                             pissa::invalid_argument);
    }
    config.lora_alpha = 4e12;  // s = 1e12 itself is allowed
    CHECK(pissa::init(W, config).A.allFinite());
}

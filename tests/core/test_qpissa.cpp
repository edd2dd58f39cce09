// Tests for qpissa.hpp: QPiSSA, LoftQ and QLoRA on an NF4 base, against the plain PiSSA split
// and the alternation recomputed independently; fan_in_fan_out, 16-bit weights, bad configurations.
#include "quant_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/init.hpp>
#include <pissa/qpissa.hpp>
#include <pissa/quant_error.hpp>
#include <pissa/quant_nf4.hpp>

#include <Eigen/SVD>

#include <cmath>
#include <string>
#include <vector>

using pissa::Index;
using pissa::QuantInitConfig;
using pissa_test::config_with;
using pissa_test::llm_like;
using pissa_test::Matrix;
using pissa_test::Vector;

TEST_CASE_TEMPLATE("QPiSSA with T = 1 is the plain PiSSA residual, quantised", T, float, double) {
    const Matrix<T> w = llm_like<T>(96, 160, 3);
    const QuantInitConfig config = config_with(8, 1);
    const auto q = pissa::qpissa_init(w, config);
    const auto split = pissa::init(w, config.pissa);
    CHECK(q.base.packed == pissa::quantize_nf4(split.residual).packed);
    CHECK(q.base.absmax == pissa::quantize_nf4(split.residual).absmax);
    CHECK(pissa_test::relative_error(q.adapter.B * q.adapter.A, split.B * split.A) < 10 * pissa_test::eps<T>());
    // Independently: W_res = W - U_r S_r V_r^T from a full SVD in double. Codes may flip only for
    // values within rounding of a midpoint, so the dequantised bases agree to a few flips.
    Eigen::BDCSVD<Matrix<double>> svd(w.template cast<double>(), Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Matrix<double> residual = w.template cast<double>() - svd.matrixU().leftCols(8) *
                                                                    svd.singularValues().head(8).asDiagonal() *
                                                                    svd.matrixV().leftCols(8).transpose();
    const pissa::Nf4Tensor reference = pissa::quantize_nf4(residual);
    Index differing = 0;
    for (Index i = 0; i < reference.size(); ++i) differing += reference.code(i) != q.base.code(i) ? 1 : 0;
    INFO("codes differing from the double-precision reference: " << differing << " of " << reference.size());
    CHECK(differing <= reference.size() / 1000);
    // The error history's single entry is the measured Frobenius error.
    REQUIRE(q.error_history.size() == 1);
    CHECK(q.error_history[0] == doctest::Approx(pissa::quantization_error(w, q)).epsilon(1e-5));
}

TEST_CASE_TEMPLATE("QPiSSA and LoftQ: more iterations never increase the error", T, float, double) {
    struct Case {
        Index m, n, rank;
        std::uint64_t seed;
    };
    for (const Case& c : {Case{96, 160, 8, 1}, Case{128, 128, 16, 2}, Case{200, 72, 4, 3}}) {
        const Matrix<T> w = llm_like<T>(c.m, c.n, c.seed);
        const QuantInitConfig config = config_with(c.rank, 5);
        const auto qpissa = pissa::qpissa_init(w, config);
        const auto loftq = pissa::loftq_init(w, config);
        REQUIRE(qpissa.error_history.size() == 5);
        REQUIRE(loftq.error_history.size() == 5);
        for (std::size_t t = 1; t < 5; ++t) {
            INFO(c.m << " x " << c.n << " rank " << c.rank << ", iteration " << t + 1 << ": QPiSSA "
                     << qpissa.error_history[t - 1] << " -> " << qpissa.error_history[t] << ", LoftQ "
                     << loftq.error_history[t - 1] << " -> " << loftq.error_history[t]);
            CHECK(qpissa.error_history[t] <= qpissa.error_history[t - 1] * (1 + 1e-6));
            CHECK(loftq.error_history[t] <= loftq.error_history[t - 1] * (1 + 1e-6));
        }
        // The T-iteration result is the T-th entry: a separate T = 3 run ends where this one was.
        const auto three = pissa::qpissa_init(w, config_with(c.rank, 3));
        CHECK(three.error_history.back() == doctest::Approx(qpissa.error_history[2]).epsilon(1e-9));
        CHECK(pissa::quantization_error(w, qpissa) == doctest::Approx(qpissa.error_history.back()).epsilon(1e-5));
        CHECK(pissa::quantization_error(w, loftq) == doctest::Approx(loftq.error_history.back()).epsilon(1e-5));
    }
}

TEST_CASE("QPiSSA and LoftQ with T = 3: the alternation recomputed independently") {
    // The file comment's alternations, from Eigen's SVD and the NF4 round trip only, in double:
    //   QPiSSA: target = W; per step: W_res = W - top_r(target), Q = nf4(W_res), target = W - deq(Q)
    //   LoftQ:  res = W;    per step: Q = nf4(res), sBA = top_r(W - deq(Q)), res = W - sBA
    // with error_t = ||W - deq(Q_t) - (sBA)_t||_F. NF4 codes could differ only for values within
    // rounding of a bucket midpoint, which these seeds do not hit: the histories agree to rounding.
    const Index rank = 5;
    const Matrix<double> w = llm_like<double>(72, 56, 21);
    auto top_r = [&](const Matrix<double>& x) {
        Eigen::BDCSVD<Matrix<double>> svd(x, Eigen::ComputeThinU | Eigen::ComputeThinV);
        return Matrix<double>(svd.matrixU().leftCols(rank) * svd.singularValues().head(rank).asDiagonal() *
                              svd.matrixV().leftCols(rank).transpose());
    };
    auto round_trip = [](const Matrix<double>& x) { return pissa::dequantize_nf4<double>(pissa::quantize_nf4(x)); };
    const QuantInitConfig config = config_with(rank, 3);
    const auto qpissa = pissa::qpissa_init(w, config);
    const auto loftq = pissa::loftq_init(w, config);
    REQUIRE(qpissa.error_history.size() == 3);
    REQUIRE(loftq.error_history.size() == 3);

    Matrix<double> target = w, low_rank;
    for (std::size_t t = 0; t < 3; ++t) {
        low_rank = top_r(target);
        const Matrix<double> deq = round_trip(w - low_rank);
        CHECK(qpissa.error_history[t] == doctest::Approx((w - deq - low_rank).norm()).epsilon(1e-10));
        target = w - deq;
    }
    const double s = config.pissa.scaling();
    CHECK(pissa_test::relative_error(Matrix<double>(s * qpissa.adapter.B * qpissa.adapter.A), low_rank) < 1e-10);
    CHECK(pissa_test::relative_error(pissa::dequantize_nf4<double>(qpissa.base), round_trip(w - low_rank)) < 1e-10);

    Matrix<double> residual = w, deq;
    for (std::size_t t = 0; t < 3; ++t) {
        deq = round_trip(residual);
        low_rank = top_r(w - deq);
        CHECK(loftq.error_history[t] == doctest::Approx((w - deq - low_rank).norm()).epsilon(1e-10));
        residual = w - low_rank;
    }
    CHECK(pissa_test::relative_error(Matrix<double>(s * loftq.adapter.B * loftq.adapter.A), low_rank) < 1e-10);
    CHECK(pissa_test::relative_error(pissa::dequantize_nf4<double>(loftq.base), deq) < 1e-10);
}

TEST_CASE("LoftQ with T = 1: QLoRA's base plus the best rank-r fit of its quantisation error") {
    const Matrix<double> w = llm_like<double>(80, 120, 5);
    const auto loftq = pissa::loftq_init(w, config_with(6, 1));
    const auto qlora = pissa::qlora_init(w);
    CHECK(loftq.base.packed == qlora.base.packed);
    CHECK(qlora.adapter.A.rows() == 0);
    CHECK(qlora.adapter.B.cols() == 0);
    CHECK(pissa::quantization_error(w, qlora) == doctest::Approx((w - pissa::nf4_round_trip(w).cast<double>()).norm()));
    // Eckart-Young on the quantisation error Q_err = W - deq(Q(W)): ||Q_err - sBA||_F^2 = sum_{i>r} sigma_i^2.
    const Matrix<double> q_err = w - pissa::dequantize_nf4<double>(qlora.base);
    Eigen::BDCSVD<Matrix<double>> svd(q_err);
    const double tail = std::sqrt(svd.singularValues().tail(svd.singularValues().size() - 6).squaredNorm());
    CHECK(pissa::quantization_error(w, loftq) == doctest::Approx(tail).epsilon(1e-10));
}

TEST_CASE("Quantised inits on a fan_in_fan_out weight quantise the stored [in, out] tensor") {
    const Matrix<float> w = llm_like<float>(64, 96, 9);  // [out, in]
    const Matrix<float> stored = w.transpose();          // GPT-2 Conv1D layout [in, out]
    QuantInitConfig config = config_with(4, 2);
    config.pissa.fan_in_fan_out = true;
    const auto q = pissa::qpissa_init(stored, config);
    CHECK(q.base.rows == 96);
    CHECK(q.base.cols == 64);
    CHECK(q.adapter.A.rows() == 4);
    CHECK(q.adapter.A.cols() == 96);  // A [r, in]
    CHECK(q.adapter.B.rows() == 64);  // B [out, r]
    const Matrix<float> rebuilt =
        pissa::dequantize_nf4<float>(q.base) + (q.adapter.B * q.adapter.A * q.adapter.scaling).transpose();
    CHECK((stored - rebuilt).norm() == doctest::Approx(q.error_history.back()).epsilon(1e-4));
    CHECK(pissa::quantization_error(stored, q) == doctest::Approx(q.error_history.back()).epsilon(1e-4));
    const auto plain = pissa::qpissa_init(w, config_with(4, 2));
    // Same matrix, other flattening: the errors are of the same size, not equal.
    CHECK(q.error_history.back() == doctest::Approx(plain.error_history.back()).epsilon(0.1));
}

TEST_CASE("Quantised inits take 16-bit weights and compute in float32") {
    const Matrix<float> w = llm_like<float>(64, 128, 8);
    const Matrix<Eigen::bfloat16> w16 = w.cast<Eigen::bfloat16>();
    const QuantInitConfig config = config_with(4, 2);
    const pissa::QuantizedInit<float> q16 = pissa::qpissa_init(w16, config);
    const pissa::QuantizedInit<float> q32 = pissa::qpissa_init(Matrix<float>(w16.cast<float>()), config);
    CHECK(q16.base.packed == q32.base.packed);
    CHECK(q16.error_history == q32.error_history);
    CHECK(pissa::quantization_error(w16, q16) == doctest::Approx(q16.error_history.back()).epsilon(1e-5));
    // The base written back in bfloat16 re-quantises to the same codes (what `pissa init --quantize` relies on).
    const Matrix<Eigen::bfloat16> written = pissa::dequantize_nf4<Eigen::bfloat16>(q16.base);
    CHECK(pissa::quantize_nf4(written).packed == q16.base.packed);
}

TEST_CASE("Quantised inits reject bad configurations") {
    const Matrix<float> w = llm_like<float>(32, 48, 1);
    QuantInitConfig config = config_with(4, 0);
    CHECK_THROWS_WITH_AS(pissa::qpissa_init(w, config), doctest::Contains("iterations"), pissa::invalid_argument);
    CHECK_THROWS_AS(pissa::loftq_init(w, config), pissa::invalid_argument);
    config = config_with(40, 1);  // rank > min(m, n)
    CHECK_THROWS_AS(pissa::qpissa_init(w, config), pissa::invalid_argument);
    config = config_with(4, 1);
    config.nf4.block_size = 7;
    CHECK_THROWS_AS(pissa::qpissa_init(w, config), pissa::invalid_argument);
    const auto q = pissa::qpissa_init(w, config_with(4, 1));
    CHECK_THROWS_AS(pissa::quantization_error(Matrix<float>(w.transpose()), q), pissa::invalid_argument);
}

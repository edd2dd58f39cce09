// Tests for quant_error.hpp: QPiSSA and LoftQ against QLoRA in both norms, the nuclear norm
// and the error reduction.
#include "quant_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/qpissa.hpp>
#include <pissa/quant_error.hpp>

#include <cstdint>
#include <string>

using pissa::Index;
using pissa::QuantErrorNorm;
using pissa_test::config_with;
using pissa_test::llm_like;
using pissa_test::Matrix;
using pissa_test::Vector;

TEST_CASE_TEMPLATE("QPiSSA beats QLoRA on every LLM-like test matrix, in both norms", T, float, double) {
    struct Case {
        Index m, n, rank;
        int iterations;
        std::uint64_t seed;
    };
    for (const Case& c :
         {Case{96, 160, 8, 1, 11}, Case{160, 96, 8, 5, 12}, Case{128, 128, 16, 1, 13}, Case{256, 64, 4, 5, 14}}) {
        const Matrix<T> w = llm_like<T>(c.m, c.n, c.seed);
        const auto errors = pissa::compare_quantization_errors(w, config_with(c.rank, c.iterations));
        for (QuantErrorNorm norm : {QuantErrorNorm::frobenius, QuantErrorNorm::nuclear}) {
            const auto e = errors.in(norm);
            const std::string norm_name = norm == QuantErrorNorm::nuclear ? "nuclear" : "Frobenius";
            INFO(c.m << " x " << c.n << " rank " << c.rank << " T " << c.iterations << " " << norm_name << ": QLoRA "
                     << e.qlora << ", LoftQ " << e.loftq << " (" << 100 * e.loftq_reduction() << "%), QPiSSA "
                     << e.qpissa << " (" << 100 * e.qpissa_reduction() << "%)");
            CHECK(e.qpissa < e.qlora);
            CHECK(e.loftq < e.qlora);
            CHECK(e.qpissa_reduction() > 0.05);
        }
    }
}

TEST_CASE("nuclear_norm sums every singular value; error_reduction") {
    Vector<double> sigma(5);
    sigma << 5, 3, 2, 0.5, 0.25;
    const Matrix<float> m = pissa_test::with_spectrum<float>(40, 30, sigma, 4);
    CHECK(pissa::nuclear_norm(m) == doctest::Approx(10.75).epsilon(1e-5));
    CHECK(pissa::nuclear_norm(m.transpose()) == doctest::Approx(10.75).epsilon(1e-5));
    CHECK(pissa::error_reduction(0.8, 1.0) == doctest::Approx(0.2));
    CHECK_THROWS_AS(pissa::error_reduction(0.8, 0.0), pissa::invalid_argument);
}

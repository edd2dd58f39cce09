// Tests for quality.hpp: the one-line report of a split, by hand and as pissa::init fills it.
#include "support.hpp"

#include <pissa/init.hpp>
#include <pissa/quality.hpp>

#include <cmath>
#include <string>

using namespace pissa_test;

namespace {

/// A spectrum with clear gaps: 8, 7.6, 7.2, ... (all distinct, all > 0).
Vector<double> quality_spectrum(Index k) {
    Vector<double> s(k);
    for (Index i = 0; i < k; ++i) s(i) = 8.0 * std::pow(0.92, double(i));
    return s;
}

}  // namespace

TEST_CASE("to_string: rank, first and last sigma, the adapter's share in percent, the norms") {
    pissa::QualityReport report;
    report.singular_values = {3.817, 2.5, 1.61};
    report.weight_norm = 6.1;
    report.residual_norm = 4.2;
    report.adapter_energy_fraction = 0.412;
    CHECK(pissa::to_string(report) ==
          "rank 3: sigma 3.817 .. 1.61, adapter holds 41.20% of ||W||_F^2, ||W_res||_F = 4.2 of 6.1");
    // An empty report (rank 0) prints zeros instead of reading past the vector.
    CHECK(pissa::to_string(pissa::QualityReport{}) ==
          "rank 0: sigma 0 .. 0, adapter holds 0.00% of ||W||_F^2, ||W_res||_F = 0 of 0");
}

TEST_CASE("the quality report reads well") {
    const Matrix<double> W = with_spectrum<double>(30, 30, quality_spectrum(30), 2);
    pissa::PissaConfig config;
    config.rank = 3;
    const auto result = pissa::init(W, config);
    const std::string line = pissa::to_string(result.quality);
    CHECK(line.find("rank 3") != std::string::npos);
    CHECK(line.find("adapter holds") != std::string::npos);
    const Vector<double> sigma = quality_spectrum(30);
    CHECK(result.quality.adapter_energy_fraction ==
          doctest::Approx(sigma.head(3).squaredNorm() / sigma.squaredNorm()).epsilon(1e-10));
}

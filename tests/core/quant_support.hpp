/// \file quant_support.hpp
/// \brief LLM-like test weights and quantised-init configurations for the tests of qpissa.hpp and
/// quant_error.hpp.
#pragma once

#include "support.hpp"

#include <pissa/detail/random.hpp>
#include <pissa/qpissa.hpp>

#include <cmath>
#include <cstdint>

namespace pissa_test {

/// An LLM-like weight [m, n]: a Gaussian bulk (std 0.02), a few strong directions well above the
/// bulk's edge, two outlier input channels (columns x6) and a handful of large isolated entries.
template <class S>
Matrix<S> llm_like(Index m, Index n, std::uint64_t seed) {
    Matrix<double> w = pissa_test::gaussian<double>(m, n, seed) * 0.02;
    const Index k = 6;
    Vector<double> sigma(k);
    const double edge = 0.02 * (std::sqrt(double(m)) + std::sqrt(double(n)));
    for (Index i = 0; i < k; ++i) sigma(i) = 3.0 * edge / double(i + 1);
    w += pissa_test::with_spectrum<double>(m, n, sigma, seed + 100);
    w.col(n / 3) *= 6.0;
    w.col((2 * n) / 3) *= 6.0;
    pissa::detail::SplitMix64 rng(seed + 7);
    for (int e = 0; e < 5; ++e) {
        const Index i = Index(rng.uniform() * double(m)) % m;
        const Index j = Index(rng.uniform() * double(n)) % n;
        w(i, j) = (e % 2 ? 1.0 : -1.0) * 0.4;
    }
    return w.cast<S>();
}

inline pissa::QuantInitConfig config_with(Index rank, int iterations) {
    pissa::QuantInitConfig config;
    config.pissa.rank = rank;
    config.pissa.lora_alpha = double(rank);  // s = 1, as the reference script
    config.iterations = iterations;
    return config;
}

}  // namespace pissa_test

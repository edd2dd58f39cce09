/// \file support.hpp
/// \brief Shared test helpers: PISSA_ASSERT that throws, seeded test matrices with a known spectrum,
/// and a near-equality check that prints both sides.
#pragma once

#include <stdexcept>

// Internal invariants throw in tests so that CHECK_THROWS can see them (tl::expected's trick).
#ifndef PISSA_ASSERT
#define PISSA_ASSERT(condition)                                                       \
    do {                                                                              \
        if (!(condition)) throw std::logic_error("PISSA_ASSERT failed: " #condition); \
    } while (false)
#endif

#include <pissa/detail/random.hpp>
#include <pissa/types.hpp>

#include <doctest/doctest.h>

#include <Eigen/QR>

#include <cmath>
#include <cstdint>
#include <limits>

namespace pissa_test {

/// Whether this test program was compiled with OpenMP: the tests that compare thread counts are
/// skipped without it (doctest reports them as skipped), and test_kernels checks that it was
/// compiled with OpenMP wherever CMake found it.
#ifdef _OPENMP
inline constexpr bool built_with_openmp = true;
#else
inline constexpr bool built_with_openmp = false;
#endif

using pissa::Index;
template <class S>
using Matrix = pissa::Matrix<S>;
template <class S>
using Vector = pissa::Vector<S>;

/// Machine epsilon of the scalar.
template <class S>
constexpr double eps() {
    return static_cast<double>(std::numeric_limits<S>::epsilon());
}

/// A seeded matrix of i.i.d. standard normals.
template <class S>
Matrix<S> gaussian(Index rows, Index cols, std::uint64_t seed) {
    pissa::detail::SplitMix64 rng(seed);
    Matrix<S> out(rows, cols);
    for (Index j = 0; j < cols; ++j)
        for (Index i = 0; i < rows; ++i) out(i, j) = static_cast<S>(rng.normal());
    return out;
}

/// A random orthonormal basis [rows, cols] (Q of a Gaussian matrix, computed in double).
inline Matrix<double> orthonormal(Index rows, Index cols, std::uint64_t seed) {
    Eigen::HouseholderQR<Matrix<double>> qr(gaussian<double>(rows, cols, seed));
    return qr.householderQ() * Matrix<double>::Identity(rows, cols);
}

/// W = U diag(sigma) V^T with random orthonormal U, V and the given singular values: the exact
/// spectrum is known, so Eckart-Young tails can be checked against it.
template <class S>
Matrix<S> with_spectrum(Index m, Index n, const Vector<double>& sigma, std::uint64_t seed) {
    const Index k = sigma.size();
    Matrix<double> W = orthonormal(m, k, seed) * sigma.asDiagonal() * orthonormal(n, k, seed + 1).transpose();
    return W.cast<S>();
}

/// Geometric spectrum sigma_i = decay^i (i = 0..k-1), a smooth LLM-like decay.
inline Vector<double> geometric_spectrum(Index k, double decay) {
    Vector<double> s(k);
    for (Index i = 0; i < k; ++i) s(i) = std::pow(decay, static_cast<double>(i));
    return s;
}

/// ||a - b||_F / max(||b||_F, floor): relative above the floor, absolute below it.
template <class DA, class DB>
double relative_error(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b, double floor = 1e-30) {
    const double diff = (a.template cast<double>() - b.template cast<double>()).norm();
    return diff / std::max(b.template cast<double>().norm(), floor);
}

}  // namespace pissa_test

// Tests for lora.hpp: forward through the bottleneck, merge / unmerge, plain LoRA init, and
// bad input to it and to lora_backward (lora_backward.hpp).
#include "lora_support.hpp"
#include "support.hpp"

#include <pissa/detail/random.hpp>
#include <pissa/lora.hpp>
#include <pissa/lora_backward.hpp>

#include <cmath>
#include <limits>
#include <string>

using namespace pissa_test;

namespace {

template <class Fn>
std::string message_of(Fn&& fn) {
    try {
        fn();
    } catch (const pissa::invalid_argument& e) {
        return e.what();
    }
    return "<no pissa::invalid_argument thrown>";
}

}  // namespace

TEST_CASE_TEMPLATE("lora_forward equals the dense formula x (W + s B A)^T + b", S, float, double) {
    const double tol = 50 * eps<S>();
    for (Index r : {1, 3, 8}) {
        CAPTURE(r);
        Layer<S> L(5, 12, 10, r, 11);
        const Matrix<S> dense = L.x * (L.W + static_cast<S>(L.s) * L.B * L.A).transpose();
        CHECK(relative_error(pissa::lora_forward(L.x, L.W, L.A, L.B, L.s), dense) < tol);
        Matrix<S> with_bias = dense;
        with_bias.rowwise() += L.bias.transpose();
        CHECK(relative_error(pissa::lora_forward(L.x, L.W, L.A, L.B, L.s, L.bias), with_bias) < tol);
        // A row bias works too, and so does a row-major Map over checkpoint-like memory.
        const pissa::RowMatrix<S> W_rows = L.W;
        const Eigen::Map<const pissa::RowMatrix<S>> W_map(W_rows.data(), W_rows.rows(), W_rows.cols());
        CHECK(relative_error(pissa::lora_forward(L.x, W_map, L.A, L.B, L.s, L.bias.transpose()), with_bias) < tol);
        // The adapter-object overload agrees.
        const pissa::LoraAdapter<S> adapter{L.A, L.B, static_cast<S>(L.s)};
        CHECK(relative_error(pissa::lora_forward(L.x, L.W, adapter, L.bias), with_bias) < tol);
    }
    // An empty batch gives an empty output of the right width.
    Layer<S> L(0, 4, 3, 2, 5);
    CHECK(pissa::lora_forward(L.x, L.W, L.A, L.B, L.s).rows() == 0);
    CHECK(pissa::lora_forward(L.x, L.W, L.A, L.B, L.s).cols() == 3);
}

TEST_CASE_TEMPLATE("lora_forward with 16-bit storage computes in float", H, Eigen::half, Eigen::bfloat16) {
    Layer<float> L(6, 20, 9, 4, 21);
    const pissa::RowMatrix<H> W16 = L.W.cast<H>();
    const Matrix<float> W_rounded = W16.template cast<float>();
    const Matrix<float> expected = L.x * (W_rounded + static_cast<float>(L.s) * L.B * L.A).transpose();
    const Matrix<float> y = pissa::lora_forward(L.x, W16, L.A, L.B, L.s);
    CHECK(relative_error(y, expected) < 1e-5);
    // The 16-bit weight is used as stored (rounded), not as the float original: the difference is
    // of the 16-bit rounding's size.
    const double rounding = relative_error(pissa::lora_forward(L.x, L.W, L.A, L.B, L.s), expected);
    CHECK(rounding > 1e-5);
    CHECK(rounding < 3e-2);
    // 16-bit input x is widened to float as well.
    const Matrix<H> x16 = L.x.cast<H>();
    const Matrix<float> y16 = pissa::lora_forward(x16, W16, L.A, L.B, L.s);
    CHECK(relative_error(y16, y) < 3e-2);
}

TEST_CASE_TEMPLATE("merge then unmerge restores W; merged weight reproduces the LoRA forward", S, float, double) {
    Layer<S> L(5, 33, 70, 4, 41);  // 70 rows: more than one 64-row block
    Matrix<S> W = L.W;
    pissa::lora_merge(W, L.A, L.B, L.s);
    CHECK(relative_error(W, (L.W + static_cast<S>(L.s) * L.B * L.A).eval()) < 20 * eps<S>());
    CHECK(relative_error((L.x * W.transpose()).eval(), pissa::lora_forward(L.x, L.W, L.A, L.B, L.s)) < 50 * eps<S>());
    pissa::lora_unmerge(W, L.A, L.B, L.s);
    CHECK(relative_error(W, L.W) < 20 * eps<S>());
    // Row-major Map over external memory.
    pissa::RowMatrix<S> rows = L.W;
    Eigen::Map<pissa::RowMatrix<S>> map(rows.data(), rows.rows(), rows.cols());
    pissa::lora_merge(map, pissa::LoraAdapter<S>{L.A, L.B, static_cast<S>(L.s)});
    CHECK(relative_error(rows, (L.W + static_cast<S>(L.s) * L.B * L.A).eval()) < 20 * eps<S>());
    pissa::lora_unmerge(map, pissa::LoraAdapter<S>{L.A, L.B, static_cast<S>(L.s)});
    CHECK(relative_error(rows, L.W) < 20 * eps<S>());
}

TEST_CASE_TEMPLATE("merge / unmerge in 16-bit storage computes in float and rounds back", H, Eigen::bfloat16,
                   Eigen::half) {
    const double unit = std::is_same_v<H, Eigen::bfloat16> ? 0x1p-8 : 0x1p-11;  // unit roundoff
    Layer<float> L(4, 40, 66, 8, 51, 0.25);
    pissa::RowMatrix<H> W = L.W.cast<H>();
    const Matrix<float> W0 = W.template cast<float>();
    pissa::lora_merge(W, L.A, L.B, L.s);
    const Matrix<float> merged = W0 + static_cast<float>(L.s) * L.B * L.A;
    // Each entry is merged(i,j) rounded once to 16 bits.
    const Matrix<float> got = W.template cast<float>();
    CHECK(((got - merged).array().abs() <= unit * merged.array().abs() + 1e-30f).all());
    CHECK(relative_error(got, W0) > 0.05);  // the adapter really was added
    pissa::lora_unmerge(W, L.A, L.B, L.s);
    // Two roundings, each relative to the larger of |W| and |s B A|.
    const Matrix<float> back = W.template cast<float>();
    const Eigen::ArrayXXf bound =
        2.5f * static_cast<float>(unit) *
        (W0.array().abs().max(merged.array().abs()) + (static_cast<float>(L.s) * L.B * L.A).array().abs());
    CHECK(((back - W0).array().abs() <= bound).all());
    CHECK(relative_error(back, W0) < 4 * unit);
}

TEST_CASE("lora_init: peft's Kaiming-uniform A, B = 0, output unchanged, seeded") {
    const Index out = 50, in = 400, r = 16;
    const auto a = pissa::lora_init<float>(out, in, r, 32.0, 7);
    REQUIRE(a.A.rows() == r);
    REQUIRE(a.A.cols() == in);
    REQUIRE(a.B.rows() == out);
    REQUIRE(a.B.cols() == r);
    CHECK(a.B.isZero(0));
    CHECK(a.scaling == doctest::Approx(2.0));
    CHECK(pissa::lora_init<float>(out, in, r, 32.0, 7, true).scaling == doctest::Approx(8.0));
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    CHECK(a.A.cwiseAbs().maxCoeff() <= bound);
    CHECK(a.A.cwiseAbs().maxCoeff() > 0.99 * bound);  // the whole range is used
    // U(-b, b): mean 0, variance b^2 / 3 (6400 draws: tolerances are several standard errors).
    const double n = static_cast<double>(a.A.size());
    const double mean = a.A.cast<double>().mean();
    const double var = (a.A.cast<double>().array() - mean).square().sum() / n;
    CHECK(std::abs(mean) < 5 * bound / std::sqrt(3 * n));
    CHECK(var == doctest::Approx(bound * bound / 3).epsilon(0.05));
    // The layer's output is unchanged at step 0.
    const Matrix<float> x = gaussian<float>(3, in, 8), W = gaussian<float>(out, in, 9);
    CHECK(pissa::lora_forward(x, W, a) == (x * W.transpose()).eval());
    // Seeded: same seed same adapter, other seed another one; double draws the same numbers.
    CHECK(pissa::lora_init<float>(out, in, r, 32.0, 7).A == a.A);
    CHECK(pissa::lora_init<float>(out, in, r, 32.0, 8).A != a.A);
    CHECK(relative_error(pissa::lora_init<double>(out, in, r, 32.0, 7).A, a.A) < 1e-7);
    // Row-major fill order: the first row is the first `in` draws of the stream.
    pissa::detail::SplitMix64 rng(7);
    for (Index j = 0; j < 3; ++j) CHECK(a.A(0, j) == static_cast<float>(bound * (2.0 * rng.uniform() - 1.0)));
}

TEST_CASE("every bad input throws pissa::invalid_argument naming the shapes") {
    Layer<float> L(4, 6, 5, 2, 61);
    const Matrix<float> x_bad = gaussian<float>(4, 7, 1);
    const Matrix<float> A_bad = gaussian<float>(2, 7, 2);
    const Matrix<float> B_bad = gaussian<float>(5, 3, 3);
    const Matrix<float> B_rows = gaussian<float>(4, 2, 3);
    const Matrix<float> A_empty(0, 6), B_empty(5, 0);
    const Vector<float> bias_bad = gaussian<float>(4, 1, 4);
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();

    CHECK(message_of([&] { pissa::lora_forward(x_bad, L.W, L.A, L.B, L.s); }).find("x [4, 7]") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, A_bad, L.B, L.s); }).find("A [2, 7]") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, L.A, B_bad, L.s); }).find("rank mismatch") !=
          std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, L.A, B_rows, L.s); }).find("B [4, 2]") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, A_empty, B_empty, L.s); }).find("rank must be >= 1") !=
          std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, L.A, L.B, inf); }).find("scaling") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, L.A, L.B, nan); }).find("scaling") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_forward(L.x, L.W, L.A, L.B, L.s, bias_bad); }).find("bias") !=
          std::string::npos);

    const Matrix<float> dy = gaussian<float>(4, 5, 5), dy_bad = gaussian<float>(4, 6, 5);
    CHECK(message_of([&] { pissa::lora_backward(L.x, L.W, L.A, L.B, L.s, dy_bad); }).find("dy must be [batch, out]") !=
          std::string::npos);
    CHECK(message_of([&] { pissa::lora_backward(x_bad, L.W, L.A, L.B, L.s, dy); }).find("x [4, 7]") !=
          std::string::npos);
    CHECK(message_of([&] { pissa::lora_backward(L.x, L.W, L.A, B_bad, L.s, dy); }).find("rank mismatch") !=
          std::string::npos);
    CHECK(message_of([&] { pissa::lora_backward(L.x, L.W, L.A, L.B, nan, dy); }).find("scaling") != std::string::npos);

    Matrix<float> W = L.W;
    CHECK(message_of([&] { pissa::lora_merge(W, A_bad, L.B, L.s); }).find("A [2, 7]") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_unmerge(W, L.A, B_bad, L.s); }).find("B [5, 3]") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_merge(W, A_empty, B_empty, L.s); }).find("rank") != std::string::npos);
    CHECK(message_of([&] { pissa::lora_merge(W, L.A, L.B, inf); }).find("scaling") != std::string::npos);
    CHECK(W == L.W);  // nothing was modified by the failed calls

    CHECK(message_of([] { pissa::lora_init<float>(5, 6, 0, 8.0, 1); }).find("rank must be >= 1") != std::string::npos);
    CHECK(message_of([] { pissa::lora_init<float>(0, 6, 2, 8.0, 1); }).find("[out, in] = [0, 6]") != std::string::npos);
    CHECK(message_of([] { pissa::lora_init<float>(5, 6, 2, 0.0, 1); }).find("lora_alpha") != std::string::npos);
    CHECK(message_of([] { pissa::lora_init<float>(5, 6, 2, std::nan(""), 1); }).find("lora_alpha") !=
          std::string::npos);
}

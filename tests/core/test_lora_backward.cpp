// Tests for lora_backward.hpp: gradients against central finite differences and against the
// full-weight gradient projected onto the adapter.
#include "lora_support.hpp"
#include "support.hpp"

#include <pissa/lora.hpp>
#include <pissa/lora_backward.hpp>

#include <cstdint>
#include <functional>

using namespace pissa_test;

namespace {

/// Loss used by the finite-difference checks: L = sum(R .* tanh(y)), smooth and not linear in y.
template <class S>
double loss_of(const Matrix<S>& y, const Matrix<S>& R) {
    return (R.array().template cast<double>() * y.array().template cast<double>().tanh()).sum();
}
template <class S>
Matrix<S> dloss_dy(const Matrix<S>& y, const Matrix<S>& R) {
    return (R.array() * (S(1) - y.array().tanh().square())).matrix();
}

/// Central difference of f at every entry of P: (f(P + h e_ij) - f(P - h e_ij)) / 2h.
template <class S>
Matrix<double> central_difference(Matrix<S>& P, double h, const std::function<double()>& f) {
    Matrix<double> g(P.rows(), P.cols());
    for (Index j = 0; j < P.cols(); ++j)
        for (Index i = 0; i < P.rows(); ++i) {
            const S saved = P(i, j);
            P(i, j) = static_cast<S>(saved + h);
            const double up = f();
            P(i, j) = static_cast<S>(saved - h);
            const double down = f();
            P(i, j) = saved;
            g(i, j) = (up - down) / (2 * h);
        }
    return g;
}

template <class S>
void check_gradients(Index rank, bool with_bias, double h, double tol) {
    CAPTURE(rank);
    CAPTURE(with_bias);
    const Index batch = 6, in = 9, out = 7;
    Layer<S> L(batch, in, out, rank, 100 + static_cast<std::uint64_t>(rank));
    const Matrix<S> R = gaussian<S>(batch, out, 7);
    auto forward = [&] {
        return with_bias ? pissa::lora_forward(L.x, L.W, L.A, L.B, L.s, L.bias)
                         : pissa::lora_forward(L.x, L.W, L.A, L.B, L.s);
    };
    auto f = [&] { return loss_of<S>(forward(), R); };
    const Matrix<S> dy = dloss_dy<S>(forward(), R);
    pissa::LoraBackwardOptions opts;
    opts.input_gradient = true;
    opts.bias_gradient = with_bias;
    const auto g = pissa::lora_backward(L.x, L.W, L.A, L.B, L.s, dy, opts);

    CHECK(relative_error(g.dA, central_difference(L.A, h, f)) < tol);
    CHECK(relative_error(g.dB, central_difference(L.B, h, f)) < tol);
    CHECK(relative_error(g.dx, central_difference(L.x, h, f)) < tol);
    if (with_bias) {
        Matrix<S> b = L.bias;
        auto fb = [&] { return loss_of<S>(pissa::lora_forward(L.x, L.W, L.A, L.B, L.s, b), R); };
        REQUIRE(g.dbias.size() == out);
        CHECK(relative_error(g.dbias, central_difference(b, h, fb)) < tol);
    } else {
        CHECK(g.dbias.size() == 0);
    }
}

}  // namespace

TEST_CASE("lora_backward matches central finite differences in double") {
    for (Index r : {1, 4})
        for (bool bias : {false, true}) check_gradients<double>(r, bias, 1e-6, 1e-7);
}

TEST_CASE("lora_backward matches central finite differences in float (looser)") {
    for (Index r : {1, 4})
        for (bool bias : {false, true}) check_gradients<float>(r, bias, 1e-2, 5e-3);
}

TEST_CASE_TEMPLATE("lora_backward equals the full-weight gradient projected onto the adapter", S, float, double) {
    const double tol = 100 * eps<S>();
    Layer<S> L(8, 15, 11, 3, 31);
    const Matrix<S> dy = gaussian<S>(8, 11, 32);
    const S s = static_cast<S>(L.s);
    const Matrix<S> full = dy.transpose() * L.x;  // dL/dW of the plain layer, [out, in]
    pissa::LoraBackwardOptions opts;
    opts.input_gradient = true;
    opts.bias_gradient = true;
    const auto g = pissa::lora_backward(L.x, L.W, L.A, L.B, L.s, dy, opts);
    CHECK(relative_error(g.dA, (s * L.B.transpose() * full).eval()) < tol);
    CHECK(relative_error(g.dB, (s * full * L.A.transpose()).eval()) < tol);
    CHECK(relative_error(g.dx, (dy * (L.W + s * L.B * L.A)).eval()) < tol);
    CHECK(relative_error(g.dbias, dy.colwise().sum().transpose().eval()) < tol);
    // Without options only the adapter gradients are computed.
    const auto g2 = pissa::lora_backward(L.x, L.W, pissa::LoraAdapter<S>{L.A, L.B, s}, dy);
    CHECK(g2.dx.size() == 0);
    CHECK(g2.dbias.size() == 0);
    CHECK(relative_error(g2.dA, g.dA) == 0.0);
    // The scaling enters linearly: the wrong power or sign would be caught here.
    const auto g3 = pissa::lora_backward(L.x, L.W, L.A, L.B, -2.0 * L.s, dy);
    CHECK(relative_error(g3.dA, (S(-2) * g.dA).eval()) < tol);
}

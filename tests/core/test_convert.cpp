// Tests for convert.hpp: pissa_to_lora on in-memory adapters (merging the converted LoRA into W equals
// merging the trained PiSSA adapter into W_res), and convert_lora_alpha.
#include "support.hpp"

#include <pissa/convert.hpp>
#include <pissa/errors.hpp>
#include <pissa/lora.hpp>
#include <pissa/types.hpp>

#include <cmath>

TEST_CASE_TEMPLATE("pissa_to_lora: merging the converted LoRA into W equals merging the trained adapter into W_res",
                   Scalar, float, double) {
    const pissa::Index out = 20, in = 14, r = 3;
    const double s = 16.0 / r;
    const auto W = pissa_test::gaussian<Scalar>(out, in, 5);
    const auto A0 = pissa_test::gaussian<Scalar>(r, in, 6);
    const auto B0 = pissa_test::gaussian<Scalar>(out, r, 7);
    const pissa::Matrix<Scalar> W_res = W - static_cast<Scalar>(s) * B0 * A0;
    const pissa::Matrix<Scalar> A = A0 + pissa_test::gaussian<Scalar>(r, in, 8) * Scalar(0.1);
    const pissa::Matrix<Scalar> B = B0 + pissa_test::gaussian<Scalar>(out, r, 9) * Scalar(0.1);
    const auto lora = pissa::pissa_to_lora(A, B, A0, B0, s);
    CHECK(lora.scaling == static_cast<Scalar>(s));
    CHECK(lora.A.rows() == 2 * r);
    CHECK(lora.B.cols() == 2 * r);
    const double s2 = pissa::convert_lora_alpha(16.0, false) / (2 * r);
    CHECK(s2 == doctest::Approx(s));
    const pissa::Matrix<Scalar> via_lora = W + static_cast<Scalar>(s2) * lora.B * lora.A;
    const pissa::Matrix<Scalar> via_pissa = W_res + static_cast<Scalar>(s) * B * A;
    const double err = pissa_test::relative_error(via_lora, via_pissa);
    INFO("relative error ", err);
    CHECK(err < 50 * pissa_test::eps<Scalar>());
    // A wrong sign on B0 would leave the initial product in: the error is then O(1).
    const pissa::Matrix<Scalar> wrong = W + static_cast<Scalar>(s) * (B * A + B0 * A0);
    CHECK(pissa_test::relative_error(wrong, via_pissa) > 0.1);
    CHECK_THROWS_AS(pissa::pissa_to_lora(A, B, A0.leftCols(3), B0, s), pissa::invalid_argument);
    // The adapter form gives the same factors and keeps the trained adapter's scaling.
    const pissa::LoraAdapter<Scalar> trained{A, B, static_cast<Scalar>(s)}, initial{A0, B0, static_cast<Scalar>(s)};
    const auto kept = pissa::pissa_to_lora(trained, initial);
    CHECK(kept.scaling == static_cast<Scalar>(s));
    CHECK(kept.A == lora.A);
    CHECK(kept.B == lora.B);
    CHECK(pissa::convert_lora_alpha(8.0, true) == doctest::Approx(8.0 * std::sqrt(2.0)));
}

// Tests for quant_nf4.hpp: NF4 blockwise quantisation and its double quantisation of the
// absmax, against hand-computed blocks and bitsandbytes' documented semantics.
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/quant_nf4.hpp>

#include <cmath>
#include <limits>
#include <vector>

using pissa::Index;
using pissa::nf4_code_values;
using pissa::nf4_thresholds;
using pissa::Nf4Options;
using pissa::Nf4Tensor;
using pissa::RowMatrix;
using pissa_test::Matrix;

namespace {

/// A 1 x n row-major matrix holding `values` (the flattening order is then the vector's order).
RowMatrix<float> row_of(const std::vector<float>& values) {
    RowMatrix<float> m(1, static_cast<Index>(values.size()));
    for (std::size_t i = 0; i < values.size(); ++i) m(0, static_cast<Index>(i)) = values[i];
    return m;
}

/// Half the largest gap between adjacent NF4 values (-0.6961928 - (-1) = 0.3038072, NF4 is not
/// symmetric): the worst rounding error of a scaled value in [-1, 1].
constexpr double nf4_half_max_gap = (1.0 - 0.6961928009986877) / 2.0;

}  // namespace

TEST_CASE("NF4 code table and thresholds are bitsandbytes' midpoints") {
    double max_gap = 0;
    for (std::size_t k = 0; k + 1 < nf4_code_values.size(); ++k) {
        CHECK(nf4_code_values[k] < nf4_code_values[k + 1]);
        max_gap = std::max(max_gap, double(nf4_code_values[k + 1]) - double(nf4_code_values[k]));
        const double midpoint = (double(nf4_code_values[k]) + double(nf4_code_values[k + 1])) / 2.0;
        CHECK(std::fabs(double(nf4_thresholds[k]) - midpoint) < 1e-7);
    }
    CHECK(nf4_code_values[0] == -1.0f);
    CHECK(nf4_code_values[7] == 0.0f);
    CHECK(nf4_code_values[15] == 1.0f);
    CHECK(max_gap / 2 == doctest::Approx(nf4_half_max_gap));
}

TEST_CASE("NF4 encode: code points, midpoints (ties go down), beyond +-1, NaN") {
    for (int k = 0; k < 16; ++k) CHECK(pissa::nf4_encode(nf4_code_values[std::size_t(k)]) == k);
    for (int k = 0; k < 15; ++k) {
        const float t = nf4_thresholds[std::size_t(k)];
        INFO("threshold " << k << " = " << t);
        CHECK(pissa::nf4_encode(t) == k);  // exactly on the midpoint: the lower code (strict '>')
        CHECK(pissa::nf4_encode(std::nextafter(t, 2.0f)) == k + 1);
        CHECK(pissa::nf4_encode(std::nextafter(t, -2.0f)) == k);
    }
    CHECK(pissa::nf4_encode(1.0000001f) == 15);
    CHECK(pissa::nf4_encode(-1.0000001f) == 0);
    CHECK(pissa::nf4_encode(std::numeric_limits<float>::quiet_NaN()) == 0);
    CHECK(pissa::nf4_decode(0xF7) == 0.0f);  // only the low nibble is read
}

TEST_CASE("NF4 hand-computed block: values on code points scaled by a non-power-of-two absmax") {
    const float absmax = 3.0f;
    std::vector<float> values;
    for (float c : nf4_code_values) values.push_back(c * absmax);
    const Nf4Tensor q = pissa::quantize_nf4(row_of(values));
    REQUIRE(q.absmax.size() == 1);
    CHECK(q.absmax[0] == absmax);
    REQUIRE(q.packed.size() == 8);
    // Codes 0..15 in order, first element in the high nibble: 0x01, 0x23, ..., 0xEF.
    for (int k = 0; k < 8; ++k) CHECK(int(q.packed[std::size_t(k)]) == ((2 * k) << 4 | (2 * k + 1)));
    const Matrix<float> back = pissa::dequantize_nf4<float>(q);
    for (int k = 0; k < 16; ++k) CHECK(back(0, k) == nf4_code_values[std::size_t(k)] * absmax);
}

TEST_CASE("NF4 packing order: first element in the high nibble; row-major flattening") {
    RowMatrix<float> w(2, 2);
    w << 1.0f, -1.0f,               // codes 15, 0  -> 0xF0
        0.0f, 0.5626170039176941f;  // codes 7, 13 -> 0x7D
    const Nf4Tensor q = pissa::quantize_nf4(w);
    REQUIRE(q.packed.size() == 2);
    CHECK(int(q.packed[0]) == 0xF0);
    CHECK(int(q.packed[1]) == 0x7D);
    CHECK(q.code(0) == 15);
    CHECK(q.code(1) == 0);
    CHECK(q.code(2) == 7);
    CHECK(q.code(3) == 13);
    // The same matrix stored column-major flattens the same way (element (i, j) is i * cols + j).
    const Matrix<float> col_major = w;
    CHECK(pissa::quantize_nf4(col_major).packed == q.packed);
    // Dequantisation returns the [rows, cols] shape, not the transpose.
    const Matrix<float> back = pissa::dequantize_nf4<float>(q);
    CHECK(back(0, 1) == -1.0f);
    CHECK(back(1, 0) == 0.0f);
}

TEST_CASE("NF4 midpoints inside a block with absmax 1") {
    std::vector<float> values = {1.0f};
    for (float t : nf4_thresholds) values.push_back(t);
    values.push_back(0.0f);
    const Nf4Tensor q = pissa::quantize_nf4(row_of(values));
    CHECK(q.code(0) == 15);
    for (int k = 0; k < 15; ++k) CHECK(int(q.code(k + 1)) == k);
    CHECK(q.code(16) == 7);  // zero in a non-zero block
    // 17 values: odd count, the last low nibble is the code of the kernel's zero padding.
    CHECK((q.packed.back() & 0x0F) == 0x07);
}

TEST_CASE("NF4 all-zero block: absmax 0, codes 0 (NaN path of the kernel), dequantises to zero") {
    RowMatrix<float> w = RowMatrix<float>::Zero(2, 64);
    w.row(1).setConstant(0.25f);  // second block non-zero
    const Nf4Tensor q = pissa::quantize_nf4(w);
    REQUIRE(q.absmax.size() == 2);
    CHECK(q.absmax[0] == 0.0f);
    CHECK(q.absmax[1] == 0.25f);
    for (Index i = 0; i < 64; ++i) CHECK(q.code(i) == 0);
    for (Index i = 64; i < 128; ++i) CHECK(q.code(i) == 15);
    const Matrix<float> back = pissa::dequantize_nf4<float>(q);
    CHECK(back.row(0).cwiseAbs().maxCoeff() == 0.0f);
    CHECK(back.row(1).isConstant(0.25f));
}

TEST_CASE("NF4 single-outlier block: the outlier is exact, the rest collapse to zero") {
    std::vector<float> values(64, 0.5f);
    values[17] = -100.0f;
    values[3] = 3.0f;  // 0.03 of absmax: below the first positive threshold 0.0398 -> code 7
    values[5] = 4.5f;  // 0.045 of absmax: above it -> code 8 (0.0795803 * 100)
    const Nf4Tensor q = pissa::quantize_nf4(row_of(values));
    CHECK(q.absmax[0] == 100.0f);
    CHECK(q.code(17) == 0);
    CHECK(q.code(0) == 7);
    CHECK(q.code(3) == 7);
    CHECK(q.code(5) == 8);
    const Matrix<float> back = pissa::dequantize_nf4<float>(q);
    CHECK(back(0, 17) == -100.0f);
    CHECK(back(0, 0) == 0.0f);
    CHECK(back(0, 5) == doctest::Approx(7.958029955625534).epsilon(1e-6));
}

TEST_CASE("NF4 tail block shorter than block_size has its own absmax") {
    // 3 x 23 = 69 values: one block of 64 and a tail of 5 (elements 64..68 = row 2, cols 18..22).
    RowMatrix<float> w = RowMatrix<float>::Constant(3, 23, 0.1f);
    w(0, 0) = 2.0f;
    w(2, 18) = 0.2f;
    w(2, 20) = -0.4f;
    const Nf4Tensor q = pissa::quantize_nf4(w);
    REQUIRE(q.absmax.size() == 2);
    CHECK(q.absmax[0] == 2.0f);
    CHECK(q.absmax[1] == 0.4f);
    CHECK(q.packed.size() == 35);
    CHECK(q.code(1) == 8);    // 0.1 / 2 = 0.05 -> 0.0795803
    CHECK(q.code(64) == 12);  // 0.2 / 0.4 = 0.5, just below the 0.50166 midpoint -> 0.4407098
    CHECK(q.code(65) == 10);  // 0.1 / 0.4 = 0.25 -> 0.2461123
    CHECK(q.code(66) == 0);   // -0.4 -> -1
    CHECK(q.code(68) == 10);
    CHECK((q.packed.back() & 0x0F) == 0x07);  // 69 values: the padding nibble is the code of 0
    const Matrix<float> back = pissa::dequantize_nf4<float>(q);
    CHECK(back(2, 20) == -0.4f);
    CHECK(back(2, 18) == doctest::Approx(0.4 * 0.44070982933044434).epsilon(1e-6));
    CHECK(back(1, 0) == doctest::Approx(2 * 0.07958029955625534).epsilon(1e-6));  // element 23: block 0
}

TEST_CASE_TEMPLATE("NF4 dequant(quant(x)) error is at most absmax * half the largest code gap", T, float, double) {
    Matrix<T> w = pissa_test::gaussian<T>(37, 91, 11);  // 3367 values: 52 full blocks and a tail of 39
    w(5, 7) = T(40);                                    // an outlier
    for (Index block : {Index(64), Index(128), Index(4096)}) {
        Nf4Options options;
        options.block_size = block;
        const Nf4Tensor q = pissa::quantize_nf4(w, options);
        const Matrix<T> back = pissa::dequantize_nf4<T>(q);
        REQUIRE(back.rows() == w.rows());
        REQUIRE(back.cols() == w.cols());
        double worst_ratio = 0;
        for (Index i = 0; i < w.rows(); ++i)
            for (Index j = 0; j < w.cols(); ++j) {
                const Index flat = i * w.cols() + j;
                const double scale = q.absmax[std::size_t(flat / block)];
                const double err = std::fabs(double(w(i, j)) - double(back(i, j)));
                worst_ratio = std::max(worst_ratio, err / scale);
            }
        INFO("block " << block << ": worst |err| / absmax = " << worst_ratio);
        CHECK(worst_ratio <= nf4_half_max_gap + 1e-6);
        if (block < 4096) CHECK(worst_ratio > 0.1);  // NF4 is coarse: 3000 Gaussians hit a wide gap
    }
}

TEST_CASE("NF4 re-quantising the dequantised tensor stored in 16 bits gives back the same codes") {
    Matrix<float> w = pissa_test::gaussian<float>(48, 80, 5) * 0.02f;
    w.row(3).setZero();  // 80 zeros straddling blocks 1 and 2
    w.block(4, 0, 1, 64).setZero();
    const Nf4Tensor q = pissa::quantize_nf4(w);
    const Matrix<Eigen::bfloat16> as_bf16 = pissa::dequantize_nf4<Eigen::bfloat16>(q);
    const Matrix<Eigen::half> as_half = pissa::dequantize_nf4<Eigen::half>(q);
    const Matrix<float> as_float = pissa::dequantize_nf4<float>(q);
    CHECK(pissa::quantize_nf4(as_float).packed == q.packed);
    CHECK(pissa::quantize_nf4(as_float).absmax == q.absmax);
    CHECK(pissa::quantize_nf4(as_bf16).packed == q.packed);
    CHECK(pissa::quantize_nf4(as_half).packed == q.packed);
}

TEST_CASE("NF4 rejects bad input") {
    Matrix<float> w = Matrix<float>::Ones(4, 4);
    Nf4Options odd;
    odd.block_size = 63;
    CHECK_THROWS_AS(pissa::quantize_nf4(w, odd), pissa::invalid_argument);
    w(2, 3) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(pissa::quantize_nf4(w), doctest::Contains("row 2, column 3"), pissa::invalid_argument);
    Nf4Tensor broken = pissa::quantize_nf4(Matrix<float>::Ones(4, 4));
    broken.absmax.push_back(1.0f);
    CHECK_THROWS_AS(pissa::dequantize_nf4<float>(broken), pissa::invalid_argument);
}

TEST_CASE("NF4 double quantisation round trip of the absmax") {
    // 300 x 128 = 38400 values -> 600 absmax blocks -> 3 nested blocks of 256 (the last one 88).
    Matrix<float> w = pissa_test::gaussian<float>(300, 128, 21);
    for (Index i = 0; i < w.rows(); ++i) w.row(i) *= 0.5f + 0.01f * float(i);  // spread the absmax
    Nf4Options plain;
    Nf4Options dq;
    dq.double_quant = true;
    const Nf4Tensor q = pissa::quantize_nf4(w, plain);
    const Nf4Tensor qq = pissa::quantize_nf4(w, dq);
    REQUIRE(qq.nested.has_value());
    CHECK(qq.absmax.empty());
    CHECK(qq.packed == q.packed);  // codes use the exact absmax, as in bitsandbytes
    REQUIRE(qq.nested->quantized.absmax.size() == 3);
    REQUIRE(qq.nested->quantized.codes.size() == 600);
    double mean = 0;
    for (float a : q.absmax) mean += a;
    mean /= double(q.absmax.size());
    CHECK(qq.nested->offset == doctest::Approx(mean).epsilon(1e-6));
    const std::vector<float> scales = qq.block_scales();
    REQUIRE(scales.size() == q.absmax.size());
    // The odd-entry search leaves gaps of 2 * 0.9 / 64 near 1: error <= 0.0140625 * absmax2.
    for (std::size_t b = 0; b < scales.size(); ++b) {
        const double absmax2 = qq.nested->quantized.absmax[b / 256];
        CHECK(std::fabs(double(scales[b]) - double(q.absmax[b])) <= 0.0140625 * absmax2 + 1e-6);
    }
    const Matrix<float> back = pissa::dequantize_nf4<float>(qq);
    const Matrix<float> back_plain = pissa::dequantize_nf4<float>(q);
    const double err_dq = (back - w).norm() / w.norm();
    const double err_plain = (back_plain - w).norm() / w.norm();
    INFO("relative error: plain " << err_plain << ", double-quantised " << err_dq);
    CHECK(err_dq < err_plain * 1.02);
    CHECK(err_dq > 0);
}

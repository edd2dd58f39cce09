// Tests for init.hpp: PiSSA initialisation, every property of docs/math.md, for float and double,
// square, tall and wide shapes, r = 1, a middle rank and r = min(m, n); 16-bit storage;
// fan_in_fan_out; rsLoRA; the in-place form; the quality report's numbers; MiLoRA and OLoRA; and
// every bad input.
#include "support.hpp"

#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/huge_pages.hpp>
#include <pissa/init.hpp>

#include <Eigen/SVD>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

using namespace pissa_test;

namespace {

struct Case {
    Index out, in;
};
const Case kShapes[] = {{36, 36}, {54, 20}, {20, 54}};

/// A spectrum with clear gaps: 8, 7.6, 7.2, ... (all distinct, all > 0).
Vector<double> spectrum(Index k) {
    Vector<double> s(k);
    for (Index i = 0; i < k; ++i) s(i) = 8.0 * std::pow(0.92, double(i));
    return s;
}

/// Checks the identities every PiSSA split must satisfy (PISSA.md, "Properties").
template <class S, class Result>
void check_split(const Matrix<S>& W, const Result& result, const pissa::PissaConfig& config,
                 const Vector<double>& sigma) {
    const Index r = config.rank, out = W.rows(), in = W.cols();
    const S s = static_cast<S>(config.scaling());
    REQUIRE(result.A.rows() == r);
    REQUIRE(result.A.cols() == in);
    REQUIRE(result.B.rows() == out);
    REQUIRE(result.B.cols() == r);
    CHECK(result.scaling == doctest::Approx(config.scaling()));
    const Matrix<S> low_rank = s * result.B * result.A;
    // 1. Reconstruction: W_res + s B A == W, to rounding (~1e-7 float, ~1e-15 double relative).
    const double reconstruction = relative_error(Matrix<S>(result.residual + low_rank), W);
    INFO("reconstruction error " << reconstruction);
    CHECK(reconstruction < 20 * eps<S>());
    // 2. Output unchanged at initialisation: x W_res^T + s (x A^T) B^T == x W^T.
    const Matrix<S> x = gaussian<S>(5, in, 99);
    const Matrix<S> y_split = x * result.residual.transpose() + s * (x * result.A.transpose()) * result.B.transpose();
    CHECK(relative_error(y_split, Matrix<S>(x * W.transpose())) < 50 * eps<S>());
    // 3. B^T B == A A^T == diag(S / s): catches a wrong scaling or a missing sqrt.
    const Matrix<S> expected = (result.singular_values / s).asDiagonal();
    const double tol = 100 * eps<S>() * sigma(0) / static_cast<double>(s);
    CHECK((Matrix<S>(result.B.transpose() * result.B) - expected).norm() < tol);
    CHECK((Matrix<S>(result.A * result.A.transpose()) - expected).norm() < tol);
    // 4. Eckart-Young (exact method): ||W_res||_F^2 == sum_{i>r} sigma_i^2, and the kept values.
    if (config.method == pissa::SvdMethod::exact) {
        const double tail = std::sqrt(sigma.tail(sigma.size() - r).squaredNorm());
        const double residual = result.residual.template cast<double>().norm();
        INFO("||W_res|| " << residual << " optimum " << tail);
        CHECK(std::abs(residual - tail) < 100 * eps<S>() * sigma(0));
        CHECK(relative_error(result.singular_values, sigma.head(r)) < 100 * eps<S>());
    }
    // 5. The quality report says the same.
    CHECK(result.quality.singular_values.size() == static_cast<std::size_t>(r));
    CHECK(result.quality.weight_norm == doctest::Approx(W.template cast<double>().norm()).epsilon(1e-6));
    CHECK(result.quality.residual_norm ==
          doctest::Approx(result.residual.template cast<double>().norm()).epsilon(1e-6));
    CHECK(result.quality.adapter_energy_fraction ==
          doctest::Approx(low_rank.template cast<double>().squaredNorm() / W.template cast<double>().squaredNorm())
              .epsilon(1e-4));
}

}  // namespace

TEST_CASE_TEMPLATE("PiSSA split: reconstruction, unchanged output, B^T B = A A^T = diag(S/s), Eckart-Young", S, float,
                   double) {
    for (const Case shape : kShapes) {
        const Index k = std::min(shape.out, shape.in);
        const Vector<double> sigma = spectrum(k);
        const Matrix<S> W = with_spectrum<S>(shape.out, shape.in, sigma, 3);
        for (const Index r : {Index(1), k / 2, k}) {
            for (const auto method : {pissa::SvdMethod::exact, pissa::SvdMethod::randomized}) {
                for (const bool rslora : {false, true}) {
                    CAPTURE(shape.out);
                    CAPTURE(shape.in);
                    CAPTURE(r);
                    CAPTURE(static_cast<int>(method));
                    CAPTURE(rslora);
                    pissa::PissaConfig config;
                    config.rank = r;
                    config.lora_alpha = 16;  // s = 16 / r (or 16 / sqrt(r)): != 1, so a lost scaling shows
                    config.use_rslora = rslora;
                    config.method = method;
                    const auto result = pissa::init(W, config);
                    check_split(W, result, config, sigma);
                }
            }
        }
    }
}

TEST_CASE("scaling: alpha / r, or alpha / sqrt(r) with rsLoRA") {
    pissa::PissaConfig config;
    config.rank = 16;
    config.lora_alpha = 32;
    CHECK(config.scaling() == doctest::Approx(2.0));
    config.use_rslora = true;
    CHECK(config.scaling() == doctest::Approx(8.0));
}

TEST_CASE_TEMPLATE("fan_in_fan_out: a [in, out] Conv1D weight gives the adapter of its transpose", S, float, double) {
    const Vector<double> sigma = spectrum(20);
    const Matrix<S> W = with_spectrum<S>(30, 20, sigma, 8);  // [out, in]
    const Matrix<S> stored = W.transpose();                  // GPT-2 Conv1D layout [in, out]
    pissa::PissaConfig config;
    config.rank = 5;
    config.lora_alpha = 10;
    const auto plain = pissa::init(W, config);
    config.fan_in_fan_out = true;
    const auto conv = pissa::init(stored, config);
    REQUIRE(conv.A.rows() == 5);
    REQUIRE(conv.A.cols() == 20);         // [r, in]
    REQUIRE(conv.B.rows() == 30);         // [out, r]
    REQUIRE(conv.residual.rows() == 20);  // stored layout [in, out]
    REQUIRE(conv.residual.cols() == 30);
    CHECK(relative_error(Matrix<S>(conv.B * conv.A), Matrix<S>(plain.B * plain.A)) < 100 * eps<S>());
    // canonical signs: the factors themselves, not only their product
    CHECK(relative_error(conv.A, plain.A) < 1000 * eps<S>());
    CHECK(relative_error(conv.B, plain.B) < 1000 * eps<S>());
    CHECK(relative_error(conv.residual, Matrix<S>(plain.residual.transpose()), 1.0) < 100 * eps<S>());
    CHECK(relative_error(Matrix<S>(conv.residual + conv.scaling * (conv.B * conv.A).transpose()), stored) <
          20 * eps<S>());
}

TEST_CASE_TEMPLATE("16-bit storage: float32 adapter, residual rounded back to the storage dtype", T, Eigen::half,
                   Eigen::bfloat16) {
    const Vector<double> sigma = spectrum(24);
    const pissa::RowMatrix<T> W = with_spectrum<float>(40, 24, sigma, 6).cast<T>();
    pissa::PissaConfig config;
    config.rank = 4;
    config.lora_alpha = 4;
    const auto result = pissa::init(W, config);
    static_assert(std::is_same_v<typename decltype(result.A)::Scalar, float>);
    static_assert(std::is_same_v<typename decltype(result.residual)::Scalar, T>);
    // peft: W_res = (W.float() - s B A).to(dtype): exactly that rounding, element by element.
    const Matrix<float> expected = W.template cast<float>() - result.scaling * result.B * result.A;
    CHECK(result.residual == Matrix<float>(expected).cast<T>());
    // The low-rank part is decomposed from the float32 value of the 16-bit weights.
    const auto reference = pissa::init(Matrix<float>(W.template cast<float>()), config);
    CHECK(relative_error(Matrix<float>(result.B * result.A), Matrix<float>(reference.B * reference.A)) < 1e-5);
}

TEST_CASE_TEMPLATE("init_in_place overwrites W with the same residual init returns", S, float, double) {
    const Matrix<S> W = with_spectrum<S>(33, 27, spectrum(27), 12);
    for (const auto method : {pissa::SvdMethod::exact, pissa::SvdMethod::randomized}) {
        pissa::PissaConfig config;
        config.rank = 6;
        config.method = method;
        const auto copy = pissa::init(W, config);
        pissa::RowMatrix<S> buffer = W;  // a checkpoint-like row-major buffer, used through a Map
        Eigen::Map<pissa::RowMatrix<S>> mapped(buffer.data(), 33, 27);
        const auto adapter = pissa::init_in_place(mapped, config);
        CHECK(relative_error(Matrix<S>(buffer), copy.residual, 1.0) < 100 * eps<S>());
        CHECK(relative_error(Matrix<S>(adapter.B * adapter.A), Matrix<S>(copy.B * copy.A)) < 100 * eps<S>());
        CHECK(adapter.quality.residual_norm == doctest::Approx(copy.quality.residual_norm).epsilon(1e-6));
    }
}

TEST_CASE_TEMPLATE("init and init_in_place give the same bits whatever the layouts", T, float, Eigen::half,
                   Eigen::bfloat16) {
    // The tool splits in place while the seed rule promises init()'s bits, so the residual update
    // (the AVX-512 one where the CPU has it) may not depend on the source's or the target's layout.
    for (const bool fan_in_fan_out : {false, true}) {
        CAPTURE(fan_in_fan_out);
        const pissa::RowMatrix<T> W = (gaussian<float>(67, 131, 3) * 3.0f).template cast<T>();
        pissa::PissaConfig config;
        config.rank = 9;
        config.lora_alpha = 5;
        config.fan_in_fan_out = fan_in_fan_out;
        const auto from_rows = pissa::init(W, config);  // row-major source, column-major residual
        pissa::RowMatrix<T> rows = W;
        const auto rows_adapter = pissa::init_in_place(rows, config);
        CHECK(Matrix<T>(rows) == from_rows.residual);
        CHECK(rows_adapter.quality.residual_norm == from_rows.quality.residual_norm);
        CHECK(rows_adapter.quality.weight_norm == from_rows.quality.weight_norm);
        const Matrix<T> W_cols = W;
        const auto from_cols = pissa::init(W_cols, config);  // column-major both
        Matrix<T> cols = W_cols;
        const auto cols_adapter = pissa::init_in_place(cols, config);
        CHECK(cols == from_cols.residual);
        CHECK(cols_adapter.quality.residual_norm == from_cols.quality.residual_norm);
        CHECK(cols_adapter.quality.weight_norm == from_cols.quality.weight_norm);
    }
}

TEST_CASE("init_in_place on a reused SVD workspace gives the bits of a fresh one, weight after weight") {
    // The checkpoint pipeline keeps one workspace for all modules: shapes, ranks, seeds, layouts
    // and storage dtypes (float32: its bfloat16 copy where AMX runs) change between calls.
    pissa::detail::RandomizedSvdWorkspace<float> workspace;
    const auto check = [&](auto W, pissa::Index rank, std::uint64_t seed) {
        CAPTURE(W.rows());
        CAPTURE(rank);
        pissa::PissaConfig config;
        config.rank = rank;
        config.randomized.seed = seed;
        auto fresh = W, reused = W;
        const auto a = pissa::init_in_place(fresh, config);
        const auto b = pissa::detail::init_in_place(reused, config, &workspace);
        CHECK(fresh == reused);
        CHECK(a.A == b.A);
        CHECK(a.B == b.B);
    };
    const pissa::RowMatrix<float> big = gaussian<float>(300, 200, 5);
    check(big, 16, 1);
    check(pissa::RowMatrix<float>(big.topLeftCorner(120, 90)), 8, 2);
    check(Matrix<float>(big.transpose()), 24, 3);
    check(pissa::RowMatrix<Eigen::bfloat16>(big.cast<Eigen::bfloat16>()), 16, 4);
    check(big, 4, 5);
}

TEST_CASE_TEMPLATE("the AVX-512 residual update agrees with the portable one to a rounding of the storage dtype", T,
                   float, Eigen::half, Eigen::bfloat16) {
    // init_in_place takes the AVX-512 rank-r update where the CPU has it (a column-major W as its
    // row-major transpose): the float32 residual rounded once to T, like the portable Eigen path,
    // summed in another order.
    const auto check_layout = [](auto W, Index r, bool fan_in_fan_out) {
        pissa::PissaConfig config;
        config.rank = r;
        config.lora_alpha = 2.0 * double(r);
        config.fan_in_fan_out = fan_in_fan_out;
        auto automatic = W, portable = W;
        const auto a = pissa::init_in_place(automatic, config);
        pissa::detail::set_kernel_isa_override(pissa::detail::KernelIsa::portable);
        const auto b = pissa::init_in_place(portable, config);
        pissa::detail::set_kernel_isa_override(pissa::detail::KernelIsa::portable, true);
        // Each residual against the exact W - s B A of its own adapter: within half a unit of T's
        // precision (plus float32 sums), the same bound for both paths.
        const double unit = std::is_same_v<T, float> ? 1e-6 : std::is_same_v<T, Eigen::half> ? 1.0 / 1024 : 1.0 / 128;
        for (const auto& [stored, adapter] : {std::pair{&automatic, &a}, std::pair{&portable, &b}}) {
            const Matrix<double> low =
                (adapter->B.template cast<double>() * adapter->A.template cast<double>()) * double(adapter->scaling);
            const Matrix<double> exact = W.template cast<float>().template cast<double>() -
                                         (fan_in_fan_out ? Matrix<double>(low.transpose()) : low);
            const Matrix<double> got = stored->template cast<float>().template cast<double>();
            CHECK(((got - exact).cwiseAbs().array() <= unit * exact.cwiseAbs().array() + 1e-5).all());
        }
        CHECK(a.quality.residual_norm == doctest::Approx(b.quality.residual_norm).epsilon(1e-4));
        CHECK(a.quality.weight_norm == doctest::Approx(b.quality.weight_norm).epsilon(1e-12));
    };
    for (const bool fan_in_fan_out : {false, true}) {
        for (const auto& [m, n, r] :
             {std::tuple<Index, Index, Index>{1, 1, 1}, {7, 5, 2}, {67, 131, 9}, {130, 70, 33}}) {
            CAPTURE(fan_in_fan_out);
            CAPTURE(m);
            CAPTURE(n);
            const pissa::RowMatrix<T> W = (gaussian<float>(m, n, std::uint64_t(m + n)) * 3.0f).template cast<T>();
            check_layout(W, r, fan_in_fan_out);
            check_layout(Matrix<T>(W), r, fan_in_fan_out);
        }
    }
}

TEST_CASE("init on a residual large enough for 2 MiB pages (6.5 MB): W_res + s B A == W") {
    // init advises huge pages for its fresh residual buffer (detail/huge_pages.hpp) before writing it.
    const Matrix<float> W = with_spectrum<float>(1600, 1024, spectrum(1024), 21);
    pissa::PissaConfig config;
    config.rank = 8;
    config.method = pissa::SvdMethod::randomized;
    const auto result = pissa::init(W, config);
    const Matrix<float> rebuilt = result.residual + result.scaling * result.B * result.A;
    CHECK(relative_error(rebuilt, W) < 100 * eps<float>());
    CHECK(result.quality.residual_norm == doctest::Approx(result.residual.cast<double>().norm()).epsilon(1e-9));
}

TEST_CASE("huge_page_range: whole 2 MiB pages inside the buffer, none below two pages") {
    using pissa::detail::huge_page_range;
    using pissa::detail::kHugePage;
    const std::uintptr_t page = kHugePage;
    for (const std::uintptr_t begin : {page * 7, page * 7 + 16, page * 8 - 64}) {
        for (const std::size_t bytes :
             {std::size_t(0), std::size_t(page), std::size_t(2 * page), std::size_t(3 * page - 1),
              std::size_t(3 * page), std::size_t(64 * page + 48)}) {
            CAPTURE(begin);
            CAPTURE(bytes);
            const auto range = huge_page_range(begin, bytes);
            const std::uintptr_t whole_first = (begin + page - 1) / page * page;
            const std::uintptr_t whole_last = (begin + bytes) / page * page;
            const std::uintptr_t whole = whole_last > whole_first ? (whole_last - whole_first) / page : 0;
            if (whole < 2) {
                CHECK(range.first == range.last);
            } else {
                CHECK(range.first == whole_first);
                CHECK(range.last == whole_last);
                CHECK(range.first % page == 0);
                CHECK(range.first >= begin);
                CHECK(range.last <= begin + bytes);
            }
        }
    }
    CHECK(huge_page_range(0, 64 * page).first == huge_page_range(0, 64 * page).last);  // null: nothing
}

TEST_CASE_TEMPLATE("init rejects bad input with a clear message and leaves W untouched", S, float, double) {
    Matrix<S> W = gaussian<S>(12, 9, 4);
    const Matrix<S> original = W;
    pissa::PissaConfig config;
    config.rank = 0;
    CHECK_THROWS_WITH_AS(pissa::init(W, config), doctest::Contains("rank must be >= 1, got 0"),
                         pissa::invalid_argument);
    config.rank = 10;
    CHECK_THROWS_WITH_AS(pissa::init(W, config), doctest::Contains("min(m, n) = 9"), pissa::invalid_argument);
    config.rank = 2;
    config.lora_alpha = 0;
    CHECK_THROWS_WITH_AS(pissa::init(W, config), doctest::Contains("lora_alpha must be a finite number > 0, got 0"),
                         pissa::invalid_argument);
    config.lora_alpha = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(pissa::init(W, config), pissa::invalid_argument);
    config.lora_alpha = 4;
    config.method = pissa::SvdMethod::randomized;
    config.randomized.niter = -2;
    CHECK_THROWS_WITH_AS(pissa::init(W, config), doctest::Contains("niter must be >= 0, got -2"),
                         pissa::invalid_argument);
    config.randomized.niter = 2;
    W(7, 1) = std::numeric_limits<S>::quiet_NaN();
    for (const auto method : {pissa::SvdMethod::exact, pissa::SvdMethod::randomized}) {
        config.method = method;
        CHECK_THROWS_WITH_AS(pissa::init(W, config), doctest::Contains("row 7, column 1"), pissa::invalid_argument);
        Matrix<S> in_place = W;
        CHECK_THROWS_AS(pissa::init_in_place(in_place, config), pissa::invalid_argument);
        CHECK(in_place.cwiseEqual(W).count() == W.size() - 1);  // untouched (NaN != NaN)
    }
    config.fan_in_fan_out = true;  // found through the transposed [out, in] view as well
    Matrix<S> stored = original;
    stored(7, 1) = std::numeric_limits<S>::infinity();
    CHECK_THROWS_WITH_AS(pissa::init(stored, config), doctest::Contains("non-finite"), pissa::invalid_argument);
}

TEST_CASE_TEMPLATE("MiLoRA: the r smallest triplets, residual identity, the kept values and energy", S, float, double) {
    for (const Case shape : kShapes) {
        const Index k = std::min(shape.out, shape.in);
        const Vector<double> sigma = spectrum(k);
        const Matrix<S> W = with_spectrum<S>(shape.out, shape.in, sigma, 5);
        for (const Index r : {Index(1), k / 3}) {
            CAPTURE(shape.out);
            CAPTURE(r);
            pissa::PissaConfig config;
            config.rank = r;
            config.lora_alpha = 16;
            config.method = pissa::SvdMethod::exact;
            config.components = pissa::Components::minor;
            const auto result = pissa::init(W, config);
            const S s = static_cast<S>(config.scaling());
            CHECK(relative_error(Matrix<S>(result.residual + s * result.B * result.A), W) < 20 * eps<S>());
            // The kept values are the r smallest, descending, and B^T B = A A^T = diag(S / s).
            CHECK(relative_error(result.singular_values, sigma.tail(r)) < 1000 * eps<S>());
            const Matrix<S> expected = (result.singular_values / s).asDiagonal();
            CHECK((Matrix<S>(result.B.transpose() * result.B) - expected).norm() < 100 * eps<S>() * sigma(0));
            // W_res keeps the principal part: ||W_res||^2 = sum of all but the r smallest sigma^2.
            const double head = std::sqrt(sigma.head(k - r).squaredNorm());
            CHECK(std::abs(result.residual.template cast<double>().norm() - head) < 100 * eps<S>() * sigma(0));
            CHECK(result.quality.adapter_energy_fraction ==
                  doctest::Approx(sigma.tail(r).squaredNorm() / sigma.squaredNorm()).epsilon(1e-3));
            // s B A is the projection onto the minor singular subspace, whatever the signs.
            const Eigen::BDCSVD<Matrix<double>> svd(W.template cast<double>(),
                                                    Eigen::ComputeThinU | Eigen::ComputeThinV);
            const Matrix<double> minor = svd.matrixU().rightCols(r) * svd.singularValues().tail(r).asDiagonal() *
                                         svd.matrixV().rightCols(r).transpose();
            CHECK(relative_error(Matrix<S>(s * result.B * result.A), minor) < 1000 * eps<S>());
        }
    }
    pissa::PissaConfig randomized;
    randomized.components = pissa::Components::minor;
    randomized.method = pissa::SvdMethod::randomized;
    CHECK_THROWS_WITH_AS(pissa::init(gaussian<S>(8, 6, 1), randomized), doctest::Contains("exact decomposition"),
                         pissa::invalid_argument);
}

TEST_CASE_TEMPLATE("OLoRA: B = Q_r, A = R_r of the leading QR, residual W - s B A", S, float, double) {
    for (const Case shape : kShapes) {
        const Index k = std::min(shape.out, shape.in);
        const Matrix<S> W = with_spectrum<S>(shape.out, shape.in, spectrum(k), 9);
        for (const Index r : {Index(1), k / 2, k}) {
            for (const bool fan_in_fan_out : {false, true}) {
                CAPTURE(shape.out);
                CAPTURE(r);
                CAPTURE(fan_in_fan_out);
                pissa::PissaConfig config;
                config.rank = r;
                config.lora_alpha = 3;  // s != 1: OLoRA's A and B are not divided by s
                config.init = pissa::InitMethod::olora;
                config.fan_in_fan_out = fan_in_fan_out;
                const Matrix<S> stored = fan_in_fan_out ? Matrix<S>(W.transpose()) : W;
                const auto result = pissa::init(stored, config);
                const auto qr = pissa::leading_qr(W, r);
                CHECK(relative_error(result.B, qr.Q) < 10 * eps<S>());
                CHECK(relative_error(result.A, qr.R) < 10 * eps<S>());
                const S s = static_cast<S>(config.scaling());
                const Matrix<S> low_rank = s * result.B * result.A;
                const Matrix<S> residual = fan_in_fan_out ? Matrix<S>(result.residual.transpose()) : result.residual;
                CHECK(relative_error(Matrix<S>(residual + low_rank), W) < 20 * eps<S>());
                CHECK(result.singular_values.size() == 0);
                CHECK(result.quality.weight_norm == doctest::Approx(W.template cast<double>().norm()));
                CHECK(result.quality.residual_norm == doctest::Approx(residual.template cast<double>().norm()));
                Matrix<S> in_place = stored;
                const auto adapter = pissa::init_in_place(in_place, config);
                CHECK(relative_error(in_place, result.residual) == 0);
                CHECK(relative_error(adapter.A, result.A) == 0);
            }
        }
    }
    pissa::PissaConfig both;
    both.init = pissa::InitMethod::olora;
    both.components = pissa::Components::minor;
    CHECK_THROWS_WITH_AS(pissa::init(gaussian<S>(8, 6, 1), both), doctest::Contains("OLoRA has none"),
                         pissa::invalid_argument);
}

// The accuracy study of the bfloat16 products (pissa::ProductPrecision): the randomized SVD of a
// bfloat16 W, and of a float32 W, with the products in float32 and in bfloat16, on the reference
// shapes and several seeds, as err / opt (the Frobenius error of the rank-r approximation over the
// Eckart-Young optimum of the stored W) and the relative change of the error. Prints a Markdown
// table per dtype (docs/math.md, "Products in bfloat16").
//
// W = A diag(d) B / sqrt(k) + 0.05 N, A [m, k], B [k, n], N Gaussian, k = 512, d_i = exp(-i / 40)
// (stored in bfloat16 or float32): a decaying head over a noise floor, like a trained weight, and
// the matrices bench/compare_peers.py times. The optimum comes from pissa's exact top-r in double.
//
// Usage: study_bf16_products [--quick] [--seeds N] [--dtype bfloat16|float32|both]
//        (--quick: two small shapes, for the suite)
#include <pissa/rsvd.hpp>
#include <pissa/svd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using pissa::Index;

struct Shape {
    Index m, n, r;
    int niter;
};

pissa::RowMatrix<float> test_weight(Index m, Index n, std::uint32_t seed) {
    const Index k = 512;
    std::mt19937 generator(seed);
    std::normal_distribution<float> normal;
    pissa::Matrix<float> A(m, k), B(k, n);
    for (float& v : A.reshaped()) v = normal(generator);
    for (float& v : B.reshaped()) v = normal(generator);
    for (Index i = 0; i < k; ++i) A.col(i) *= std::exp(-float(i) / 40.0f);
    pissa::Matrix<float> W = A * B / std::sqrt(float(k));
    for (float& v : W.reshaped()) v += 0.05f * normal(generator);
    return W;
}

/// The table of one storage dtype; returns the largest relative change of the error.
template <class Storage>
double study(const std::vector<Shape>& shapes, int seeds, const char* dtype) {
    std::printf(
        "| W (%s) | r | niter | err/opt, float32 products (mean) | err/opt, bfloat16 products (mean) "
        "| largest relative change of the error |\n",
        dtype);
    std::printf("|---|---|---|---|---|---|\n");
    double worst_overall = 0;
    for (const Shape& shape : shapes) {
        const pissa::RowMatrix<Storage> W =
            test_weight(shape.m, shape.n, std::uint32_t(shape.m * 31 + shape.n)).template cast<Storage>();
        const pissa::Matrix<double> exact = W.template cast<float>().template cast<double>();
        const double opt = std::sqrt(exact.squaredNorm() - pissa::truncated_svd(exact, shape.r).S.squaredNorm());
        double sum_f32 = 0, sum_bf16 = 0, worst = 0;
        for (int seed = 0; seed < seeds; ++seed) {
            double error[2];
            for (int mode = 0; mode < 2; ++mode) {
                pissa::RandomizedSvdOptions options;
                options.niter = shape.niter;
                options.seed = std::uint64_t(seed);
                options.products = mode == 0 ? pissa::ProductPrecision::float32 : pissa::ProductPrecision::bfloat16;
                const pissa::SvdResult<float> svd = pissa::randomized_svd(W, shape.r, options);
                const pissa::Matrix<double> US = svd.U.cast<double>() * svd.S.cast<double>().asDiagonal();
                error[mode] = (exact - US * svd.V.cast<double>().transpose()).norm();
            }
            sum_f32 += error[0] / opt;
            sum_bf16 += error[1] / opt;
            worst = std::max(worst, std::abs(error[1] - error[0]) / error[0]);
        }
        worst_overall = std::max(worst_overall, worst);
        std::printf("| %ldx%ld | %ld | %d | %.7f | %.7f | %.1e |\n", long(shape.m), long(shape.n), long(shape.r),
                    shape.niter, sum_f32 / seeds, sum_bf16 / seeds, worst);
    }
    return worst_overall;
}

}  // namespace

int main(int argc, char** argv) {
    bool quick = false;
    int seeds = 5;
    std::string dtype = "both";
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--quick") == 0) {
            quick = true;
        } else if (std::strcmp(argv[i], "--seeds") == 0 && i + 1 < argc) {
            seeds = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) {
            dtype = argv[++i];
        } else {
            std::fprintf(stderr, "usage: study_bf16_products [--quick] [--seeds N] [--dtype bfloat16|float32|both]\n");
            return 2;
        }
    }
    if (dtype != "bfloat16" && dtype != "float32" && dtype != "both") {
        std::fprintf(stderr, "study_bf16_products: --dtype must be bfloat16, float32 or both, got '%s'\n",
                     dtype.c_str());
        return 2;
    }
    const std::vector<Shape> shapes =
        quick ? std::vector<Shape>{{300, 200, 8, 4}, {256, 640, 32, 2}}
              : std::vector<Shape>{{4096, 4096, 16, 4},  {4096, 4096, 64, 4},   {4096, 4096, 128, 4},
                                   {11008, 4096, 16, 4}, {11008, 4096, 128, 4}, {4096, 4096, 16, 16}};
    if (quick) seeds = std::min(seeds, 2);

    pissa::RandomizedSvdOptions bf16;
    bf16.products = pissa::ProductPrecision::bfloat16;
    const bool active = pissa::uses_bf16_products<Eigen::bfloat16>(bf16);
    std::printf("# bfloat16 products: %s; %d seeds per shape\n",
                !active                                  ? "not available on this CPU (both columns are float32)"
                : pissa::detail::cpu_supports_amx_bf16() ? "AMX (tdpbf16ps)"
                                                         : "AVX512_BF16 (vdpbf16ps)",
                seeds);
    double worst = 0;
    if (dtype != "float32") worst = std::max(worst, study<Eigen::bfloat16>(shapes, seeds, "bfloat16"));
    if (dtype == "both") std::printf("\n");
    if (dtype != "bfloat16") worst = std::max(worst, study<float>(shapes, seeds, "float32"));
    std::printf("# largest relative change of the error: %.1e (bound 1e-3: %s)\n", worst,
                worst < 1e-3 ? "met" : "NOT MET");
    return worst < 1e-3 ? 0 : 1;
}

// quant_error_table: the PiSSA paper's quantisation-error comparison (QLoRA vs LoftQ vs QPiSSA,
// NF4, blocks of 64) on synthetic LLM-like weights, printed as a Markdown table.
//
//   quant_error_table [--sizes 1024x1024,2752x1024] [--ranks 16,64,128] [--iters 1,5]
//                     [--seed 1] [--no-nuclear] [--svd auto|full|krylov|niterK]
//
// --svd picks the SVD of every PiSSA / LoftQ split: the exact one with pissa's automatic choice
// (default), Eigen's full BDCSVD, block Krylov, or the randomized `pissa_niter_K` (e.g. niter8).
//
// Without arguments it runs a small smoke configuration (256 x 256, rank 16, T = 1 and 2).
// Error = ||W - deq(Q) - s B A|| (Frobenius and nuclear), reduction = 1 - error / QLoRA error.
// Exits 1 when a row breaks the paper's ordering of the Frobenius errors, QPiSSA < LoftQ < QLoRA.
// The synthetic weights are NOT real LLM weights: a Gaussian bulk (std 0.02), six strong
// directions (sigma_i = 3 * bulk edge / i), two outlier input channels (x6) and a few large entries.
#include <pissa/quant.hpp>

#include <pissa/detail/random.hpp>

#include <Eigen/QR>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace {

using pissa::Index;
using pissa::Matrix;

/// Splits "a,b,c" into its parts.
std::vector<std::string> split(const std::string& text, char sep) {
    std::vector<std::string> parts;
    std::stringstream in(text);
    for (std::string part; std::getline(in, part, sep);)
        if (!part.empty()) parts.push_back(part);
    return parts;
}

/// A seeded matrix of standard normals.
Matrix<double> gaussian(Index rows, Index cols, std::uint64_t seed) {
    pissa::detail::SplitMix64 rng(seed);
    Matrix<double> out(rows, cols);
    for (Index j = 0; j < cols; ++j)
        for (Index i = 0; i < rows; ++i) out(i, j) = rng.normal();
    return out;
}

/// The LLM-like synthetic weight described in the file comment, in float32.
Matrix<float> llm_like(Index m, Index n, std::uint64_t seed) {
    Matrix<double> w = gaussian(m, n, seed) * 0.02;
    const Index k = 6;
    const double edge = 0.02 * (std::sqrt(double(m)) + std::sqrt(double(n)));
    const Eigen::HouseholderQR<Matrix<double>> qu(gaussian(m, k, seed + 100));
    const Eigen::HouseholderQR<Matrix<double>> qv(gaussian(n, k, seed + 101));
    const Matrix<double> U = qu.householderQ() * Matrix<double>::Identity(m, k);
    const Matrix<double> V = qv.householderQ() * Matrix<double>::Identity(n, k);
    for (Index i = 0; i < k; ++i) w += (3.0 * edge / double(i + 1)) * U.col(i) * V.col(i).transpose();
    w.col(n / 3) *= 6.0;
    w.col((2 * n) / 3) *= 6.0;
    pissa::detail::SplitMix64 rng(seed + 7);
    for (int e = 0; e < 5 + int(m * n / 200000); ++e) {
        const Index i = Index(rng.uniform() * double(m)) % m;
        const Index j = Index(rng.uniform() * double(n)) % n;
        w(i, j) = (e % 2 ? 1.0 : -1.0) * 0.4;
    }
    return w.cast<float>();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
    std::string sizes = "256x256", ranks = "16", iters = "1,2";
    std::uint64_t seed = 1;
    bool nuclear = true;
    std::string svd = "auto";
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "quant_error_table: %s needs a value\n", arg.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (arg == "--sizes") sizes = value();
        else if (arg == "--ranks") ranks = value();
        else if (arg == "--iters") iters = value();
        else if (arg == "--seed") seed = std::stoull(value());
        else if (arg == "--no-nuclear") nuclear = false;
        else if (arg == "--svd") svd = value();
        else {
            std::fprintf(stderr,
                         "usage: quant_error_table [--sizes MxN,...] [--ranks r,...] [--iters T,...] "
                         "[--seed S] [--no-nuclear] [--svd auto|full|krylov|niterK]\n");
            return 2;
        }
    }

    std::printf("SVD: %s, NF4 blocks of 64, seed %llu\n\n", svd.c_str(), static_cast<unsigned long long>(seed));
    std::printf(
        "| shape | rank | T | QLoRA F | LoftQ F (red.) | QPiSSA F (red.) | QLoRA nuc | LoftQ nuc (red.) | "
        "QPiSSA nuc (red.) |\n|---|---|---|---|---|---|---|---|---|\n");
    std::fflush(stdout);
    bool ordered = true;
    for (const std::string& size : split(sizes, ',')) {
        const auto dims = split(size, 'x');
        if (dims.size() != 2) {
            std::fprintf(stderr, "quant_error_table: bad size '%s' (want MxN)\n", size.c_str());
            return 2;
        }
        const Index m = std::stol(dims[0]), n = std::stol(dims[1]);
        auto start = std::chrono::steady_clock::now();
        const Matrix<float> w = llm_like(m, n, seed);
        const auto qlora = pissa::qlora_init(w);
        const Matrix<float> qlora_error = pissa::quantization_error_matrix(w, qlora);
        const double qlora_f = qlora_error.cast<double>().norm();
        const double qlora_n = nuclear ? pissa::nuclear_norm(qlora_error) : -1.0;
        std::fprintf(stderr, "%s: QLoRA measured in %.1f s\n", size.c_str(), seconds_since(start));
        for (const std::string& rank_text : split(ranks, ',')) {
            for (const std::string& iter_text : split(iters, ',')) {
                start = std::chrono::steady_clock::now();
                pissa::QuantInitConfig config;
                config.pissa.rank = std::stol(rank_text);
                config.pissa.lora_alpha = double(config.pissa.rank);
                config.iterations = std::stoi(iter_text);
                if (svd == "full") config.pissa.exact.algorithm = pissa::ExactSvdAlgorithm::full;
                else if (svd == "krylov") config.pissa.exact.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
                else if (svd.rfind("niter", 0) == 0) {
                    config.pissa.method = pissa::SvdMethod::randomized;
                    config.pissa.randomized.niter = std::stoi(svd.substr(5));
                } else if (svd != "auto") {
                    std::fprintf(stderr, "quant_error_table: bad --svd '%s'\n", svd.c_str());
                    return 2;
                }
                const auto loftq = pissa::loftq_init(w, config);
                const auto qpissa = pissa::qpissa_init(w, config);
                const Matrix<float> loftq_error = pissa::quantization_error_matrix(w, loftq);
                const Matrix<float> qpissa_error = pissa::quantization_error_matrix(w, qpissa);
                const double loftq_f = loftq_error.cast<double>().norm();
                const double qpissa_f = qpissa_error.cast<double>().norm();
                if (!(qpissa_f < loftq_f && loftq_f < qlora_f)) {
                    std::fprintf(stderr, "quant_error_table: %s rank %s T %s breaks QPiSSA < LoftQ < QLoRA\n",
                                 size.c_str(), rank_text.c_str(), iter_text.c_str());
                    ordered = false;
                }
                std::printf("| %s | %s | %s | %.4g | %.4g (%.1f%%) | %.4g (%.1f%%) |", size.c_str(), rank_text.c_str(),
                            iter_text.c_str(), qlora_f, loftq_f, 100 * pissa::error_reduction(loftq_f, qlora_f),
                            qpissa_f, 100 * pissa::error_reduction(qpissa_f, qlora_f));
                if (nuclear) {
                    const double loftq_n = pissa::nuclear_norm(loftq_error);
                    const double qpissa_n = pissa::nuclear_norm(qpissa_error);
                    std::printf(" %.4g | %.4g (%.1f%%) | %.4g (%.1f%%) |\n", qlora_n, loftq_n,
                                100 * pissa::error_reduction(loftq_n, qlora_n), qpissa_n,
                                100 * pissa::error_reduction(qpissa_n, qlora_n));
                } else {
                    std::printf(" - | - | - |\n");
                }
                std::fflush(stdout);
                std::fprintf(stderr, "%s rank %s T %s: %.1f s\n", size.c_str(), rank_text.c_str(), iter_text.c_str(),
                             seconds_since(start));
            }
        }
    }
    return ordered ? 0 : 1;
}

// Google Benchmark: pissa's exact mode against Spectra's PartialSVDSolver (its C++ peer),
// side by side in one process on the same matrices. Built only when Spectra's headers are found
// (Debian: libspectra-dev, installed by scripts/install-deps.sh --peers).
//
//   BM_spectra/<m>/<n>/<r>   Spectra::PartialSVDSolver<MatrixXf>(W, r, ncv = 2r + 1), tol 1e-4
//                            (the reference setting), Lanczos on W^T W with one vector at a time
//   BM_pissa_exact/<m>/<n>/<r>  pissa::truncated_svd, ExactSvdAlgorithm::automatic, float32
//
// Matrices: W = A diag(d) B / sqrt(512) + 0.05 N, A [m, 512], B [512, n], d_i = exp(-i / 40): a
// decaying head over a noise floor like trained weights (the matrices of bench/compare_peers.py,
// drawn here with pissa's generator). Counters, the same a-posteriori accuracy for both:
//   residual = max_i ||W^T u_i - s_i v_i|| / s_1 over the r triplets returned,
//   sigma_vs_pissa = max_i |s_i - s_i(pissa exact)| / s_i.
#include <pissa/svd.hpp>

#include <pissa/detail/random.hpp>

#include <Spectra/contrib/PartialSVDSolver.h>
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <tuple>

namespace {

using pissa::Index;
using pissa::Matrix;

const Matrix<float>& weight(Index m, Index n) {
    static std::map<std::pair<Index, Index>, std::unique_ptr<Matrix<float>>> cache;
    auto& slot = cache[{m, n}];
    if (!slot) {
        constexpr Index k = 512;
        pissa::detail::SplitMix64 rng(std::uint64_t(m) * 31 + std::uint64_t(n));
        auto gaussian = [&](Index rows, Index cols) {
            Matrix<float> g(rows, cols);
            for (Index i = 0; i < g.size(); ++i) g.data()[i] = static_cast<float>(rng.normal());
            return g;
        };
        Eigen::VectorXf d(k);
        for (Index i = 0; i < k; ++i) d(i) = std::exp(-static_cast<float>(i) / 40.0f);
        const Matrix<float> A = gaussian(m, k), B = gaussian(k, n);
        slot = std::make_unique<Matrix<float>>((A * d.asDiagonal()) * B / std::sqrt(float(k)) + 0.05f * gaussian(m, n));
    }
    return *slot;
}

/// max_i ||W^T u_i - s_i v_i|| / s_1.
double residual(const Matrix<float>& W, const Matrix<float>& U, const Eigen::VectorXf& S, const Matrix<float>& V) {
    const Matrix<float> R = W.transpose() * U - V * S.asDiagonal();
    return static_cast<double>(R.colwise().norm().maxCoeff() / S(0));
}

const pissa::SvdResult<float>& pissa_reference(Index m, Index n, Index r) {
    static std::map<std::tuple<Index, Index, Index>, pissa::SvdResult<float>> cache;
    auto it = cache.find({m, n, r});
    if (it == cache.end()) it = cache.emplace(std::make_tuple(m, n, r), pissa::truncated_svd(weight(m, n), r)).first;
    return it->second;
}

double sigma_error(const Eigen::VectorXf& S, const Eigen::VectorXf& reference) {
    const Index k = std::min(S.size(), reference.size());
    return static_cast<double>(
        ((S.head(k) - reference.head(k)).cwiseAbs().array() / reference.head(k).array()).maxCoeff());
}

void BM_spectra(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), r = state.range(2);
    const Matrix<float>& W = weight(m, n);
    Eigen::VectorXf S;
    Matrix<float> U, V;
    Index converged = 0;
    for (auto _ : state) {
        Spectra::PartialSVDSolver<Eigen::MatrixXf> solver(W, r, 2 * r + 1);
        converged = solver.compute(1000, 1e-4f);
        S = solver.singular_values();
        U = solver.matrix_U(r);
        V = solver.matrix_V(r);
        benchmark::DoNotOptimize(S.data());
    }
    state.counters["converged"] = static_cast<double>(converged);
    state.counters["residual"] = residual(W, U, S, V);
    state.counters["sigma_vs_pissa"] = sigma_error(S, pissa_reference(m, n, r).S);
}

void BM_pissa_exact(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), r = state.range(2);
    const Matrix<float>& W = weight(m, n);
    pissa::SvdResult<float> result;
    for (auto _ : state) {
        result = pissa::truncated_svd(W, r);
        benchmark::DoNotOptimize(result.S.data());
    }
    state.counters["cycles"] = result.report.iterations;
    state.counters["residual"] = residual(W, result.U, result.S, result.V);
    state.counters["sigma_vs_pissa"] = sigma_error(result.S, pissa_reference(m, n, r).S);
}

void reference_rows(benchmark::internal::Benchmark* b) {
    b->Args({4096, 4096, 16})
        ->Args({4096, 4096, 64})
        ->Args({4096, 4096, 128})
        ->Args({11008, 4096, 16})
        ->Args({11008, 4096, 128});
    b->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
}
BENCHMARK(BM_pissa_exact)->Apply(reference_rows);
BENCHMARK(BM_spectra)->Apply(reference_rows);

}  // namespace

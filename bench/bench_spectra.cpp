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
//
// Matrices from files (bench/compare_peers.py), the spec bench_svd's BM_file_* read:
//   PISSA_PEER_INPUT="name:path:m:n:r[:niter[:dtype]];..." registers BM_spectra_file/<name> on the raw
//   row-major [m, n] file (dtype f32, the default, or bf16: bfloat16 bits widened to float32 before
//   the timing). PISSA_SPECTRA_TOL sets the solver's tolerance (default 1e-4, the setting above);
//   ncv = 2r + 1 as above. PISSA_PEER_OUT=dir makes each write <dir>/<name>_spectra.txt with the
//   singular values, ||W - U S V^T||_F (double), the residual and the convergence count.
#include <pissa/svd.hpp>

#include <pissa/detail/random.hpp>

#include <Spectra/contrib/PartialSVDSolver.h>
#include <benchmark/benchmark.h>

#include "peer_input.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

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

// ---- matrices from files (bench/compare_peers.py) ------------------------------------------------

using pissa_bench::FileCase;

/// The file's [m, n] row-major matrix as a column-major float32 Matrix (Spectra's reference setting).
const Matrix<float>& file_weight(const FileCase& c) {
    static std::map<std::string, std::unique_ptr<Matrix<float>>> cache;
    auto& slot = cache[c.path];
    if (!slot) {
        const std::size_t count = static_cast<std::size_t>(c.m * c.n), bytes = c.bf16 ? 2 : 4;
        std::vector<char> raw(count * bytes);
        std::ifstream in(c.path, std::ios::binary);
        in.read(raw.data(), std::streamsize(raw.size()));
        if (!in) {
            std::fprintf(stderr, "bench_spectra: cannot read %lld x %lld %s from %s\n", (long long)c.m, (long long)c.n,
                         c.bf16 ? "bfloat16" : "float32", c.path.c_str());
            std::exit(2);
        }
        pissa::RowMatrix<float> rows(c.m, c.n);
        if (c.bf16) {
            for (std::size_t i = 0; i < count; ++i) {
                std::uint16_t half;
                std::memcpy(&half, raw.data() + 2 * i, 2);
                const std::uint32_t bits = std::uint32_t(half) << 16;
                std::memcpy(rows.data() + i, &bits, 4);
            }
        } else {
            std::memcpy(rows.data(), raw.data(), raw.size());
        }
        slot = std::make_unique<Matrix<float>>(rows);
    }
    return *slot;
}

void write_spectra_result(const FileCase& c, const Matrix<float>& W, const Eigen::VectorXf& S, const Matrix<float>& U,
                          const Matrix<float>& V, Index converged, float tolerance) {
    const char* dir = std::getenv("PISSA_PEER_OUT");
    if (dir == nullptr) return;
    const Matrix<double> approx = U.cast<double>() * S.cast<double>().asDiagonal() * V.cast<double>().transpose();
    const double error = (W.cast<double>() - approx).norm();
    std::ofstream out(std::string(dir) + "/" + c.name + "_spectra.txt");
    out.precision(17);
    out << "frob_error " << error << "\nconverged " << converged << "\ntolerance " << tolerance << "\nncv "
        << 2 * c.r + 1 << "\nresidual " << residual(W, U, S, V) << "\nsingular_values";
    for (Index i = 0; i < S.size(); ++i) out << ' ' << S(i);
    out << '\n';
}

void spectra_file_benchmark(benchmark::State& state, const FileCase& c) {
    const Matrix<float>& W = file_weight(c);
    const char* tol = std::getenv("PISSA_SPECTRA_TOL");
    const float tolerance = tol != nullptr ? static_cast<float>(std::atof(tol)) : 1e-4f;
    Eigen::VectorXf S;
    Matrix<float> U, V;
    Index converged = 0;
    for (auto _ : state) {
        Spectra::PartialSVDSolver<Eigen::MatrixXf> solver(W, c.r, 2 * c.r + 1);
        converged = solver.compute(1000, tolerance);
        S = solver.singular_values();
        U = solver.matrix_U(c.r);
        V = solver.matrix_V(c.r);
        benchmark::DoNotOptimize(S.data());
    }
    state.counters["converged"] = static_cast<double>(converged);
    write_spectra_result(c, W, S, U, V, converged, tolerance);
}

const bool file_cases_registered = [] {
    for (const FileCase& c : pissa_bench::peer_input_cases("bench_spectra")) {
        benchmark::RegisterBenchmark(("BM_spectra_file/" + c.name).c_str(),
                                     [c](benchmark::State& s) { spectra_file_benchmark(s, c); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
    }
    return true;
}();

}  // namespace

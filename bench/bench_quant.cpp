// Google Benchmark: NF4 quantise / dequantise throughput, QPiSSA and LoftQ initialisation, and the
// singular-value-only nuclear norm, on square and tall shapes. The error table itself (reduction
// ratios) is printed by examples/quant_error_table.
// GCC 12 with the bench targets' -march=native (AVX-512) reports -Wmaybe-uninitialized inside its
// own avx512fintrin.h when Eigen's packet code is inlined (a known false positive); it must not
// fail the -Werror build. Declared before any include so it covers the inlined intrinsics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <pissa/quant.hpp>

#include <pissa/detail/random.hpp>

#include <benchmark/benchmark.h>

namespace {

using pissa::Index;
using pissa::Matrix;

Matrix<float> gaussian(Index rows, Index cols, std::uint64_t seed) {
    pissa::detail::SplitMix64 rng(seed);
    Matrix<float> out(rows, cols);
    for (Index j = 0; j < cols; ++j)
        for (Index i = 0; i < rows; ++i) out(i, j) = static_cast<float>(rng.normal() * 0.02);
    return out;
}

void set_bytes(benchmark::State& state, Index m, Index n) {
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * m * n * 4);
}

void BM_quantize_nf4(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const Matrix<float> w = gaussian(m, n, 1);
    for (auto _ : state) benchmark::DoNotOptimize(pissa::quantize_nf4(w));
    set_bytes(state, m, n);
}

void BM_dequantize_nf4(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const pissa::Nf4Tensor q = pissa::quantize_nf4(gaussian(m, n, 2));
    for (auto _ : state) benchmark::DoNotOptimize(pissa::dequantize_nf4<float>(q));
    set_bytes(state, m, n);
}

void BM_qpissa_init(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const Matrix<float> w = gaussian(m, n, 3);
    pissa::QuantInitConfig config;
    config.pissa.rank = state.range(2);
    config.iterations = static_cast<int>(state.range(3));
    for (auto _ : state) benchmark::DoNotOptimize(pissa::qpissa_init(w, config));
}

void BM_loftq_init(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const Matrix<float> w = gaussian(m, n, 4);
    pissa::QuantInitConfig config;
    config.pissa.rank = state.range(2);
    config.iterations = static_cast<int>(state.range(3));
    for (auto _ : state) benchmark::DoNotOptimize(pissa::loftq_init(w, config));
}

void BM_nuclear_norm(benchmark::State& state) {
    const Matrix<float> w = gaussian(state.range(0), state.range(1), 5);
    for (auto _ : state) benchmark::DoNotOptimize(pissa::nuclear_norm(w));
}

}  // namespace

BENCHMARK(BM_quantize_nf4)->ArgNames({"m", "n"})->Args({1024, 1024})->Args({4096, 4096})->Args({11008, 4096});
BENCHMARK(BM_dequantize_nf4)->ArgNames({"m", "n"})->Args({1024, 1024})->Args({4096, 4096})->Args({11008, 4096});
BENCHMARK(BM_qpissa_init)
    ->ArgNames({"m", "n", "r", "T"})
    ->Args({1024, 1024, 16, 1})
    ->Args({1024, 1024, 128, 1})
    ->Args({2752, 1024, 64, 5})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_loftq_init)
    ->ArgNames({"m", "n", "r", "T"})
    ->Args({1024, 1024, 16, 1})
    ->Args({1024, 1024, 128, 1})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_nuclear_norm)->ArgNames({"m", "n"})->Args({1024, 1024})->Args({2752, 1024})->Unit(benchmark::kMillisecond);

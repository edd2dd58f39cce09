// Google Benchmark: the decompositions behind PiSSA initialisation, against the machine's roofline.
//
//   BM_bandwidth/<MiB>               read bandwidth probe (all threads, 8 accumulators each)
//   BM_fma_peak                      float32 FMA throughput probe (all threads, 12 FMA chains each)
//   BM_multiply, BM_multiply_t       one skinny product W X / W^T Y (float32 / bfloat16 storage)
//   BM_multiply_bf16<T>              the bfloat16 products of a bfloat16 W (AMX / AVX512_BF16)
//   BM_multiply_gram                 W^T (W Q) in one pass over W, beside the two products
//   BM_randomized/<m>/<n>/<r>/<niter>/<weight>   randomized_svd (peft pissa_niter_K), the reference
//                                    rows; weight 0: float32 with the default products, 1: bfloat16
//                                    with float32 products, 2: bfloat16 with the default products,
//                                    3: float32 with float32 products
//   BM_randomized_reused/...         the same through one RandomizedSvd object (buffers kept)
//   BM_randomized_fused/...          the same with fused_power_iteration (RandomizedSvd object)
//   BM_randomized_vs_machine/<m>/<n>/<r>/<niter>/<fused>   reused object, float32 products, against the
//                                    limits probed around each run (x_machine_roofline)
//   BM_exact_krylov/<m>/<n>/<r>      exact top-r by block Krylov (float32 accuracy test)
//   BM_exact_full/<m>/<n>/<r>        exact top-r by a full BDCSVD (smaller size)
//   BM_pissa_init/<m>/<n>/<r>        pissa::init, bfloat16 row-major W, randomized niter 4
//   BM_lora_forward/<batch>/<n>/<r>  lora_forward through a float32 W
//   BM_file_*                        only with PISSA_PEER_INPUT (bench/compare_peers.py): matrices
//                                    from raw float32 or bfloat16 files, with accuracy files
//
// Counters: bytes_per_second (bytes of W read by all passes), roofline_ms = max(passes * bytes /
// bandwidth, passes * 2 m n q / peak), roofline_frac = roofline_ms / measured. The roofline
// defaults are the figures measured on the 2-core AVX-512 machine (32.6 GB/s, 388 GFLOP/s);
// override with PISSA_ROOFLINE_GBS and PISSA_ROOFLINE_GFLOPS, e.g. with this machine's own
// BM_bandwidth/1024 and BM_fma_peak readings.
#include <pissa/init.hpp>
#include <pissa/rsvd.hpp>
#include <pissa/svd.hpp>

#include <pissa/detail/cholesky_qr.hpp>
#include <pissa/detail/cpu_features.hpp>
#include <pissa/detail/random.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/tall_qr.hpp>

#if __has_include(<pissa/lora.hpp>)
#include <pissa/lora.hpp>
#define PISSA_BENCH_LORA 1
#endif

#include <benchmark/benchmark.h>

#include "peer_input.hpp"

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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
using pissa::RowMatrix;

double env_or(const char* name, double fallback) {
    const char* v = std::getenv(name);
    return v != nullptr ? std::atof(v) : fallback;
}

const double kBandwidth = env_or("PISSA_ROOFLINE_GBS", 32.6) * 1e9;  // bytes/s from memory
const double kPeak = env_or("PISSA_ROOFLINE_GFLOPS", 388.0) * 1e9;   // float32 FMA flop/s

/// A seeded [m, n] row-major float32 matrix of N(0, 0.02^2), generated once per shape.
const RowMatrix<float>& weight(Index m, Index n) {
    static std::map<std::pair<Index, Index>, std::unique_ptr<RowMatrix<float>>> cache;
    auto& slot = cache[{m, n}];
    if (!slot) {
        slot = std::make_unique<RowMatrix<float>>(m, n);
        pissa::detail::SplitMix64 rng(std::uint64_t(m) * 7919 + std::uint64_t(n));
        for (Index i = 0; i < slot->size(); ++i) slot->data()[i] = static_cast<float>(0.02 * rng.normal());
    }
    return *slot;
}

const RowMatrix<Eigen::bfloat16>& weight_bf16(Index m, Index n) {
    static std::map<std::pair<Index, Index>, std::unique_ptr<RowMatrix<Eigen::bfloat16>>> cache;
    auto& slot = cache[{m, n}];
    if (!slot) slot = std::make_unique<RowMatrix<Eigen::bfloat16>>(weight(m, n).cast<Eigen::bfloat16>());
    return *slot;
}

/// Sets bytes/s and the roofline counters for `passes` passes over W [m, n] with q columns, each
/// `products_per_pass` skinny products (2 m n q flops each).
void set_roofline(benchmark::State& state, Index m, Index n, Index q, double passes, double element_bytes,
                  double products_per_pass = 1) {
    const double bytes = passes * double(m) * double(n) * element_bytes;
    const double flops = passes * products_per_pass * 2.0 * double(m) * double(n) * double(q);
    const double roofline_s = std::max(bytes / kBandwidth, flops / kPeak);
    state.SetBytesProcessed(static_cast<std::int64_t>(bytes * double(state.iterations())));
    state.counters["roofline_ms"] = roofline_s * 1e3;
    // Measured seconds per iteration are only known to the reporter: roofline_s / (t/iter) as a rate.
    state.counters["roofline_frac"] =
        benchmark::Counter(roofline_s * double(state.iterations()), benchmark::Counter::kIsRate);
    state.counters["GFLOPs"] =
        benchmark::Counter(flops * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
    state.SetLabel(pissa::detail::kernel_isa_name(pissa::detail::active_kernel_isa()));
}

// ---- bandwidth probe ----------------------------------------------------------------------------

/// Sum of buffer[0, count) with 8 independent accumulators (a single running sum is a chain of
/// dependent adds: latency-bound at a fraction of the memory bandwidth).
float probe_sum(const float* buffer, Index count) {
#ifdef __AVX512F__
    __m512 a[8];
    for (auto& v : a) v = _mm512_setzero_ps();
    Index i = 0;
    for (; i + 128 <= count; i += 128)
        for (int k = 0; k < 8; ++k) a[k] = _mm512_add_ps(a[k], _mm512_loadu_ps(buffer + i + 16 * k));
    // (_mm512_reduce_add_ps trips GCC 12's -Wuninitialized through _mm256_undefined_pd.)
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                                         _mm512_add_ps(_mm512_add_ps(a[4], a[5]), _mm512_add_ps(a[6], a[7]))));
    float sum = 0;
    for (const float v : lanes) sum += v;
#else
    float a[32] = {};
    Index i = 0;
    for (; i + 32 <= count; i += 32)
        for (int k = 0; k < 32; ++k) a[k] += buffer[i + k];
    float sum = 0;
    for (const float v : a) sum += v;
#endif
    for (; i < count; ++i) sum += buffer[i];
    return sum;
}

/// probe_sum over all threads, each reading its own contiguous half (third, ...) of the buffer.
float parallel_probe_sum(const float* buffer, Index count) {
    float sum = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(+ : sum)
    {
        const Index threads = omp_get_num_threads(), t = omp_get_thread_num();
        const Index begin = count * t / threads / 128 * 128;
        const Index end = t + 1 == threads ? count : count * (t + 1) / threads / 128 * 128;
        sum += probe_sum(buffer + begin, end - begin);
    }
#else
    sum = probe_sum(buffer, count);
#endif
    return sum;
}

void BM_bandwidth(benchmark::State& state) {
    const Index count = state.range(0) * (Index(1) << 20) / Index(sizeof(float));
    std::vector<float> buffer(static_cast<std::size_t>(count), 1.0f);
    double total = 0;
    for (auto _ : state) {
        total += parallel_probe_sum(buffer.data(), count);
        benchmark::DoNotOptimize(total);
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * count * Index(sizeof(float)));
}
BENCHMARK(BM_bandwidth)->Arg(16)->Arg(64)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();

/// Runs `steps` steps of 12 independent multiply-add chains over full vectors (12 chains cover the
/// FMA latency times the FMA ports of current x86 cores); returns a value that depends on all of
/// them. Flops: steps * 12 * 2 * lanes.
#ifdef __AVX512F__
constexpr int kPeakLanes = 16;
float fma_chains(Index steps) {
    __m512 a[12];
    for (int c = 0; c < 12; ++c) a[c] = _mm512_set1_ps(float(c));
    const __m512 b = _mm512_set1_ps(0.999999f), d = _mm512_set1_ps(1e-6f);
    for (Index s = 0; s < steps; ++s)
        for (int c = 0; c < 12; ++c) a[c] = _mm512_fmadd_ps(a[c], b, d);
    alignas(64) float lanes[16];
    __m512 sum = a[0];
    for (int c = 1; c < 12; ++c) sum = _mm512_add_ps(sum, a[c]);
    _mm512_store_ps(lanes, sum);
    float total = 0;
    for (const float v : lanes) total += v;
    return total;
}
#else
constexpr int kPeakLanes = 8;  // what the compiler makes of 8-wide arrays: AVX2 FMA with -march=native
float fma_chains(Index steps) {
    float a[12][kPeakLanes];
    for (int c = 0; c < 12; ++c)
        for (float& v : a[c]) v = float(c);
    for (Index s = 0; s < steps; ++s)
        for (auto& chain : a)
            for (float& v : chain) v = v * 0.999999f + 1e-6f;
    float total = 0;
    for (const auto& chain : a)
        for (const float v : chain) total += v;
    return total;
}
#endif

/// fma_chains(steps) on every thread; `flops` gets the flops done.
float parallel_fma_chains(Index steps, double& flops) {
    int threads = 1;
    float sum = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(+ : sum)
    {
#pragma omp single
        threads = omp_get_num_threads();
        sum += fma_chains(steps);
    }
#else
    sum = fma_chains(steps);
#endif
    flops = double(threads) * double(steps) * 12 * 2 * kPeakLanes;
    return sum;
}

/// The float32 compute peak of all threads: the GFLOPs counter is the roofline's peak term.
void BM_fma_peak(benchmark::State& state) {
    double flops = 0;
    for (auto _ : state) benchmark::DoNotOptimize(parallel_fma_chains(Index(1) << 20, flops));
    state.counters["GFLOPs"] =
        benchmark::Counter(flops * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_fma_peak)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- single products ----------------------------------------------------------------------------

template <class Storage>
const RowMatrix<Storage>& typed_weight(Index m, Index n) {
    if constexpr (std::is_same_v<Storage, float>) return weight(m, n);
    else return weight_bf16(m, n);
}

/// Times `Y = W X` (or, Transposed, `Z = W^T Y`) over `view` with a random q-column operand and
/// sets the counters.
template <class Storage, bool Transposed>
void time_product(benchmark::State& state, const pissa::detail::RowMajorView<Storage>& view, Index q) {
    const Matrix<float> X = Matrix<float>::Random(Transposed ? view.rows : view.cols, q);
    Matrix<float> Y;
    for (auto _ : state) {
        if constexpr (Transposed) pissa::detail::multiply_transposed(view, X, Y);
        else pissa::detail::multiply(view, X, Y);
        benchmark::DoNotOptimize(Y.data());
    }
    set_roofline(state, view.rows, view.cols, q, 1, sizeof(Storage));
}

template <class Storage>
void BM_multiply(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const auto& W = typed_weight<Storage>(m, n);
    time_product<Storage, false>(state, {W.data(), m, n, n}, state.range(2));
}

template <class Storage>
void BM_multiply_t(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const auto& W = typed_weight<Storage>(m, n);
    time_product<Storage, true>(state, {W.data(), m, n, n}, state.range(2));
}

/// The bfloat16 products of a bfloat16 W (the skinny operand rounded to bfloat16, float32 sums;
/// AMX where present, else AVX512_BF16, else float32): `Y = W X`, or Transposed `Z = W^T Y`.
template <bool Transposed>
void BM_multiply_bf16(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), q = state.range(2);
    const auto& W = weight_bf16(m, n);
    const pissa::detail::RowMajorView<Eigen::bfloat16> view{W.data(), m, n, n};
    const Matrix<float> X = Matrix<float>::Random(Transposed ? m : n, q);
    Matrix<float> Y;
    pissa::detail::KernelWorkspace workspace;
    for (auto _ : state) {
        if constexpr (Transposed) pissa::detail::multiply_transposed_bf16(view, X, Y, workspace);
        else pissa::detail::multiply_bf16(view, X, Y, workspace);
        benchmark::DoNotOptimize(Y.data());
    }
    set_roofline(state, m, n, q, 1, 2.0);
    state.SetLabel(pissa::detail::cpu_supports_amx_bf16()        ? "amx"
                   : pissa::detail::cpu_supports_bf16_products() ? "avx512_bf16"
                                                                 : "float32");
}

/// Both products with W placed `offset` bytes past a 64-byte boundary, as a 16-byte aligned
/// allocation leaves it (what a consumer built without AVX-512 flags gets from Eigen, and glibc's
/// malloc for large blocks).
template <class Storage, bool Transposed>
void BM_product_offset(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), offset = state.range(3);
    const auto& W = typed_weight<Storage>(m, n);
    std::vector<Storage> buffer(static_cast<std::size_t>(m * n) + 64);
    const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
    Storage* start = buffer.data() + ((64 - address % 64) % 64 + offset) / sizeof(Storage);
    std::copy(W.data(), W.data() + m * n, start);
    time_product<Storage, Transposed>(state, {start, m, n, n}, state.range(2));
}

void product_args(benchmark::internal::Benchmark* b) {
    for (const Index q : {16, 64, 128}) b->Args({4096, 4096, q});
    b->Args({11008, 4096, 16});
    b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK_TEMPLATE(BM_multiply, float)->Apply(product_args);
BENCHMARK_TEMPLATE(BM_multiply_t, float)->Apply(product_args);
BENCHMARK_TEMPLATE(BM_multiply, Eigen::bfloat16)->Args({4096, 4096, 16})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_multiply_t, Eigen::bfloat16)
    ->Args({4096, 4096, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_multiply_bf16, false)->Apply(product_args);
BENCHMARK_TEMPLATE(BM_multiply_bf16, true)->Apply(product_args);
void offset_args(benchmark::internal::Benchmark* b) {
    b->Args({4096, 4096, 16, 0})->Args({4096, 4096, 16, 16})->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK_TEMPLATE(BM_product_offset, float, false)->Apply(offset_args);
BENCHMARK_TEMPLATE(BM_product_offset, Eigen::bfloat16, false)->Apply(offset_args);
BENCHMARK_TEMPLATE(BM_product_offset, float, true)->Apply(offset_args);
BENCHMARK_TEMPLATE(BM_product_offset, Eigen::bfloat16, true)->Apply(offset_args);

/// `Z = W^T (W Q)` by multiply_gram (one pass over W for q <= 32 on the AVX-512 kernels; two
/// products beyond) next to the same two products, timed alternately in one benchmark (the
/// counters are the one-pass product's; `two_products_ms` and `ratio` compare).
template <class Storage>
void BM_multiply_gram(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), q = state.range(2);
    const auto& W = typed_weight<Storage>(m, n);
    const pissa::detail::RowMajorView<Storage> view{W.data(), m, n, n};
    const Matrix<float> Q = Matrix<float>::Random(n, q);
    Matrix<float> Y, Z, Y2, Z2;
    pissa::detail::KernelWorkspace workspace;
    std::vector<double> gram_s, two_s;
    for (auto _ : state) {
        auto t0 = std::chrono::steady_clock::now();
        pissa::detail::multiply_gram(view, Q, Z, Y, workspace);
        benchmark::DoNotOptimize(Z.data());
        auto t1 = std::chrono::steady_clock::now();
        state.PauseTiming();
        pissa::detail::multiply(view, Q, Y2, workspace);
        pissa::detail::multiply_transposed(view, Y2, Z2, workspace);
        benchmark::DoNotOptimize(Z2.data());
        const auto t2 = std::chrono::steady_clock::now();
        state.ResumeTiming();
        gram_s.push_back(std::chrono::duration<double>(t1 - t0).count());
        two_s.push_back(std::chrono::duration<double>(t2 - t1).count());
    }
    std::sort(gram_s.begin(), gram_s.end());
    std::sort(two_s.begin(), two_s.end());
    state.counters["two_products_ms"] = two_s[two_s.size() / 2] * 1e3;
    state.counters["ratio"] = gram_s[gram_s.size() / 2] / two_s[two_s.size() / 2];
    set_roofline(state, m, n, q, 1, sizeof(Storage), 2);
}
void gram_args(benchmark::internal::Benchmark* b) {
    for (const Index q : {8, 16, 24, 32, 64}) b->Args({4096, 4096, q});
    b->Args({11008, 4096, 16});
    b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK_TEMPLATE(BM_multiply_gram, float)->Apply(gram_args);
BENCHMARK_TEMPLATE(BM_multiply_gram, Eigen::bfloat16)
    ->Args({4096, 4096, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---- randomized SVD (peft pissa_niter_K) --------------------------------------------------------

/// `Reused`: one RandomizedSvd object across the iterations (buffers kept, the steady state of a
/// model's many matrices); otherwise a fresh randomized_svd call each time (cold buffers: fresh
/// pages, a page fault per 4 KiB).
template <bool Fused, bool Reused>
void BM_randomized_impl(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), r = state.range(2);
    const int niter = static_cast<int>(state.range(3));
    const bool bf16 = state.range(4) == 1 || state.range(4) == 2;
    pissa::RandomizedSvdOptions options;
    options.niter = niter;
    options.fused_power_iteration = Fused;
    if (state.range(4) == 1 || state.range(4) == 3) options.products = pissa::ProductPrecision::float32;
    const bool bf16_products =
        bf16 ? pissa::uses_bf16_products<Eigen::bfloat16>(options) : pissa::uses_bf16_products<float>(options);
    state.SetLabel(bf16_products ? "bf16 products" : "float32 products");
    pissa::RandomizedSvd<float> reused(options);
    if (bf16) weight_bf16(m, n);  // generated once per shape, outside the timed loop
    else weight(m, n);
    for (auto _ : state) {
        if constexpr (Reused) {
            if (bf16) benchmark::DoNotOptimize(reused.compute(weight_bf16(m, n), r).singular_values().data());
            else benchmark::DoNotOptimize(reused.compute(weight(m, n), r).singular_values().data());
        } else {
            if (bf16) benchmark::DoNotOptimize(pissa::randomized_svd(weight_bf16(m, n), r, options));
            else benchmark::DoNotOptimize(pissa::randomized_svd(weight(m, n), r, options));
        }
    }
    set_roofline(state, m, n, r, 2.0 * niter + 2, bf16 ? 2.0 : 4.0);
}
void BM_randomized(benchmark::State& state) { BM_randomized_impl<false, false>(state); }
void BM_randomized_reused(benchmark::State& state) { BM_randomized_impl<false, true>(state); }
void BM_randomized_fused(benchmark::State& state) { BM_randomized_impl<true, true>(state); }

/// This machine's limits in the seconds around a measurement: the FMA peak (parallel_fma_chains,
/// about 1 ms) and the read bandwidth over 512 MiB (beyond the 300 MiB L3 of the Intel Xeon; it also
/// evicts W from the caches, so every run starts cold). A shared VM's limits move by 2x within
/// minutes (BM_fma_peak read 157 to 328 GFLOP/s within an hour), more than any change to the
/// code; a ratio to the limits measured at the same moment is what stays comparable.
struct MachineNow {
    double flops_per_s = 0, bytes_per_s = 0;
};
MachineNow probe_machine() {
    static const std::vector<float> buffer(std::size_t(512) << 18, 1.0f);
    using Clock = std::chrono::steady_clock;
    double flops = 0;
    const auto t0 = Clock::now();
    float sink = parallel_fma_chains(Index(1) << 18, flops);
    const auto t1 = Clock::now();
    sink += parallel_probe_sum(buffer.data(), Index(buffer.size()));
    const auto t2 = Clock::now();
    benchmark::DoNotOptimize(sink);
    return {flops / std::chrono::duration<double>(t1 - t0).count(),
            double(buffer.size() * sizeof(float)) / std::chrono::duration<double>(t2 - t1).count()};
}

/// BM_randomized_reused / BM_randomized_fused (args {m, n, r, niter, fused}, float32 W and float32
/// products: the FMA units' roofline) against the roofline of the limits probed just before and
/// just after each run (their mean): the counter
/// `x_machine_roofline` is time / that roofline (median over runs: the aggregate rows), the
/// figure a "within 1.5x of the roofline" target is about, on whatever machine this runs. Only the
/// decomposition is timed (manual time); the probes run between the runs.
void BM_randomized_vs_machine(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), r = state.range(2);
    pissa::RandomizedSvdOptions options;
    options.niter = static_cast<int>(state.range(3));
    options.fused_power_iteration = state.range(4) != 0;
    options.products = pissa::ProductPrecision::float32;
    pissa::RandomizedSvd<float> svd(options);
    const double passes = 2.0 * options.niter + 2;
    const double bytes = passes * double(m) * double(n) * 4.0;
    const double flops = passes * 2.0 * double(m) * double(n) * double(r);
    double ratio_sum = 0, peak_sum = 0, bandwidth_sum = 0;
    const RowMatrix<float>& W = weight(m, n);  // generated once per shape, before the first probe
    MachineNow before = probe_machine();
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        benchmark::DoNotOptimize(svd.compute(W, r).singular_values().data());
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        state.SetIterationTime(seconds);
        const MachineNow after = probe_machine();
        const double peak = 0.5 * (before.flops_per_s + after.flops_per_s);
        const double bandwidth = 0.5 * (before.bytes_per_s + after.bytes_per_s);
        ratio_sum += seconds / std::max(bytes / bandwidth, flops / peak);
        peak_sum += peak / 1e9;
        bandwidth_sum += bandwidth / 1e9;
        before = after;
    }
    state.counters["x_machine_roofline"] = benchmark::Counter(ratio_sum, benchmark::Counter::kAvgIterations);
    state.counters["peak_GFLOPs_now"] = benchmark::Counter(peak_sum, benchmark::Counter::kAvgIterations);
    state.counters["GBs_now"] = benchmark::Counter(bandwidth_sum, benchmark::Counter::kAvgIterations);
    set_roofline(state, m, n, r, passes, 4.0);
}

/// The randomized SVD's Gaussian test matrix `[rows, q]`, float: the AVX-512 draws where the
/// kernels run, the C library's log and cos with PISSA_KERNELS=portable.
void BM_gaussian(benchmark::State& state) {
    const Index rows = state.range(0), q = state.range(1);
    pissa::Matrix<float> G;
    for (auto _ : state) {
        pissa::detail::fill_gaussian(G, rows, q, 0);
        benchmark::DoNotOptimize(G.data());
    }
    state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * rows * q);
    state.SetLabel(pissa::detail::kernel_isa_name(pissa::detail::active_kernel_isa()));
}
BENCHMARK(BM_gaussian)
    ->Args({4096, 16})
    ->Args({4096, 128})
    ->Args({11008, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

/// Orthonormalising a `[k, q]` block between the passes: Householder QR (TallQr, the standard
/// path) or CholeskyQR2 (the fused path; Householder only where it falls back). Includes copying
/// the block in (k q floats).
template <bool Cholesky>
void BM_orthonormalize(benchmark::State& state) {
    const Index k = state.range(0), q = state.range(1);
    const Matrix<float> X = weight(k, q).cast<float>();
    pissa::detail::TallQr<float> householder;
    pissa::detail::CholeskyQr2<float> cholesky;
    Matrix<float> Q;
    for (auto _ : state) {
        Q = X;
        if constexpr (Cholesky) cholesky.orthonormalize(Q, householder);
        else householder.orthonormalize(Q);
        benchmark::DoNotOptimize(Q.data());
    }
    if constexpr (Cholesky) state.counters["fallback"] = cholesky.used_fallback() ? 1 : 0;
}
void orthonormalize_args(benchmark::internal::Benchmark* b) {
    b->Args({4096, 16})->Args({4096, 64})->Args({4096, 128})->Args({11008, 128});
    b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK_TEMPLATE(BM_orthonormalize, false)->Apply(orthonormalize_args);
BENCHMARK_TEMPLATE(BM_orthonormalize, true)->Apply(orthonormalize_args);

/// The reference float rows: {m, n, r, niter}.
constexpr std::array<std::array<Index, 4>, 6> kReferenceRows{{{4096, 4096, 16, 4},
                                                              {4096, 4096, 64, 4},
                                                              {4096, 4096, 128, 4},
                                                              {11008, 4096, 16, 4},
                                                              {11008, 4096, 128, 4},
                                                              {4096, 4096, 16, 16}}};

/// The reference table, W in float32 (last argument 0) and in bfloat16 with float32 products (1)
/// and with the default products (2: bfloat16 on a CPU with AMX), and W in float32 with float32
/// products (3): {m, n, r, niter, weight}.
void randomized_args(benchmark::internal::Benchmark* b) {
    for (const Index weight_kind : {0, 1, 2, 3})
        for (const auto& [m, n, r, niter] : kReferenceRows) b->Args({m, n, r, niter, weight_kind});
    b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK(BM_randomized)->Apply(randomized_args);
BENCHMARK(BM_randomized_reused)->Apply(randomized_args);
BENCHMARK(BM_randomized_fused)->Apply(randomized_args);
/// The reference float rows, standard then fused: {m, n, r, niter, fused}.
void vs_machine_args(benchmark::internal::Benchmark* b) {
    for (const Index fused : {0, 1})
        for (const auto& [m, n, r, niter] : kReferenceRows) b->Args({m, n, r, niter, fused});
    b->Unit(benchmark::kMillisecond)->UseManualTime();
}
BENCHMARK(BM_randomized_vs_machine)->Apply(vs_machine_args);

// ---- exact mode ---------------------------------------------------------------------------------

void BM_exact_krylov(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), r = state.range(2);
    pissa::ExactSvdOptions options;
    options.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
    pissa::ConvergenceReport report{};
    for (auto _ : state) {
        auto svd = pissa::truncated_svd(weight(m, n), r, options);
        report = svd.report;
        benchmark::DoNotOptimize(svd);
    }
    state.counters["cycles"] = report.iterations;
    state.counters["residual_bound"] = report.residual_bound;
    state.counters["converged"] = report.converged ? 1 : 0;
    state.SetLabel(pissa::detail::kernel_isa_name(pissa::detail::active_kernel_isa()));
}
BENCHMARK(BM_exact_krylov)
    ->Args({1024, 1024, 16})
    ->Args({4096, 4096, 16})
    ->Args({4096, 4096, 128})
    ->Args({11008, 4096, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_exact_full(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1), r = state.range(2);
    pissa::ExactSvdOptions options;
    options.algorithm = pissa::ExactSvdAlgorithm::full;
    for (auto _ : state) benchmark::DoNotOptimize(pissa::truncated_svd(weight(m, n), r, options));
}
BENCHMARK(BM_exact_full)->Args({1024, 1024, 16})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);

// ---- PiSSA init and the forward pass ------------------------------------------------------------

/// peft's pissa_niter_4 at rank state.range(2), lora_alpha = r.
pissa::PissaConfig randomized_init_config(const benchmark::State& state) {
    pissa::PissaConfig config;
    config.rank = state.range(2);
    config.lora_alpha = double(config.rank);
    config.method = pissa::SvdMethod::randomized;
    return config;
}

void BM_pissa_init(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const pissa::PissaConfig config = randomized_init_config(state);
    const auto& W = weight_bf16(m, n);
    for (auto _ : state) benchmark::DoNotOptimize(pissa::init(W, config));
    set_roofline(state, m, n, config.rank, 2.0 * config.randomized.niter + 2, 2.0);
}
BENCHMARK(BM_pissa_init)->Args({4096, 4096, 16})->Args({11008, 4096, 16})->Unit(benchmark::kMillisecond)->UseRealTime();

/// What `pissa init` runs per tensor: init_in_place on the stored bf16 matrix (no residual allocation).
void BM_pissa_init_in_place(benchmark::State& state) {
    const Index m = state.range(0), n = state.range(1);
    const pissa::PissaConfig config = randomized_init_config(state);
    RowMatrix<Eigen::bfloat16> W = weight_bf16(m, n);
    for (auto _ : state) {
        state.PauseTiming();
        W = weight_bf16(m, n);
        state.ResumeTiming();
        benchmark::DoNotOptimize(pissa::init_in_place(W, config));
    }
    set_roofline(state, m, n, config.rank, 2.0 * config.randomized.niter + 2, 2.0);
}
BENCHMARK(BM_pissa_init_in_place)
    ->Args({4096, 4096, 16})
    ->Args({11008, 4096, 16})
    ->Args({4096, 11008, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

#ifdef PISSA_BENCH_LORA
void BM_lora_forward(benchmark::State& state) {
    const Index batch = state.range(0), n = state.range(1), r = state.range(2);
    const auto& W = weight(n, n);
    const Matrix<float> x = Matrix<float>::Random(batch, n);
    const Matrix<float> A = Matrix<float>::Random(r, n), B = Matrix<float>::Random(n, r);
    for (auto _ : state) benchmark::DoNotOptimize(pissa::lora_forward(x, W, A, B, 2.0));
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * n * n * 4);
    state.counters["GFLOPs"] =
        benchmark::Counter(2.0 * double(batch) * double(n) * double(n + 2 * r) * double(state.iterations()) / 1e9,
                           benchmark::Counter::kIsRate);
}
BENCHMARK(BM_lora_forward)->Args({1, 4096, 16})->Args({64, 4096, 16})->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

// ---- matrices from files (bench/compare_peers.py) ------------------------------------------------
//
// PISSA_PEER_INPUT="name:path:m:n:r:niter[:dtype];..." registers BM_file_{randomized,reused,fused,exact}/<name>
// on the raw row-major [m, n] file: dtype f32 (float32, the default) or bf16 (bfloat16 bits, read
// into an Eigen::bfloat16 matrix and decomposed from that storage, as BM_randomized's bfloat16 rows).
// PISSA_PEER_OUT=dir makes each write <dir>/<name>_<mode>.txt with the singular values and
// ||W - U S V^T||_F (double, against the stored W).

using pissa_bench::FileCase;

template <class Storage>
const RowMatrix<Storage>& file_weight(const FileCase& c) {
    static std::map<std::string, std::unique_ptr<RowMatrix<Storage>>> cache;
    auto& slot = cache[c.path];
    if (!slot) {
        static_assert(sizeof(Storage) == 4 || sizeof(Storage) == 2, "raw float32 or bfloat16 bits");
        slot = std::make_unique<RowMatrix<Storage>>(c.m, c.n);
        std::ifstream in(c.path, std::ios::binary);
        in.read(reinterpret_cast<char*>(slot->data()), std::streamsize(slot->size() * Index(sizeof(Storage))));
        if (!in) {
            std::fprintf(stderr, "bench_svd: cannot read %lld x %lld %s from %s\n", (long long)c.m, (long long)c.n,
                         c.bf16 ? "bfloat16" : "float32", c.path.c_str());
            std::exit(2);
        }
    }
    return *slot;
}

template <class Storage>
void write_result(const FileCase& c, const char* mode, const pissa::SvdResult<float>& svd) {
    const char* dir = std::getenv("PISSA_PEER_OUT");
    if (dir == nullptr) return;
    const RowMatrix<Storage>& W = file_weight<Storage>(c);
    const Matrix<double> approx =
        svd.U.cast<double>() * svd.S.cast<double>().asDiagonal() * svd.V.cast<double>().transpose();
    const double error = (W.template cast<float>().template cast<double>() - approx).norm();
    std::ofstream out(std::string(dir) + "/" + c.name + "_" + mode + ".txt");
    out.precision(17);
    out << "frob_error " << error << "\niterations " << svd.report.iterations << "\nresidual_bound "
        << svd.report.residual_bound << "\nsingular_values";
    for (Index i = 0; i < svd.S.size(); ++i) out << ' ' << svd.S(i);
    out << '\n';
}

/// The modes of BM_file_*: exact (block Krylov), randomized (a fresh randomized_svd call per
/// iteration), reused (one RandomizedSvd object), fused (one object, fused_power_iteration).
enum class FileMode { exact, randomized, reused, fused };
const char* file_mode_name(FileMode mode) {
    switch (mode) {
        case FileMode::exact:
            return "exact";
        case FileMode::randomized:
            return "randomized";
        case FileMode::reused:
            return "reused";
        case FileMode::fused:
            return "fused";
    }
    return "?";
}

/// One BM_file_* run over W stored as `Storage` (float or Eigen::bfloat16), through the same
/// public calls for both storages.
template <class Storage>
void file_benchmark(benchmark::State& state, const FileCase& c, FileMode mode) {
    const RowMatrix<Storage>& W = file_weight<Storage>(c);
    pissa::RandomizedSvdOptions options;
    options.niter = c.niter;
    options.fused_power_iteration = mode == FileMode::fused;
    pissa::RandomizedSvd<float> reused(options);
    pissa::SvdResult<float> last;
    // "reused" is the object's steady state: its buffers are allocated by an untimed first call
    // (compare_peers.py runs one iteration per repetition, each with a fresh object).
    if (mode == FileMode::reused || mode == FileMode::fused) reused.compute(W, c.r);
    for (auto _ : state) {
        if (mode == FileMode::exact) {
            pissa::ExactSvdOptions exact;
            exact.algorithm = pissa::ExactSvdAlgorithm::block_krylov;
            last = pissa::truncated_svd(W, c.r, exact);
            benchmark::DoNotOptimize(last);
        } else if (mode == FileMode::randomized) {
            last = pissa::randomized_svd(W, c.r, options);
            benchmark::DoNotOptimize(last);
        } else {
            benchmark::DoNotOptimize(reused.compute(W, c.r).singular_values().data());
        }
    }
    if (mode == FileMode::reused || mode == FileMode::fused) last = reused.result();
    if (mode != FileMode::exact) set_roofline(state, c.m, c.n, c.r, 2.0 * c.niter + 2, double(sizeof(Storage)));
    write_result<Storage>(c, file_mode_name(mode), last);
}

const bool file_cases_registered = [] {
    for (const FileCase& c : pissa_bench::peer_input_cases("bench_svd")) {
        for (const FileMode mode : {FileMode::randomized, FileMode::reused, FileMode::fused, FileMode::exact})
            benchmark::RegisterBenchmark((std::string("BM_file_") + file_mode_name(mode) + "/" + c.name).c_str(),
                                         [c, mode](benchmark::State& s) {
                                             if (c.bf16) file_benchmark<Eigen::bfloat16>(s, c, mode);
                                             else file_benchmark<float>(s, c, mode);
                                         })
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
    }
    return true;
}();

}  // namespace

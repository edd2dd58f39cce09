// A/B timing of two versions of the kernels in one process (bench/ab/run.sh): calls alternate
// between the old and the new code (and which goes first alternates too), so that both see the
// same phases of a noisy machine; prints medians, the ratio new/old and whether the bits agree.
#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using Dense = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;
void ab_old(int op, const void* w, long m, long n, const Dense& in, Dense& out);
void ab_new(int op, const void* w, long m, long n, const Dense& in, Dense& out);

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s M N Q OFFSET_BYTES REPETITIONS\n", argv[0]);
        return 2;
    }
    const long m = std::atol(argv[1]), n = std::atol(argv[2]), q = std::atol(argv[3]), offset = std::atol(argv[4]);
    const int repetitions = std::atoi(argv[5]);
    if (m <= 0 || n <= 0 || q <= 0 || offset < 0 || offset >= 64 || offset % 4 != 0 || repetitions <= 0) {
        std::fprintf(stderr, "M, N, Q, REPETITIONS must be positive, OFFSET_BYTES a multiple of 4 in [0, 64)\n");
        return 2;
    }
    // W 64-byte aligned plus `offset` bytes; Gaussian-like values of size 0.02.
    std::vector<float> fbuf(static_cast<std::size_t>(m * n) + 32);
    std::vector<Eigen::bfloat16> hbuf(static_cast<std::size_t>(m * n) + 64);
    const auto align = [&](auto* base) {
        const auto address = reinterpret_cast<std::uintptr_t>(base);
        return reinterpret_cast<decltype(base)>(reinterpret_cast<char*>(base) + (64 - address % 64) % 64 + offset);
    };
    float* wf = align(fbuf.data());
    Eigen::bfloat16* wh = align(hbuf.data());
    for (long i = 0; i < m * n; ++i) {
        wf[i] = 0.02f * (float((std::uint64_t(i) * 2654435761u) % 2001) / 1000.f - 1.f);
        wh[i] = Eigen::bfloat16(wf[i]);
    }
    const Dense X = Dense::Random(n, q), Y = Dense::Random(m, q), rank = Dense::Zero(1, q);
    const char* names[] = {"W X   float", "W X   bf16", "W^T Y float", "W^T Y bf16",
                           "rsvd  float", "rsvd  bf16", "fused float", "fused bf16"};
    std::printf("%ld x %ld, q = %ld, W %ld bytes past a 64-byte boundary, median of %d\n", m, n, q, offset,
                repetitions);
    for (int op = 0; op < 8; ++op) {
        const void* w = op % 2 ? static_cast<const void*>(wh) : static_cast<const void*>(wf);
        const Dense& in = op < 2 ? X : op < 4 ? Y : rank;
        Dense a, b;
        std::vector<double> t_old, t_new;
        for (int r = 0; r < repetitions; ++r)
            for (int k = 0; k < 2; ++k) {
                const bool old = (k == 0) == (r % 2 == 0);
                const auto t0 = std::chrono::steady_clock::now();
                if (old) ab_old(op, w, m, n, in, a);
                else ab_new(op, w, m, n, in, b);
                const double ms =
                    std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
                (old ? t_old : t_new).push_back(ms);
            }
        std::sort(t_old.begin(), t_old.end());
        std::sort(t_new.begin(), t_new.end());
        const double o = t_old[t_old.size() / 2], nw = t_new[t_new.size() / 2];
        const bool same = a.rows() == b.rows() && a.cols() == b.cols() &&
                          std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
        std::printf("  %-11s  old %8.2f ms  new %8.2f ms  new/old %.3f  bits %s\n", names[op], o, nw, nw / o,
                    same ? "same" : "differ");
    }
}

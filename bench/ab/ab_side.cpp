// One side of the A/B comparison (bench/ab/run.sh): the library's products and randomized SVD,
// compiled once against the headers of an older commit (with `-Dpissa=pissa_old`, so both copies
// of every inline function coexist in one program) and once against the working tree.
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/rsvd.hpp>

#include <Eigen/Core>

using Dense = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;

/// A randomized SVD object with niter 4 (fused or not), to be reused.
static pissa::RandomizedSvd<float> reused_svd(bool fused) {
    pissa::RandomizedSvdOptions options;
    options.niter = 4;
    options.fused_power_iteration = fused;
    return pissa::RandomizedSvd<float>(options);
}

/// op 0: Y = W X (float W), 1: the same with bf16 W, 2: Z = W^T Y (float), 3: bf16,
/// 4: randomized SVD (niter 4, rank = in.cols()) of float W, 5: of bf16 W (out = S), 6 and 7: the
/// same with fused_power_iteration. The SVDs run on a RandomizedSvd object per op, reused from
/// call to call (the steady state of a model's matrices: no fresh pages, whose faults would
/// dominate a comparison on a shared VM).
void AB_SIDE(int op, const void* w, long m, long n, const Dense& in, Dense& out) {
    using namespace pissa;
    using namespace pissa::detail;
    static KernelWorkspace workspace;
    const auto* f = static_cast<const float*>(w);
    const auto* h = static_cast<const Eigen::bfloat16*>(w);
    if (op == 0) multiply(RowMajorView<float>{f, m, n, n}, in, out, workspace);
    if (op == 1) multiply(RowMajorView<Eigen::bfloat16>{h, m, n, n}, in, out, workspace);
    if (op == 2) multiply_transposed(RowMajorView<float>{f, m, n, n}, in, out, workspace);
    if (op == 3) multiply_transposed(RowMajorView<Eigen::bfloat16>{h, m, n, n}, in, out, workspace);
    if (op >= 4) {
        static RandomizedSvd<float> svds[4] = {reused_svd(false), reused_svd(false), reused_svd(true),
                                               reused_svd(true)};
        RandomizedSvd<float>& svd = svds[op - 4];
        if (op % 2 == 0) out = svd.compute(Eigen::Map<const RowMatrix<float>>(f, m, n), in.cols()).singular_values();
        else out = svd.compute(Eigen::Map<const RowMatrix<Eigen::bfloat16>>(h, m, n), in.cols()).singular_values();
    }
}

/// \file detail/block_krylov.hpp
/// \brief Restarted block Krylov iteration for the top-r singular triplets, with a residual test.
///
/// One cycle builds the block Krylov basis `K = [V0, (W^T W) V0, ..., (W^T W)^(s-1) V0]`
/// (`[n, s b]`, re-orthogonalised block by block), keeps `P = W K` on the way, and takes the
/// Rayleigh-Ritz triplets from the small SVD of `P` (QR of P, then SVD of its R): `W v_i = s_i u_i`
/// holds by construction, so the error of triplet i is `||W^T u_i - s_i v_i||`, measured with one
/// more product. The next cycle restarts from `W^T U` (a subspace-iteration step on the Ritz
/// vectors). Each cycle reads W 2s times; it only ever multiplies W by skinny blocks.
#pragma once

#include <pissa/detail/random.hpp>
#include <pissa/detail/ritz.hpp>
#include <pissa/detail/serial_eigen.hpp>
#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/tall_qr.hpp>
#include <pissa/detail/validate.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/errors.hpp>
#include <pissa/svd_result.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace pissa::detail {

/// Makes the columns of `Z` orthonormal and orthogonal to the orthonormal columns of `basis`
/// (classical Gram-Schmidt twice, then QR, then once more: safe even when Z is almost in span(basis)).
template <class Scalar>
void orthonormalize_against(const Eigen::Ref<const Matrix<Scalar>>& basis, Matrix<Scalar>& Z, TallQr<Scalar>& qr) {
    auto project_out = [&] { run_serial_eigen([&] { Z.noalias() -= basis * (basis.transpose() * Z); }); };
    project_out();
    project_out();
    qr.orthonormalize(Z);
    project_out();
    qr.orthonormalize(Z);
}

/// Top-`rank` triplets of `W [m, n]` by restarted block Krylov; see the file comment.
/// Stops when `max_i<rank ||W^T u_i - s_i v_i|| <= tolerance * s_1` or after `max_cycles` cycles.
template <class Scalar, class Storage>
SvdResult<Scalar> block_krylov_svd(const WeightOperator<Storage>& W, Index rank, double tolerance, int max_cycles,
                                   std::uint64_t seed) {
    const Index m = W.rows(), n = W.cols(), k = std::min(m, n);
    Index block = std::min(k, rank + std::max<Index>(8, rank / 2));
    if (2 * block > k) block = k;  // small problem: one block spans everything, Rayleigh-Ritz is exact
    // Up to 6 Krylov steps, but a basis of at most ~kMaxWidth columns: the QR of the image and the
    // small SVD cost O(m width^2) and O(width^3) serial flops per cycle, which at r = 128 and 6
    // steps (width 1152) cost more than all the passes over W.
    constexpr Index kMaxWidth = 384;
    const Index steps = std::clamp<Index>(std::min(k / block, std::max<Index>(2, kMaxWidth / block)), 1, 6);
    const Index width = steps * block;

    Matrix<Scalar> start, Z, Y;
    TallQr<Scalar> qr_block;  // every block orthonormalised is [n, block]
    fill_gaussian(start, n, block, seed);
    qr_block.orthonormalize(start);

    Matrix<Scalar> basis(n, width), image(m, width), U;
    Vector<Scalar> S;
    TallQr<Scalar> qr_image;
    SvdResult<Scalar> out;
    double best = std::numeric_limits<double>::infinity();
    int best_cycle = 0;
    for (int cycle = 1; cycle <= max_cycles; ++cycle) {
        basis.leftCols(block) = start;
        W.apply(start, Y);
        require_finite_product(W, Y, "truncated_svd");
        image.leftCols(block) = Y;
        for (Index j = 1; j < steps; ++j) {
            W.apply_transposed(Y, Z);  // (W^T W) times the previous block
            orthonormalize_against<Scalar>(basis.leftCols(j * block), Z, qr_block);
            basis.middleCols(j * block, block) = Z;
            W.apply(Z, Y);
            image.middleCols(j * block, block) = Y;
        }
        // Rayleigh-Ritz; the whole leading block of U restarts the next cycle.
        ritz_triplets(basis, image, block, rank, "truncated_svd", U, S, out.V, qr_image);
        out.U = U.leftCols(rank);
        out.S = S.head(rank);

        W.apply_transposed(U, Z);  // W^T u_i for the whole block: residuals and the restart
        const Scalar scale = std::max(S(0), std::numeric_limits<Scalar>::min());
        double worst = 0;
        for (Index i = 0; i < rank; ++i)
            worst = std::max(worst, static_cast<double>((Z.col(i) - out.S(i) * out.V.col(i)).norm() / scale));
        out.report = {cycle, worst, worst <= tolerance};
        if (out.report.converged) break;
        // Stagnation at the rounding floor: 5 cycles without a 10% improvement of the best residual.
        if (worst < 0.9 * best) {
            best = worst;
            best_cycle = cycle;
        } else if (cycle - best_cycle >= 5) {
            break;  // reported as not converged, with the bound reached
        }
        start = Z;
        qr_block.orthonormalize(start);
    }
    return out;
}

}  // namespace pissa::detail

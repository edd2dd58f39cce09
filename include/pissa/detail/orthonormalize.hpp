/// \file detail/orthonormalize.hpp
/// \brief Orthonormal basis of a skinny matrix's columns (the `Q` of a thin QR, as
/// `torch.linalg.qr(X).Q` returns it in torch.svd_lowrank), as a one-off call. Decompositions keep
/// a TallQr per shape instead and call its orthonormalize(), which reuses the storage.
#pragma once

#include <pissa/detail/tall_qr.hpp>
#include <pissa/types.hpp>

namespace pissa::detail {

/// Replaces `X [k, q]` (k >= q) by the thin `Q` of its QR (TallQr::orthonormalize).
template <class Scalar>
void orthonormalize(Matrix<Scalar>& X) {
    TallQr<Scalar>{}.orthonormalize(X);
}

}  // namespace pissa::detail

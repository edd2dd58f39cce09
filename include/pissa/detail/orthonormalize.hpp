/// \file detail/orthonormalize.hpp
/// \brief Orthonormal basis of a skinny matrix's columns (the `Q` of a thin QR, as
/// `torch.linalg.qr(X).Q` returns it in torch.svd_lowrank).
#pragma once

#include <pissa/detail/tall_qr.hpp>
#include <pissa/types.hpp>

namespace pissa::detail {

/// Replaces `X [k, q]` (k >= q) by the thin `Q` of its QR (detail/tall_qr.hpp): orthonormal
/// columns that span the columns of X (a rank-deficient X still gets orthonormal columns).
/// Keep one object per shape for a whole decomposition: its storage is reused.
template <class Scalar>
class Orthonormalizer {
public:
    void operator()(Matrix<Scalar>& X) {
        m_qr.factor(X);
        m_qr.apply_q(Matrix<Scalar>::Identity(X.cols(), X.cols()), X);
    }

private:
    TallQr<Scalar> m_qr;
};

/// One-off Orthonormalizer call.
template <class Scalar>
void orthonormalize(Matrix<Scalar>& X) {
    Orthonormalizer<Scalar>{}(X);
}

}  // namespace pissa::detail

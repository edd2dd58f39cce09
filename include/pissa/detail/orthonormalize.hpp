/// \file detail/orthonormalize.hpp
/// \brief Orthonormal basis of a skinny matrix's columns (the `Q` of a thin Householder QR, as
/// `torch.linalg.qr(X).Q` returns it in torch.svd_lowrank).
#pragma once

#include <pissa/detail/serial_eigen.hpp>
#include <pissa/types.hpp>

#include <Eigen/QR>

namespace pissa::detail {

/// Replaces `X [k, q]` (k >= q) by the thin `Q` of its Householder QR: orthonormal columns that
/// span the columns of X (a rank-deficient X still gets orthonormal columns).
template <class Scalar>
void orthonormalize(Matrix<Scalar>& X) {
    run_serial_eigen([&] {
        const Index k = X.rows(), q = X.cols();
        Eigen::HouseholderQR<Matrix<Scalar>> qr(X);
        X.setIdentity(k, q);
        X.applyOnTheLeft(qr.householderQ());
    });
}

}  // namespace pissa::detail

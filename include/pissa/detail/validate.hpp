/// \file detail/validate.hpp
/// \brief Input checks shared by the decompositions: rank range, empty matrices, non-finite values.
#pragma once

#include <pissa/detail/skinny_gemm.hpp>
#include <pissa/detail/weight_view.hpp>
#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <algorithm>
#include <string>

namespace pissa::detail {

/// Throws unless `1 <= rank <= min(rows, cols)`; `what` names the caller in the message.
inline void check_rank(Index rows, Index cols, Index rank, const char* what) {
    require(rows > 0 && cols > 0, what, ": the weight matrix is empty (", rows, " x ", cols, ")");
    require(rank >= 1 && rank <= std::min(rows, cols), what,
            ": rank must satisfy 1 <= r <= min(m, n) = ", std::min(rows, cols), " for a ", rows, " x ", cols,
            " matrix, got r = ", rank);
}

/// Throws pissa::invalid_argument naming the first NaN/Inf of `W` (in W's own orientation).
template <class Storage>
void check_finite(const PreparedWeight<Storage>& W, const char* what) {
    if (auto bad = find_non_finite(W.view)) {
        const Index i = W.transposed ? bad->second : bad->first;
        const Index j = W.transposed ? bad->first : bad->second;
        const double value = static_cast<double>(W.view.row(bad->first)[bad->second]);
        throw invalid_argument(
            concat(what, ": the weight matrix contains a non-finite value (", value, ") at row ", i, ", column ", j));
    }
}

/// Non-finite detection at no extra pass: a NaN or Inf anywhere in W makes the first product
/// `W X` (X Gaussian, every entry non-zero) non-finite in that row. Only then is W scanned, to name
/// the bad entry; a finite W whose product overflows is a numerical_error.
template <class Storage, class Scalar>
void require_finite_product(const WeightOperator<Storage>& W, const Matrix<Scalar>& product, const char* what) {
    if (product.allFinite()) return;
    check_finite(W.weight, what);
    throw numerical_error(concat(what, ": W times a test matrix overflowed the compute type; rescale W"));
}

}  // namespace pissa::detail

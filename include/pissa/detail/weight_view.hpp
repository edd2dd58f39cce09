/// \file detail/weight_view.hpp
/// \brief A non-owning row-major view of a weight matrix, and how any Eigen expression becomes one.
///
/// The kernels read `W` through a RowMajorView so that a checkpoint's memory-mapped row-major
/// tensor is used in place, in its storage dtype (16-bit values are widened block by block inside
/// the kernels, never as a whole float32 copy). A column-major `W [m, n]` is, byte for byte, the
/// row-major `W^T [n, m]`: it is viewed that way and the caller swaps the roles of W and W^T.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <optional>
#include <type_traits>

namespace pissa::detail {

/// Read-only row-major view: element (i, j) is `data[i * stride + j]`.
template <class Storage>
struct RowMajorView {
    const Storage* data = nullptr;
    Index rows = 0;
    Index cols = 0;
    Index stride = 0;  ///< distance between consecutive rows, >= cols

    /// Pointer to the first element of row `i`.
    const Storage* row(Index i) const { return data + i * stride; }
};

/// A weight prepared for the kernels: `view` is `W` itself (transposed == false) or `W^T`
/// (transposed == true, for column-major input). `owned` holds a row-major copy only when the
/// expression had no usable memory layout (e.g. a product or a non-unit inner stride).
template <class Storage>
struct PreparedWeight {
    RowMajorView<Storage> view;
    bool transposed = false;
    std::optional<RowMatrix<Storage>> owned;

    PreparedWeight() = default;
    PreparedWeight(const PreparedWeight&) = delete;  // view may point into `owned`
    PreparedWeight& operator=(const PreparedWeight&) = delete;
};

/// Fills `out` with a view of `W`, copying only when the expression has no direct row- or
/// column-major storage with unit inner stride.
template <class Derived>
void prepare_weight(const Eigen::MatrixBase<Derived>& W, PreparedWeight<typename Derived::Scalar>& out) {
    constexpr bool direct = (int(Eigen::internal::traits<Derived>::Flags) & Eigen::DirectAccessBit) != 0;
    if constexpr (direct) {
        const auto& w = W.derived();
        if (w.innerStride() == 1) {
            const Index outer = w.outerStride();
            if constexpr (Derived::IsRowMajor) {
                out.view = {w.data(), w.rows(), w.cols(), w.rows() > 1 ? outer : w.cols()};
                out.transposed = false;
            } else {
                out.view = {w.data(), w.cols(), w.rows(), w.cols() > 1 ? outer : w.rows()};
                out.transposed = true;
            }
            return;
        }
    }
    out.owned.emplace(W);
    out.view = {out.owned->data(), out.owned->rows(), out.owned->cols(), out.owned->cols()};
    out.transposed = false;
}

/// Finds the first non-finite entry of the view, in (row, col) of the view's own orientation.
template <class Storage>
std::optional<std::pair<Index, Index>> find_non_finite(const RowMajorView<Storage>& W) {
    for (Index i = 0; i < W.rows; ++i) {
        const Storage* row = W.row(i);
        for (Index j = 0; j < W.cols; ++j)
            if (!(Eigen::numext::isfinite)(row[j])) return std::make_pair(i, j);
    }
    return std::nullopt;
}

}  // namespace pissa::detail

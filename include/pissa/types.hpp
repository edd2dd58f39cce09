/// \file types.hpp
/// \brief Matrix aliases and the storage -> compute scalar mapping shared by every pissa header.
#pragma once

#include <Eigen/Core>

#include <type_traits>

namespace pissa {

using Index = Eigen::Index;

/// Column-major dynamic matrix (Eigen's default layout), used for results.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// Row-major dynamic matrix: the layout of checkpoints (`nn.Linear.weight` is `[out, in]` row-major).
template <class Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector.
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// The scalar that pissa computes in for a given storage scalar: float for the 16-bit storage
/// types (Eigen::half, Eigen::bfloat16), as peft computes PiSSA in float32; otherwise the type itself.
template <class Storage>
struct compute_scalar {
    using type = Storage;
};
template <>
struct compute_scalar<Eigen::half> {
    using type = float;
};
template <>
struct compute_scalar<Eigen::bfloat16> {
    using type = float;
};
template <class Storage>
using compute_scalar_t = typename compute_scalar<Storage>::type;

/// True for the storage scalars pissa accepts: float, double, Eigen::half, Eigen::bfloat16.
template <class Storage>
inline constexpr bool is_supported_storage_v =
    std::is_same_v<Storage, float> || std::is_same_v<Storage, double> || std::is_same_v<Storage, Eigen::half> ||
    std::is_same_v<Storage, Eigen::bfloat16>;

}  // namespace pissa

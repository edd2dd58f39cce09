/// \file io/tensor.hpp
/// \brief Between safetensors bytes and Eigen matrices: zero-copy maps of 2-D float tensors, dtype
/// conversion, and serialisation of matrices back to a stored dtype.
///
/// A safetensors tensor of shape `[rows, cols]` is row-major, so it maps onto
/// `Eigen::Map<const RowMatrix<Storage>>` without a copy when the bytes are aligned for the storage
/// type (the format does not promise alignment: then a copy is made). Storage types: F32 -> float,
/// F64 -> double, F16 -> Eigen::half, BF16 -> Eigen::bfloat16 (bit-identical layouts, little-endian).
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/dtype.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace pissa::io {

/// The safetensors dtype of a storage scalar.
template <class Storage>
constexpr Dtype dtype_of() {
    static_assert(is_supported_storage_v<Storage>, "dtype_of: float, double, Eigen::half or Eigen::bfloat16");
    if constexpr (std::is_same_v<Storage, float>) return Dtype::F32;
    else if constexpr (std::is_same_v<Storage, double>) return Dtype::F64;
    else if constexpr (std::is_same_v<Storage, Eigen::half>) return Dtype::F16;
    else return Dtype::BF16;
}

/// Calls `f(Storage{})` with the storage scalar of a float dtype (F32/F64/F16/BF16).
/// \throws pissa::invalid_argument for any other dtype, naming `what`.
template <class F>
decltype(auto) visit_float_dtype(Dtype dtype, const std::string& what, F&& f) {
    switch (dtype) {
        case Dtype::F32:
            return f(float{});
        case Dtype::F64:
            return f(double{});
        case Dtype::F16:
            return f(Eigen::half{});
        case Dtype::BF16:
            return f(Eigen::bfloat16{});
        default:
            throw pissa::invalid_argument(what + ": dtype " + std::string(dtype_name(dtype)) +
                                          " is not a float type (F32, F64, F16 or BF16)");
    }
}

/// True for a 2-D tensor of a float dtype: the weights PiSSA and LoRA apply to.
inline bool is_float_matrix(const TensorInfo& t) { return t.shape.size() == 2 && is_float_dtype(t.dtype); }

/// rows, cols of a 2-D tensor as Eigen indices. \throws pissa::invalid_argument if not 2-D.
inline std::pair<Index, Index> matrix_shape(const TensorInfo& t, const std::string& file) {
    pissa::detail::require(t.shape.size() == 2, file, ": tensor '", t.name, "' has ", t.shape.size(),
                           " dimensions, a matrix needs 2");
    constexpr auto max = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    pissa::detail::require(t.shape[0] <= max && t.shape[1] <= max, file, ": tensor '", t.name, "' is too large");
    return {static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1])};
}

/// rows, cols of a 2-D tensor stored as `Storage`.
/// \throws pissa::invalid_argument naming file and tensor when it is not 2-D or not stored as `Storage`.
template <class Storage>
std::pair<Index, Index> stored_matrix_shape(const SafetensorsFile& file, const TensorInfo& t) {
    const auto shape = matrix_shape(t, file.path().string());
    pissa::detail::require(t.dtype == dtype_of<Storage>(), file.path().string(), ": tensor '", t.name, "': stored as ",
                           dtype_name(t.dtype), ", not ", dtype_name(dtype_of<Storage>()));
    return shape;
}

/// A zero-copy map of a 2-D tensor's bytes as `RowMatrix<Storage>` `[rows, cols]`; `ok` is false
/// (and the map empty) when the bytes are not aligned for Storage. The dtype must be dtype_of<Storage>.
/// Like SafetensorsFile::bytes(), it is not safe against the file being truncated while in use
/// (SIGBUS on access); copy_matrix_into() is.
template <class Storage>
Eigen::Map<const RowMatrix<Storage>> map_matrix(const SafetensorsFile& file, const TensorInfo& t, bool& ok) {
    const auto [rows, cols] = stored_matrix_shape<Storage>(file, t);
    const ByteView bytes = file.bytes(t);
    ok = reinterpret_cast<std::uintptr_t>(bytes.data) % alignof(Storage) == 0;
    if (!ok) return {nullptr, 0, 0};
    return {reinterpret_cast<const Storage*>(bytes.data), rows, cols};
}

/// Copies a 2-D tensor into a RowMatrix of its own storage type (an aligned copy of the bytes, read
/// with pread(2): see copy_matrix_into).
template <class Storage>
RowMatrix<Storage> copy_matrix(const SafetensorsFile& file, const TensorInfo& t) {
    const auto [rows, cols] = stored_matrix_shape<Storage>(file, t);
    RowMatrix<Storage> out(rows, cols);
    file.read(t, 0, static_cast<void*>(out.data()), static_cast<std::size_t>(t.nbytes()));
    return out;
}

/// Copies a 2-D tensor stored as `Storage` into `buffer` and returns it viewed as the row-major
/// matrix. `buffer` is resized, never shrunk: reused from tensor to tensor, it is allocated once
/// for a whole checkpoint instead of once per tensor (fresh pages of a large allocation cost a
/// page fault each). The view is valid until `buffer` is next resized.
/// The bytes are read with pread(2), not copied out of the mapping, so another process truncating the
/// file meanwhile is reported instead of raising SIGBUS; with the page cache already filled
/// (SafetensorsFile::prefetch) it costs the same one copy.
/// \throws pissa::invalid_argument when the tensor is not 2-D or not stored as `Storage`;
///         pissa::io::io_error naming the file and tensor when the file has become shorter.
template <class Storage>
Eigen::Map<RowMatrix<Storage>> copy_matrix_into(const SafetensorsFile& file, const TensorInfo& t,
                                                std::vector<unsigned char>& buffer) {
    const auto [rows, cols] = stored_matrix_shape<Storage>(file, t);
    const auto size = static_cast<std::size_t>(t.nbytes());
    // Growing: drop the old allocation first, so that the old and the new one (the largest tensor)
    // never coexist, and its bytes are not copied for nothing.
    if (buffer.capacity() < size) std::vector<unsigned char>().swap(buffer);
    buffer.resize(size);
    file.read(t, 0, buffer.data(), size);
    return {reinterpret_cast<Storage*>(buffer.data()), rows, cols};
}

/// Reads a 2-D float tensor (F32/F64/F16/BF16) converted to `Scalar` (float or double).
template <class Scalar>
RowMatrix<Scalar> read_matrix(const SafetensorsFile& file, const TensorInfo& t) {
    static_assert(std::is_floating_point_v<Scalar>, "read_matrix: Scalar must be float or double");
    return visit_float_dtype(t.dtype, file.path().string() + ": tensor '" + t.name + "'", [&](auto tag) {
        using Storage = decltype(tag);
        RowMatrix<Scalar> out = copy_matrix<Storage>(file, t).template cast<Scalar>();
        return out;
    });
}

/// The bytes of a matrix stored row-major as `dtype` (a float dtype), converting from its scalar.
template <class Derived>
std::vector<unsigned char> matrix_bytes(const Eigen::MatrixBase<Derived>& m, Dtype dtype) {
    return visit_float_dtype(dtype, "matrix_bytes", [&](auto tag) {
        using Storage = decltype(tag);
        const RowMatrix<Storage> rm = m.template cast<Storage>();
        std::vector<unsigned char> out(static_cast<std::size_t>(rm.size()) * sizeof(Storage));
        if (!out.empty()) std::memcpy(out.data(), static_cast<const void*>(rm.data()), out.size());
        return out;
    });
}

/// An OwnedTensor holding a matrix as `[rows, cols]` in `dtype` (for adapter files and tests).
template <class Derived>
OwnedTensor matrix_tensor(const std::string& name, const Eigen::MatrixBase<Derived>& m, Dtype dtype = Dtype::F32) {
    return {{name, dtype, {static_cast<std::uint64_t>(m.rows()), static_cast<std::uint64_t>(m.cols())}},
            matrix_bytes(m, dtype)};
}

}  // namespace pissa::io

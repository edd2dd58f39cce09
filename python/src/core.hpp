// Shared helpers of the pissa._core extension: array conversion between NumPy (via nanobind's
// ndarray) and Eigen, and the per-area binding functions that module.cpp calls.
#pragma once

#include <pissa/types.hpp>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <Eigen/Core>

#include <cstdint>
#include <string>
#include <utility>

namespace pissa_python {

namespace nb = nanobind;

/// An array as the Python layer passes it: on the CPU, C-contiguous (pissa/_arrays.py makes it so,
/// copying only when the caller's layout requires it), read-only access; 16-bit floats arrive as
/// uint16 views with their dtype named separately.
using InArray = nb::ndarray<nb::device::cpu, nb::c_contig, nb::ro>;

/// The storage types pissa computes on.
enum class DType { float32, float64, bfloat16, float16 };

/// "float32", "float64", "bfloat16" or "float16"; throws pissa::invalid_argument otherwise.
DType parse_dtype(const std::string& name);

[[noreturn]] void throw_array_error(const char* what, std::size_t ndim, std::size_t got_ndim);
[[noreturn]] void throw_dtype_error(DType dtype);

/// Throws pissa::invalid_argument unless `a` has `ndim` dimensions and holds `T`.
template <class T>
void require_array(const InArray& a, std::size_t ndim, const char* what) {
    if (a.ndim() != ndim || a.dtype() != nb::dtype<T>()) throw_array_error(what, ndim, a.ndim());
}

/// Calls `f(T{})` with the storage scalar T that `dtype` names.
template <class F>
decltype(auto) dispatch(DType dtype, F&& f) {
    switch (dtype) {
        case DType::float32:
            return f(float{});
        case DType::float64:
            return f(double{});
        case DType::bfloat16:
            return f(Eigen::bfloat16{});
        case DType::float16:
            break;
    }
    return f(Eigen::half{});
}

/// As dispatch, for functions defined on float32 and float64 only (the Python layer casts 16-bit
/// input to float32 first, as the C++ templates do inside).
template <class F>
decltype(auto) dispatch_float(DType dtype, F&& f) {
    if (dtype == DType::float64) return f(double{});
    if (dtype != DType::float32) throw_dtype_error(dtype);
    return f(float{});
}

/// A read-only row-major view of a 2-D array (no copy).
template <class T>
Eigen::Map<const pissa::RowMatrix<T>> view(const InArray& a) {
    return {static_cast<const T*>(a.data()), static_cast<Eigen::Index>(a.shape(0)),
            static_cast<Eigen::Index>(a.shape(1))};
}
template <class T>
Eigen::Map<const pissa::Vector<T>> view_vector(const InArray& a) {
    return {static_cast<const T*>(a.data()), static_cast<Eigen::Index>(a.shape(0))};
}

/// The NumPy element type an Eigen scalar is handed out as (16-bit floats as uint16 bit patterns).
template <class T>
struct numpy_element {
    using type = T;
};
template <>
struct numpy_element<Eigen::bfloat16> {
    using type = std::uint16_t;
};
template <>
struct numpy_element<Eigen::half> {
    using type = std::uint16_t;
};

/// Hands an Eigen object to NumPy without a copy: the array owns it through a capsule.
template <class Object>
nb::ndarray<nb::numpy> to_numpy(Object&& object) {
    using Plain = std::decay_t<Object>;
    using Element = typename numpy_element<typename Plain::Scalar>::type;
    static_assert(Plain::IsRowMajor || Plain::ColsAtCompileTime == 1, "to_numpy: row-major or vector");
    auto* owned = new Plain(std::forward<Object>(object));
    nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<Plain*>(p); });
    std::size_t shape[2] = {static_cast<std::size_t>(owned->rows()), static_cast<std::size_t>(owned->cols())};
    const std::size_t ndim = Plain::ColsAtCompileTime == 1 ? 1 : 2;
    return nb::ndarray<nb::numpy>(reinterpret_cast<Element*>(owned->data()), ndim, shape, owner, nullptr,
                                  nb::dtype<Element>());
}

/// A column-major result (Eigen's default) handed out as a C-contiguous array (one copy).
template <class T>
nb::ndarray<nb::numpy> matrix_to_numpy(const pissa::Matrix<T>& m) {
    return to_numpy(pissa::RowMatrix<T>(m));
}

void bind_decompose(nb::module_& m);
void bind_quantize(nb::module_& m);
void bind_checkpoint(nb::module_& m);

}  // namespace pissa_python

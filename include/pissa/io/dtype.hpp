/// \file io/dtype.hpp
/// \brief The element types of safetensors files: names, sizes, and which ones pissa computes with.
///
/// safetensors names dtypes by strings ("F32", "BF16", ...). pissa computes with F64, F32, F16 and
/// BF16 (as peft, which refuses PiSSA on anything but float32/float16/bfloat16 weights, plus double)
/// and passes every other byte-sized dtype through byte for byte. Sub-byte dtypes (F4, F6_*) are not
/// supported and are rejected as unknown.
#pragma once

#include <pissa/errors.hpp>

#include <cstddef>
#include <string>
#include <string_view>

namespace pissa::io {

/// A safetensors element type.
enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

namespace detail {
struct DtypeEntry {
    Dtype dtype;
    std::string_view name;
    std::size_t size;
};
inline constexpr DtypeEntry dtype_table[] = {
    {Dtype::BOOL, "BOOL", 1},       {Dtype::U8, "U8", 1},   {Dtype::I8, "I8", 1},   {Dtype::F8_E5M2, "F8_E5M2", 1},
    {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::I16, "I16", 2}, {Dtype::U16, "U16", 2}, {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2},       {Dtype::I32, "I32", 4}, {Dtype::U32, "U32", 4}, {Dtype::F32, "F32", 4},
    {Dtype::F64, "F64", 8},         {Dtype::I64, "I64", 8}, {Dtype::U64, "U64", 8},
};
}  // namespace detail

/// The safetensors name of a dtype ("F32", "BF16", ...).
inline std::string_view dtype_name(Dtype dtype) {
    for (const auto& entry : detail::dtype_table)
        if (entry.dtype == dtype) return entry.name;
    return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(Dtype dtype) {
    for (const auto& entry : detail::dtype_table)
        if (entry.dtype == dtype) return entry.size;
    return 0;
}

/// Parses a safetensors dtype name; returns false for an unknown name.
inline bool parse_dtype(std::string_view name, Dtype& out) {
    for (const auto& entry : detail::dtype_table)
        if (entry.name == name) {
            out = entry.dtype;
            return true;
        }
    return false;
}

/// The dtype for a name. \throws pissa::invalid_argument naming the unknown dtype.
inline Dtype dtype_from_name(std::string_view name) {
    Dtype dtype{};
    pissa::detail::require(parse_dtype(name, dtype), "unknown safetensors dtype '", name, "'");
    return dtype;
}

/// True for the dtypes pissa computes with (F64, F32, F16, BF16); every other dtype is passed through.
inline bool is_float_dtype(Dtype dtype) {
    return dtype == Dtype::F64 || dtype == Dtype::F32 || dtype == Dtype::F16 || dtype == Dtype::BF16;
}

}  // namespace pissa::io

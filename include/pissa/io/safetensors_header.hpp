/// \file io/safetensors_header.hpp
/// \brief Parsing and validating a safetensors header, and serialising one; no file access.
///
/// Layout (PISSA.md, "safetensors"): an 8-byte little-endian header length `N`, `N` bytes of UTF-8
/// JSON, then the data area. The JSON maps each tensor name to
/// `{"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}` (offsets relative to the
/// first byte after the header) plus an optional `"__metadata__"` object of string to string.
///
/// parse_safetensors_header() enforces every rule of the format and throws pissa::io::format_error,
/// naming the file and the tensor, for:
/// - a file shorter than 8 bytes, a header length over 100,000,000 bytes (the reference
///   implementation's cap) or past the end of the file;
/// - a header that is not valid UTF-8, not a JSON object, or has duplicate keys (JSON parsers merge
///   them silently; here they are an error, detected while parsing);
/// - an entry without a known dtype, a shape of non-negative integers or two integer data offsets;
/// - `end - begin` differing from (element count x dtype size), computed without overflow;
/// - offsets that do not tile the data area exactly (gaps, overlaps, bytes past the last tensor,
///   a tensor past the end of the file).
/// After it returns, every tensor's bytes lie inside the file: no later access can read outside.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/dtype.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace pissa::io {

/// A malformed or unsupported file (safetensors, index, adapter config). The message names the file
/// and, where there is one, the tensor.
class format_error : public pissa::invalid_argument {
public:
    using pissa::invalid_argument::invalid_argument;
};

/// The reference implementation's cap on the header length (100 MB).
inline constexpr std::uint64_t max_header_size = 100'000'000;

/// One tensor of a safetensors file: name, dtype, shape and its byte range in the data area.
struct TensorInfo {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<std::uint64_t> shape;
    std::uint64_t begin = 0;  ///< first byte, relative to the data area
    std::uint64_t end = 0;    ///< one past the last byte

    /// Element count (product of the shape; 1 for a scalar). Validated not to overflow.
    std::uint64_t numel() const {
        std::uint64_t n = 1;
        for (auto d : shape) n *= d;
        return n;
    }
    /// Bytes of data: end - begin == numel() * dtype_size(dtype).
    std::uint64_t nbytes() const { return end - begin; }
};

/// A validated header: tensors in data order (ascending offsets), metadata, and the layout numbers.
struct SafetensorsHeader {
    std::vector<TensorInfo> tensors;              ///< sorted by data offset
    std::map<std::string, std::string> metadata;  ///< "__metadata__" (empty if absent)
    std::uint64_t header_size = 0;                ///< N, the JSON length
    std::uint64_t data_offset = 0;                ///< 8 + N: file offset of the data area
    std::uint64_t data_size = 0;                  ///< bytes of the data area
};

namespace detail {

/// True when `text` is well-formed UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF);
/// `bad_at` receives the offset of the first bad byte.
inline bool valid_utf8(const unsigned char* text, std::size_t size, std::size_t& bad_at) {
    std::size_t i = 0;
    while (i < size) {
        const unsigned c = text[i];
        std::size_t extra = 0;
        unsigned lo = 0x80, hi = 0xBF;  // allowed range of the first continuation byte
        if (c < 0x80) {
            ++i;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            extra = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            extra = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;  // surrogates
        } else if (c >= 0xF0 && c <= 0xF4) {
            extra = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            bad_at = i;
            return false;
        }
        if (size - i <= extra) {
            bad_at = i;
            return false;
        }
        for (std::size_t k = 1; k <= extra; ++k) {
            const unsigned cc = text[i + k];
            const unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
            if (cc < l || cc > h) {
                bad_at = i;
                return false;
            }
        }
        i += extra + 1;
    }
    return true;
}

/// a * b into `out`; false on unsigned 64-bit overflow.
inline bool mul_overflow(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
    if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
    out = a * b;
    return true;
}

/// "[2, 3]" for messages.
inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

template <class... Parts>
[[noreturn]] void fail(const std::string& file, const Parts&... parts) {
    throw format_error(pissa::detail::concat(file, ": ", parts...));
}

/// Reads a non-negative JSON integer that fits in 64 bits.
inline bool json_u64(const nlohmann::json& value, std::uint64_t& out) {
    if (!value.is_number_unsigned()) {
        if (value.is_number_integer() && value.get<std::int64_t>() >= 0) {
            out = static_cast<std::uint64_t>(value.get<std::int64_t>());
            return true;
        }
        return false;
    }
    out = value.get<std::uint64_t>();
    return true;
}

/// Parses JSON text, rejecting duplicate keys in any object (nlohmann would keep the last one).
/// `Json` is nlohmann::json, or nlohmann::ordered_json where the order of keys matters.
template <class Json = nlohmann::json>
Json parse_json_strict(const char* first, const char* last, const std::string& file) {
    std::vector<std::set<std::string>> keys;  // one set per open object
    std::string duplicate;
    auto callback = [&](int, typename Json::parse_event_t event, Json& parsed) {
        using E = typename Json::parse_event_t;
        if (event == E::object_start) {
            keys.emplace_back();
        } else if (event == E::object_end) {
            if (!keys.empty()) keys.pop_back();
        } else if (event == E::key && !keys.empty() && duplicate.empty()) {
            const auto& key = parsed.template get_ref<const std::string&>();
            if (!keys.back().insert(key).second) duplicate = key;
        }
        return true;
    };
    Json doc;
    try {
        doc = Json::parse(first, last, callback);
    } catch (const nlohmann::json::exception& e) {
        fail(file, "invalid JSON: ", e.what());
    }
    if (!duplicate.empty()) fail(file, "duplicate key '", duplicate, "' in JSON");
    return doc;
}

}  // namespace detail

/// Parses and validates the header of a safetensors file held in memory.
/// \param bytes      the file's first bytes: at least min(file_size, 8 + N) of them must be readable
/// \param available  how many bytes `bytes` holds (the whole file, or at least the header)
/// \param file_size  the size of the whole file
/// \param file       a label for messages (usually the path)
/// \throws pissa::io::format_error for any violation listed in the file comment.
inline SafetensorsHeader parse_safetensors_header(const unsigned char* bytes, std::size_t available,
                                                  std::uint64_t file_size, const std::string& file) {
    using detail::fail;
    if (file_size < 8 || available < 8)
        fail(file, "truncated: ", file_size, " bytes, shorter than the 8-byte header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
    if (n > max_header_size)
        fail(file, "header length ", n, " exceeds the 100,000,000-byte limit of the safetensors format");
    if (n > file_size - 8)
        fail(file, "header length ", n, " runs past the end of the file (", file_size, " bytes)");
    if (available - 8 < n) fail(file, "header not fully available (", available, " of ", 8 + n, " bytes)");
    const unsigned char* text = bytes + 8;
    std::size_t bad_at = 0;
    if (!detail::valid_utf8(text, static_cast<std::size_t>(n), bad_at))
        fail(file, "header is not valid UTF-8 (bad byte ", static_cast<unsigned>(text[bad_at]), " at header offset ",
             bad_at, ")");
    if (n == 0 || text[0] != '{') fail(file, "header does not start with '{' (not a safetensors file?)");

    const auto doc = detail::parse_json_strict(reinterpret_cast<const char*>(text),
                                               reinterpret_cast<const char*>(text + n), file);
    if (!doc.is_object()) fail(file, "header is not a JSON object");

    SafetensorsHeader header;
    header.header_size = n;
    header.data_offset = 8 + n;
    header.data_size = file_size - header.data_offset;
    for (const auto& [name, entry] : doc.items()) {
        if (name == "__metadata__") {
            if (!entry.is_object()) fail(file, "__metadata__ is not an object of strings");
            for (const auto& [key, value] : entry.items()) {
                if (!value.is_string()) fail(file, "__metadata__ entry '", key, "' is not a string");
                header.metadata.emplace(key, value.get<std::string>());
            }
            continue;
        }
        if (!entry.is_object()) fail(file, "tensor '", name, "': entry is not an object");
        TensorInfo info;
        info.name = name;
        const auto dtype = entry.find("dtype");
        if (dtype == entry.end() || !dtype->is_string()) fail(file, "tensor '", name, "': missing string 'dtype'");
        if (!parse_dtype(dtype->get_ref<const std::string&>(), info.dtype))
            fail(file, "tensor '", name, "': unknown dtype '", dtype->get_ref<const std::string&>(), "'");
        const auto shape = entry.find("shape");
        if (shape == entry.end() || !shape->is_array())
            fail(file, "tensor '", name, "': missing 'shape' array");
        for (const auto& d : *shape) {
            std::uint64_t dim = 0;
            if (!detail::json_u64(d, dim))
                fail(file, "tensor '", name, "': shape entry ", d.dump(), " is not a non-negative integer");
            info.shape.push_back(dim);
        }
        const auto offsets = entry.find("data_offsets");
        if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
            !detail::json_u64((*offsets)[0], info.begin) || !detail::json_u64((*offsets)[1], info.end))
            fail(file, "tensor '", name, "': 'data_offsets' must be two non-negative integers [begin, end]");
        if (info.begin > info.end)
            fail(file, "tensor '", name, "': data_offsets [", info.begin, ", ", info.end, "] end before they begin");
        std::uint64_t numel = 1, expected = 0;
        for (auto dim : info.shape)
            if (!detail::mul_overflow(numel, dim, numel))
                fail(file, "tensor '", name, "': shape ", detail::shape_string(info.shape),
                     " overflows a 64-bit element count");
        if (!detail::mul_overflow(numel, dtype_size(info.dtype), expected))
            fail(file, "tensor '", name, "': shape ", detail::shape_string(info.shape), " x ", dtype_name(info.dtype),
                 " overflows a 64-bit byte count");
        if (info.end - info.begin != expected)
            fail(file, "tensor '", name, "': data_offsets [", info.begin, ", ", info.end, "] hold ",
                 info.end - info.begin, " bytes but shape ", detail::shape_string(info.shape), " x ",
                 dtype_name(info.dtype), " needs ", expected);
        if (info.end > header.data_size)
            fail(file, "tensor '", name, "': data_offsets [", info.begin, ", ", info.end,
                 "] reach past the end of the file (data area is ", header.data_size, " bytes)");
        header.tensors.push_back(std::move(info));
    }
    std::stable_sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t covered = 0;
    const TensorInfo* previous = nullptr;
    for (const auto& t : header.tensors) {
        if (t.begin < covered)
            fail(file, "tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] overlap tensor '",
                 previous->name, "' [", previous->begin, ", ", previous->end, "]");
        if (t.begin > covered)
            fail(file, "tensor '", t.name, "': gap of ", t.begin - covered, " bytes before its data (offsets [",
                 t.begin, ", ", t.end, "]); offsets must tile the data area");
        covered = t.end;
        previous = &t;
    }
    if (covered != header.data_size)
        fail(file, header.data_size - covered, " bytes after the last tensor's data are not covered by any tensor");
    return header;
}

/// Serialises a header: JSON with "__metadata__" first (when not empty) and the tensors in the given
/// order, padded with spaces to a multiple of 8 bytes, preceded by its 8-byte little-endian length.
/// The tensors' offsets must already tile the data area (the writer computes them).
/// \throws pissa::invalid_argument for a name or metadata string that is not valid UTF-8.
inline std::string serialize_safetensors_header(const std::vector<TensorInfo>& tensors,
                                                const std::map<std::string, std::string>& metadata) {
    auto quoted = [](const std::string& s) {
        try {
            return nlohmann::json(s).dump();
        } catch (const nlohmann::json::exception&) {
            throw pissa::invalid_argument("safetensors writer: name or metadata '" + s + "' is not valid UTF-8");
        }
    };
    std::string json = "{";
    bool first = true;
    if (!metadata.empty()) {
        json += "\"__metadata__\":{";
        bool first_entry = true;
        for (const auto& [key, value] : metadata) {
            json += (first_entry ? "" : ",") + quoted(key) + ":" + quoted(value);
            first_entry = false;
        }
        json += "}";
        first = false;
    }
    for (const auto& t : tensors) {
        json += (first ? "" : ",") + quoted(t.name) + ":{\"dtype\":\"" + std::string(dtype_name(t.dtype)) +
                "\",\"shape\":" + nlohmann::json(t.shape).dump() + ",\"data_offsets\":[" + std::to_string(t.begin) +
                "," + std::to_string(t.end) + "]}";
        first = false;
    }
    json += "}";
    json.append((8 - json.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    std::uint64_t n = json.size();
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
    return out + json;
}

}  // namespace pissa::io

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
/// - a NUL byte anywhere in the header (after the JSON value only whitespace may follow, as in the
///   reference reader: writers pad with spaces), or JSON nested deeper than max_json_depth (256);
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
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace pissa::io {

/// The reference implementation's cap on the header length (100 MB).
inline constexpr std::uint64_t max_header_size = 100'000'000;

/// How deeply any JSON document pissa reads may nest (objects and arrays, the outermost counting
/// as 1). Python's json module stops near 1000 (its recursion limit); the files pissa reads nest 2
/// to 4 deep. The bound keeps every recursive walk of a parsed document (copy, dump, comparison)
/// within a few hundred stack frames, and keeps the two-space indented rewrite of a document at
/// most ~2 x 256 bytes of indentation per value.
inline constexpr std::size_t max_json_depth = 256;

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

template <class T, class = void>
struct has_container : std::false_type {};
template <class T>
struct has_container<T, std::void_t<typename T::Container>> : std::true_type {};

/// What parse_json_strict() learnt about a document besides its content.
struct JsonStats {
    std::size_t depth = 0;            ///< deepest nesting of objects/arrays (0 for a scalar)
    std::uint64_t indented_size = 0;  ///< upper bound on the size of doc.dump(2)
};

/// A SAX handler that builds the document itself (instead of nlohmann's callback parser, whose
/// end_object() scans the whole parent object for discarded values: quadratic in the number of
/// keys), refusing duplicate keys and nesting deeper than max_json_depth as soon as they are read,
/// so no deep document is ever built (or destroyed). Objects are appended to without a lookup:
/// duplicates are found by the std::map insertion itself (nlohmann::json) or by a hash set per
/// open object (nlohmann::ordered_json, whose own insertion is a linear search).
template <class Json>
class StrictJsonBuilder {
public:
    using number_integer_t = typename Json::number_integer_t;
    using number_unsigned_t = typename Json::number_unsigned_t;
    using number_float_t = typename Json::number_float_t;
    using string_t = typename Json::string_t;
    using binary_t = typename Json::binary_t;
    using object_t = typename Json::object_t;
    using array_t = typename Json::array_t;
    static constexpr bool ordered = has_container<object_t>::value;  // nlohmann::ordered_map

    Json root;
    std::string error;  ///< why parsing stopped (empty on success)
    JsonStats stats;

    bool null() { return value(Json(nullptr)); }
    bool boolean(bool b) { return value(Json(b)); }
    bool number_integer(number_integer_t v) { return value(Json(v)); }
    bool number_unsigned(number_unsigned_t v) { return value(Json(v)); }
    bool number_float(number_float_t v, const string_t&) {
        stats.indented_size += 24;  // dump() may print a float longer than it was written ("1e5" -> "100000.0")
        return value(Json(v));
    }
    bool string(string_t& s) { return value(Json(std::move(s))); }
    bool binary(binary_t& b) { return value(Json::binary(std::move(b))); }
    bool start_object(std::size_t) { return open(Json::object()); }
    bool start_array(std::size_t) { return open(Json::array()); }
    bool end_object() { return close(); }
    bool end_array() { return close(); }
    bool key(string_t& k) {
        Frame& f = m_stack.back();
        auto* object = f.container->template get_ptr<object_t*>();
        if constexpr (ordered) {
            if (!f.keys.insert(k).second) return duplicate(k);
            auto& items = static_cast<typename object_t::Container&>(*object);
            items.emplace_back(std::move(k), Json());
            m_slot = &items.back().second;
        } else {
            const auto [it, fresh] = object->emplace(std::move(k), Json());
            if (!fresh) return duplicate(it->first);
            m_slot = &it->second;
        }
        return true;
    }
    template <class Exception>
    bool parse_error(std::size_t, const std::string&, const Exception& e) {
        if (error.empty()) error = std::string("invalid JSON: ") + e.what();
        return false;
    }

private:
    struct Frame {
        Json* container;
        std::unordered_set<string_t> keys;  // ordered_json only
    };

    // Places `v` where the parser is: the root, the end of the open array, or the slot of the last key.
    Json* place(Json&& v) {
        stats.indented_size += 2 * m_stack.size() + 4;  // newline, indentation, ", " / ": "
        if (m_stack.empty()) {
            root = std::move(v);
            return &root;
        }
        Json& container = *m_stack.back().container;
        if (container.is_array()) {
            auto* array = container.template get_ptr<array_t*>();
            array->push_back(std::move(v));
            return &array->back();
        }
        *m_slot = std::move(v);
        return m_slot;
    }
    bool value(Json&& v) {
        place(std::move(v));
        return true;
    }
    bool open(Json&& container) {
        if (m_stack.size() >= max_json_depth) {
            error = pissa::detail::concat("JSON nested deeper than ", max_json_depth, " levels");
            return false;
        }
        stats.indented_size += 2 * m_stack.size() + 2;  // the closing bracket's line
        Json* placed = place(std::move(container));
        m_stack.push_back({placed, {}});
        stats.depth = std::max(stats.depth, m_stack.size());
        return true;
    }
    bool close() {
        m_stack.pop_back();
        return true;
    }
    bool duplicate(const string_t& k) {
        error = "duplicate key '" + k + "' in JSON";
        return false;
    }

    std::vector<Frame> m_stack;  // open containers, outermost first
    Json* m_slot = nullptr;      // the value of the key just read
};

/// Parses JSON text strictly: the whole text must be one JSON value (whitespace around it allowed),
/// with no duplicate keys in any object (nlohmann would keep the last one), no NUL byte (nlohmann's
/// lexer takes one for the end of the input and would ignore what follows) and nesting at most
/// max_json_depth deep, checked while parsing, before anything deeper is built. Linear time.
/// `Json` is nlohmann::json, or nlohmann::ordered_json where the order of keys matters.
/// \throws pissa::io::format_error naming `file`.
template <class Json = nlohmann::json>
Json parse_json_strict(const char* first, const char* last, const std::string& file, JsonStats* stats = nullptr) {
    if (const void* nul = std::memchr(first, 0, static_cast<std::size_t>(last - first)))
        fail(file, "NUL byte at offset ", static_cast<const char*>(nul) - first,
             " (JSON text cannot contain one, not even after the value)");
    StrictJsonBuilder<Json> builder;
    bool ok = false;
    try {
        ok = Json::sax_parse(first, last, &builder, nlohmann::json::input_format_t::json, /*strict=*/true,
                             /*ignore_comments=*/false);
    } catch (const nlohmann::json::exception& e) {
        fail(file, "invalid JSON: ", e.what());
    }
    if (!ok) fail(file, builder.error.empty() ? std::string("invalid JSON") : builder.error);
    builder.stats.indented_size += static_cast<std::uint64_t>(last - first);
    if (stats) *stats = builder.stats;
    return std::move(builder.root);
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
    if (n > file_size - 8) fail(file, "header length ", n, " runs past the end of the file (", file_size, " bytes)");
    if (available - 8 < n) fail(file, "header not fully available (", available, " of ", 8 + n, " bytes)");
    const unsigned char* text = bytes + 8;
    std::size_t bad_at = 0;
    if (!detail::valid_utf8(text, static_cast<std::size_t>(n), bad_at))
        fail(file, "header is not valid UTF-8 (bad byte ", static_cast<unsigned>(text[bad_at]), " at header offset ",
             bad_at, ")");
    if (n == 0 || text[0] != '{') fail(file, "header does not start with '{' (not a safetensors file?)");
    // The reference reader (serde_json::from_str) allows only JSON whitespace after the object; the
    // writers pad with spaces. nlohmann's lexer would stop at a NUL and ignore whatever follows it.
    if (const void* nul = std::memchr(text, 0, static_cast<std::size_t>(n)))
        fail(file, "header has a NUL byte at header offset ", static_cast<const unsigned char*>(nul) - text,
             "; the JSON may only be followed by whitespace (padding is spaces, 0x20)");

    const auto doc =
        detail::parse_json_strict(reinterpret_cast<const char*>(text), reinterpret_cast<const char*>(text + n), file);
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
        if (shape == entry.end() || !shape->is_array()) fail(file, "tensor '", name, "': missing 'shape' array");
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

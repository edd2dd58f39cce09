/// \file idx.hpp
/// \brief Reader for the IDX files of (Fashion-)MNIST, gzip'd or not, via zlib.
///
/// IDX layout: two zero bytes, a type byte (0x08 = unsigned byte, the only type these datasets use),
/// a byte with the number of dimensions d, then d big-endian uint32 sizes, then the data row-major.
/// Every malformed file (bad magic, unsupported type, too few or too many bytes, corrupt or truncated
/// gzip stream) throws fmnist::idx_error with a message naming the file.
#pragma once

#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace fmnist {

/// A malformed or unreadable IDX file; the message names the file and the problem.
class idx_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// An IDX array of unsigned bytes: its dimensions and its data, row-major.
struct IdxArray {
    std::vector<std::uint32_t> dims;
    std::vector<std::uint8_t> data;

    std::uint64_t count() const {
        std::uint64_t n = 1;
        for (auto d : dims) n *= d;
        return n;
    }
};

/// The whole content of a file, decompressed when it is gzip'd (zlib reads plain files as they are).
/// \throws idx_error when the file cannot be opened or its gzip stream is corrupt or truncated.
inline std::vector<std::uint8_t> read_gzip_file(const std::filesystem::path& path) {
    gzFile file = gzopen(path.c_str(), "rb");
    if (file == nullptr) throw idx_error(path.string() + ": cannot open");
    std::vector<std::uint8_t> out;
    std::uint8_t buffer[1 << 16];
    for (;;) {
        const int n = gzread(file, buffer, sizeof buffer);
        if (n < 0) {
            int code = 0;
            const std::string message = gzerror(file, &code);
            gzclose(file);
            throw idx_error(path.string() + ": corrupt gzip data (" + message + ")");
        }
        if (n == 0) break;
        out.insert(out.end(), buffer, buffer + n);
    }
    int code = 0;
    const std::string message = gzerror(file, &code);
    // A stream cut short reads as end of file; zlib reports it as Z_BUF_ERROR ("unexpected end of file").
    const int closed = gzclose(file);
    if (code != Z_OK || closed == Z_BUF_ERROR)
        throw idx_error(path.string() + ": truncated or corrupt gzip stream (" +
                        (code != Z_OK ? message : std::string("unexpected end of file")) + ")");
    if (closed != Z_OK) throw idx_error(path.string() + ": error while reading the gzip stream");
    return out;
}

/// Parses IDX bytes. `name` is used in error messages.
/// \throws idx_error for a bad magic, a type other than 0x08, zero dimensions, or a data size that
///         disagrees with the dimensions (truncated, or trailing bytes).
inline IdxArray parse_idx(const std::vector<std::uint8_t>& bytes, const std::string& name) {
    if (bytes.size() < 4)
        throw idx_error(name + ": truncated IDX file (" + std::to_string(bytes.size()) +
                        " bytes, the header alone needs at least 4)");
    if (bytes[0] != 0 || bytes[1] != 0) throw idx_error(name + ": not an IDX file (the first two bytes must be zero)");
    if (bytes[2] != 0x08) {
        const char* hex = "0123456789abcdef";
        throw idx_error(name + ": unsupported IDX element type 0x" + hex[bytes[2] >> 4] + hex[bytes[2] & 15] +
                        " (only 0x08, unsigned byte, is supported)");
    }
    const std::size_t ndim = bytes[3];
    if (ndim == 0) throw idx_error(name + ": IDX file with zero dimensions");
    const std::size_t header = 4 + 4 * ndim;
    if (bytes.size() < header)
        throw idx_error(name + ": truncated IDX header (" + std::to_string(ndim) + " dimensions need " +
                        std::to_string(header) + " bytes, the file has " + std::to_string(bytes.size()) + ")");
    IdxArray array;
    for (std::size_t d = 0; d < ndim; ++d) {
        const std::uint8_t* p = bytes.data() + 4 + 4 * d;
        array.dims.push_back((std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
                             std::uint32_t{p[3]});
    }
    std::uint64_t expected = 1;
    for (auto d : array.dims) {
        if (d != 0 && expected > (std::uint64_t{1} << 40) / d) throw idx_error(name + ": IDX dimensions too large");
        expected *= d;
    }
    const std::uint64_t have = bytes.size() - header;
    if (have < expected)
        throw idx_error(name + ": truncated IDX data (the header announces " + std::to_string(expected) +
                        " bytes, the file has " + std::to_string(have) + ")");
    if (have > expected)
        throw idx_error(name + ": " + std::to_string(have - expected) + " unexpected bytes after the IDX data");
    array.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header), bytes.end());
    return array;
}

/// Reads and parses an IDX file (gzip'd or plain).
inline IdxArray read_idx(const std::filesystem::path& path) { return parse_idx(read_gzip_file(path), path.string()); }

}  // namespace fmnist

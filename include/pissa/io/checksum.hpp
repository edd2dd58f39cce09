/// \file io/checksum.hpp
/// \brief A fast streaming 64-bit checksum of bytes, for verifying written work before it is
/// trusted again (io/journal.hpp): not cryptographic, it detects torn, truncated, zeroed or
/// otherwise damaged files, not deliberate forgery.
///
/// The value depends only on the bytes and their count, never on how they were split into
/// update() calls. Four independent 64-bit lanes of multiply-rotate mixing over 32-byte stripes
/// (the structure of xxHash64) keep it at several GB/s, well above disk speed.
#pragma once

#include <pissa/io/safetensors.hpp>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace pissa::io {

/// The streaming checksum; see the file comment.
class Checksum {
public:
    Checksum() : m_lane{seed + prime1 + prime2, seed + prime2, seed, seed - prime1} {}

    /// Adds `size` bytes.
    void update(const void* data, std::size_t size) {
        const auto* p = static_cast<const unsigned char*>(data);
        m_total += size;
        if (m_fill > 0) {
            const std::size_t take = std::min(size, stripe - m_fill);
            std::memcpy(m_buffer.data() + m_fill, p, take);
            m_fill += take;
            p += take;
            size -= take;
            if (m_fill < stripe) return;
            consume(m_buffer.data());
            m_fill = 0;
        }
        for (; size >= stripe; p += stripe, size -= stripe) consume(p);
        std::memcpy(m_buffer.data(), p, size);
        m_fill = size;
    }

    /// The checksum of everything added so far (update() may go on afterwards).
    std::uint64_t value() const {
        std::uint64_t h = seed + prime5;
        for (std::size_t i = 0; i < 4; ++i) h = (rotl(h, 7) ^ round(0, m_lane[i])) * prime1 + prime4;
        h += m_total;
        for (std::size_t i = 0; i < m_fill; ++i) h = rotl(h ^ (m_buffer[i] * prime5), 11) * prime1;
        h ^= h >> 33;
        h *= prime2;
        h ^= h >> 29;
        h *= prime3;
        h ^= h >> 32;
        return h;
    }

    /// value() as 16 lowercase hex digits, the form journals store.
    std::string hex() const {
        char text[17];
        std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value()));
        return text;
    }

private:
    static constexpr std::size_t stripe = 32;
    static constexpr std::uint64_t seed = 0x7069737361ULL;  // "pissa"
    static constexpr std::uint64_t prime1 = 0x9E3779B185EBCA87ULL, prime2 = 0xC2B2AE3D27D4EB4FULL,
                                   prime3 = 0x165667B19E3779F9ULL, prime4 = 0x85EBCA77C2B2AE63ULL,
                                   prime5 = 0x27D4EB2F165667C5ULL;

    static std::uint64_t rotl(std::uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
    static std::uint64_t round(std::uint64_t lane, std::uint64_t input) {
        return rotl(lane + input * prime2, 31) * prime1;
    }
    void consume(const unsigned char* p) {
        for (std::size_t i = 0; i < 4; ++i) {
            std::uint64_t word;
            std::memcpy(&word, p + 8 * i, 8);  // little-endian hosts only (see safetensors.hpp)
            m_lane[i] = round(m_lane[i], word);
        }
    }

    std::array<std::uint64_t, 4> m_lane;
    std::array<unsigned char, stripe> m_buffer{};
    std::size_t m_fill = 0;
    std::uint64_t m_total = 0;
};

/// The checksum of `size` bytes of an open file from `offset`, read with pread(2) in pieces.
/// \throws io_error when the file is shorter or reading fails (naming `what`).
inline Checksum checksum_of_range(int fd, std::uint64_t offset, std::uint64_t size, const std::string& what) {
    constexpr std::size_t piece = std::size_t{8} << 20;
    std::vector<unsigned char> buffer(static_cast<std::size_t>(std::min<std::uint64_t>(size, piece)));
    Checksum sum;
    for (std::uint64_t at = 0; at < size;) {
        const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(size - at, piece));
        if (detail::pread_full(fd, buffer.data(), n, offset + at, what) < n)
            throw io_error(what + ": shorter than expected");
        sum.update(buffer.data(), n);
        at += n;
    }
    return sum;
}

/// The checksum of a whole regular file, as 16 hex digits (Checksum::hex).
/// \throws format_error when it is not a readable regular file; io_error when reading fails.
inline std::string checksum_of_file(const std::filesystem::path& path) {
    const int fd = detail::open_regular_file(path);
    const detail::FdCloser closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw io_error(path.string() + ": cannot stat: " + detail::errno_text());
    return checksum_of_range(fd, 0, static_cast<std::uint64_t>(st.st_size), path.string()).hex();
}

}  // namespace pissa::io

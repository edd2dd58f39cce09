/// \file io/journal.hpp
/// \brief An append-only record of completed work that survives SIGKILL and power loss, and the
/// lock that keeps two processes from writing the same journal.
///
/// One record per line: 16 hex digits (the checksum of the JSON text, io/checksum.hpp), a space,
/// the JSON text. Each append is written and flushed to the disk (fdatasync) before append()
/// returns, so a record is only there once the work it describes is; the work itself must be
/// flushed before it is recorded. Reading stops at the first line that is torn (power loss
/// mid-write), not JSON, or whose checksum does not match: that record and everything after it
/// are treated as never written. What a record claims is checked by its user against the files
/// (sizes, checksums) before it is trusted.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/checksum.hpp>
#include <pissa/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <filesystem>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace pissa::io {

namespace detail {

/// The intact records of a journal's text (see the file comment) and the bytes they span.
inline std::vector<nlohmann::json> parse_journal(const std::string& text, std::uint64_t& intact_bytes) {
    std::vector<nlohmann::json> out;
    intact_bytes = 0;
    for (std::size_t at = 0; at < text.size();) {
        const std::size_t end = text.find('\n', at);
        if (end == std::string::npos || end - at < 18 || text[at + 16] != ' ') break;
        const std::string json_text = text.substr(at + 17, end - at - 17);
        Checksum sum;
        sum.update(json_text.data(), json_text.size());
        if (text.compare(at, 16, sum.hex()) != 0) break;
        auto record = nlohmann::json::parse(json_text, nullptr, false);
        if (record.is_discarded() || !record.is_object()) break;
        out.push_back(std::move(record));
        at = end + 1;
        intact_bytes = at;
    }
    return out;
}

/// The whole content of an open file.
inline std::string read_all(int fd, const std::filesystem::path& path) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw io_error(path.string() + ": cannot stat: " + errno_text());
    std::string text(static_cast<std::size_t>(st.st_size), '\0');
    text.resize(pread_full(fd, text.data(), text.size(), 0, path.string()));
    return text;
}

}  // namespace detail

/// An exclusive advisory lock (flock(2)) on a file, held for the object's life. flock works across
/// machines on NFS (Linux emulates it with byte-range locks there).
class FileLock {
public:
    /// Opens (creating) `path` and locks it. With `wait`, blocks until the lock is free; without,
    /// \throws pissa::invalid_argument naming `what` when another process holds it.
    /// \throws io_error when the file cannot be opened.
    FileLock(const std::filesystem::path& path, bool wait, const std::string& what) {
        m_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (m_fd < 0) throw io_error(path.string() + ": cannot open: " + detail::errno_text());
        int rc;
        do rc = ::flock(m_fd, LOCK_EX | (wait ? 0 : LOCK_NB));
        while (rc != 0 && errno == EINTR);
        if (rc != 0) {
            const int error = errno;
            ::close(m_fd);
            m_fd = -1;
            if (error == EWOULDBLOCK)
                throw pissa::invalid_argument(what + " is in use by another process (" + path.string() + " is locked)");
            throw io_error(path.string() + ": cannot lock: " + std::strerror(error));
        }
    }
    ~FileLock() {
        if (m_fd >= 0) ::close(m_fd);  // closing releases the lock
    }
    FileLock(const FileLock&) = delete;
    FileLock& operator=(const FileLock&) = delete;

    int fd() const { return m_fd; }

    /// True when some process holds a lock on `path` (false when the file does not exist).
    static bool held_elsewhere(const std::filesystem::path& path) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return false;
        const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
        ::close(fd);
        return held;
    }

private:
    int m_fd = -1;
};

/// A journal file, locked for writing by this process (see the file comment).
class Journal {
public:
    /// Opens (creating) the journal at `path` and locks it.
    /// \throws pissa::invalid_argument when another process holds it (naming `what`); io_error.
    Journal(std::filesystem::path path, const std::string& what)
        : m_path(std::move(path)), m_lock(m_path, false, what) {}

    const std::filesystem::path& path() const { return m_path; }

    /// The intact records, in order, up to the first damaged line (see the file comment).
    std::vector<nlohmann::json> read() {
        m_records = detail::parse_journal(detail::read_all(m_lock.fd(), m_path), m_intact_bytes);
        return m_records;
    }

    /// Keeps the first `count` records of the last read() and drops the rest from the file.
    void keep(std::size_t count) {
        pissa::detail::require(count <= m_records.size(), m_path.string(), ": keep() beyond the records read");
        std::uint64_t bytes = 0;
        for (std::size_t i = 0; i < count; ++i) bytes += line(m_records[i]).size();
        truncate_to(bytes);
        m_records.resize(count);
    }

    /// Empties the journal.
    void clear() {
        truncate_to(0);
        m_records.clear();
    }

    /// Appends `record` and flushes it to the disk.
    void append(const nlohmann::json& record) {
        const std::string text = line(record);
        const std::uint64_t at = m_intact_bytes;
        const char* p = text.data();
        std::size_t left = text.size();
        for (std::uint64_t offset = at; left > 0;) {
            const ssize_t n = ::pwrite(m_lock.fd(), p, left, static_cast<off_t>(offset));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) throw io_error(m_path.string() + ": write failed: " + detail::errno_text());
            p += n;
            left -= static_cast<std::size_t>(n);
            offset += static_cast<std::uint64_t>(n);
        }
        if (::fdatasync(m_lock.fd()) != 0) throw io_error(m_path.string() + ": cannot flush: " + detail::errno_text());
        m_intact_bytes = at + text.size();
        m_records.push_back(record);
    }

    /// The records read or appended so far.
    const std::vector<nlohmann::json>& records() const { return m_records; }

private:
    static std::string line(const nlohmann::json& record) {
        const std::string json_text = record.dump();
        Checksum sum;
        sum.update(json_text.data(), json_text.size());
        return sum.hex() + " " + json_text + "\n";
    }

    void truncate_to(std::uint64_t bytes) {
        if (::ftruncate(m_lock.fd(), static_cast<off_t>(bytes)) != 0 || ::fdatasync(m_lock.fd()) != 0)
            throw io_error(m_path.string() + ": cannot truncate: " + detail::errno_text());
        m_intact_bytes = bytes;
    }

    std::filesystem::path m_path;
    FileLock m_lock;
    std::vector<nlohmann::json> m_records;
    std::uint64_t m_intact_bytes = 0;
};

/// Reads the intact records of a journal without locking it (another process may be appending;
/// a record it is writing is simply not there yet). Empty when the file does not exist.
inline std::vector<nlohmann::json> read_journal(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return {};
    const detail::FdCloser closer{fd};
    std::uint64_t intact = 0;
    return detail::parse_journal(detail::read_all(fd, path), intact);
}

}  // namespace pissa::io

/// \file io/safetensors.hpp
/// \brief safetensors files: a memory-mapped, validating reader with zero-copy views, and an atomic
/// streaming writer.
///
/// Reading: SafetensorsFile maps the file read-only and validates its header completely
/// (io/safetensors_header.hpp) before anything can be accessed, so bytes(t) always lies inside the
/// mapping. Nothing is copied: a checkpoint of any size costs its page cache, not heap.
///
/// Writing: SafetensorsWriter takes the full list of tensors first (the header must precede the data),
/// writes the header padded with spaces to 8 bytes, then receives each tensor's bytes in order and
/// streams them to a temporary file beside the target; commit() renames it into place. A writer
/// destroyed without commit() removes its temporary file, so a failure never leaves a partial file.
///
/// POSIX only (mmap, mkstemp, rename). Data is little-endian, as the format requires; pissa only
/// supports little-endian hosts.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/dtype.hpp>
#include <pissa/io/safetensors_header.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace pissa::io {

static_assert(sizeof(void*) == 8, "pissa::io needs a 64-bit host");

/// Thrown when the operating system refuses a file operation (open, map, write, rename).
class io_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {

inline std::string errno_text() { return std::strerror(errno); }

/// A read-only private mapping of a whole file (empty files map to nothing).
class MappedFile {
public:
    explicit MappedFile(const std::filesystem::path& path) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw io_error(path.string() + ": cannot open: " + errno_text());
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            ::close(fd);
            throw io_error(path.string() + ": cannot stat: " + errno_text());
        }
        if (!S_ISREG(st.st_mode)) {
            ::close(fd);
            throw format_error(path.string() + ": not a regular file");
        }
        m_size = static_cast<std::size_t>(st.st_size);
        if (m_size > 0) {
            void* p = ::mmap(nullptr, m_size, PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) {
                ::close(fd);
                throw io_error(path.string() + ": cannot map: " + errno_text());
            }
            m_data = static_cast<const unsigned char*>(p);
        }
        ::close(fd);
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile() {
        if (m_data) ::munmap(const_cast<unsigned char*>(m_data), m_size);
    }
    const unsigned char* data() const { return m_data; }
    std::size_t size() const { return m_size; }

    /// Drops the whole pages inside [offset, offset + length) from memory (MADV_DONTNEED on a
    /// read-only private mapping: the file is untouched and the pages are faulted in again on use).
    void release(std::uint64_t offset, std::uint64_t length) const {
        const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
        const std::uint64_t first = (offset + page - 1) / page * page, last = (offset + length) / page * page;
        if (m_data && last > first)
            ::madvise(const_cast<unsigned char*>(m_data) + first, static_cast<std::size_t>(last - first), MADV_DONTNEED);
    }

    /// Asks the kernel to start reading [offset, offset + length) now (MADV_WILLNEED): one large
    /// read-ahead instead of page faults with a small read-ahead window, and overlapped with
    /// whatever the caller computes meanwhile. Only advice: a refusal changes nothing.
    void will_need(std::uint64_t offset, std::uint64_t length) const {
        const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
        const std::uint64_t first = offset / page * page, end = std::min<std::uint64_t>(offset + length, m_size);
        if (m_data && end > first)
            ::madvise(const_cast<unsigned char*>(m_data) + first, static_cast<std::size_t>(end - first), MADV_WILLNEED);
    }

private:
    const unsigned char* m_data = nullptr;
    std::size_t m_size = 0;
};

}  // namespace detail

/// A read-only view of one tensor's bytes inside a mapped file.
struct ByteView {
    const unsigned char* data = nullptr;
    std::size_t size = 0;
};

/// A validated, memory-mapped safetensors file.
///
/// \code
/// pissa::io::SafetensorsFile file("model.safetensors");
/// for (const auto& t : file.tensors()) std::cout << t.name << " " << dtype_name(t.dtype) << "\n";
/// auto bytes = file.bytes(file.at("lm_head.weight"));   // zero-copy
/// \endcode
class SafetensorsFile {
public:
    /// Maps and validates `path`.
    /// \throws pissa::io::format_error for a malformed file (message names the file and tensor),
    ///         pissa::io::io_error when the file cannot be opened or mapped.
    explicit SafetensorsFile(const std::filesystem::path& path) : m_path(path), m_map(path) {
        m_header = parse_safetensors_header(m_map.data(), m_map.size(), m_map.size(), path.string());
        for (std::size_t i = 0; i < m_header.tensors.size(); ++i) m_index.emplace(m_header.tensors[i].name, i);
    }

    const std::filesystem::path& path() const { return m_path; }
    /// Tensors in data order (ascending offsets).
    const std::vector<TensorInfo>& tensors() const { return m_header.tensors; }
    /// The "__metadata__" map (empty when the file has none).
    const std::map<std::string, std::string>& metadata() const { return m_header.metadata; }
    const SafetensorsHeader& header() const { return m_header; }
    std::size_t file_size() const { return m_map.size(); }

    /// The tensor called `name`, or nullptr.
    const TensorInfo* find(std::string_view name) const {
        const auto it = m_index.find(std::string(name));
        return it == m_index.end() ? nullptr : &m_header.tensors[it->second];
    }
    /// The tensor called `name`. \throws pissa::invalid_argument naming file and tensor when absent.
    const TensorInfo& at(std::string_view name) const {
        const TensorInfo* t = find(name);
        pissa::detail::require(t != nullptr, m_path.string(), ": no tensor '", name, "'");
        return *t;
    }
    /// The tensor's bytes, inside the mapping (validated at construction).
    ByteView bytes(const TensorInfo& t) const {
        return {m_map.data() + m_header.data_offset + t.begin, static_cast<std::size_t>(t.nbytes())};
    }

    /// Tells the kernel the tensor's pages are no longer needed (they are re-read from the file if
    /// touched again), so streaming through a large checkpoint keeps resident memory flat.
    void release(const TensorInfo& t) const { m_map.release(m_header.data_offset + t.begin, t.nbytes()); }

    /// Starts reading the tensor's pages in the background (see MappedFile::will_need).
    void prefetch(const TensorInfo& t) const { m_map.will_need(m_header.data_offset + t.begin, t.nbytes()); }

private:
    std::filesystem::path m_path;
    detail::MappedFile m_map;
    SafetensorsHeader m_header;
    std::unordered_map<std::string, std::size_t> m_index;
};

/// What the writer needs to know about a tensor before any data: name, dtype, shape.
struct TensorSpec {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<std::uint64_t> shape;
};

/// Streams a safetensors file: header first, then each tensor's bytes in the declared order, into a
/// temporary file beside `path` that commit() renames into place.
class SafetensorsWriter {
public:
    /// Creates the temporary file and writes the header.
    /// \throws pissa::invalid_argument for duplicate or non-UTF-8 names, or a size that overflows;
    ///         pissa::io::io_error when the file cannot be created.
    SafetensorsWriter(std::filesystem::path path, const std::vector<TensorSpec>& tensors,
                      const std::map<std::string, std::string>& metadata = {})
        : m_path(std::move(path)) {
        std::uint64_t offset = 0;
        std::map<std::string, int> seen;
        for (const auto& spec : tensors) {
            pissa::detail::require(spec.name != "__metadata__" && seen.emplace(spec.name, 0).second, m_path.string(),
                                   ": tensor name '", spec.name, "' is duplicated or reserved");
            TensorInfo info{spec.name, spec.dtype, spec.shape, offset, 0};
            std::uint64_t n = 1;
            for (auto d : spec.shape) pissa::detail::require(detail::mul_overflow(n, d, n), m_path.string(), ": tensor '",
                                                             spec.name, "': shape overflows");
            pissa::detail::require(detail::mul_overflow(n, dtype_size(spec.dtype), n), m_path.string(), ": tensor '",
                                   spec.name, "': size overflows");
            info.end = offset + n;
            offset = info.end;
            m_tensors.push_back(std::move(info));
        }
        const std::string header = serialize_safetensors_header(m_tensors, metadata);
        std::string templ = (m_path.parent_path() / ("." + m_path.filename().string() + ".tmp-XXXXXX")).string();
        if (m_path.parent_path().empty()) templ = "." + m_path.filename().string() + ".tmp-XXXXXX";
        m_fd = ::mkstemp(templ.data());
        if (m_fd < 0) throw io_error(m_path.string() + ": cannot create temporary file: " + detail::errno_text());
        m_tmp = templ;
        ::fchmod(m_fd, 0644);
        write_all(header.data(), header.size());
    }
    SafetensorsWriter(const SafetensorsWriter&) = delete;
    SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
    ~SafetensorsWriter() {
        if (m_fd >= 0) ::close(m_fd);
        if (!m_committed && !m_tmp.empty()) ::unlink(m_tmp.c_str());
    }

    /// The declared tensors with their offsets.
    const std::vector<TensorInfo>& tensors() const { return m_tensors; }
    /// Index of the next tensor write() expects.
    std::size_t next() const { return m_next; }

    /// Writes the next tensor's bytes. \throws pissa::invalid_argument when `size` differs from the
    /// declared shape x dtype size, or every tensor was already written.
    void write(const void* data, std::size_t size) {
        pissa::detail::require(m_next < m_tensors.size(), m_path.string(), ": more tensors written than declared");
        const TensorInfo& t = m_tensors[m_next];
        pissa::detail::require(size == t.nbytes(), m_path.string(), ": tensor '", t.name, "': got ", size,
                               " bytes, its shape and dtype need ", t.nbytes());
        write_all(data, size);
        ++m_next;
    }

    /// Flushes, closes and renames the file into place (replacing an existing file).
    /// \throws pissa::invalid_argument when tensors are missing; io_error when the OS refuses.
    void commit() {
        pissa::detail::require(m_next == m_tensors.size(), m_path.string(), ": only ", m_next, " of ", m_tensors.size(),
                               " tensors written");
        if (::fsync(m_fd) != 0 || ::close(m_fd) != 0) {
            m_fd = -1;
            throw io_error(m_path.string() + ": cannot flush: " + detail::errno_text());
        }
        m_fd = -1;
        if (::rename(m_tmp.c_str(), m_path.c_str()) != 0)
            throw io_error(m_path.string() + ": cannot rename into place: " + detail::errno_text());
        m_committed = true;
    }

private:
    void write_all(const void* data, std::size_t size) {
        const char* p = static_cast<const char*>(data);
        while (size > 0) {
            const ssize_t n = ::write(m_fd, p, size);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) throw io_error(m_path.string() + ": write failed: " + detail::errno_text());
            p += n;
            size -= static_cast<std::size_t>(n);
        }
    }

    std::filesystem::path m_path;
    std::string m_tmp;
    int m_fd = -1;
    bool m_committed = false;
    std::size_t m_next = 0;
    std::vector<TensorInfo> m_tensors;
};

/// A tensor held in memory, for small files (adapters, tests).
struct OwnedTensor {
    TensorSpec spec;
    std::vector<unsigned char> bytes;
};

/// Writes a whole file at once (atomically, as SafetensorsWriter).
inline void write_safetensors(const std::filesystem::path& path, const std::vector<OwnedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
    std::vector<TensorSpec> specs;
    for (const auto& t : tensors) specs.push_back(t.spec);
    SafetensorsWriter writer(path, specs, metadata);
    for (const auto& t : tensors) writer.write(t.bytes.data(), t.bytes.size());
    writer.commit();
}

}  // namespace pissa::io

/// \file io/safetensors.hpp
/// \brief safetensors files: a memory-mapped, validating reader with zero-copy views, and an atomic
/// streaming writer.
///
/// Reading: SafetensorsFile opens only a regular file (a FIFO, device or socket is refused before it is
/// opened), maps it read-only and validates its header completely (io/safetensors_header.hpp) before
/// anything can be accessed, so every tensor lies inside the file as it was when opened. read(t, ...)
/// copies a tensor's bytes with pread(2): if another process truncates the file meanwhile, that is an
/// io_error naming the file and tensor. bytes(t) is a zero-copy view into the mapping, which such a
/// truncation turns into SIGBUS on access; the library's own copies (copy_matrix_into, copy_matrix,
/// rewrite_checkpoint) all go through read().
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
#include <sys/syscall.h>
#include <unistd.h>

namespace pissa::io {

static_assert(sizeof(void*) == 8, "pissa::io needs a 64-bit host");

namespace detail {

inline std::string errno_text() { return std::strerror(errno); }

/// Closes a file descriptor at scope exit.
struct FdCloser {
    int fd;
    explicit FdCloser(int descriptor) : fd(descriptor) {}
    FdCloser(const FdCloser&) = delete;
    FdCloser& operator=(const FdCloser&) = delete;
    ~FdCloser() {
        if (fd >= 0) ::close(fd);
    }
};

/// What kind of non-regular file `mode` is, for messages.
inline const char* file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a folder";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISSOCK(mode)) return "a socket";
    if (S_ISCHR(mode) || S_ISBLK(mode)) return "a device";
    return "not a regular file";
}

/// Opens `path` for reading, refusing anything but a regular file (after following symlinks) before
/// it is opened: opening a FIFO for reading blocks until a writer appears, and a device or a socket
/// has no size to validate against. O_NONBLOCK covers a path swapped for a FIFO between the stat()
/// and the open() (the fstat() then refuses it); it changes nothing for a regular file.
/// \throws pissa::io::format_error for a non-regular file and for a path that names no readable
///         file (missing, a symlink loop, a dangling link, no permission: bad input, not a fault);
///         io_error when opening fails otherwise.
inline int open_regular_file(const std::filesystem::path& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        const int err = errno;
        const std::string message = path.string() + ": cannot open: " + errno_text();
        if (err == ENOENT || err == ELOOP || err == ENOTDIR || err == ENAMETOOLONG || err == EACCES)
            throw format_error(message);
        throw io_error(message);
    }
    if (!S_ISREG(st.st_mode))
        throw format_error(path.string() + ": not a regular file (" + file_kind(st.st_mode) + ")");
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw io_error(path.string() + ": cannot open: " + errno_text());
    if (::fstat(fd, &st) != 0) {
        const std::string why = errno_text();
        ::close(fd);
        throw io_error(path.string() + ": cannot stat: " + why);
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw format_error(path.string() + ": not a regular file (" + file_kind(st.st_mode) + ")");
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

/// rename(2) that fails with EEXIST instead of replacing an existing target (Linux renameat2).
inline int rename_no_replace(const std::filesystem::path& from, const std::filesystem::path& to) {
#if defined(SYS_renameat2)
    constexpr unsigned no_replace = 1;  // RENAME_NOREPLACE
    const long rc = ::syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), no_replace);
    if (rc == 0 || (errno != ENOSYS && errno != EINVAL)) return static_cast<int>(rc);
#endif
    // Without renameat2: link-free folders cannot be moved atomically without replacing; check
    // and rename (a narrow window instead of none).
    struct stat st {};
    if (::lstat(to.c_str(), &st) == 0) {
        errno = EEXIST;
        return -1;
    }
    return ::rename(from.c_str(), to.c_str());
}

/// Reads exactly `size` bytes at `offset` of `fd` into `out`, retrying short reads; returns how many
/// bytes were read, less than `size` only when the file ends first (it was truncated meanwhile).
/// \throws io_error (naming `what`) when the read fails.
inline std::size_t pread_full(int fd, void* out, std::size_t size, std::uint64_t offset, const std::string& what) {
    auto* p = static_cast<unsigned char*>(out);
    std::size_t done = 0;
    while (done < size) {
        const ssize_t n = ::pread(fd, p + done, size - done, static_cast<off_t>(offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw io_error(what + ": read failed: " + errno_text());
        if (n == 0) break;
        done += static_cast<std::size_t>(n);
    }
    return done;
}

/// A read-only private mapping of a whole regular file (empty files map to nothing), plus the open
/// descriptor, through which read() copies bytes out with pread(2).
///
/// The mapping is not safe against the file shrinking while it is in use: touching a page past the
/// new end raises SIGBUS. read() is: a file that got shorter gives a short read, reported as an
/// io_error. Copies therefore go through read(); the mapping serves zero-copy views.
class MappedFile {
public:
    explicit MappedFile(const std::filesystem::path& path) : m_fd(open_regular_file(path)) {
        struct stat st {};
        if (::fstat(m_fd, &st) != 0) {
            const std::string why = errno_text();
            ::close(m_fd);
            throw io_error(path.string() + ": cannot stat: " + why);
        }
        m_size = static_cast<std::size_t>(st.st_size);
        if (m_size > 0) {
            void* p = ::mmap(nullptr, m_size, PROT_READ, MAP_PRIVATE, m_fd, 0);
            if (p == MAP_FAILED) {
                const std::string why = errno_text();
                ::close(m_fd);
                throw io_error(path.string() + ": cannot map: " + why);
            }
            m_data = static_cast<const unsigned char*>(p);
        }
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile() {
        if (m_data) ::munmap(const_cast<unsigned char*>(m_data), m_size);
        ::close(m_fd);
    }
    const unsigned char* data() const { return m_data; }
    /// The size when the file was opened.
    std::size_t size() const { return m_size; }
    int fd() const { return m_fd; }

    /// Copies [offset, offset + size) of the file into `out` with pread(2); returns the bytes read,
    /// fewer than `size` when the file has been truncated since it was opened.
    std::size_t read(std::uint64_t offset, void* out, std::size_t size, const std::string& what) const {
        return pread_full(m_fd, out, size, offset, what);
    }

    /// Drops the whole pages inside [offset, offset + length) from memory (MADV_DONTNEED on a
    /// read-only private mapping: the file is untouched and the pages are faulted in again on use).
    void release(std::uint64_t offset, std::uint64_t length) const {
        const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
        const std::uint64_t first = (offset + page - 1) / page * page, last = (offset + length) / page * page;
        if (m_data && last > first)
            ::madvise(const_cast<unsigned char*>(m_data) + first, static_cast<std::size_t>(last - first),
                      MADV_DONTNEED);
    }

    /// Asks the kernel to start reading [offset, offset + length) into the page cache now
    /// (POSIX_FADV_WILLNEED): one large read-ahead instead of reads with a small read-ahead window,
    /// overlapped with whatever the caller computes meanwhile. It serves read() and the mapping
    /// alike, and touches no page itself (so it is harmless on a truncated file). Only advice: a
    /// refusal changes nothing.
    void will_need(std::uint64_t offset, std::uint64_t length) const {
        const std::uint64_t end = std::min<std::uint64_t>(offset + length, m_size);
        if (end > offset)
            ::posix_fadvise(m_fd, static_cast<off_t>(offset), static_cast<off_t>(end - offset), POSIX_FADV_WILLNEED);
    }

private:
    int m_fd = -1;
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
        m_header = read_header();
        m_index.reserve(m_header.tensors.size());
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
    /// The tensor's bytes, inside the mapping (validated at construction). Zero-copy, and therefore
    /// not safe against another process truncating the file meanwhile: reading a page past the new
    /// end raises SIGBUS. Copies should use read(), which reports a truncation as an io_error.
    ByteView bytes(const TensorInfo& t) const {
        return {m_map.data() + m_header.data_offset + t.begin, static_cast<std::size_t>(t.nbytes())};
    }

    /// Copies `size` bytes of tensor `t`, from byte `from` of its data, into `out` with pread(2).
    /// \throws io_error naming the file and tensor when the file has become shorter since it was
    ///         opened (or the read fails); pissa::invalid_argument when the range is outside the tensor.
    void read(const TensorInfo& t, std::uint64_t from, void* out, std::size_t size) const {
        pissa::detail::require(from <= t.nbytes() && size <= t.nbytes() - from, m_path.string(), ": tensor '", t.name,
                               "': bytes [", from, ", ", from + size, ") are outside its ", t.nbytes(), " bytes");
        const std::string what = m_path.string() + ": tensor '" + t.name + "'";
        const std::uint64_t offset = m_header.data_offset + t.begin + from;
        const std::size_t got = m_map.read(offset, out, size, what);
        if (got < size)
            throw io_error(pissa::detail::concat(what, ": the file is shorter than when it was opened (", m_map.size(),
                                                 " bytes): read ", got, " of ", size, " bytes at file offset ", offset,
                                                 "; was it truncated or replaced meanwhile?"));
    }

    /// Tells the kernel the tensor's pages are no longer needed (they are re-read from the file if
    /// touched again), so streaming through a large checkpoint keeps resident memory flat.
    void release(const TensorInfo& t) const { m_map.release(m_header.data_offset + t.begin, t.nbytes()); }

    /// Starts reading the tensor's pages in the background (see MappedFile::will_need).
    void prefetch(const TensorInfo& t) const { m_map.will_need(m_header.data_offset + t.begin, t.nbytes()); }

private:
    // The header is read with pread(2) rather than through the mapping, so that a file truncated
    // while it is being opened gives an error, not SIGBUS.
    SafetensorsHeader read_header() const {
        const std::string file = m_path.string();
        const std::uint64_t size = m_map.size();
        unsigned char length[8] = {};
        const auto first = static_cast<std::size_t>(std::min<std::uint64_t>(size, 8));
        if (m_map.read(0, length, first, file) < first)
            throw io_error(file + ": the file got shorter while being opened");
        if (size < 8) return parse_safetensors_header(length, first, size, file);  // throws "truncated"
        std::uint64_t n = 0;
        for (int i = 7; i >= 0; --i) n = (n << 8) | length[i];
        if (n > max_header_size || n > size - 8) return parse_safetensors_header(length, 8, size, file);  // throws
        std::vector<unsigned char> bytes(static_cast<std::size_t>(8 + n));
        if (m_map.read(0, bytes.data(), bytes.size(), file) < bytes.size())
            throw io_error(file + ": the file got shorter while being opened");
        return parse_safetensors_header(bytes.data(), bytes.size(), size, file);
    }

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

/// The tensors of a file written from `tensors` in order, packed without gaps from offset 0: what
/// every writer of this library lays out, so that the same tensors always give the same bytes.
/// \throws pissa::invalid_argument for a duplicate or reserved name or a size that overflows (naming `file`).
inline std::vector<TensorInfo> packed_layout(const std::vector<TensorSpec>& tensors, const std::string& file) {
    std::vector<TensorInfo> out;
    std::uint64_t offset = 0;
    std::map<std::string, int> seen;
    for (const auto& spec : tensors) {
        pissa::detail::require(spec.name != "__metadata__" && seen.emplace(spec.name, 0).second, file,
                               ": tensor name '", spec.name, "' is duplicated or reserved");
        TensorInfo info{spec.name, spec.dtype, spec.shape, offset, 0};
        std::uint64_t n = 1;
        for (auto d : spec.shape)
            pissa::detail::require(detail::mul_overflow(n, d, n), file, ": tensor '", spec.name, "': shape overflows");
        pissa::detail::require(detail::mul_overflow(n, dtype_size(spec.dtype), n), file, ": tensor '", spec.name,
                               "': size overflows");
        info.end = offset + n;
        offset = info.end;
        out.push_back(std::move(info));
    }
    return out;
}

/// A file written into a temporary file beside its target (`.NAME.tmp-XXXXXX`, mode 0644) and
/// renamed into place by commit(), so that the target is either untouched or complete: a writer
/// destroyed without commit() (an error, an exception) removes its temporary file. The shared core
/// of every binary file this library writes (safetensors, GGUF).
class AtomicFile {
public:
    /// Creates the temporary file. \throws pissa::io::io_error when it cannot be created.
    explicit AtomicFile(std::filesystem::path path) : m_path(std::move(path)) {
        std::string templ = (m_path.parent_path() / ("." + m_path.filename().string() + ".tmp-XXXXXX")).string();
        if (m_path.parent_path().empty()) templ = "." + m_path.filename().string() + ".tmp-XXXXXX";
        m_fd = ::mkstemp(templ.data());
        if (m_fd < 0) throw io_error(m_path.string() + ": cannot create temporary file: " + detail::errno_text());
        m_tmp = templ;
        ::fchmod(m_fd, 0644);
    }
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;
    ~AtomicFile() {
        if (m_fd >= 0) ::close(m_fd);
        if (!m_committed && !m_tmp.empty()) ::unlink(m_tmp.c_str());
    }

    /// The target path.
    const std::filesystem::path& path() const { return m_path; }

    /// Appends `size` bytes. \throws pissa::io::io_error naming the target when the write fails.
    void write(const void* data, std::size_t size) {
        const char* p = static_cast<const char*>(data);
        while (size > 0) {
            const ssize_t n = ::write(m_fd, p, size);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) throw io_error(m_path.string() + ": write failed: " + detail::errno_text());
            p += n;
            size -= static_cast<std::size_t>(n);
        }
    }

    /// Flushes, closes and renames the file into place. With `replace` an existing target is
    /// replaced; without it, a target that exists by then (another program wrote it meanwhile) is
    /// left alone and the commit fails (pissa::invalid_argument).
    /// \throws pissa::io::io_error when the OS refuses.
    void commit(bool replace = true) {
        if (::fsync(m_fd) != 0 || ::close(m_fd) != 0) {
            m_fd = -1;
            throw io_error(m_path.string() + ": cannot flush: " + detail::errno_text());
        }
        m_fd = -1;
        if (replace) {
            if (::rename(m_tmp.c_str(), m_path.c_str()) != 0)
                throw io_error(m_path.string() + ": cannot rename into place: " + detail::errno_text());
        } else if (detail::rename_no_replace(m_tmp, m_path) != 0) {
            if (errno == EEXIST)
                throw pissa::invalid_argument(m_path.string() +
                                              " appeared while this run was writing; leaving it as it is");
            throw io_error(m_path.string() + ": cannot rename into place: " + detail::errno_text());
        }
        m_committed = true;
    }

private:
    std::filesystem::path m_path;
    std::string m_tmp;
    int m_fd = -1;
    bool m_committed = false;
};

/// Streams a safetensors file: header first, then each tensor's bytes in the declared order, into a
/// temporary file beside `path` (AtomicFile) that commit() renames into place.
class SafetensorsWriter {
public:
    /// Creates the temporary file and writes the header.
    /// \throws pissa::invalid_argument for duplicate or non-UTF-8 names, or a size that overflows;
    ///         pissa::io::io_error when the file cannot be created.
    SafetensorsWriter(std::filesystem::path path, const std::vector<TensorSpec>& tensors,
                      const std::map<std::string, std::string>& metadata = {})
        : m_path(std::move(path)), m_tensors(packed_layout(tensors, m_path.string())), m_file(m_path) {
        const std::string header = serialize_safetensors_header(m_tensors, metadata);
        m_file.write(header.data(), header.size());
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
        pissa::detail::require(m_part == 0 && size == t.nbytes(), m_path.string(), ": tensor '", t.name, "': got ",
                               size, " bytes, its shape and dtype need ", t.nbytes() - m_part);
        m_file.write(data, size);
        ++m_next;
    }

    /// Writes the next `size` bytes of the current tensor, which may so be written in several parts
    /// (streaming a large tensor through a small buffer); once all its bytes are written, the next
    /// tensor becomes current. \throws pissa::invalid_argument when `size` exceeds what the tensor
    /// still needs, or every tensor was already written.
    void write_part(const void* data, std::size_t size) {
        pissa::detail::require(m_next < m_tensors.size(), m_path.string(), ": more tensors written than declared");
        const TensorInfo& t = m_tensors[m_next];
        pissa::detail::require(size <= t.nbytes() - m_part, m_path.string(), ": tensor '", t.name, "': got ", size,
                               " bytes, it needs only ", t.nbytes() - m_part, " more");
        m_file.write(data, size);
        m_part += size;
        if (m_part == t.nbytes()) {
            m_part = 0;
            ++m_next;
        }
    }

    /// Flushes, closes and renames the file into place (replacing an existing file).
    /// \throws pissa::invalid_argument when tensors are missing; io_error when the OS refuses.
    void commit() {
        pissa::detail::require(m_next == m_tensors.size(), m_path.string(), ": only ", m_next, " of ", m_tensors.size(),
                               " tensors written");
        m_file.commit();
    }

private:
    std::filesystem::path m_path;
    std::vector<TensorInfo> m_tensors;
    AtomicFile m_file;  // after m_tensors: a refused layout creates no temporary file
    std::size_t m_next = 0;
    std::uint64_t m_part = 0;  // bytes of tensor m_next written so far by write_part()
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

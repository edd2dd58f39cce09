/// \file io/partitioned_rewrite.hpp
/// \brief rewrite_checkpoint (io/checkpoint.hpp) cut into pieces that independent processes write
/// and a crashed process continues: the same output bytes, written as part files that are joined.
///
/// The work is the checkpoint's tensors in checkpoint order ("items"). A segment, the contiguous run
/// of items one process writes (io/shard.hpp), becomes one part file per output file it touches:
/// `<file>.part<first tensor>` holding the bytes that file has from there (the header too when the
/// part begins at the file's first tensor). Each output file is thus the concatenation of its
/// parts in order, and join_parts() makes it so: it extends the first part with the others and
/// renames it; when one segment covers a whole file, that is one rename.
///
/// A segment records its progress in a journal (io/journal.hpp), one record per completed run of
/// items: which items, which part, the byte range and its checksum, and the rewrite's own note on
/// the last item (e.g. the checksum of a side file it wrote). A record is appended only after the
/// bytes it describes are flushed to the disk. run_segment() with `resume` checks every record
/// against the part files (sizes, checksums) and the rewrite's note (verify_note), keeps the
/// records up to the first that does not hold, truncates the part to that point and goes on from
/// there; everything after a damaged record is redone. The last record of a finished segment is
/// `{"done": true, "parts": {name: size}}`.
#pragma once

#include <pissa/cancel.hpp>
#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/checksum.hpp>
#include <pissa/io/journal.hpp>
#include <pissa/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace pissa::io {

/// Where every tensor of a checkpoint goes in its rewrite (same files, names, order, dtypes and
/// shapes, packed as every writer of this library packs them).
struct RewriteLayout {
    struct File {
        std::string name;        ///< file name in the output folder
        std::string header;      ///< the rewritten file's header bytes
        std::size_t first_item;  ///< global index of its first tensor
        std::size_t items;       ///< its tensor count
    };
    struct Item {
        std::size_t file;      ///< index into files
        std::size_t tensor;    ///< index among the file's tensors
        std::uint64_t begin;   ///< first byte in the output file (header included)
        std::uint64_t nbytes;  ///< its size
    };
    std::vector<File> files;
    std::vector<Item> items;

    /// The name of the part of file `f` that begins at its tensor `tensor`.
    std::string part_name(std::size_t f, std::size_t tensor) const {
        return files[f].name + ".part" + std::to_string(tensor);
    }
    /// The byte where the part beginning at item `i` begins in its output file.
    std::uint64_t part_begin(std::size_t i) const { return items[i].tensor == 0 ? 0 : items[i].begin; }
};

/// The layout of the rewrite of `in`.
inline RewriteLayout rewrite_layout(const Checkpoint& in) {
    RewriteLayout layout;
    for (const auto& shard : in.shards()) {
        std::vector<TensorSpec> specs;
        for (const auto& t : shard->tensors()) specs.push_back({t.name, t.dtype, t.shape});
        const std::string name = shard->path().filename().string();
        const auto packed = packed_layout(specs, name);
        RewriteLayout::File file{name, serialize_safetensors_header(packed, shard->metadata()), layout.items.size(),
                                 packed.size()};
        for (std::size_t i = 0; i < packed.size(); ++i)
            layout.items.push_back(
                {layout.files.size(), i, file.header.size() + packed[i].begin, packed[i].end - packed[i].begin});
        layout.files.push_back(std::move(file));
    }
    return layout;
}

/// The rewrite of one item: fills `bytes` with its new bytes and returns true, or returns false to
/// copy it unchanged (see TensorRewrite). May set `note`, which its journal record keeps.
using ItemRewrite = std::function<bool(std::size_t item, const SafetensorsFile&, const TensorInfo&,
                                       std::vector<unsigned char>& bytes, std::string& note)>;
/// On resume: true when what `note` recorded for `item` still holds (e.g. its side file is intact).
using NoteCheck = std::function<bool(std::size_t item, const std::string& note)>;

/// What run_segment did.
struct SegmentReport {
    std::size_t resumed_items = 0;               ///< items found complete and verified in the journal
    std::map<std::string, std::uint64_t> parts;  ///< part file name -> size
};

namespace detail {

/// Whether part files are written with direct I/O (O_DIRECT), as they are unless the environment
/// sets PISSA_DIRECT_IO=0 (or the file system refuses it).
inline bool direct_io_enabled() {
    const char* v = std::getenv("PISSA_DIRECT_IO");
    return !(v && std::string(v) == "0");
}

/// A part file being written: appends, and flush() makes everything appended so far durable
/// (fdatasync(2)) before it returns.
///
/// Writes bypass the page cache (O_DIRECT) where the file system allows it: the bytes go from one
/// aligned 8 MiB staging buffer, reused for the whole file, straight to the device, instead of into
/// fresh page-cache pages that the kernel must allocate, fill and write back (most of a buffered
/// copy's system time). The staging buffer goes out in whole 4 KiB blocks; flush() also writes the
/// last, partial block (padded, then the file cut back to its size), and keeps it staged, so the
/// next appends complete it. Where O_DIRECT is refused (tmpfs, some network file systems) or
/// PISSA_DIRECT_IO=0, the same bytes are written with buffered write(2).
class PartFile {
public:
    static constexpr std::size_t block = 4096;  ///< O_DIRECT alignment (offsets, sizes, memory)

    PartFile(const std::filesystem::path& path, std::uint64_t keep) : m_path(path) {
        m_fd = -1;
#ifdef O_DIRECT
        if (direct_io_enabled()) m_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_DIRECT, 0644);
        m_direct = m_fd >= 0;
#endif
        if (m_fd < 0) m_fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (m_fd < 0) throw io_error(path.string() + ": cannot open: " + errno_text());
        if (::ftruncate(m_fd, static_cast<off_t>(keep)) != 0 || ::lseek(m_fd, static_cast<off_t>(keep), SEEK_SET) < 0) {
            ::close(m_fd);
            throw io_error(path.string() + ": cannot truncate: " + errno_text());
        }
        m_size = keep;
        if (m_direct) {
            m_stage = static_cast<unsigned char*>(std::aligned_alloc(block, stage_size));
            if (!m_stage) {
                ::close(m_fd);
                throw std::bad_alloc();
            }
            // The kept bytes of the last, partial block are staged again, to be rewritten whole.
            m_stage_at = keep / block * block;
            m_fill = static_cast<std::size_t>(keep - m_stage_at);
            if (m_fill > 0 && !read_back(m_fill)) {
                ::close(m_fd);
                std::free(m_stage);
                throw io_error(path.string() + ": cannot read back its last block: " + errno_text());
            }
        }
    }
    ~PartFile() {
        ::close(m_fd);
        std::free(m_stage);
    }
    PartFile(const PartFile&) = delete;
    PartFile& operator=(const PartFile&) = delete;

    void write(const void* data, std::size_t size) {
        const char* p = static_cast<const char*>(data);
        if (!m_direct) {
            write_buffered(p, size);
            return;
        }
        while (size > 0) {
            const std::size_t n = std::min(size, stage_size - m_fill);
            std::memcpy(m_stage + m_fill, p, n);
            m_fill += n;
            m_size += n;
            p += n;
            size -= n;
            if (m_fill == stage_size) write_stage(false);
        }
    }
    void flush() {
        if (m_direct && m_fill > 0) write_stage(true);
        if (::fdatasync(m_fd) != 0) throw io_error(m_path.string() + ": cannot flush: " + errno_text());
    }
    std::uint64_t size() const { return m_size; }
    bool direct() const { return m_direct; }

    /// Direct I/O only: where the next appended bytes go in the staging buffer, and how many fit
    /// there. A caller that reads its bytes straight into it (commit() then appends them) saves
    /// write()'s copy.
    std::pair<unsigned char*, std::size_t> stage_space() {
        pissa::detail::require(m_direct, m_path.string(), ": no staging buffer without direct I/O");
        return {m_stage + m_fill, stage_size - m_fill};
    }
    /// Appends the `bytes` just placed at stage_space().
    void commit(std::size_t bytes) {
        pissa::detail::require(m_direct && bytes <= stage_size - m_fill, m_path.string(), ": commit of ", bytes,
                               " bytes beyond the staging buffer");
        m_fill += bytes;
        m_size += bytes;
        if (m_fill == stage_size) write_stage(false);
    }

    /// Bytes [from, to) of the file (block-aligned, past size()) are being written ahead through
    /// another descriptor (WriteAhead). Until skip_written_ahead() or cancel_ahead(), flush() does
    /// not cut the file back to size(): its padded last block ends at or before `from`.
    void expect_ahead(std::uint64_t from, std::uint64_t to) {
        m_ahead_from = from;
        m_ahead_to = to;
    }
    /// Appends the bytes written ahead without writing them: size() must have reached the range.
    void skip_written_ahead() {
        pissa::detail::require(m_direct && m_size == m_ahead_from && m_ahead_to > m_ahead_from, m_path.string(),
                               ": no bytes written ahead at ", m_size);
        write_stage(false);  // whole blocks only: the range starts at a block boundary, so none stay
        m_stage_at = m_size = m_ahead_to;
        m_ahead_from = m_ahead_to = 0;
    }
    /// Forgets the bytes written ahead (they are appended again, the same bytes).
    void cancel_ahead() { m_ahead_from = m_ahead_to = 0; }

private:
    static constexpr std::size_t stage_size = std::size_t{8} << 20;  // a multiple of block

    void write_buffered(const char* p, std::size_t size) {
        while (size > 0) {
            const ssize_t n = ::write(m_fd, p, size);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) throw io_error(m_path.string() + ": write failed: " + errno_text());
            p += n;
            size -= static_cast<std::size_t>(n);
            m_size += static_cast<std::uint64_t>(n);
        }
    }

    /// pwrite(2) of [0, bytes) of the stage at m_stage_at, retrying short writes.
    void pwrite_stage(std::size_t bytes) {
        std::size_t done = 0;
        while (done < bytes) {
            const ssize_t n = ::pwrite(m_fd, m_stage + done, bytes - done, static_cast<off_t>(m_stage_at + done));
            if (n < 0 && errno == EINTR) continue;
#ifdef O_DIRECT
            // A file system that opens with O_DIRECT but wants another alignment: buffered from here.
            if (n < 0 && errno == EINVAL && (::fcntl(m_fd, F_GETFL) & O_DIRECT) &&
                ::fcntl(m_fd, F_SETFL, ::fcntl(m_fd, F_GETFL) & ~O_DIRECT) == 0)
                continue;
#endif
            if (n <= 0) throw io_error(m_path.string() + ": write failed: " + errno_text());
            done += static_cast<std::size_t>(n);
        }
    }

    /// Writes the staged whole blocks and keeps the partial one staged; with `partial`, writes
    /// that one too (padded to a block; the file is then cut back to its size).
    void write_stage(bool partial) {
        const std::size_t whole = m_fill / block * block, tail = m_fill - whole;
        const std::size_t bytes = partial && tail > 0 ? whole + block : whole;
        if (bytes > 0) {
            if (bytes > m_fill) std::memset(m_stage + m_fill, 0, bytes - m_fill);
            pwrite_stage(bytes);
            if (bytes > m_fill && m_ahead_to == 0 && ::ftruncate(m_fd, static_cast<off_t>(m_size)) != 0)
                throw io_error(m_path.string() + ": cannot truncate: " + errno_text());
        }
        if (whole > 0) {
            std::memmove(m_stage, m_stage + whole, tail);
            m_stage_at += whole;
            m_fill = tail;
        }
    }

    /// Reads the file's bytes [m_stage_at, m_stage_at + bytes) into the stage (a whole block read).
    bool read_back(std::size_t bytes) {
        std::size_t done = 0;
        while (done < bytes) {
            const ssize_t n = ::pread(m_fd, m_stage + done, block, static_cast<off_t>(m_stage_at + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return false;
            done += static_cast<std::size_t>(n);
        }
        return true;
    }

    std::filesystem::path m_path;
    int m_fd = -1;
    bool m_direct = false;
    std::uint64_t m_size = 0;
    unsigned char* m_stage = nullptr;  // direct I/O: the bytes of the file from m_stage_at on
    std::uint64_t m_stage_at = 0;      // a multiple of block
    std::size_t m_fill = 0;
    std::uint64_t m_ahead_from = 0, m_ahead_to = 0;  // bytes written ahead (expect_ahead), or 0, 0
};

/// The bytes of a run of items copied unchanged at the end of a part, written ahead of the items
/// before them through a descriptor of its own (O_DIRECT), so that copying them does not wait for
/// the last rewrite (a model's output layer after its last split). run_segment posts its pieces
/// to the writer thread, in order, between the writes of the items before the run; the bytes
/// before the run's first and after its last block boundary are left to the in-order appends.
/// It keeps the checksum of the whole run for the run's journal record. Any failure to open or
/// write (no O_DIRECT, another alignment) only marks it failed: the run is then copied in order.
class WriteAhead {
public:
    static constexpr std::uint64_t piece = std::uint64_t{32} << 20;  ///< bytes per piece (a multiple of the block)

    /// Items [first_item, end_item) of `layout`, in the part that begins at byte `part_origin` of
    /// their output file.
    WriteAhead(const Checkpoint& in, const RewriteLayout& layout, std::size_t first_item, std::size_t end_item,
               std::uint64_t part_origin)
        : m_in(in), m_layout(layout), m_first(first_item), m_end_item(end_item) {
        constexpr std::uint64_t block = PartFile::block;
        m_begin = layout.items[first_item].begin - part_origin;
        m_end = layout.items[end_item - 1].begin + layout.items[end_item - 1].nbytes - part_origin;
        m_aligned_begin = std::min((m_begin + block - 1) / block * block, m_end);
        m_aligned_end = std::max(m_end / block * block, m_aligned_begin);
        m_done = m_begin;
    }
    ~WriteAhead() {
        if (m_fd >= 0) ::close(m_fd);
        std::free(m_buffer);
    }
    WriteAhead(const WriteAhead&) = delete;
    WriteAhead& operator=(const WriteAhead&) = delete;

    std::uint64_t begin() const { return m_begin; }  ///< the run's first byte in the part
    std::uint64_t end() const { return m_end; }      ///< one past its last
    std::uint64_t aligned_begin() const { return m_aligned_begin; }
    std::uint64_t aligned_end() const { return m_aligned_end; }
    /// Whether there is a whole block to write ahead.
    bool worthwhile() const { return m_aligned_end > m_aligned_begin; }

    /// The end of the piece that starts at `at` (< end()): [begin, aligned_begin), then pieces of
    /// up to `piece` bytes to aligned_end, then [aligned_end, end).
    std::uint64_t piece_end(std::uint64_t at) const {
        if (at < m_aligned_begin) return m_aligned_begin;
        if (at < m_aligned_end) return std::min(at + piece, m_aligned_end);
        return m_end;
    }

    /// Reads and checksums the piece at `at` (the pieces in order) and writes its whole blocks
    /// into the part file at `path`. \throws io_error when a source file cannot be read.
    void write_piece(const std::filesystem::path& path, std::uint64_t at) {
        pissa::detail::require(at == m_done, path.string(), ": the pieces written ahead are out of order");
        const std::uint64_t to = piece_end(at);
        const auto size = static_cast<std::size_t>(to - at);
        if (!m_buffer) {
            m_buffer = static_cast<unsigned char*>(std::aligned_alloc(PartFile::block, piece));
            if (!m_buffer) throw std::bad_alloc();
        }
        read(at, to, m_buffer);
        m_sum.update(m_buffer, size);
        m_done = to;
        if (m_failed || at < m_aligned_begin || to > m_aligned_end) return;
#ifdef O_DIRECT
        if (m_fd < 0) m_fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC | O_DIRECT);
#endif
        for (std::size_t done = 0; !m_failed && done < size;) {
            const ssize_t n =
                m_fd < 0 ? -1 : ::pwrite(m_fd, m_buffer + done, size - done, static_cast<off_t>(at + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) m_failed = true;
            else done += static_cast<std::size_t>(n);
        }
    }

    /// Whether every piece was written (and the checksum covers the whole run).
    bool complete() const { return !m_failed && m_done == m_end; }
    const Checksum& checksum() const { return m_sum; }

    /// Reads the run's bytes [from, to) (offsets in the part) into `out`.
    void read(std::uint64_t from, std::uint64_t to, unsigned char* out) const {
        const std::uint64_t origin = m_layout.items[m_first].begin - m_begin;
        for (std::size_t i = m_first; i < m_end_item && from < to; ++i) {
            const auto& item = m_layout.items[i];
            const std::uint64_t b = item.begin - origin, e = b + item.nbytes;
            if (e <= from || b >= to) continue;
            const std::uint64_t lo = std::max(from, b), hi = std::min(to, e);
            const SafetensorsFile& shard = *m_in.shards()[item.file];
            shard.read(shard.tensors()[item.tensor], lo - b, out + (lo - from), static_cast<std::size_t>(hi - lo));
        }
    }

private:
    const Checkpoint& m_in;
    const RewriteLayout& m_layout;
    std::size_t m_first, m_end_item;
    std::uint64_t m_begin = 0, m_end = 0, m_aligned_begin = 0, m_aligned_end = 0, m_done = 0;
    Checksum m_sum;
    unsigned char* m_buffer = nullptr;
    int m_fd = -1;
    bool m_failed = false;
};

/// One background thread that runs tasks in the order they are posted, so that writing, checksumming
/// and flushing a segment's output overlaps with reading and splitting the next tensors. It also
/// keeps a pool of tensor buffers (`buffers` of them): take_buffer() waits for a free one, which
/// bounds how far the producer runs ahead (memory: `buffers` times the largest rewritten tensor).
/// The first task that throws stops the thread's work: later tasks are dropped and the error is
/// rethrown to the producer by post(), take_buffer() or finish().
class WriterThread {
public:
    /// `reserve`: bytes each buffer is allocated for up front (the largest tensor the producer will
    /// put in it), so that a buffer is never reallocated, and its pages faulted in, more than once.
    WriterThread(std::size_t buffers, std::size_t reserve) : m_pool(buffers), m_thread([this] { run(); }) {
        for (auto& b : m_pool) reserve_buffer(b, reserve);
    }
    WriterThread(const WriterThread&) = delete;
    WriterThread& operator=(const WriterThread&) = delete;
    /// Runs the tasks still queued (unless one failed) and joins the thread; never throws.
    ~WriterThread() {
        {
            std::lock_guard<std::mutex> lock(m_mutex);
            m_closing = true;
        }
        m_wake.notify_all();
        m_thread.join();
    }

    /// Queues `task`. \throws whatever an earlier task threw.
    void post(std::function<void()> task) {
        std::lock_guard<std::mutex> lock(m_mutex);
        if (m_error) std::rethrow_exception(m_error);
        m_tasks.push_back(std::move(task));
        m_wake.notify_all();
    }

    /// A buffer from the pool (its capacity kept from earlier use), waiting until one is free.
    /// \throws whatever a task threw.
    std::vector<unsigned char> take_buffer() {
        std::unique_lock<std::mutex> lock(m_mutex);
        m_wake.wait(lock, [this] { return m_error || !m_pool.empty(); });
        if (m_error) std::rethrow_exception(m_error);
        std::vector<unsigned char> b = std::move(m_pool.back());
        m_pool.pop_back();
        return b;
    }

    /// Puts a buffer back into the pool (from either thread).
    void return_buffer(std::vector<unsigned char>&& b) {
        std::lock_guard<std::mutex> lock(m_mutex);
        m_pool.push_back(std::move(b));
        m_wake.notify_all();
    }

    /// Waits until every queued task has run. \throws whatever a task threw.
    void finish() {
        std::unique_lock<std::mutex> lock(m_mutex);
        m_wake.wait(lock, [this] { return m_error || (m_tasks.empty() && !m_busy); });
        if (m_error) std::rethrow_exception(m_error);
    }

private:
    /// Allocates `b` for `bytes` and asks for transparent huge pages on it (Linux; advice only):
    /// one page fault per 2 MiB instead of per 4 KiB when it is first filled.
    static void reserve_buffer(std::vector<unsigned char>& b, std::size_t bytes) {
        if (bytes == 0) return;
        b.reserve(bytes);
#ifdef MADV_HUGEPAGE
        constexpr std::uintptr_t huge = std::uintptr_t{2} << 20;
        const auto begin = reinterpret_cast<std::uintptr_t>(b.data()), end = begin + bytes;
        const std::uintptr_t first = (begin + huge - 1) / huge * huge, last = end / huge * huge;
        if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
    }

    void run() {
        std::unique_lock<std::mutex> lock(m_mutex);
        for (;;) {
            m_wake.wait(lock, [this] { return m_closing || !m_tasks.empty(); });
            if (m_tasks.empty()) return;  // closing, nothing left
            std::function<void()> task = std::move(m_tasks.front());
            m_tasks.pop_front();
            if (m_error) continue;  // dropped (its captures, buffers included, are freed here)
            m_busy = true;
            lock.unlock();
            std::exception_ptr error;
            try {
                task();
            } catch (...) {
                error = std::current_exception();
            }
            task = nullptr;
            lock.lock();
            m_busy = false;
            if (error && !m_error) m_error = error;
            m_wake.notify_all();
        }
    }

    std::mutex m_mutex;
    std::condition_variable m_wake;
    std::deque<std::function<void()>> m_tasks;
    std::vector<std::vector<unsigned char>> m_pool;
    std::exception_ptr m_error;
    bool m_busy = false;
    bool m_closing = false;
    std::thread m_thread;  // last: started once everything above is initialised
};

/// The checksum of bytes [begin, end) of the file at `path`; nullopt when it is shorter.
inline std::optional<std::string> range_checksum(const std::filesystem::path& path, std::uint64_t begin,
                                                 std::uint64_t end) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return std::nullopt;
    const detail::FdCloser closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0 || static_cast<std::uint64_t>(st.st_size) < end) return std::nullopt;
    return checksum_of_range(fd, begin, end - begin, path.string()).hex();
}

}  // namespace detail

/// Writes items [first, last) of `in` as part files in `parts_dir`, journaled in `journal` whose
/// first record must be `plan` (an identifier of the whole job: a journal of another job is
/// discarded). Without `resume` the segment starts over; with it, it continues after the verified
/// records (see the file comment). `progress` is called before each item with its index within
/// the segment and the segment's size. Parts that an interrupted join already moved into
/// `joined_dir` are left for join_parts to check.
///
/// Overlap: `rewrite` (and `progress`) run on the calling thread, item after item; the output runs
/// on one writer thread (WriterThread) in the same order: a rewritten item's bytes are written,
/// checksummed, flushed (fdatasync) and journaled there while the caller rewrites the next ones,
/// and unchanged items are copied there entirely (pread(2) into the part's direct-I/O staging
/// buffer, or through the writer's own 16 MiB buffer where writes are buffered).
/// Two item buffers alternate, so memory is about twice the largest rewritten item;
/// `buffer_bytes` (that largest item, if known) allocates them once up front. Every guarantee of
/// the file comment holds as in a sequential run: a record is appended only after the bytes it
/// describes are flushed, in item order.
/// `copied_unchanged` names items `rewrite` would decline (it is not called for those of the run
/// below): the run of them that ends the segment's last part is written ahead (WriteAhead), piece
/// by piece after each rewritten item of that part, and journaled as one record once it is
/// reached in order, so that the output layer after a model's last split costs no wait.
/// \throws io_error when reading or writing fails; whatever `rewrite` throws (the journal then
///         holds the items completed before it: the writer finishes them first).
inline SegmentReport run_segment(const Checkpoint& in, const RewriteLayout& layout, std::size_t first, std::size_t last,
                                 const std::filesystem::path& parts_dir, Journal& journal, const nlohmann::json& plan,
                                 bool resume, const ItemRewrite& rewrite, const NoteCheck& check_note,
                                 const RewriteProgress& progress = {}, const std::filesystem::path& joined_dir = {},
                                 std::uint64_t buffer_bytes = 0,
                                 const std::function<bool(std::size_t)>& copied_unchanged = {}) {
    constexpr std::uint64_t record_every = std::uint64_t{256} << 20;  // bytes of copied tensors per record
    constexpr std::uint64_t copy_piece = std::uint64_t{16} << 20;
    SegmentReport report;
    auto part_of = [&](std::size_t i) {
        const std::size_t f = layout.items[i].file;
        const std::size_t begin = std::max(first, layout.files[f].first_item);
        return layout.part_name(f, layout.items[begin].tensor);
    };

    // Where to go on from: the verified records.
    std::size_t next = first;
    std::string part;            // part of the last verified record
    std::uint64_t part_end = 0;  // its size there
    const auto records = resume ? journal.read() : std::vector<nlohmann::json>{};
    std::size_t kept = 0;
    if (!records.empty() && records[0] == nlohmann::json{{"plan", plan}}) {
        kept = 1;
        for (std::size_t r = 1; r < records.size(); ++r) {
            const auto& rec = records[r];
            if (rec.contains("done")) {
                if (next != last) break;
                ++kept;
                break;
            }
            if (!rec.contains("from") || rec.value("from", std::size_t{0}) != next || next >= last) break;
            const std::size_t to = rec.value("to", std::size_t{0});
            const std::string name = rec.value("part", std::string());
            if (to <= next || to > last || name != part_of(next) || name != part_of(to - 1)) break;
            const std::uint64_t begin = rec.value("begin", std::uint64_t{0}), end = rec.value("end", std::uint64_t{0});
            if (begin != (name == part ? part_end : 0)) break;
            const bool joined = !joined_dir.empty() && !detail::path_exists(parts_dir / name) &&
                                detail::path_exists(joined_dir / layout.files[layout.items[next].file].name);
            if (!joined) {  // a part joined already is checked by join_parts instead
                const auto sum = detail::range_checksum(parts_dir / name, begin, end);
                if (!sum || *sum != rec.value("sum", std::string())) break;
            }
            if (rec.contains("note") && !(check_note && check_note(to - 1, rec.value("note", std::string())))) break;
            part = name;
            part_end = end;
            report.parts[name] = end;
            next = to;
            ++kept;
        }
    }
    if (kept == 0) {
        journal.clear();
        journal.append({{"plan", plan}});
    } else {
        journal.keep(kept);
    }
    report.resumed_items = next - first;
    if (journal.records().back().contains("done")) return report;

    // The writer thread's state: the part being written, its running checksum and the open record.
    // Once the loop runs, only tasks on the writer thread touch it (and the journal).
    std::unique_ptr<detail::PartFile> out;
    std::string out_name;
    Checksum sum;
    std::uint64_t record_begin = 0;
    std::size_t record_from = next;
    std::vector<unsigned char> copy_buffer;  // the writer's, for unchanged tensors
    auto record = [&](std::size_t to, const std::string& note) {
        out->flush();
        nlohmann::json rec = {{"from", record_from},   {"to", to},           {"part", out_name},
                              {"begin", record_begin}, {"end", out->size()}, {"sum", sum.hex()}};
        if (!note.empty()) rec["note"] = note;
        journal.append(rec);
        report.parts[out_name] = out->size();
        record_from = to;
        record_begin = out->size();
        sum = Checksum();
    };
    // Copies item i unchanged (on the writer thread): read with pread(2) (a shard truncated
    // meanwhile is an io_error, not SIGBUS) straight into the part's staging buffer with direct
    // I/O, else through the writer's own buffer; written and checksummed.
    auto copy_item = [&](std::size_t i) {
        const SafetensorsFile& shard = *in.shards()[layout.items[i].file];
        const TensorInfo& t = shard.tensors()[layout.items[i].tensor];
        for (std::uint64_t at = 0; at < t.nbytes();) {
            const std::uint64_t left = t.nbytes() - at;
            unsigned char* bytes = nullptr;
            std::size_t room = 0;
            if (out->direct()) {
                std::tie(bytes, room) = out->stage_space();
            } else {
                room = static_cast<std::size_t>(std::min(left, copy_piece));
                if (copy_buffer.size() < room) copy_buffer.resize(room);
                bytes = copy_buffer.data();
            }
            const auto piece = static_cast<std::size_t>(std::min<std::uint64_t>(left, room));
            shard.read(t, at, bytes, piece);
            sum.update(bytes, piece);
            if (out->direct()) out->commit(piece);
            else out->write(bytes, piece);
            at += piece;
        }
        shard.release(t);
    };

    // The run of unchanged items that ends the segment's last part, when an item of that part
    // precedes it in this segment (the pieces then go out between that part's rewrites).
    std::unique_ptr<detail::WriteAhead> ahead;
    std::size_t ahead_item = last;  // where the run starts (last: no run)
    if (copied_unchanged && next < last && detail::direct_io_enabled()) {
        const std::string tail_part = part_of(last - 1);
        std::size_t j = last;
        while (j > next && part_of(j - 1) == tail_part && copied_unchanged(j - 1)) --j;
        if (j > next && j < last && part_of(j - 1) == tail_part) {
            const std::size_t part_first = std::max(first, layout.files[layout.items[j].file].first_item);
            ahead = std::make_unique<detail::WriteAhead>(in, layout, j, last, layout.part_begin(part_first));
            if (ahead->worthwhile()) ahead_item = j;
            else ahead.reset();
        }
    }
    // Writes the run in order: the bytes written ahead are skipped when every piece went out and
    // the run starts its own record; otherwise the run is copied like any other item.
    auto finish_ahead = [&] {
        const bool skip =
            ahead->complete() && out->direct() && out->size() == ahead->begin() && record_begin == out->size();
        if (skip) {
            std::vector<unsigned char> edge(detail::PartFile::block);
            const auto append = [&](std::uint64_t from, std::uint64_t to) {
                ahead->read(from, to, edge.data());
                out->write(edge.data(), static_cast<std::size_t>(to - from));
            };
            append(ahead->begin(), ahead->aligned_begin());
            out->skip_written_ahead();
            append(ahead->aligned_end(), ahead->end());
            sum = ahead->checksum();
            for (std::size_t k = ahead_item; k < last; ++k)
                in.shards()[layout.items[k].file]->release(
                    in.shards()[layout.items[k].file]->tensors()[layout.items[k].tensor]);
        } else {
            out->cancel_ahead();
            for (std::size_t k = ahead_item; k < last; ++k) copy_item(k);
        }
        record(last, "");
    };

    // Declared after everything its tasks use: on an exception its destructor finishes the queued
    // tasks (so the journal holds every item handed over before it) and joins the thread first.
    detail::WriterThread writer(2, static_cast<std::size_t>(buffer_bytes));
    std::uint64_t ahead_posted = ahead ? ahead->begin() : 0;  // where the next piece starts
    auto post_ahead_piece = [&] {
        const std::uint64_t at = ahead_posted;
        ahead_posted = ahead->piece_end(at);
        writer.post([&, at] {
            if (at == ahead->begin()) out->expect_ahead(ahead->aligned_begin(), ahead->aligned_end());
            ahead->write_piece(parts_dir / out_name, at);
        });
    };
    std::string current_part;  // the main thread's view of which part the writer is on
    for (std::size_t i = next; i < last; ++i) {
        const auto& item = layout.items[i];
        const auto& file = layout.files[item.file];
        const SafetensorsFile& shard = *in.shards()[item.file];
        const TensorInfo& t = shard.tensors()[item.tensor];
        if (part_of(i) != current_part) {
            current_part = part_of(i);
            const bool continuing = current_part == part;  // resuming inside the part of the last record
            const bool header = !continuing && item.tensor == 0 && i == std::max(first, file.first_item);
            writer.post([&, &file = file, i, name = current_part, continuing, header] {
                out_name = name;
                out = std::make_unique<detail::PartFile>(parts_dir / out_name, continuing ? part_end : 0);
                record_begin = out->size();
                record_from = i;
                sum = Checksum();
                if (header) {
                    out->write(file.header.data(), file.header.size());
                    sum.update(file.header.data(), file.header.size());
                }
            });
        }
        if (i == ahead_item) {  // the rest of the segment is the run: its last pieces, then in order
            while (ahead_posted < ahead->end()) post_ahead_piece();
            for (std::size_t k = i; k < last; ++k) {
                throw_if_cancelled();
                if (progress)
                    progress(k - first, last - first,
                             in.shards()[layout.items[k].file]->tensors()[layout.items[k].tensor]);
            }
            writer.post(finish_ahead);
            break;
        }
        if (i == next) shard.prefetch(t);
        if (item.tensor + 1 < file.items && i + 1 < last) shard.prefetch(shard.tensors()[item.tensor + 1]);
        throw_if_cancelled();
        if (progress) progress(i - first, last - first, t);
        const bool part_ends = i + 1 == last || layout.items[i + 1].file != item.file;
        std::string note;
        std::vector<unsigned char> bytes = writer.take_buffer();
        if (rewrite && rewrite(i, shard, t, bytes, note)) {
            pissa::detail::require(bytes.size() == t.nbytes(), shard.path().string(), ": tensor '", t.name,
                                   "': the rewrite gave ", bytes.size(), " bytes, its shape and dtype need ",
                                   t.nbytes());
            // Written, checksummed, flushed and journaled on the writer thread while this thread
            // goes on with the next items; the buffer comes back to the pool afterwards.
            writer.post([&, i, b = std::move(bytes), note = std::move(note)]() mutable {
                out->write(b.data(), b.size());
                sum.update(b.data(), b.size());
                record(i + 1, note);
                writer.return_buffer(std::move(b));
            });
            if (ahead && ahead_posted < ahead->end() && current_part == part_of(ahead_item)) post_ahead_piece();
        } else {
            writer.return_buffer(std::move(bytes));
            writer.post([&, i, part_ends] {
                copy_item(i);
                if (part_ends || out->size() - record_begin >= record_every) record(i + 1, "");
            });
            continue;
        }
        shard.release(t);
    }
    writer.finish();
    nlohmann::json parts = nlohmann::json::object();
    for (const auto& [name, size] : report.parts) parts[name] = size;
    journal.append({{"done", true}, {"parts", parts}});
    return report;
}

/// The parts of output file `f` in order: name and, from the segments' `done` records, size.
/// \throws format_error when a segment that touches the file has not recorded its part.
inline std::vector<std::pair<std::string, std::uint64_t>> parts_of_file(
    const RewriteLayout& layout, const std::vector<std::size_t>& bounds, std::size_t f,
    const std::vector<std::map<std::string, std::uint64_t>>& done_parts, const std::filesystem::path& journal_dir) {
    std::vector<std::pair<std::string, std::uint64_t>> out;
    const auto& file = layout.files[f];
    for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
        const std::size_t lo = std::max(bounds[s], file.first_item),
                          hi = std::min(bounds[s + 1], file.first_item + file.items);
        if (lo >= hi) continue;
        const std::string name = layout.part_name(f, layout.items[lo].tensor);
        const auto it = done_parts[s].find(name);
        if (it == done_parts[s].end())
            throw format_error(journal_dir.string() + ": shard " + std::to_string(s) + " recorded no part " + name);
        out.emplace_back(name, it->second);
    }
    return out;
}

/// Called before each output file is joined: its index, the file count, its name.
using JoinProgress = std::function<void(std::size_t index, std::size_t count, const std::string& file)>;

/// Joins the parts of every output file: `parts_dir/<file>.part<k>` -> `out_dir/<file>`. Safe to
/// run again after a crash: a file already joined is checked (its size, and every record's
/// checksum at its place when `records` are given) and its leftover parts removed; a first part
/// that was being extended is cut back to its own size first.
/// \throws format_error naming the part when a part is missing or has the wrong size (rerun its
///         segment with resume), or a joined file does not hold; io_error when writing fails.
inline void join_parts(const RewriteLayout& layout, const std::vector<std::size_t>& bounds,
                       const std::vector<std::map<std::string, std::uint64_t>>& done_parts,
                       const std::vector<std::vector<nlohmann::json>>& records, const std::filesystem::path& parts_dir,
                       const std::filesystem::path& out_dir, const JoinProgress& progress = {}) {
    namespace fs = std::filesystem;
    for (std::size_t f = 0; f < layout.files.size(); ++f) {
        if (progress) progress(f, layout.files.size(), layout.files[f].name);
        const auto parts = parts_of_file(layout, bounds, f, done_parts, parts_dir);
        std::uint64_t total = 0;
        for (const auto& p : parts) total += p.second;
        const fs::path dest = out_dir / layout.files[f].name;
        std::error_code ec;
        if (parts.empty()) {  // a file without tensors: its header is all of it
            detail::write_text_file(dest, layout.files[f].header);
            continue;
        }
        if (fs::exists(dest, ec)) {
            // Joined before a crash: check it before trusting it.
            const auto size = fs::file_size(dest, ec);
            if (ec || size != total)
                throw format_error(dest.string() + ": joined file has " + std::to_string(size) + " bytes, the parts " +
                                   std::to_string(total) + "; remove it and join again");
            std::map<std::string, std::uint64_t> base;  // part -> its offset in dest
            std::uint64_t at = 0;
            for (const auto& p : parts) base[p.first] = at, at += p.second;
            for (const auto& journal : records)
                for (const auto& rec : journal) {
                    const auto it = base.find(rec.value("part", std::string()));
                    if (it == base.end() || rec.contains("done")) continue;
                    const auto sum = detail::range_checksum(dest, it->second + rec.value("begin", std::uint64_t{0}),
                                                            it->second + rec.value("end", std::uint64_t{0}));
                    if (!sum || *sum != rec.value("sum", std::string()))
                        throw format_error(dest.string() + ": the bytes of part " + it->first +
                                           " do not match their checksum; remove it and join again");
                }
            for (std::size_t k = 1; k < parts.size(); ++k) fs::remove(parts_dir / parts[k].first, ec);
            continue;
        }
        for (std::size_t k = 0; k < parts.size(); ++k) {
            const fs::path p = parts_dir / parts[k].first;
            const auto size = fs::file_size(p, ec);
            if (ec || size < parts[k].second || (k > 0 && size != parts[k].second))
                throw format_error(p.string() + ": missing or " + std::to_string(ec ? 0 : size) + " bytes, " +
                                   std::to_string(parts[k].second) + " recorded; rerun its shard with resume");
        }
        const fs::path head = parts_dir / parts[0].first;
        detail::PartFile joined(head, parts[0].second);  // cut back what an interrupted join appended
        std::vector<unsigned char> buffer;
        for (std::size_t k = 1; k < parts.size(); ++k) {
            const fs::path p = parts_dir / parts[k].first;
            const int fd = detail::open_regular_file(p);
            const detail::FdCloser closer{fd};
            constexpr std::size_t piece = std::size_t{16} << 20;
            buffer.resize(static_cast<std::size_t>(std::min<std::uint64_t>(parts[k].second, piece)));
            for (std::uint64_t at = 0; at < parts[k].second;) {
                const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(parts[k].second - at, piece));
                if (detail::pread_full(fd, buffer.data(), n, at, p.string()) < n)
                    throw io_error(p.string() + ": got shorter while being joined");
                joined.write(buffer.data(), n);
                at += n;
            }
        }
        joined.flush();
        if (::rename(head.c_str(), dest.c_str()) != 0)
            throw io_error(dest.string() + ": cannot rename into place: " + detail::errno_text());
        for (std::size_t k = 1; k < parts.size(); ++k) fs::remove(parts_dir / parts[k].first, ec);
    }
}

}  // namespace pissa::io

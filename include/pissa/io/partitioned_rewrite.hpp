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
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
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

/// A part file being written: appends with write(2), flushes with fdatasync(2).
class PartFile {
public:
    PartFile(const std::filesystem::path& path, std::uint64_t keep) : m_path(path) {
        m_fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (m_fd < 0) throw io_error(path.string() + ": cannot open: " + errno_text());
        if (::ftruncate(m_fd, static_cast<off_t>(keep)) != 0 || ::lseek(m_fd, static_cast<off_t>(keep), SEEK_SET) < 0) {
            ::close(m_fd);
            throw io_error(path.string() + ": cannot truncate: " + errno_text());
        }
        m_size = keep;
    }
    ~PartFile() { ::close(m_fd); }
    PartFile(const PartFile&) = delete;
    PartFile& operator=(const PartFile&) = delete;

    void write(const void* data, std::size_t size) {
        const char* p = static_cast<const char*>(data);
        while (size > 0) {
            const ssize_t n = ::write(m_fd, p, size);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) throw io_error(m_path.string() + ": write failed: " + errno_text());
            p += n;
            size -= static_cast<std::size_t>(n);
            m_size += static_cast<std::uint64_t>(n);
        }
    }
    void flush() {
        if (::fdatasync(m_fd) != 0) throw io_error(m_path.string() + ": cannot flush: " + errno_text());
    }
    std::uint64_t size() const { return m_size; }

private:
    std::filesystem::path m_path;
    int m_fd = -1;
    std::uint64_t m_size = 0;
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
/// \throws io_error when reading or writing fails; whatever `rewrite` throws (the journal then
///         holds the items completed so far).
inline SegmentReport run_segment(const Checkpoint& in, const RewriteLayout& layout, std::size_t first, std::size_t last,
                                 const std::filesystem::path& parts_dir, Journal& journal, const nlohmann::json& plan,
                                 bool resume, const ItemRewrite& rewrite, const NoteCheck& check_note,
                                 const RewriteProgress& progress = {}, const std::filesystem::path& joined_dir = {}) {
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

    std::vector<unsigned char> buffer;
    std::unique_ptr<detail::PartFile> out;
    std::string out_name;
    Checksum sum;
    std::uint64_t record_begin = 0;
    std::size_t record_from = next;
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
    for (std::size_t i = next; i < last; ++i) {
        const auto& item = layout.items[i];
        const auto& file = layout.files[item.file];
        const SafetensorsFile& shard = *in.shards()[item.file];
        const TensorInfo& t = shard.tensors()[item.tensor];
        if (part_of(i) != out_name) {
            out_name = part_of(i);
            const bool continuing = out_name == part;  // resuming inside the part of the last record
            out = std::make_unique<detail::PartFile>(parts_dir / out_name, continuing ? part_end : 0);
            record_begin = out->size();
            record_from = i;
            sum = Checksum();
            if (!continuing && item.tensor == 0 && i == std::max(first, file.first_item)) {
                out->write(file.header.data(), file.header.size());
                sum.update(file.header.data(), file.header.size());
            }
        }
        if (i == next) shard.prefetch(t);
        if (item.tensor + 1 < file.items && i + 1 < last) shard.prefetch(shard.tensors()[item.tensor + 1]);
        throw_if_cancelled();
        if (progress) progress(i - first, last - first, t);
        std::string note;
        bool recorded_now = false;
        if (rewrite && rewrite(i, shard, t, buffer, note)) {
            pissa::detail::require(buffer.size() == t.nbytes(), shard.path().string(), ": tensor '", t.name,
                                   "': the rewrite gave ", buffer.size(), " bytes, its shape and dtype need ",
                                   t.nbytes());
            out->write(buffer.data(), buffer.size());
            sum.update(buffer.data(), buffer.size());
            record(i + 1, note);
            recorded_now = true;
        } else {
            for (std::uint64_t at = 0; at < t.nbytes();) {
                const auto piece = static_cast<std::size_t>(std::min<std::uint64_t>(t.nbytes() - at, copy_piece));
                if (buffer.size() < piece) buffer.resize(piece);
                shard.read(t, at, buffer.data(), piece);
                out->write(buffer.data(), piece);
                sum.update(buffer.data(), piece);
                at += piece;
            }
        }
        shard.release(t);
        const bool part_ends = i + 1 == last || layout.items[i + 1].file != item.file;
        if (!recorded_now && (part_ends || out->size() - record_begin >= record_every)) record(i + 1, "");
    }
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

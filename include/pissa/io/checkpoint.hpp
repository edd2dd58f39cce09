/// \file io/checkpoint.hpp
/// \brief A model checkpoint as one set of tensors: a single `.safetensors` file, a folder holding
/// one, or a sharded folder (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`),
/// and the streaming rewrite that keeps its layout.
///
/// Reading maps every shard (io/safetensors.hpp) and checks the index against them: each tensor of
/// `weight_map` is in the shard it names, every tensor of every shard is listed, no tensor is in two
/// shards, shard names are plain file names inside the folder. Only regular files are opened (a
/// FIFO, device or socket is refused before it is opened); the index is at most max_index_size bytes
/// of JSON nested at most max_json_depth deep. Opening is O(n log n) in the number of tensors.
///
/// rewrite_checkpoint() writes a checkpoint with the same file names, tensor names, order, shapes,
/// dtypes and `__metadata__`, taking each tensor either unchanged (copied byte for byte from the
/// mapping) or from a callback that returns its new bytes. Tensors are handled one at a time, so
/// memory stays at one tensor plus what the callback holds. The index is written back with its
/// `weight_map` and an updated `metadata.total_size`.
#pragma once

#include <pissa/cancel.hpp>
#include <pissa/errors.hpp>
#include <pissa/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace pissa::io {

/// The index file of a sharded checkpoint.
inline constexpr const char* index_file_name = "model.safetensors.index.json";

/// The largest index file read (bytes), the same cap as the reference's on a safetensors header: an
/// index lists one line per tensor (about 100 bytes), so 100 MB is a million tensors.
inline constexpr std::uint64_t max_index_size = 100'000'000;

namespace detail {

/// Reads a whole regular file of at most `max_size` bytes (`what` names the kind of file in the
/// error). Non-regular files are refused before they are opened (see open_regular_file).
/// \throws pissa::io::format_error for a non-regular or oversized file, io_error when reading fails.
inline std::string read_text_file(const std::filesystem::path& path, std::uint64_t max_size, const char* what) {
    const int fd = open_regular_file(path);
    const detail::FdCloser closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw io_error(path.string() + ": cannot stat: " + errno_text());
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size > max_size)
        throw format_error(
            pissa::detail::concat(path.string(), ": ", size, " bytes, over the ", max_size, "-byte limit for ", what));
    std::string text(static_cast<std::size_t>(size), '\0');
    if (pread_full(fd, text.data(), text.size(), 0, path.string()) < text.size())
        throw io_error(path.string() + ": the file got shorter while being read");
    return text;
}

/// True when something is at `path`, even a dangling or looping symlink (opening it then reports
/// the real problem); never throws.
inline bool path_exists(const std::filesystem::path& path) {
    std::error_code ec;
    return std::filesystem::symlink_status(path, ec).type() != std::filesystem::file_type::not_found && !ec;
}

/// True for a folder (after following symlinks); false for anything else or an error.
inline bool is_folder(const std::filesystem::path& path) {
    std::error_code ec;
    return std::filesystem::is_directory(path, ec);
}

/// Writes a small text file atomically (temporary file beside it, then rename).
inline void write_text_file(const std::filesystem::path& path, const std::string& text) {
    const auto tmp = path.parent_path() / ("." + path.filename().string() + ".tmp");
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out.write(text.data(), static_cast<std::streamsize>(text.size()));
        if (!out.flush()) throw io_error(tmp.string() + ": write failed");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) throw io_error(path.string() + ": cannot rename into place: " + ec.message());
}

/// A shard name from an index must be a plain file name (no folders, no "..").
inline bool plain_file_name(const std::string& name) {
    return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
           name.find('\\') == std::string::npos;
}

}  // namespace detail

/// A parsed model.safetensors.index.json, checked on its own (the shards are not looked at).
struct CheckpointIndex {
    nlohmann::ordered_json json;                    ///< the whole document, key order kept for the rewrite
    std::vector<std::string> shards;                ///< shard file names, by first appearance in weight_map
    std::map<std::string, std::string> weight_map;  ///< tensor name -> shard file name
};

/// Parses the text of an index: a JSON object (at most max_index_size bytes, nested at most
/// max_json_depth deep, no duplicate keys) with a "weight_map" object from tensor names to plain
/// file names (no folders, no ".."); other fields (such as "metadata") are kept as they are, as long
/// as the two-space indented rewrite stays under 4 x max_index_size bytes. Linear in the text.
/// \throws pissa::io::format_error naming `file`.
inline CheckpointIndex parse_checkpoint_index(const std::string& text, const std::string& file) {
    if (text.size() > max_index_size)
        throw format_error(pissa::detail::concat(file, ": ", text.size(), " bytes, over the ", max_index_size,
                                                 "-byte limit for a checkpoint index"));
    CheckpointIndex index;
    detail::JsonStats stats;
    index.json =
        detail::parse_json_strict<nlohmann::ordered_json>(text.data(), text.data() + text.size(), file, &stats);
    if (stats.indented_size > 4 * max_index_size)
        throw format_error(pissa::detail::concat(file, ": rewriting it would take up to ", stats.indented_size,
                                                 " bytes, over the ", 4 * max_index_size, "-byte limit"));
    const auto map = index.json.is_object() ? index.json.find("weight_map") : index.json.end();
    if (!index.json.is_object() || map == index.json.end() || !map->is_object())
        throw format_error(file + ": no \"weight_map\" object");
    std::set<std::string> seen;
    for (const auto& [tensor, shard] : map->items()) {
        if (!shard.is_string() || !detail::plain_file_name(shard.get_ref<const std::string&>()))
            throw format_error(file + ": weight_map entry '" + tensor + "' must name a shard file in the same folder");
        const auto& name = shard.get_ref<const std::string&>();
        if (seen.insert(name).second) index.shards.push_back(name);
        index.weight_map.emplace(tensor, name);
    }
    return index;
}

/// A checkpoint (single file or sharded folder) read as one model.
class Checkpoint {
public:
    /// Opens `path`: a `.safetensors` file; a folder with `model.safetensors.index.json` (sharded);
    /// a folder with `model.safetensors`; or a folder with exactly one `.safetensors` file.
    /// \throws pissa::io::format_error for a malformed file or index (naming it), or a folder with
    ///         no (or several unindexed) safetensors files; io_error when a file cannot be read.
    explicit Checkpoint(const std::filesystem::path& path) : m_root(path) {
        namespace fs = std::filesystem;
        if (!detail::path_exists(path)) throw format_error(path.string() + ": no such file or folder");
        if (!detail::is_folder(path)) {
            add_shard(path);
        } else if (detail::path_exists(path / index_file_name)) {
            m_folder = true;
            m_sharded = true;
            open_index();
        } else {
            m_folder = true;
            std::vector<fs::path> files;
            std::error_code ec;
            for (const auto& entry : fs::directory_iterator(path)) {
                // Only regular files (after symlinks) are candidates; a FIFO or a broken link is not.
                if (entry.path().extension() == ".safetensors" && entry.is_regular_file(ec))
                    files.push_back(entry.path());
            }
            std::sort(files.begin(), files.end());
            if (detail::path_exists(path / "model.safetensors")) files = {path / "model.safetensors"};
            if (files.size() != 1)
                throw format_error(path.string() + (files.empty() ? ": no .safetensors file in the folder"
                                                                  : ": several .safetensors files but no " +
                                                                        std::string(index_file_name)));
            add_shard(files.front());
        }
    }

    /// The path given to the constructor.
    const std::filesystem::path& root() const { return m_root; }
    /// True when opened from a folder (other files such as config.json belong to the model).
    bool is_folder() const { return m_folder; }
    /// True when the folder has an index.
    bool is_sharded() const { return m_sharded; }
    /// The shard files, in index order (first appearance in weight_map, then name).
    const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return m_shards; }
    /// The parsed index (null when not sharded).
    const nlohmann::ordered_json& index() const { return m_index; }

    /// Every tensor name, shard by shard, each shard in data order.
    std::vector<std::string> tensor_names() const {
        std::vector<std::string> names;
        for (const auto& shard : m_shards)
            for (const auto& t : shard->tensors()) names.push_back(t.name);
        return names;
    }
    /// Number of tensors.
    std::size_t size() const { return m_where.size(); }
    /// The tensor called `name`, or nullptr.
    const TensorInfo* find(const std::string& name) const {
        const auto it = m_where.find(name);
        return it == m_where.end() ? nullptr : m_shards[it->second]->find(name);
    }
    /// The shard holding `name`. \throws pissa::invalid_argument when absent.
    const SafetensorsFile& file_of(const std::string& name) const {
        const auto it = m_where.find(name);
        pissa::detail::require(it != m_where.end(), m_root.string(), ": no tensor '", name, "'");
        return *m_shards[it->second];
    }
    /// Total bytes of tensor data.
    std::uint64_t total_size() const {
        std::uint64_t total = 0;
        for (const auto& shard : m_shards)
            for (const auto& t : shard->tensors()) total += t.nbytes();
        return total;
    }
    /// Regular files of the model folder other than the shards, the index and unlisted
    /// `.safetensors` files (config.json, tokenizer files, ...): what a rewrite copies. Empty for
    /// a single-file checkpoint.
    std::vector<std::filesystem::path> other_files() const { return folder_entries(false); }

    /// What a rewrite leaves out of a model folder: `.safetensors` files that the index does not
    /// list (e.g. Mistral's consolidated.safetensors, the same weights in another layout: copied,
    /// they would put the original weights beside the rewritten ones) and subfolders.
    std::vector<std::filesystem::path> not_copied() const { return folder_entries(true); }

    /// not_copied() as one sentence for a warning; empty when nothing is left out.
    std::string not_copied_note() const {
        const auto left = not_copied();
        if (left.empty()) return "";
        std::string note = "not copied from " + m_root.string() + ":";
        for (const auto& p : left) note += " " + p.filename().string() + (detail::is_folder(p) ? "/" : "");
        return note + " (unlisted .safetensors files and subfolders are left out)";
    }

private:
    /// The model folder's entries besides the shards and the index: the regular files to copy, or
    /// (left_out) the unlisted .safetensors files and the folders.
    std::vector<std::filesystem::path> folder_entries(bool left_out) const {
        std::vector<std::filesystem::path> out;
        if (!m_folder) return out;
        std::set<std::string> own = {index_file_name};
        for (const auto& shard : m_shards) own.insert(shard->path().filename().string());
        std::error_code ec;
        for (const auto& entry : std::filesystem::directory_iterator(m_root)) {
            if (own.count(entry.path().filename().string())) continue;
            const bool folder = entry.is_directory(ec);
            const bool file = entry.is_regular_file(ec);
            const bool weights = file && entry.path().extension() == ".safetensors";
            if (left_out ? (folder || weights) : (file && !weights)) out.push_back(entry.path());
        }
        std::sort(out.begin(), out.end());
        return out;
    }

    void add_shard(const std::filesystem::path& file) {
        m_shards.push_back(std::make_unique<SafetensorsFile>(file));
        const std::size_t k = m_shards.size() - 1;
        for (const auto& t : m_shards[k]->tensors()) {
            const auto [it, fresh] = m_where.emplace(t.name, k);
            if (!fresh)
                throw format_error(file.string() + ": tensor '" + t.name + "' is also in " +
                                   m_shards[it->second]->path().string());
        }
    }

    void open_index() {
        const auto index_path = m_root / index_file_name;
        CheckpointIndex index = parse_checkpoint_index(
            detail::read_text_file(index_path, max_index_size, "a checkpoint index"), index_path.string());
        m_index = std::move(index.json);
        for (const auto& name : index.shards) {
            if (!detail::path_exists(m_root / name))
                throw format_error(index_path.string() + ": shard '" + name + "' listed in weight_map does not exist");
            add_shard(m_root / name);
        }
        std::vector<std::string> shard_names;
        for (const auto& shard : m_shards) shard_names.push_back(shard->path().filename().string());
        for (const auto& [tensor, shard] : index.weight_map) {
            const auto it = m_where.find(tensor);
            if (it == m_where.end() || shard_names[it->second] != shard)
                throw format_error(index_path.string() + ": weight_map puts tensor '" + tensor + "' in '" + shard +
                                   "', which does not hold it");
        }
        for (const auto& [tensor, k] : m_where)
            if (!index.weight_map.count(tensor))
                throw format_error(m_shards[k]->path().string() + ": tensor '" + tensor + "' is not listed in " +
                                   index_path.string());
    }

    std::filesystem::path m_root;
    bool m_folder = false;
    bool m_sharded = false;
    nlohmann::ordered_json m_index;
    std::vector<std::unique_ptr<SafetensorsFile>> m_shards;
    std::map<std::string, std::size_t> m_where;  // tensor -> shard
};

/// What a rewrite of `in` writes besides the tensor files, into the folder `out_dir`: the index (if
/// any) with the same weight_map and metadata.total_size updated, and, when `copy_other_files` is
/// set, the other files of a model folder (config.json, ...).
inline void write_checkpoint_companions(const Checkpoint& in, const std::filesystem::path& out_dir,
                                        bool copy_other_files = true) {
    if (in.is_sharded()) {
        nlohmann::ordered_json index = in.index();
        if (!index.contains("metadata") || !index["metadata"].is_object())
            index["metadata"] = nlohmann::ordered_json::object();
        index["metadata"]["total_size"] = in.total_size();
        detail::write_text_file(out_dir / index_file_name, index.dump(2) + "\n");
    }
    if (copy_other_files)
        for (const auto& file : in.other_files())
            std::filesystem::copy_file(file, out_dir / file.filename(),
                                       std::filesystem::copy_options::overwrite_existing);
}

/// Replaces a tensor: fills `bytes` with its new bytes (same dtype and shape) and returns true, or
/// returns false to copy it unchanged. `bytes` is one buffer reused from tensor to tensor (see
/// copy_matrix_into), so a rewrite that works in it allocates once for the whole checkpoint.
using TensorRewrite = std::function<bool(const SafetensorsFile&, const TensorInfo&, std::vector<unsigned char>& bytes)>;
/// Called before each tensor: index (0-based) and count over the whole checkpoint, the tensor.
using RewriteProgress = std::function<void(std::size_t, std::size_t, const TensorInfo&)>;

/// Writes `in` into the folder `out_dir` (which must exist) with the same layout: each shard under
/// its own file name (a single-file checkpoint under its file name), same tensor order, dtypes,
/// shapes and `__metadata__`; the index (if any) with the same weight_map and metadata.total_size
/// updated. `rewrite` gives a tensor's new bytes or declines to copy it unchanged. When
/// `copy_other_files` is set, the other files of a model folder (config.json, ...) are copied too.
/// The next tensor is read from disk in the background while the current one is rewritten.
/// Unchanged tensors are copied with pread(2) through `bytes`, in pieces of at most 16 MiB.
/// \throws pissa::invalid_argument when `rewrite` returns a wrong byte count (naming the tensor),
///         io_error when writing fails or an input shard has become shorter since it was opened
///         (naming it and the tensor); every shard is written atomically, so no partial output.
inline void rewrite_checkpoint(const Checkpoint& in, const std::filesystem::path& out_dir, const TensorRewrite& rewrite,
                               const RewriteProgress& progress = {}, bool copy_other_files = true) {
    constexpr std::uint64_t copy_piece = std::uint64_t{16} << 20;  // bytes per read/write of an unchanged tensor
    const std::size_t count = in.size();
    std::size_t done = 0;
    std::vector<unsigned char> buffer;
    for (const auto& shard : in.shards()) {
        const auto& tensors = shard->tensors();
        std::vector<TensorSpec> specs;
        for (const auto& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
        SafetensorsWriter writer(out_dir / shard->path().filename(), specs, shard->metadata());
        if (!tensors.empty()) shard->prefetch(tensors.front());
        for (std::size_t i = 0; i < tensors.size(); ++i) {
            const TensorInfo& t = tensors[i];
            if (i + 1 < tensors.size()) shard->prefetch(tensors[i + 1]);
            throw_if_cancelled();
            if (progress) progress(done, count, t);
            if (rewrite && rewrite(*shard, t, buffer)) {
                writer.write(buffer.data(), buffer.size());
            } else {
                // Streamed through `buffer` in pieces with pread(2) (SafetensorsFile::read), not
                // written from the mapping: a shard truncated meanwhile is an io_error, not SIGBUS.
                const std::uint64_t size = t.nbytes();
                if (size == 0) writer.write(nullptr, 0);
                for (std::uint64_t at = 0; at < size;) {
                    const auto piece = static_cast<std::size_t>(std::min<std::uint64_t>(size - at, copy_piece));
                    if (buffer.size() < piece) buffer.resize(piece);
                    shard->read(t, at, buffer.data(), piece);
                    writer.write_part(buffer.data(), piece);
                    at += piece;
                }
            }
            shard->release(t);
            ++done;
        }
        writer.commit();
    }
    write_checkpoint_companions(in, out_dir, copy_other_files);
}

}  // namespace pissa::io

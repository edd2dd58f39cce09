/// \file io/checkpoint.hpp
/// \brief A model checkpoint as one set of tensors: a single `.safetensors` file, a folder holding
/// one, or a sharded folder (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`),
/// and the streaming rewrite that keeps its layout.
///
/// Reading maps every shard (io/safetensors.hpp) and checks the index against them: each tensor of
/// `weight_map` is in the shard it names, every tensor of every shard is listed, no tensor is in two
/// shards, shard names are plain file names inside the folder.
///
/// rewrite_checkpoint() writes a checkpoint with the same file names, tensor names, order, shapes,
/// dtypes and `__metadata__`, taking each tensor either unchanged (copied byte for byte from the
/// mapping) or from a callback that returns its new bytes. Tensors are handled one at a time, so
/// memory stays at one tensor plus what the callback holds. The index is written back with its
/// `weight_map` and an updated `metadata.total_size`.
#pragma once

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
#include <sstream>
#include <string>
#include <vector>

namespace pissa::io {

/// The index file of a sharded checkpoint.
inline constexpr const char* index_file_name = "model.safetensors.index.json";

namespace detail {

inline std::string read_text_file(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error(path.string() + ": cannot open");
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
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

/// A checkpoint (single file or sharded folder) read as one model.
class Checkpoint {
public:
    /// Opens `path`: a `.safetensors` file; a folder with `model.safetensors.index.json` (sharded);
    /// a folder with `model.safetensors`; or a folder with exactly one `.safetensors` file.
    /// \throws pissa::io::format_error for a malformed file or index (naming it), or a folder with
    ///         no (or several unindexed) safetensors files; io_error when a file cannot be read.
    explicit Checkpoint(const std::filesystem::path& path) : m_root(path) {
        namespace fs = std::filesystem;
        if (!fs::exists(path)) throw format_error(path.string() + ": no such file or folder");
        if (!fs::is_directory(path)) {
            add_shard(path);
        } else if (fs::exists(path / index_file_name)) {
            m_folder = true;
            m_sharded = true;
            open_index();
        } else {
            m_folder = true;
            std::vector<fs::path> files;
            for (const auto& entry : fs::directory_iterator(path))
                if (entry.is_regular_file() && entry.path().extension() == ".safetensors") files.push_back(entry.path());
            std::sort(files.begin(), files.end());
            if (fs::exists(path / "model.safetensors")) files = {path / "model.safetensors"};
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
    /// Regular files of the model folder other than the shards and the index (config.json,
    /// tokenizer files, ...); empty for a single-file checkpoint.
    std::vector<std::filesystem::path> other_files() const {
        std::vector<std::filesystem::path> out;
        if (!m_folder) return out;
        std::set<std::string> own = {index_file_name};
        for (const auto& shard : m_shards) own.insert(shard->path().filename().string());
        for (const auto& entry : std::filesystem::directory_iterator(m_root))
            if (entry.is_regular_file() && !own.count(entry.path().filename().string())) out.push_back(entry.path());
        std::sort(out.begin(), out.end());
        return out;
    }

private:
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
        const std::string text = detail::read_text_file(index_path);
        m_index = detail::parse_json_strict<nlohmann::ordered_json>(text.data(), text.data() + text.size(),
                                                                    index_path.string());
        const auto map = m_index.is_object() ? m_index.find("weight_map") : m_index.end();
        if (!m_index.is_object() || map == m_index.end() || !map->is_object())
            throw format_error(index_path.string() + ": no \"weight_map\" object");
        std::vector<std::string> order;
        std::map<std::string, std::string> expected;  // tensor -> shard
        for (const auto& [tensor, shard] : map->items()) {
            if (!shard.is_string() || !detail::plain_file_name(shard.get<std::string>()))
                throw format_error(index_path.string() + ": weight_map entry '" + tensor +
                                   "' must name a shard file in the same folder");
            const auto name = shard.get<std::string>();
            if (std::find(order.begin(), order.end(), name) == order.end()) order.push_back(name);
            expected.emplace(tensor, name);
        }
        for (const auto& name : order) {
            if (!std::filesystem::exists(m_root / name))
                throw format_error(index_path.string() + ": shard '" + name + "' listed in weight_map does not exist");
            add_shard(m_root / name);
        }
        for (const auto& [tensor, shard] : expected) {
            const auto it = m_where.find(tensor);
            if (it == m_where.end() || m_shards[it->second]->path().filename() != shard)
                throw format_error(index_path.string() + ": weight_map puts tensor '" + tensor + "' in '" + shard +
                                   "', which does not hold it");
        }
        for (const auto& [tensor, k] : m_where)
            if (!expected.count(tensor))
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

/// Replaces a tensor: fills `bytes` with its new bytes (same dtype and shape) and returns true, or
/// returns false to copy it unchanged. `bytes` is one buffer reused from tensor to tensor (see
/// copy_matrix_into), so a rewrite that works in it allocates once for the whole checkpoint.
using TensorRewrite =
    std::function<bool(const SafetensorsFile&, const TensorInfo&, std::vector<unsigned char>& bytes)>;
/// Called before each tensor: index (0-based) and count over the whole checkpoint, the tensor.
using RewriteProgress = std::function<void(std::size_t, std::size_t, const TensorInfo&)>;

/// Writes `in` into the folder `out_dir` (which must exist) with the same layout: each shard under
/// its own file name (a single-file checkpoint under its file name), same tensor order, dtypes,
/// shapes and `__metadata__`; the index (if any) with the same weight_map and metadata.total_size
/// updated. `rewrite` gives a tensor's new bytes or declines to copy it unchanged. When
/// `copy_other_files` is set, the other files of a model folder (config.json, ...) are copied too.
/// The next tensor is read from disk in the background while the current one is rewritten.
/// \throws pissa::invalid_argument when `rewrite` returns a wrong byte count (naming the tensor),
///         io_error when writing fails; every shard is written atomically.
inline void rewrite_checkpoint(const Checkpoint& in, const std::filesystem::path& out_dir, const TensorRewrite& rewrite,
                               const RewriteProgress& progress = {}, bool copy_other_files = true) {
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
            if (progress) progress(done, count, t);
            if (rewrite && rewrite(*shard, t, buffer)) {
                writer.write(buffer.data(), buffer.size());
            } else {
                const ByteView bytes = shard->bytes(t);
                writer.write(bytes.data, bytes.size);
            }
            shard->release(t);
            ++done;
        }
        writer.commit();
    }
    if (in.is_sharded()) {
        nlohmann::ordered_json index = in.index();
        if (!index.contains("metadata") || !index["metadata"].is_object()) index["metadata"] = nlohmann::ordered_json::object();
        index["metadata"]["total_size"] = in.total_size();
        detail::write_text_file(out_dir / index_file_name, index.dump(2) + "\n");
    }
    if (copy_other_files)
        for (const auto& file : in.other_files())
            std::filesystem::copy_file(file, out_dir / file.filename(), std::filesystem::copy_options::overwrite_existing);
}

}  // namespace pissa::io

// libFuzzer target for a sharded checkpoint's model.safetensors.index.json
// (pissa::io::parse_checkpoint_index in pissa/io/checkpoint.hpp), without any shard files.
// Every input must either parse or throw pissa::io::format_error; any other exception, crash,
// sanitizer report or broken invariant is a bug. For inputs that parse: every weight_map entry names
// a plain file name listed once in `shards`, every shard is named by some entry, and the rewrite
// (dump(2), as rewrite_checkpoint writes it) parses back to the same index.
#include <pissa/io/checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace pissa::io;
    const std::string text(reinterpret_cast<const char*>(data), size);
    CheckpointIndex index;
    try {
        index = parse_checkpoint_index(text, "fuzz-input");
    } catch (const format_error&) {
        return 0;
    }
    const std::set<std::string> shards(index.shards.begin(), index.shards.end());
    if (shards.size() != index.shards.size()) std::abort();
    std::set<std::string> named;
    for (const auto& [tensor, shard] : index.weight_map) {
        if (!shards.count(shard) || !detail::plain_file_name(shard)) std::abort();
        named.insert(shard);
    }
    if (named != shards) std::abort();
    const CheckpointIndex back = parse_checkpoint_index(index.json.dump(2), "fuzz-rewrite");
    if (back.json != index.json || back.shards != index.shards || back.weight_map != index.weight_map) std::abort();
    return 0;
}

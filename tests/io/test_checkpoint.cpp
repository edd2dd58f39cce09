// Tests for io/checkpoint.hpp: single files, folders, sharded folders read as one model and
// rewritten with the same layout; bad indexes rejected.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/tensor.hpp>

using namespace pissa::io;
using pissa_test::ScratchDir;

namespace {

/// A sharded folder: 3 shards, mixed dtypes, an index, a config.json and a tokenizer file.
void make_sharded(const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", 0}, {"producer", "test"}};
    int k = 0;
    for (int shard = 1; shard <= 3; ++shard) {
        const std::string file = "model-0000" + std::to_string(shard) + "-of-00003.safetensors";
        std::vector<OwnedTensor> tensors;
        for (int i = 0; i < 3; ++i, ++k) {
            const std::string name = "layers." + std::to_string(k) + ".proj.weight";
            const Dtype d = k % 3 == 0 ? Dtype::BF16 : k % 3 == 1 ? Dtype::F32 : Dtype::F16;
            tensors.push_back(matrix_tensor(name, pissa_test::gaussian<float>(4 + k, 3, static_cast<unsigned>(k)), d));
            index["weight_map"][name] = file;
        }
        tensors.push_back({{"counter" + std::to_string(shard), Dtype::I64, {2}}, pissa_test::random_bytes(16, 9)});
        index["weight_map"]["counter" + std::to_string(shard)] = file;
        write_safetensors(dir / file, tensors, {{"format", "pt"}});
    }
    detail::write_text_file(dir / index_file_name, index.dump(2));
    detail::write_text_file(dir / "config.json", "{\"model_type\": \"llama\"}");
    detail::write_text_file(dir / "tokenizer.json", "{}");
}

}  // namespace

TEST_CASE("a sharded folder reads as one model and is rewritten with the same sharding") {
    ScratchDir dir("ckpt-sharded");
    make_sharded(dir / "in");
    Checkpoint in(dir / "in");
    CHECK(in.is_sharded());
    CHECK(in.shards().size() == 3);
    CHECK(in.size() == 12);
    CHECK(in.find("layers.4.proj.weight") != nullptr);
    CHECK(in.file_of("layers.4.proj.weight").path().filename() == "model-00002-of-00003.safetensors");
    CHECK(in.other_files().size() == 2);
    CHECK(in.not_copied().empty());
    CHECK(in.not_copied_note().empty());

    std::filesystem::create_directories(dir / "out");
    std::size_t calls = 0;
    rewrite_checkpoint(
        in, dir / "out",
        [&](const SafetensorsFile& file, const TensorInfo& t, std::vector<unsigned char>& bytes) {
            if (t.name != "layers.4.proj.weight") return false;
            const pissa::RowMatrix<float> m = read_matrix<float>(file, t) * 2.0f;
            bytes = matrix_bytes(m, t.dtype);
            return true;
        },
        [&](std::size_t i, std::size_t n, const TensorInfo&) {
            CHECK(i == calls++);
            CHECK(n == 12);
        });
    CHECK(calls == 12);
    Checkpoint out(dir / "out");
    CHECK(out.is_sharded());
    REQUIRE(out.shards().size() == 3);
    CHECK(out.tensor_names() == in.tensor_names());
    for (const auto& name : in.tensor_names()) {
        const auto& a = in.file_of(name);
        const auto& b = out.file_of(name);
        CHECK(a.path().filename() == b.path().filename());
        CHECK(a.metadata() == b.metadata());
        const TensorInfo& ta = a.at(name);
        const TensorInfo& tb = b.at(name);
        CHECK(ta.dtype == tb.dtype);
        CHECK(ta.shape == tb.shape);
        const ByteView va = a.bytes(ta), vb = b.bytes(tb);
        const bool same = va.size == vb.size && std::equal(va.data, va.data + va.size, vb.data);
        if (name == "layers.4.proj.weight") {
            CHECK_FALSE(same);
            CHECK(pissa_test::relative_error(read_matrix<double>(b, tb), 2.0 * read_matrix<double>(a, ta)) < 1e-7);
        } else {
            CHECK(same);  // untouched tensors byte-identical
        }
    }
    CHECK(out.index()["metadata"]["total_size"] == in.total_size());
    CHECK(out.index()["metadata"]["producer"] == "test");
    CHECK(out.index()["weight_map"] == in.index()["weight_map"]);
    CHECK(pissa_test::read_bytes(dir / "out" / "config.json") == pissa_test::read_bytes(dir / "in" / "config.json"));
    CHECK(std::filesystem::exists(dir / "out" / "tokenizer.json"));
}

TEST_CASE("single files and single-file folders") {
    ScratchDir dir("ckpt-single");
    std::filesystem::create_directories(dir / "m");
    write_safetensors(dir / "m" / "model.safetensors", {matrix_tensor("w", pissa::Matrix<float>::Ones(2, 2))});
    Checkpoint folder(dir / "m");
    CHECK(folder.is_folder());
    CHECK_FALSE(folder.is_sharded());
    Checkpoint file(dir / "m" / "model.safetensors");
    CHECK_FALSE(file.is_folder());
    CHECK(file.other_files().empty());
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "nothing"), doctest::Contains("no such file"), format_error);
    std::filesystem::create_directories(dir / "empty");
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "empty"), doctest::Contains("no .safetensors file"), format_error);
}

TEST_CASE("inconsistent indexes are rejected, naming the index and the tensor") {
    ScratchDir dir("ckpt-bad");
    auto with_index = [&](const std::function<void(nlohmann::ordered_json&)>& edit) {
        std::filesystem::remove_all(dir / "m");
        make_sharded(dir / "m");
        auto index = nlohmann::ordered_json::parse(pissa_test::read_bytes(dir / "m" / index_file_name));
        edit(index);
        detail::write_text_file(dir / "m" / index_file_name, index.dump());
    };
    with_index([](auto& j) { j["weight_map"].erase("counter2"); });
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "m"), doctest::Contains("'counter2' is not listed"), format_error);
    with_index([](auto& j) { j["weight_map"]["counter2"] = "model-00001-of-00003.safetensors"; });
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "m"), doctest::Contains("does not hold it"), format_error);
    with_index([](auto& j) { j["weight_map"]["ghost"] = "model-00009-of-00003.safetensors"; });
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "m"), doctest::Contains("does not exist"), format_error);
    with_index([](auto& j) { j["weight_map"]["counter1"] = "../outside.safetensors"; });
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "m"), doctest::Contains("must name a shard file"), format_error);
    with_index([](auto& j) { j.erase("weight_map"); });
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "m"), doctest::Contains("no \"weight_map\""), format_error);
    make_sharded(dir / "d");
    detail::write_text_file(
        dir / "d" / index_file_name,
        "{\"weight_map\": {\"counter1\": \"a\", \"counter1\": \"model-00001-of-00003.safetensors\"}}");
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "d"), doctest::Contains("duplicate key 'counter1'"), format_error);
}

TEST_CASE("the index parses on its own; deep, NUL-padded and oversized indexes are refused naming it") {
    const std::string good =
        R"({"metadata":{"total_size":8},"weight_map":{"b":"s2.safetensors","a":"s1.safetensors","c":"s2.safetensors"}})";
    const CheckpointIndex index = parse_checkpoint_index(good, "idx.json");
    CHECK(index.shards == std::vector<std::string>{"s2.safetensors", "s1.safetensors"});
    CHECK(index.weight_map.at("a") == "s1.safetensors");
    CHECK(index.json.begin().key() == "metadata");
    for (std::size_t depth : {max_json_depth + 1, std::size_t{100'000}, std::size_t{1'000'000}}) {
        INFO("depth ", depth);
        const std::string deep = R"({"weight_map":{},"metadata":)" + pissa_test::nested_arrays(depth) + "}";
        CHECK_THROWS_WITH_AS(parse_checkpoint_index(deep, "idx.json"),
                             doctest::Contains("idx.json: JSON nested deeper than 256 levels"), format_error);
    }
    CHECK_THROWS_WITH_AS(parse_checkpoint_index(good + std::string(1, '\0') + "junk", "idx.json"),
                         doctest::Contains("idx.json: NUL byte"), format_error);
    CHECK_THROWS_WITH_AS(parse_checkpoint_index(std::string(max_index_size + 1, ' '), "idx.json"),
                         doctest::Contains("over the 100000000-byte limit"), format_error);
    // On disk, too: a deep index in a model folder.
    ScratchDir dir("ckpt-deep");
    make_sharded(dir / "m");
    detail::write_text_file(dir / "m" / index_file_name,
                            R"({"weight_map":{},"metadata":)" + pissa_test::nested_arrays(300'000) + "}");
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "m"), doctest::Contains(index_file_name), format_error);
}

TEST_CASE("a FIFO as the model, a shard or the index is refused, not waited on") {
    pissa_test::Watchdog watchdog(60);
    ScratchDir dir("ckpt-fifo");
    pissa_test::make_fifo(dir / "model.safetensors");
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "model.safetensors"), doctest::Contains("not a regular file (a FIFO)"),
                         format_error);
    std::filesystem::create_directories(dir / "folder");
    pissa_test::make_fifo(dir / "folder" / "model.safetensors");
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "folder"), doctest::Contains("not a regular file"), format_error);
    make_sharded(dir / "shard");
    std::filesystem::remove(dir / "shard" / "model-00002-of-00003.safetensors");
    pissa_test::make_fifo(dir / "shard" / "model-00002-of-00003.safetensors");
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "shard"),
                         doctest::Contains("model-00002-of-00003.safetensors: not a regular"), format_error);
    make_sharded(dir / "index");
    std::filesystem::remove(dir / "index" / index_file_name);
    pissa_test::make_fifo(dir / "index" / index_file_name);
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "index"), doctest::Contains("not a regular file (a FIFO)"), format_error);
    // A symlink loop where the index should be: an error, not an exception from std::filesystem.
    make_sharded(dir / "loop");
    std::filesystem::remove(dir / "loop" / index_file_name);
    std::filesystem::create_symlink(dir / "loop" / index_file_name, dir / "loop" / index_file_name);
    CHECK_THROWS_WITH_AS(Checkpoint(dir / "loop"), doctest::Contains("symbolic links"), format_error);
    std::filesystem::create_symlink(dir / "self", dir / "self");
    CHECK_THROWS_AS(Checkpoint(dir / "self"), format_error);
}

TEST_CASE("a shard truncated during a rewrite is an io_error naming it and the tensor; its output is not left behind") {
    ScratchDir dir("ckpt-shrink");
    make_sharded(dir / "in");
    Checkpoint in(dir / "in");
    std::filesystem::create_directories(dir / "out");
    const auto& shard = in.shards()[1];
    std::filesystem::resize_file(shard->path(), shard->header().data_offset + 10);
    CHECK_THROWS_WITH_AS(rewrite_checkpoint(in, dir / "out", {}),
                         doctest::Contains("model-00002-of-00003.safetensors: tensor 'layers.3.proj.weight'"),
                         io_error);
    CHECK_FALSE(std::filesystem::exists(dir / "out" / "model-00002-of-00003.safetensors"));
}

TEST_CASE("unchanged tensors larger than the copy piece are streamed whole") {
    ScratchDir dir("ckpt-big");
    const auto big = pissa_test::random_bytes((std::size_t{16} << 20) + 12345, 5);
    write_safetensors(dir / "in.safetensors",
                      {{{"big", Dtype::U8, {big.size()}}, big}, {{"small", Dtype::U8, {3}}, {1, 2, 3}}});
    Checkpoint in(dir / "in.safetensors");
    std::filesystem::create_directories(dir / "out");
    rewrite_checkpoint(in, dir / "out", {});
    CHECK(pissa_test::read_bytes(dir / "out" / "in.safetensors") == pissa_test::read_bytes(dir / "in.safetensors"));
}

TEST_CASE("a sharded checkpoint of 100,000 tensors opens (in O(n log n): the index parse was quadratic)") {
    ScratchDir dir("ckpt-many");
    std::string index = R"({"metadata":{"total_size":0},"weight_map":{)";
    for (int s = 0; s < 4; ++s) {
        const std::string file = "model-" + std::to_string(s) + ".safetensors";
        std::vector<OwnedTensor> tensors;
        for (int i = 0; i < 25'000; ++i) {
            const std::string name = "layers." + std::to_string(s) + "." + std::to_string(i) + ".weight";
            tensors.push_back({{name, Dtype::U8, {1}}, {static_cast<unsigned char>(i)}});
            index += (s || i ? "," : "") + ("\"" + name + "\":\"" + file + "\"");
        }
        write_safetensors(dir / file, tensors);
    }
    detail::write_text_file(dir / index_file_name, index + "}}");
    const Checkpoint in(dir.path());
    CHECK(in.size() == 100'000);
    CHECK(in.shards().size() == 4);
    CHECK(in.find("layers.3.24999.weight") != nullptr);
}

TEST_CASE("unlisted .safetensors files and subfolders of an indexed folder are left out, and said") {
    ScratchDir dir("ckpt-unlisted");
    make_sharded(dir / "in");
    // Mistral's layout: the same weights once more in one file that the index does not list.
    write_safetensors(dir / "in" / "consolidated.safetensors",
                      {matrix_tensor("layers.0.proj.weight", pissa_test::gaussian<float>(4, 3, 1), Dtype::F32)}, {});
    std::filesystem::create_directories(dir / "in" / "original");
    detail::write_text_file(dir / "in" / "original" / "params.json", "{}");
    const Checkpoint in(dir / "in");
    CHECK(in.other_files().size() == 2);  // config.json, tokenizer.json
    const auto left = in.not_copied();
    REQUIRE(left.size() == 2);
    CHECK(left[0].filename() == "consolidated.safetensors");
    CHECK(left[1].filename() == "original");
    const std::string note = in.not_copied_note();
    CHECK(note.find("consolidated.safetensors original/") != std::string::npos);

    std::filesystem::create_directories(dir / "out");
    rewrite_checkpoint(in, dir / "out", {});
    CHECK_FALSE(std::filesystem::exists(dir / "out" / "consolidated.safetensors"));
    CHECK_FALSE(std::filesystem::exists(dir / "out" / "original"));
    CHECK(std::filesystem::exists(dir / "out" / "tokenizer.json"));
}

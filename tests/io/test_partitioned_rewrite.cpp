// Tests for io/partitioned_rewrite.hpp: a checkpoint's rewrite cut into segments written as part
// files and joined gives the bytes of the whole rewrite, whatever the cut; a rewritten item lands in
// its place; a resumed segment trusts its verified records; a part no segment recorded is refused.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/journal.hpp>
#include <pissa/io/partitioned_rewrite.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

using namespace pissa::io;
using pissa_test::ScratchDir;

namespace {

/// A single-file checkpoint of three float tensors, "a", "b" and "c", in `dir`.
void make_three_tensors(const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    write_safetensors(dir / "model.safetensors",
                      {matrix_tensor("a", pissa_test::gaussian<float>(3, 4, 1)),
                       matrix_tensor("b", pissa_test::gaussian<float>(5, 2, 2)),
                       matrix_tensor("c", pissa_test::gaussian<float>(2, 2, 3))},
                      {{"format", "pt"}});
}

/// Copies every item unchanged.
bool copy_every_item(std::size_t, const SafetensorsFile&, const TensorInfo&, std::vector<unsigned char>&,
                     std::string&) {
    return false;
}

bool every_note_holds(std::size_t, const std::string&) { return true; }

}  // namespace

TEST_CASE("partitioned rewrite: segments written as parts and joined give the checkpoint's bytes, whatever the cut") {
    ScratchDir dir("partitioned");
    make_three_tensors(dir / "model");
    const Checkpoint in(dir / "model");
    const RewriteLayout layout = rewrite_layout(in);
    REQUIRE(layout.files.size() == 1);
    REQUIRE(layout.items.size() == 3);
    CHECK(layout.files[0].name == "model.safetensors");
    CHECK(layout.files[0].items == 3);
    CHECK(layout.part_name(0, 2) == "model.safetensors.part2");
    CHECK(layout.part_begin(0) == 0);  // the first part holds the header too
    CHECK(layout.part_begin(2) == layout.items[2].begin);
    CHECK(layout.items[0].begin == layout.files[0].header.size());
    const std::string original = pissa_test::read_bytes(dir / "model" / "model.safetensors");

    for (const std::vector<std::size_t>& bounds :
         {std::vector<std::size_t>{0, 3}, std::vector<std::size_t>{0, 2, 3}, std::vector<std::size_t>{0, 1, 2, 3}}) {
        const std::size_t segments = bounds.size() - 1;
        INFO(segments, " segments");
        const auto work = dir / ("work" + std::to_string(segments));
        const auto parts = work / "parts", out = work / "out";
        std::filesystem::create_directories(parts);
        std::filesystem::create_directories(out);
        std::vector<std::map<std::string, std::uint64_t>> done(segments);
        std::vector<std::vector<nlohmann::json>> records(segments);
        for (std::size_t s = 0; s < segments; ++s) {
            const auto journal_path = work / ("shard-" + std::to_string(s) + ".jsonl");
            {
                Journal journal(journal_path, "test journal");
                const auto report = run_segment(in, layout, bounds[s], bounds[s + 1], parts, journal,
                                                nlohmann::json("plan"), false, copy_every_item, every_note_holds);
                CHECK(report.resumed_items == 0);
                CHECK(report.parts.count(layout.part_name(0, bounds[s])) == 1);
            }
            // Resumed, the segment finds all its items done and verified, and redoes nothing.
            Journal journal(journal_path, "test journal");
            const auto resumed = run_segment(in, layout, bounds[s], bounds[s + 1], parts, journal,
                                             nlohmann::json("plan"), true, copy_every_item, every_note_holds);
            CHECK(resumed.resumed_items == bounds[s + 1] - bounds[s]);
            done[s] = resumed.parts;
            records[s] = journal.read();
        }
        join_parts(layout, bounds, done, records, parts, out);
        CHECK(pissa_test::read_bytes(out / "model.safetensors") == original);
        // Joined again (as after a crash in the join): the joined file is checked and kept.
        CHECK_NOTHROW(join_parts(layout, bounds, done, records, parts, out));
        CHECK(pissa_test::read_bytes(out / "model.safetensors") == original);
    }
}

TEST_CASE("partitioned rewrite: a rewritten item lands in place; a part no segment recorded is refused") {
    ScratchDir dir("partitioned-rewrite");
    make_three_tensors(dir / "model");
    const Checkpoint in(dir / "model");
    const RewriteLayout layout = rewrite_layout(in);
    const auto parts = dir / "parts", out = dir / "out";
    std::filesystem::create_directories(parts);
    std::filesystem::create_directories(out);
    // Item 1 ("b") becomes zeros, with a note its journal record keeps.
    const ItemRewrite zero_b = [](std::size_t item, const SafetensorsFile&, const TensorInfo& t,
                                  std::vector<unsigned char>& bytes, std::string& note) {
        if (item != 1) return false;
        bytes.assign(t.nbytes(), 0);
        note = "zeroed";
        return true;
    };
    const std::vector<std::size_t> bounds = {0, 3};
    Journal journal(dir / "journal.jsonl", "test journal");
    const auto report =
        run_segment(in, layout, 0, 3, parts, journal, nlohmann::json("plan"), false, zero_b, every_note_holds);
    const auto records = journal.read();
    bool noted = false;
    for (const auto& record : records) noted = noted || record.value("note", std::string()) == "zeroed";
    CHECK(noted);

    // Without the segment's done record for the file, the join refuses, naming the missing part.
    CHECK_THROWS_WITH_AS(join_parts(layout, bounds, {{}}, {records}, parts, out),
                         doctest::Contains("recorded no part model.safetensors.part0"), format_error);
    join_parts(layout, bounds, {report.parts}, {records}, parts, out);
    const SafetensorsFile original(dir / "model" / "model.safetensors"), rewritten(out / "model.safetensors");
    CHECK(read_matrix<float>(rewritten, rewritten.at("a")) == read_matrix<float>(original, original.at("a")));
    CHECK(read_matrix<float>(rewritten, rewritten.at("b")).isZero(0));
    CHECK(read_matrix<float>(rewritten, rewritten.at("c")) == read_matrix<float>(original, original.at("c")));
}

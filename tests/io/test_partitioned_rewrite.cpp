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
#include <fstream>
#include <functional>
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

TEST_CASE("partitioned rewrite: the unchanged items that end the segment are written ahead, also across a crash") {
    // a, b and e are rewritten (zeroed), c and d, which end the file, are copied unchanged: their
    // bytes go out in pieces between the rewrites, through a descriptor of their own, and are
    // journaled as one record when reached. The output must be the bytes of the plain run, also
    // when the rewrite fails after pieces were written past the journal's end and is resumed.
    ScratchDir dir("partitioned-ahead");
    std::filesystem::create_directories(dir / "model");
    write_safetensors(dir / "model" / "model.safetensors",
                      {matrix_tensor("a", pissa_test::gaussian<float>(64, 64, 1)),
                       matrix_tensor("b", pissa_test::gaussian<float>(40, 30, 2)),
                       matrix_tensor("e", pissa_test::gaussian<float>(33, 7, 3)),
                       matrix_tensor("c", pissa_test::gaussian<float>(300, 301, 4)),
                       matrix_tensor("d", pissa_test::gaussian<float>(3, 5, 5))},
                      {{"format", "pt"}});
    const Checkpoint in(dir / "model");
    const RewriteLayout layout = rewrite_layout(in);
    const std::vector<std::size_t> bounds = {0, 5};
    bool fail_at_e = false;
    const ItemRewrite zero_abe = [&](std::size_t item, const SafetensorsFile&, const TensorInfo& t,
                                     std::vector<unsigned char>& bytes, std::string&) {
        if (item > 2) return false;
        if (item == 2 && fail_at_e) throw pissa::invalid_argument("the rewrite of e failed");
        bytes.assign(t.nbytes(), 0);
        return true;
    };
    const auto unchanged = [](std::size_t item) { return item > 2; };
    const auto run = [&](const std::string& name, bool ahead, bool crash) {
        const auto parts = dir / name / "parts", out = dir / name / "out";
        std::filesystem::create_directories(parts);
        std::filesystem::create_directories(out);
        const auto journal_path = dir / name / "journal.jsonl";
        if (crash) {
            fail_at_e = true;
            Journal journal(journal_path, "test journal");
            CHECK_THROWS_WITH(run_segment(in, layout, 0, 5, parts, journal, nlohmann::json("plan"), false, zero_abe,
                                          every_note_holds, {}, {}, 0, unchanged),
                              doctest::Contains("the rewrite of e failed"));
            fail_at_e = false;
        }
        Journal journal(journal_path, "test journal");
        const auto report =
            run_segment(in, layout, 0, 5, parts, journal, nlohmann::json("plan"), crash, zero_abe, every_note_holds, {},
                        {}, 0, ahead ? std::function<bool(std::size_t)>(unchanged) : nullptr);
        const auto records = journal.read();
        join_parts(layout, bounds, {report.parts}, {records}, parts, out);
        if (ahead) {  // c and d: one record
            bool one_record = false;
            for (const auto& r : records) one_record = one_record || (r.value("from", 0) == 3 && r.value("to", 0) == 5);
            CHECK(one_record);
        }
        return pissa_test::read_bytes(out / "model.safetensors");
    };
    const std::string plain = run("plain", false, false);
    const SafetensorsFile original(dir / "model" / "model.safetensors");
    CHECK(run("ahead", true, false) == plain);
    CHECK(run("ahead-crash", true, true) == plain);
    // The plain run itself: rewritten items zero, the others the original's.
    std::filesystem::create_directories(dir / "check");
    { std::ofstream(dir / "check" / "model.safetensors", std::ios::binary) << plain; }
    const SafetensorsFile rewritten(dir / "check" / "model.safetensors");
    CHECK(read_matrix<float>(rewritten, rewritten.at("e")).isZero(0));
    CHECK(read_matrix<float>(rewritten, rewritten.at("c")) == read_matrix<float>(original, original.at("c")));
    CHECK(read_matrix<float>(rewritten, rewritten.at("d")) == read_matrix<float>(original, original.at("d")));
}

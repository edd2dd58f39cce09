// Tests for the scale-out and restart of io/init_checkpoint.hpp: a job split into shards, run in any
// order, gives the bytes of a single run; a run stopped at any point (a callback that throws leaves
// the disk as SIGKILL would for a resumable run) and resumed gives the same bytes; damaged journal
// records, parts and pieces are found and redone; resumes with other options are refused.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/init_checkpoint.hpp>

#include <map>

using namespace pissa::io;
using pissa_test::ScratchDir;
namespace fs = std::filesystem;

namespace {

/// A small model of `files` safetensors files (sharded with an index when more than one): per
/// layer an attention block of q/k/v (BF16), an MLP down projection and a norm; a config.json.
void make_resume_model(const fs::path& dir, int files) {
    fs::create_directories(dir);
    nlohmann::ordered_json index = {{"metadata", {{"total_size", 0}}},
                                    {"weight_map", nlohmann::ordered_json::object()}};
    const int layers = 4;
    for (int f = 0; f < files; ++f) {
        std::vector<OwnedTensor> tensors;
        for (int layer = f * layers / files; layer < (f + 1) * layers / files; ++layer) {
            const std::string prefix = "model.layers." + std::to_string(layer) + ".";
            for (const char* proj : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}) {
                pissa::Matrix<float> W =
                    pissa_test::gaussian<float>(40, 24 + 8 * (proj[0] == 'm'), 100 * layer + proj[10]);
                for (pissa::Index j = 0; j < W.cols(); ++j) W.col(j) *= std::pow(0.85f, static_cast<float>(j));
                tensors.push_back(matrix_tensor(prefix + proj + ".weight", W, Dtype::BF16));
            }
            tensors.push_back({{prefix + "input_layernorm.weight", Dtype::F32, {24}},
                               pissa_test::random_bytes(96, static_cast<std::uint32_t>(layer))});
        }
        const std::string name =
            files == 1 ? "model.safetensors"
                       : "model-0000" + std::to_string(f + 1) + "-of-0000" + std::to_string(files) + ".safetensors";
        for (const auto& t : tensors) index["weight_map"][t.spec.name] = name;
        write_safetensors(dir / name, tensors, {{"format", "pt"}});
    }
    if (files > 1) detail::write_text_file(dir / index_file_name, index.dump(2));
    detail::write_text_file(dir / "config.json", "{\"architectures\": [\"LlamaForCausalLM\"]}");
}

InitCheckpointOptions resume_options() {
    InitCheckpointOptions o;
    o.pissa.rank = 4;
    o.target_modules = {"q_proj", "v_proj", "down_proj"};
    o.seed = 3;
    return o;
}

/// Every file under `dir` (relative path -> bytes).
std::map<std::string, std::string> tree(const fs::path& dir) {
    std::map<std::string, std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(dir))
        if (e.is_regular_file()) out[fs::relative(e.path(), dir).string()] = pissa_test::read_bytes(e.path());
    return out;
}

/// Thrown by a callback to stop a run where a kill would.
struct Killed {};

fs::path work_of(const fs::path& out) { return out.parent_path() / ("." + out.filename().string() + ".pissa-work"); }

}  // namespace

TEST_CASE("init_checkpoint --shard: every split, in any order, gives the bytes of a single run") {
    for (int files : {1, 2}) {
        CAPTURE(files);
        ScratchDir dir("shards");
        make_resume_model(dir / "model", files);
        const auto options = resume_options();
        init_checkpoint(dir / "model", dir / "single", options);
        const auto expected = tree(dir / "single");
        REQUIRE(expected.size() == static_cast<std::size_t>(files + (files > 1) + 3));  // + config, adapter files

        for (std::uint64_t count : {1, 2, 3, 7, 30}) {  // 30: more shards than tensors
            CAPTURE(count);
            const fs::path out = dir / ("sharded-" + std::to_string(count));
            std::vector<std::uint64_t> order(count);
            for (std::uint64_t k = 0; k < count; ++k) order[k] = (k * 7 + 1) % count;  // not in index order
            if (count == 7) order = {6, 5, 4, 3, 2, 1, 0};
            std::size_t modules = 0;
            for (std::size_t n = 0; n < order.size(); ++n) {
                auto o = options;
                o.shard = {order[n], count, "test"};
                const auto report = init_checkpoint(dir / "model", out, o);
                CHECK(report.complete == (n + 1 == order.size()));
                CHECK(report.waiting_for.size() == (report.complete ? 0 : count - n - 1));
                if (!report.complete) modules += report.modules.size();
                if (report.complete) CHECK(report.modules.size() == 12);  // the summary covers the whole job
            }
            CHECK(modules <= 12);
            CHECK(tree(out) == expected);
            CHECK_FALSE(fs::exists(work_of(out)));
        }
    }
}

TEST_CASE("init_checkpoint --resume: stopped anywhere, resumed, the same bytes; verified work is not redone") {
    ScratchDir dir("resume");
    make_resume_model(dir / "model", 2);
    const auto options = resume_options();
    init_checkpoint(dir / "model", dir / "single", options);
    const auto expected = tree(dir / "single");

    struct Stop {
        const char* where;
        std::function<void(InitCheckpointCallbacks&)> arm;
        bool some_work_kept;
    };
    int modules_seen = 0;
    const std::vector<Stop> stops = {
        {"before the first module",
         [](InitCheckpointCallbacks& c) {
             c.progress = [](std::size_t, std::size_t, const TensorInfo&) { throw Killed(); };
         },
         false},
        {"mid-module (split and adapter saved, residual not written)",
         [&](InitCheckpointCallbacks& c) {
             c.module_done = [&](const ModuleReport&) {
                 if (++modules_seen == 3) throw Killed();
             };
         },
         true},
        {"between modules",
         [](InitCheckpointCallbacks& c) {
             c.progress = [](std::size_t i, std::size_t, const TensorInfo&) {
                 if (i == 7) throw Killed();
             };
         },
         true},
        {"while joining the files",
         [](InitCheckpointCallbacks& c) {
             c.joining = [](std::size_t i, std::size_t, const std::string&) {
                 if (i == 1) throw Killed();
             };
         },
         true},
        {"just before the final rename",
         [](InitCheckpointCallbacks& c) {
             c.joining = [](std::size_t i, std::size_t n, const std::string&) {
                 if (i == n) throw Killed();
             };
         },
         true},
    };
    for (const auto& stop : stops) {
        CAPTURE(stop.where);
        const fs::path out = dir / "out";
        fs::remove_all(out);
        auto o = options;
        o.resume = true;
        InitCheckpointCallbacks callbacks;
        modules_seen = 0;
        stop.arm(callbacks);
        CHECK_THROWS_AS(init_checkpoint(dir / "model", out, o, callbacks), Killed);
        CHECK_FALSE(fs::exists(out));
        REQUIRE(fs::exists(work_of(out)));  // kept for the resume
        const auto report = init_checkpoint(dir / "model", out, o);
        CHECK(report.complete);
        CHECK((report.resumed_items > 0) == stop.some_work_kept);
        CHECK(report.modules.size() == 12);
        CHECK(tree(out) == expected);
        CHECK_FALSE(fs::exists(work_of(out)));

        // again: the output is complete with the same options, nothing is done
        const auto again = init_checkpoint(dir / "model", out, o);
        CHECK(again.already_complete);
        CHECK(tree(out) == expected);
    }
}

TEST_CASE("init_checkpoint --resume: killed between the final rename and the clean-up") {
    ScratchDir dir("resume-renamed");
    make_resume_model(dir / "model", 1);
    auto o = resume_options();
    o.resume = true;
    const fs::path out = dir / "out", work = work_of(out);
    InitCheckpointCallbacks stop;
    stop.joining = [](std::size_t i, std::size_t n, const std::string&) {
        if (i == n) throw Killed();
    };
    CHECK_THROWS_AS(init_checkpoint(dir / "model", out, o, stop), Killed);
    fs::rename(work / "out", out);  // the rename happened, the work folder's removal did not
    const auto expected = tree(out);
    const auto report = init_checkpoint(dir / "model", out, o);
    CHECK(report.already_complete);
    CHECK_FALSE(fs::exists(work));
    CHECK(tree(out) == expected);
}

TEST_CASE("init_checkpoint --resume: a damaged journal record, part or piece is found and redone") {
    ScratchDir dir("resume-damage");
    make_resume_model(dir / "model", 1);
    const auto options = resume_options();
    init_checkpoint(dir / "model", dir / "single", options);
    const auto expected = tree(dir / "single");
    auto o = options;
    o.resume = true;
    const fs::path out = dir / "out", work = work_of(out);

    auto stopped_run = [&] {  // stops before the last tensor: most of the work is journaled
        fs::remove_all(work);
        InitCheckpointCallbacks callbacks;
        callbacks.progress = [](std::size_t i, std::size_t n, const TensorInfo&) {
            if (i + 1 == n) throw Killed();
        };
        CHECK_THROWS_AS(init_checkpoint(dir / "model", out, o, callbacks), Killed);
    };
    auto resumed_items = [&] {
        const auto report = init_checkpoint(dir / "model", out, o);
        CHECK(tree(out) == expected);
        fs::remove_all(out);
        return report.resumed_items;
    };
    stopped_run();
    const std::size_t all_kept = resumed_items();
    CHECK(all_kept == 19);  // 20 tensors, stopped before the last

    stopped_run();  // a record whose text was changed
    const fs::path journal = work / "journal" / "shard-0-of-1.jsonl";
    std::string text = pissa_test::read_bytes(journal);
    const auto third = text.find("\"from\":", text.find("\"from\":", text.find("\"from\":") + 1) + 1);
    text[text.find("\"end\":", third) + 7] ^= 1;
    pissa_test::write_bytes(journal, text);
    const std::size_t after_record = resumed_items();
    CHECK(after_record > 0);
    CHECK(after_record < all_kept);

    stopped_run();  // the part file cut short (a lost write)
    const fs::path part = work / "parts" / "model.safetensors.part0";
    fs::resize_file(part, fs::file_size(part) / 2);
    const std::size_t after_cut = resumed_items();
    CHECK(after_cut < all_kept);

    stopped_run();  // a flipped byte in the part
    std::string bytes = pissa_test::read_bytes(part);
    bytes[bytes.size() / 3] ^= 0x40;
    pissa_test::write_bytes(part, bytes);
    CHECK(resumed_items() < all_kept);

    stopped_run();  // a damaged piece (a module's saved adapter)
    const fs::path piece = work / "pieces" / "00000002.safetensors";
    std::string piece_bytes = pissa_test::read_bytes(piece);
    piece_bytes[piece_bytes.size() - 3] ^= 1;
    pissa_test::write_bytes(piece, piece_bytes);
    CHECK(resumed_items() < all_kept);

    stopped_run();  // a journal of garbage: everything is redone
    pissa_test::write_bytes(journal, "not a journal\n");
    CHECK(resumed_items() == 0);
}

TEST_CASE("init_checkpoint: resumes and shards with other options are refused; a plain run starts over") {
    ScratchDir dir("resume-refuse");
    make_resume_model(dir / "model", 2);
    auto o = resume_options();
    o.resume = true;
    const fs::path out = dir / "out";
    InitCheckpointCallbacks stop;
    stop.progress = [](std::size_t i, std::size_t, const TensorInfo&) {
        if (i == 5) throw Killed();
    };
    CHECK_THROWS_AS(init_checkpoint(dir / "model", out, o, stop), Killed);

    auto other = o;
    other.pissa.rank = 5;
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", out, other), doctest::Contains("/adapter_config/r"),
                         pissa::invalid_argument);
    other = o;
    other.seed = 4;
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", out, other), doctest::Contains("pissa.seed"),
                         pissa::invalid_argument);
    other = o;
    other.shard = {0, 2, "test"};
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", out, other), doctest::Contains("holds the work of another job"),
                         pissa::invalid_argument);
    // joining an unfinished job names the missing shard
    CHECK_THROWS_WITH_AS(join_init_checkpoint(out), doctest::Contains("shards 0 of 1 have not finished"),
                         pissa::invalid_argument);

    // a plain run (no resume) starts over in place of the killed one
    auto plain = resume_options();
    const auto report = init_checkpoint(dir / "model", out, plain);
    CHECK(report.complete);
    CHECK(report.resumed_items == 0);
    const auto expected = tree(out);

    // the output is complete: --resume with the same options does nothing, with others is refused
    CHECK(init_checkpoint(dir / "model", out, o).already_complete);
    other = o;
    other.pissa.lora_alpha = 16;
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", out, other),
                         doctest::Contains("complete output of other options"), pissa::invalid_argument);
    CHECK(tree(out) == expected);
    CHECK_THROWS_WITH_AS(join_init_checkpoint(out), doctest::Contains("no job to join"), pissa::invalid_argument);

    // a changed input is refused at the join
    fs::remove_all(out);
    auto shard0 = resume_options();
    shard0.shard = {0, 2, "test"};
    CHECK_FALSE(init_checkpoint(dir / "model", out, shard0).complete);
    auto shard1 = shard0;
    shard1.shard = {1, 2, "test"};
    fs::last_write_time(dir / "model" / index_file_name, fs::file_time_type::clock::now() + std::chrono::hours(1));
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", out, shard1), doctest::Contains("/inputs"),
                         pissa::invalid_argument);
}

TEST_CASE("join_init_checkpoint: finishes a job whose last shard did not join, and is safe to repeat") {
    ScratchDir dir("join");
    make_resume_model(dir / "model", 2);
    const auto options = resume_options();
    init_checkpoint(dir / "model", dir / "single", options);
    const auto expected = tree(dir / "single");
    const fs::path out = dir / "out";
    for (std::uint64_t k = 0; k < 3; ++k) {
        auto o = options;
        o.shard = {k, 3, "test"};
        InitCheckpointCallbacks callbacks;
        if (k == 2)  // the last shard dies while extending the first file's first part
            callbacks.joining = [](std::size_t i, std::size_t, const std::string&) {
                if (i == 1) throw Killed();
            };
        if (k < 2) init_checkpoint(dir / "model", out, o);
        else CHECK_THROWS_AS(init_checkpoint(dir / "model", out, o, callbacks), Killed);
    }
    // simulate a half-extended part: bytes appended past its recorded size are cut back
    const fs::path work = work_of(out);
    const fs::path head = work / "parts" / "model-00002-of-00002.safetensors.part0";
    REQUIRE(fs::exists(head));
    std::ofstream(head, std::ios::app) << "garbage appended by an interrupted join";
    const auto report = join_init_checkpoint(out);
    CHECK(report.complete);
    CHECK(report.modules.size() == 12);
    CHECK(tree(out) == expected);
    CHECK_FALSE(fs::exists(work));
}

TEST_CASE("init_checkpoint --shard with QPiSSA: the same bytes as a single run") {
    ScratchDir dir("shards-qpissa");
    make_resume_model(dir / "model", 1);
    auto options = resume_options();
    options.quantize = pissa::QuantInitConfig{};
    init_checkpoint(dir / "model", dir / "single", options);
    for (std::uint64_t k : {1, 0}) {
        auto o = options;
        o.shard = {k, 2, "test"};
        const auto report = init_checkpoint(dir / "model", dir / "out", o);
        CHECK(report.complete == (k == 0));
        if (report.complete) {
            REQUIRE(report.modules.size() == 12);
            CHECK(report.modules[0].quant.has_value());
        }
    }
    CHECK(tree(dir / "out") == tree(dir / "single"));
}

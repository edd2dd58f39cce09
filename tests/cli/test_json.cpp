// The --json objects of init, convert, merge, inspect and quant-error: exactly the keys docs/cli.md
// lists, and numbers that are the library's (norms, scalings, per-kind means, a merge with s != 1).
#include "cli/cli_support.hpp"

#include <pissa/io/peft.hpp>

#include <doctest/doctest.h>

#include <map>

using namespace pissa_cli_test;
using pissa::io::Adapter;
using pissa::io::read_adapter;

namespace {

std::set<std::string> keys_of(const nlohmann::json& j) {
    std::set<std::string> out;
    for (const auto& [key, value] : j.items()) out.insert(key);
    return out;
}

nlohmann::json json_of(const ScratchDir& dir, const std::string& args) {
    const Run r = pissa_run(dir, args);
    INFO(args, ": ", r.err);
    REQUIRE(r.code == 0);
    return nlohmann::json::parse(r.out);
}

}  // namespace

TEST_CASE("init, convert, merge, inspect --json: the documented keys, the library's numbers") {
    ScratchDir dir("cli-json");
    REQUIRE(pissa_run(dir, "generate --out m --dtype F32 --shards 2 " + small_llama).code == 0);
    // alpha 16, r 4: s = 4, so a merge that forgot the scaling would show
    const auto init = json_of(dir, "init m --out o --rank 4 --alpha 16 --targets q_proj,down_proj --json");
    CHECK(keys_of(init) == std::set<std::string>{"command",
                                                 "model",
                                                 "out",
                                                 "adapter",
                                                 "complete",
                                                 "already_complete",
                                                 "shard",
                                                 "waiting_for",
                                                 "resumed_tensors",
                                                 "init",
                                                 "method",
                                                 "niter",
                                                 "fused_power_iteration",
                                                 "products",
                                                 "seed",
                                                 "rank",
                                                 "lora_alpha",
                                                 "scaling",
                                                 "use_rslora",
                                                 "fan_in_fan_out",
                                                 "seconds",
                                                 "modules"});
    CHECK(init["scaling"] == 4.0);
    CHECK(init["init"] == "pissa");
    CHECK(init["method"] == "randomized");
    CHECK(init["complete"] == true);
    CHECK(keys_of(init["shard"]) == std::set<std::string>{"index", "count", "source"});
    const Checkpoint model(dir / "m"), residual(dir / "o");
    const Adapter adapter = read_adapter(dir / "o" / "pissa_init");
    REQUIRE(init["modules"].size() == 4);
    for (std::size_t i = 0; i < 4; ++i) {
        const auto& m = init["modules"][i];
        CHECK(keys_of(m) == std::set<std::string>{"name", "shape", "rank", "energy_fraction", "weight_norm",
                                                  "residual_norm", "seconds", "seed"});
        const std::string name = m["name"].get<std::string>() + ".weight";
        const pissa::Matrix<double> W = weight(model, name), R = weight(residual, name);
        const auto* lora = adapter.find(m["name"].get<std::string>());
        REQUIRE(lora != nullptr);
        const pissa::Matrix<double> sBA = 4.0 * (lora->B * lora->A).cast<double>();
        CHECK(m["weight_norm"].get<double>() == doctest::Approx(W.norm()).epsilon(1e-6));
        CHECK(m["residual_norm"].get<double>() == doctest::Approx(R.norm()).epsilon(1e-5));
        CHECK(m["energy_fraction"].get<double>() == doctest::Approx(sBA.squaredNorm() / W.squaredNorm()).epsilon(1e-4));
    }

    // inspect an adapter: norms and scalings from the file
    const auto ia = json_of(dir, "inspect o/pissa_init --json");
    CHECK(keys_of(ia) == std::set<std::string>{"kind", "path", "r", "lora_alpha", "use_rslora", "scaling",
                                               "target_modules", "init_lora_weights", "fan_in_fan_out", "metadata",
                                               "modules"});
    CHECK(ia["kind"] == "adapter");
    CHECK(ia["scaling"] == 4.0);
    CHECK(ia["metadata"]["pissa.rank"] == "4");
    REQUIRE(ia["modules"].size() == adapter.modules.size());
    for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
        const auto& m = ia["modules"][i];
        CHECK(keys_of(m) == std::set<std::string>{"name", "rank", "in", "out", "scaling", "norm_A", "norm_B"});
        CHECK(m["name"] == adapter.modules[i].name);
        CHECK(m["rank"] == 4);
        CHECK(m["in"] == adapter.modules[i].A.cols());
        CHECK(m["out"] == adapter.modules[i].B.rows());
        CHECK(m["norm_A"].get<double>() == doctest::Approx(adapter.modules[i].A.cast<double>().norm()).epsilon(1e-6));
        CHECK(m["norm_B"].get<double>() == doctest::Approx(adapter.modules[i].B.cast<double>().norm()).epsilon(1e-6));
    }

    // inspect a checkpoint
    const auto ic = json_of(dir, "inspect m --json");
    CHECK(keys_of(ic) == std::set<std::string>{"kind", "path", "sharded", "total_size", "tensors", "metadata"});
    CHECK(ic["sharded"] == true);
    CHECK(ic["total_size"] == model.total_size());
    REQUIRE(ic["tensors"].size() == model.size());
    for (const auto& t : ic["tensors"]) {
        CHECK(keys_of(t) == std::set<std::string>{"name", "dtype", "shape", "bytes", "file"});
        const auto* info = model.find(t["name"].get<std::string>());
        REQUIRE(info != nullptr);
        CHECK(t["bytes"] == info->nbytes());
        CHECK(t["file"] == model.file_of(info->name).path().filename().string());
    }

    // merge with s = 4: W_res + 4 B A is W
    const auto merged = json_of(dir, "merge o o/pissa_init --out merged --json");
    CHECK(keys_of(merged) ==
          std::set<std::string>{"command", "model", "adapter", "out", "seconds", "modules", "skipped"});
    REQUIRE(merged["modules"].size() == 4);
    for (const auto& m : merged["modules"]) {
        CHECK(keys_of(m) == std::set<std::string>{"name", "shape", "scaling", "seconds"});
        CHECK(m["scaling"] == 4.0);
    }
    CHECK(merged["skipped"].empty());
    const Checkpoint back(dir / "merged");
    for (const auto& m : init["modules"]) {
        const std::string name = m["name"].get<std::string>() + ".weight";
        CHECK(pissa_test::relative_error(weight(back, name), weight(model, name)) < 1e-5);
    }

    // convert: rank 2r, alpha doubled, the same scaling
    Adapter trained = adapter;
    for (auto& m : trained.modules) m.A *= 1.01f;
    trained.config.init_lora_weights = "pissa_niter_4";
    pissa::io::write_adapter(dir / "trained", trained);
    const auto converted = json_of(dir, "convert --initial o/pissa_init --trained trained --out lora --json");
    CHECK(keys_of(converted) == std::set<std::string>{"command", "out", "r", "lora_alpha", "use_rslora", "modules"});
    CHECK(converted["r"] == 8);
    CHECK(converted["lora_alpha"] == 32.0);
    REQUIRE(converted["modules"].size() == 4);
    for (const auto& m : converted["modules"]) {
        CHECK(keys_of(m) == std::set<std::string>{"name", "rank", "scaling"});
        CHECK(m["rank"] == 8);
        CHECK(m["scaling"] == 4.0);
    }
}

TEST_CASE("quant-error --json: the kinds are the means of the modules, each kind weighing the same") {
    ScratchDir dir("cli-json-kinds");
    REQUIRE(pissa_run(dir, "generate --out m --layers 3 --hidden 64 --intermediate 96 --vocab 128 --heads 4").code ==
            0);
    const auto q = json_of(dir, "quant-error m --rank 4 --targets q_proj,v_proj,down_proj --json");
    REQUIRE(q["modules"].size() == 9);
    std::map<std::string, std::vector<nlohmann::json>> by_kind;
    for (const auto& m : q["modules"]) {
        const std::string name = m["module"].get<std::string>();
        by_kind[name.substr(name.find('.', name.find("layers.") + 7) + 1)].push_back(m);
    }
    REQUIRE(by_kind.size() == 3);
    REQUIRE(q["kinds"].size() == 4);  // three kinds, then "all"
    std::map<std::string, double> all;
    for (const auto& kind : q["kinds"]) {
        CHECK(keys_of(kind) == std::set<std::string>{"kind", "modules", "qlora", "loftq", "qpissa", "loftq_reduction",
                                                     "qpissa_reduction"});
        const std::string name = kind["kind"].get<std::string>();
        if (name == "all") continue;
        const auto& modules = by_kind.at(name);
        CHECK(kind["modules"] == modules.size());
        for (const char* key : {"qlora", "loftq", "qpissa", "loftq_reduction", "qpissa_reduction"}) {
            double mean = 0;
            for (const auto& m : modules) mean += m[key].get<double>() / static_cast<double>(modules.size());
            CHECK(kind[key].get<double>() == doctest::Approx(mean).epsilon(1e-12));
            all[key] += mean / 3;
        }
    }
    const auto& total = q["kinds"][3];
    CHECK(total["kind"] == "all");
    for (const auto& [key, mean] : all) CHECK(total[key].get<double>() == doctest::Approx(mean).epsilon(1e-12));
}

// Tests for io/work_folder.hpp: where a job's work folder lies, agreeing on its plan (the first
// difference named), its locks seen as in use, its removal, and plan digests.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/io/journal.hpp>
#include <pissa/io/work_folder.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

using namespace pissa::io;
using pissa_test::ScratchDir;

TEST_CASE("first_difference names the first path where two plans differ") {
    const auto a = nlohmann::ordered_json::parse(R"({"model": "m", "adapter_config": {"r": 8, "alpha": 16}})");
    auto b = a;
    CHECK(first_difference(a, b).empty());
    b["adapter_config"]["r"] = 4;
    CHECK(first_difference(a, b) == "/adapter_config/r");
    b = a;
    b["extra"] = true;
    CHECK(first_difference(a, b) == "/extra");
    CHECK(first_difference(b, a) == "/extra");
    CHECK(first_difference(nlohmann::ordered_json(1), nlohmann::ordered_json(2)) == "/");
}

TEST_CASE("a work folder beside its output: the plan agreed once, another job's plan refused, locks, removal") {
    ScratchDir dir("work-folder");
    const WorkFolder work(dir / "out");
    CHECK(work.path() == dir / ".out.pissa-work");
    CHECK(work.plan_file() == work.path() / "plan.json");
    CHECK(work.journal(1, 4) == work.path() / "journal" / "shard-1-of-4.jsonl");
    CHECK_FALSE(work.exists());

    const auto plan = nlohmann::ordered_json::parse(R"({"job": "init", "rank": 8})");
    work.agree_on_plan(plan, "remove it");
    CHECK(work.exists());
    CHECK(std::filesystem::is_directory(work.parts()));
    CHECK(std::filesystem::is_directory(work.pieces()));
    CHECK(work.read_plan() == plan);
    CHECK_NOTHROW(work.agree_on_plan(plan, "remove it"));  // the same plan: agreed
    auto other = plan;
    other["rank"] = 4;
    CHECK_THROWS_WITH_AS(work.agree_on_plan(other, "remove it"),
                         doctest::Contains("its plan differs at /rank): remove it"), pissa::invalid_argument);
    CHECK(work.read_plan() == plan);  // never replaced

    CHECK_FALSE(work.in_use());
    {
        Journal journal(work.journal(0, 2), "a shard's journal");
        CHECK(work.in_use());
    }
    CHECK_FALSE(work.in_use());

    CHECK(plan_digest(plan) == plan_digest(nlohmann::ordered_json::parse(R"({"job": "init", "rank": 8})")));
    CHECK(plan_digest(plan) != plan_digest(other));
    CHECK(plan_digest(plan).size() == 16);

    work.remove();
    CHECK_FALSE(work.exists());
    CHECK_THROWS_AS(work.read_plan(), format_error);
}

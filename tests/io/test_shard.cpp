// Tests for io/shard.hpp: --shard parsing, the launchers' environments and the deterministic
// partition of the work.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/io/shard.hpp>

#include <map>
#include <numeric>

using namespace pissa::io;
using pissa_test::ScratchDir;

namespace {

/// An environment made of `vars` only.
EnvironmentLookup environment(const std::map<std::string, std::string>& vars) {
    return [vars](const char* name) -> const char* {
        const auto it = vars.find(name);
        return it == vars.end() ? nullptr : it->second.c_str();
    };
}

ShardSpec shard_of(const std::string& text, const std::map<std::string, std::string>& vars = {}) {
    return parse_shard(text, environment(vars));
}

}  // namespace

TEST_CASE("parse_shard: K/N, and refusals that name the value") {
    CHECK(shard_of("0/1") == ShardSpec{0, 1, ""});
    CHECK(shard_of("3/4") == ShardSpec{3, 4, ""});
    CHECK(shard_of("3/4").source == "--shard");
    for (const char* bad : {"4/4", "1", "/2", "1/", "-1/2", "1/-2", " 1/2", "1/2 ", "a/b", "1/0", "0/0", "0x1/2",
                            "1/2/3", "99999999999999999999/2"}) {
        const std::string quoted = std::string("'") + bad + "'";
        CHECK_THROWS_WITH_AS(shard_of(bad), doctest::Contains(quoted.c_str()), pissa::invalid_argument);
    }
}

TEST_CASE("parse_shard auto: the launchers' variables") {
    // Slurm job array (ids need not start at 0)
    CHECK(shard_of("auto",
                   {{"SLURM_ARRAY_TASK_ID", "5"}, {"SLURM_ARRAY_TASK_MIN", "3"}, {"SLURM_ARRAY_TASK_COUNT", "4"}}) ==
          ShardSpec{2, 4, ""});
    CHECK(shard_of("auto", {{"SLURM_ARRAY_TASK_ID", "1"}, {"SLURM_ARRAY_TASK_COUNT", "2"}}).source ==
          "SLURM_ARRAY_TASK_ID");
    // an array whose tasks each run several ranks: array index x ranks + rank
    const auto both = shard_of(
        "auto",
        {{"SLURM_ARRAY_TASK_ID", "1"}, {"SLURM_ARRAY_TASK_COUNT", "3"}, {"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}});
    CHECK(both == ShardSpec{3, 6, ""});
    CHECK(both.source == "SLURM_ARRAY_TASK_ID x SLURM_PROCID");
    // MPI ranks win over Slurm's task id (mpirun inside an allocation)
    CHECK(shard_of("auto", {{"OMPI_COMM_WORLD_RANK", "2"},
                            {"OMPI_COMM_WORLD_SIZE", "3"},
                            {"SLURM_PROCID", "0"},
                            {"SLURM_NTASKS", "1"}}) == ShardSpec{2, 3, ""});
    CHECK(shard_of("auto", {{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}}).source == "PMI_RANK");
    CHECK(shard_of("auto", {{"SLURM_PROCID", "7"}, {"SLURM_NTASKS", "8"}}) == ShardSpec{7, 8, ""});
    // Kubernetes Indexed Job: the count is given
    CHECK(shard_of("auto/4", {{"JOB_COMPLETION_INDEX", "3"}}) == ShardSpec{3, 4, ""});
    CHECK_THROWS_WITH_AS(shard_of("auto", {{"JOB_COMPLETION_INDEX", "3"}}), doctest::Contains("auto/N"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(shard_of("auto/4", {{"JOB_COMPLETION_INDEX", "4"}}), doctest::Contains("shard 4 of 4"),
                         pissa::invalid_argument);
    // a given count must agree with the launcher's
    CHECK_THROWS_WITH_AS(shard_of("auto/3", {{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}}),
                         doctest::Contains("says 2 shards"), pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(shard_of("auto"), doctest::Contains("no launcher found"), pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(shard_of("auto", {{"OMPI_COMM_WORLD_RANK", "1"}}), doctest::Contains("OMPI_COMM_WORLD_SIZE"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(shard_of("auto", {{"PMI_RANK", " 1"}, {"PMI_SIZE", "2"}}), doctest::Contains("PMI_RANK=' 1'"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(shard_of("auto", {{"SLURM_ARRAY_TASK_ID", "8"}, {"SLURM_ARRAY_TASK_COUNT", "4"}}),
                         doctest::Contains("outside the array"), pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(shard_of("auto/0"), doctest::Contains("auto/N"), pissa::invalid_argument);
}

TEST_CASE("partition_work: contiguous runs covering everything, each within one item of its share") {
    std::mt19937 gen(11);
    for (int trial = 0; trial < 200; ++trial) {
        const std::size_t items = gen() % 40;
        std::vector<std::uint64_t> costs(items);
        for (auto& c : costs) c = (gen() % 4 == 0) ? 1000 + gen() % 100000 : gen() % 100;  // a few heavy modules
        const std::uint64_t count = 1 + gen() % 12;
        const auto bounds = partition_work(costs, count);
        REQUIRE(bounds.size() == count + 1);
        CHECK(bounds.front() == 0);
        CHECK(bounds.back() == items);
        const std::uint64_t total = std::accumulate(costs.begin(), costs.end(), std::uint64_t{0});
        const std::uint64_t heaviest = items ? *std::max_element(costs.begin(), costs.end()) : 0;
        for (std::uint64_t k = 0; k < count; ++k) {
            CHECK(bounds[k] <= bounds[k + 1]);
            std::uint64_t run = 0;
            for (std::size_t i = bounds[k]; i < bounds[k + 1]; ++i) run += costs[i];
            CHECK(run <= total / count + 2 * heaviest);
        }
        CHECK(partition_work(costs, count) == bounds);  // deterministic
    }
    CHECK(partition_work({5, 5, 5, 5}, 2) == std::vector<std::size_t>{0, 2, 4});
    CHECK(partition_work({5, 5}, 4) == std::vector<std::size_t>{0, 0, 1, 1, 2});  // more shards than items
    CHECK(partition_work({}, 3) == std::vector<std::size_t>{0, 0, 0, 0});
    CHECK(partition_work({1, 100, 1}, 3) == std::vector<std::size_t>{0, 1, 2, 3});
    CHECK_THROWS_AS(partition_work({1}, 0), pissa::invalid_argument);
}

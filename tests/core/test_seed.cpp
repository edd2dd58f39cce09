// Tests for seed.hpp: module_seed is the seed rule adapters record (stream_seed of the job's seed and
// the target's index), its values are fixed, and neighbouring modules and jobs get different seeds.
#include "support.hpp"

#include <pissa/detail/random.hpp>
#include <pissa/seed.hpp>

#include <cstdint>
#include <set>
#include <string>

TEST_CASE("module_seed: the recorded rule, fixed values, a different seed per module and per job") {
    CHECK(std::string(pissa::module_seed_rule).find("pissa::module_seed(seed, i)") != std::string::npos);
    // Adapters written earlier record only the rule: its values must not change.
    CHECK(pissa::module_seed(42, 0) == 14473931205035997723ULL);
    CHECK(pissa::module_seed(42, 1) == 18048596636615606144ULL);
    CHECK(pissa::module_seed(42, 2) == 5632914758302621589ULL);
    std::set<std::uint64_t> seen;
    for (std::uint64_t seed : {0, 1, 2, 42})
        for (std::uint64_t i = 0; i < 64; ++i) {
            CHECK(pissa::module_seed(seed, i) == pissa::detail::stream_seed(seed, i));
            seen.insert(pissa::module_seed(seed, i));
        }
    CHECK(seen.size() == 4 * 64);
}

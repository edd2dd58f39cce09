// Tests for quant_blockwise8.hpp: bitsandbytes' 8-bit dynamic map, the CUDA kernel's search,
// and the blockwise round trip.
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/quant_blockwise8.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

TEST_CASE("8-bit dynamic map: bitsandbytes' create_dynamic_map shape") {
    const auto& map = pissa::dynamic_map_8bit();
    for (std::size_t k = 0; k + 1 < map.size(); ++k) CHECK(map[k] <= map[k + 1]);
    CHECK(map[127] == 0.0f);
    CHECK(map[255] == 1.0f);
    // Largest non-unit entry: the last midpoint of linspace(0.1, 1, 65) = (0.9859375 + 1) / 2.
    CHECK(map[254] == doctest::Approx(0.99296875).epsilon(1e-6));
    CHECK(map[0] == -map[254]);
    // Smallest magnitude: 1e-6 * (0.1 + 1) / 2.
    CHECK(map[128] == doctest::Approx(5.5e-7).epsilon(1e-5));
    CHECK(map[126] == -map[128]);
}

TEST_CASE("8-bit search reproduces the CUDA kernel's dQuantize<0>") {
    const auto& map = pissa::dynamic_map_8bit();
    // The binary search compares against odd-indexed entries only: those come back exactly...
    for (int k = 1; k <= 253; k += 2) CHECK(int(pissa::quantize_8bit_value(map, map[std::size_t(k)])) == k);
    // ...an even entry goes to a neighbour, and +1 is clamped to entry 254.
    for (int k = 2; k <= 252; k += 2) {
        const int got = pissa::quantize_8bit_value(map, map[std::size_t(k)]);
        CHECK((got == k - 1 || got == k + 1));
    }
    CHECK(pissa::quantize_8bit_value(map, 1.0f) == 254);
    CHECK(pissa::quantize_8bit_value(map, -1.0f) == 0);
    CHECK(pissa::quantize_8bit_value(map, 0.0f) == 127);
}

TEST_CASE("8-bit blockwise round trip: absmax per block, a zero block, a short tail block, bad input") {
    const std::vector<float> values = {0.5f, -1.0f, 0.25f, 2.0f, 0.0f, 0.0f, 0.0f, 0.0f, 3.0f, -0.1f};
    const pissa::Blockwise8bit q = pissa::quantize_blockwise_8bit(values, 4);
    CHECK(q.block_size == 4);
    CHECK(q.codes.size() == values.size());
    CHECK(q.absmax == std::vector<float>{2.0f, 0.0f, 3.0f});
    const std::vector<float> back = pissa::dequantize_blockwise_8bit(q);
    REQUIRE(back.size() == values.size());
    // The search clamps +-1 to entries 0 and 254, whose gap to the next is 2 * 0.9 / 64 at most.
    for (std::size_t i = 0; i < values.size(); ++i) {
        INFO("value ", i);
        CHECK(std::fabs(back[i] - values[i]) <= 0.0140625f * q.absmax[i / 4] + 1e-6f);
    }
    for (std::size_t i = 4; i < 8; ++i) CHECK(back[i] == 0.0f);
    CHECK(back[1] < 0.0f);
    CHECK(back[9] < 0.0f);

    CHECK_THROWS_AS(pissa::quantize_blockwise_8bit(values, 0), pissa::invalid_argument);
    CHECK_THROWS_AS(pissa::quantize_blockwise_8bit({1.0f, std::numeric_limits<float>::quiet_NaN()}),
                    pissa::invalid_argument);
    pissa::Blockwise8bit broken = q;
    broken.absmax.pop_back();
    CHECK_THROWS_AS(pissa::dequantize_blockwise_8bit(broken), pissa::invalid_argument);
}

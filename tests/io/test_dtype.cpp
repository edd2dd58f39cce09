// Tests for io/dtype.hpp: every dtype's safetensors name and size, parsing names back, and which
// dtypes pissa computes with.
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/io/dtype.hpp>

#include <cstddef>
#include <map>
#include <string>
#include <string_view>
#include <vector>

using namespace pissa::io;

namespace {

/// Every enumerator of Dtype, BOOL to U64.
std::vector<Dtype> every_dtype() {
    std::vector<Dtype> out;
    for (int k = 0; k <= static_cast<int>(Dtype::U64); ++k) out.push_back(static_cast<Dtype>(k));
    return out;
}

}  // namespace

TEST_CASE("dtype names") {
    for (Dtype d : every_dtype()) CHECK(dtype_from_name(dtype_name(d)) == d);
    CHECK_THROWS_WITH_AS(dtype_from_name("Q4"), doctest::Contains("unknown safetensors dtype 'Q4'"),
                         pissa::invalid_argument);
    CHECK(is_float_dtype(Dtype::BF16));
    CHECK_FALSE(is_float_dtype(Dtype::I8));
}

TEST_CASE("dtype sizes and names as the safetensors format defines them; unknown names are not parsed") {
    const std::map<std::string, std::size_t> expected = {
        {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
        {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
    std::map<std::string, std::size_t> got;
    for (Dtype d : every_dtype()) got[std::string(dtype_name(d))] = dtype_size(d);
    CHECK(got == expected);
    int floats = 0;
    for (Dtype d : every_dtype()) floats += is_float_dtype(d) ? 1 : 0;
    CHECK(floats == 4);
    CHECK(is_float_dtype(Dtype::F16));
    CHECK(is_float_dtype(Dtype::F32));
    CHECK(is_float_dtype(Dtype::F64));
    Dtype parsed = Dtype::U8;
    CHECK_FALSE(parse_dtype("f32", parsed));  // names are case-sensitive
    CHECK_FALSE(parse_dtype("", parsed));
    CHECK(parsed == Dtype::U8);  // left as it was
    REQUIRE(parse_dtype("BF16", parsed));
    CHECK(parsed == Dtype::BF16);
}

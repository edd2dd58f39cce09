// Tests for io/safetensors_header.hpp: parsing headers without file access: JSON nested too deep is
// refused before it is built, the indented-size bound of the strict JSON parser, and a header of
// 100,000 tensors parsed in linear time.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/safetensors_header.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

using namespace pissa::io;

namespace {
/// A safetensors file image whose header is `json` padded with spaces, followed by `data` bytes of zeros.
std::string image(const std::string& json, std::size_t data = 0) {
    std::string h = json;
    h.append((8 - h.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xFF);
    return out + h + std::string(data, '\0');
}
SafetensorsHeader parse_image(const std::string& bytes, const std::string& name) {
    return parse_safetensors_header(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), bytes.size(),
                                    name);
}
}  // namespace

TEST_CASE("JSON nested deeper than max_json_depth is refused before it is built, at any depth") {
    for (std::size_t depth : {max_json_depth + 1, std::size_t{100'000}, std::size_t{1'000'000}}) {
        INFO("depth ", depth);
        const std::string bytes = image("{\"__metadata__\":" + pissa_test::nested_arrays(depth) + "}");
        CHECK_THROWS_WITH_AS(parse_image(bytes, "deep.safetensors"),
                             doctest::Contains("deep.safetensors: JSON nested deeper than 256 levels"), format_error);
    }
    // At the limit the JSON itself parses (the header is then refused for its content, not its depth).
    const std::string at_limit = image("{\"__metadata__\":" + pissa_test::nested_arrays(max_json_depth - 1) + "}");
    CHECK_THROWS_WITH_AS(parse_image(at_limit, "f"), doctest::Contains("__metadata__ is not an object"), format_error);
    detail::JsonStats stats;
    const std::string objects = pissa_test::nested_arrays(max_json_depth);
    CHECK_NOTHROW(detail::parse_json_strict(objects.data(), objects.data() + objects.size(), "f", &stats));
    CHECK(stats.depth == max_json_depth);
}

TEST_CASE("the indented-size bound of parse_json_strict holds") {
    for (const std::string& text : {std::string(R"({"a":[1,2,{"x":1e5,"y":"\u00e9"}],"b":{},"c":[[[]]]})"),
                                    pissa_test::nested_arrays(200, "1,2,3,1.5E-300"), std::string("  7  ")}) {
        detail::JsonStats stats;
        const auto doc =
            detail::parse_json_strict<nlohmann::ordered_json>(text.data(), text.data() + text.size(), "f", &stats);
        CHECK(doc.dump(2).size() <= stats.indented_size);
    }
}

TEST_CASE("a 100,000-tensor header parses (in linear time: it took minutes when quadratic)") {
    std::vector<TensorInfo> tensors;
    for (std::uint64_t i = 0; i < 100'000; ++i)
        tensors.push_back({"model.layers." + std::to_string(i / 7) + ".mlp.p" + std::to_string(i % 7) + ".weight",
                           Dtype::F32,
                           {1},
                           4 * i,
                           4 * i + 4});
    std::string bytes = serialize_safetensors_header(tensors, {{"format", "pt"}});
    bytes.append(4 * tensors.size(), '\0');
    const SafetensorsHeader header = parse_image(bytes, "many");
    REQUIRE(header.tensors.size() == tensors.size());
    CHECK(header.tensors[99'999].name == tensors[99'999].name);
    CHECK(header.metadata.at("format") == "pt");
}

// Tests for io/targets.hpp: peft's module selection on a checkpoint ("all-linear", condensed
// target lists, select_targets), and io/peft.hpp's exclude_modules / layers_to_transform /
// layers_pattern rules it builds on. peft itself is the oracle in tests/python/test_peft_targeting.py.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/targets.hpp>

using namespace pissa::io;
using pissa_test::ScratchDir;

namespace {

/// A checkpoint of 1x1 float tensors (or 1-D ones for names ending in "norm.weight").
Checkpoint write_names(const ScratchDir& dir, const std::vector<std::string>& names) {
    std::vector<OwnedTensor> tensors;
    for (const auto& n : names) {
        const bool vector = n.find("norm.weight") != std::string::npos;
        tensors.push_back({{n, Dtype::F32, vector ? std::vector<std::uint64_t>{1} : std::vector<std::uint64_t>{1, 1}},
                           std::vector<unsigned char>(4)});
    }
    write_safetensors(dir / "m.safetensors", tensors);
    return Checkpoint(dir / "m.safetensors");
}

std::vector<std::string> llama_names(int layers, bool lm_head) {
    std::vector<std::string> names{"model.embed_tokens.weight"};
    for (int i = 0; i < layers; ++i) {
        const std::string p = "model.layers." + std::to_string(i) + ".";
        names.push_back(p + "input_layernorm.weight");
        for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"})
            names.push_back(p + "self_attn." + m + ".weight");
        for (const char* m : {"gate_proj", "up_proj", "down_proj"}) names.push_back(p + "mlp." + m + ".weight");
    }
    names.push_back("model.norm.weight");
    if (lm_head) names.push_back("lm_head.weight");
    return names;
}

}  // namespace

TEST_CASE("layer_index as peft's regexes: the first numbered component, or the first after a layers_pattern") {
    const std::vector<std::regex> none;
    CHECK(detail::layer_index("model.layers.3.self_attn.q_proj", none) == 3);
    // Lazy .*?: the layer's index, not a nested expert's.
    CHECK(detail::layer_index("model.layers.1.experts.0.w1", none) == 1);
    CHECK_FALSE(detail::layer_index("layers.3.q_proj", none));  // needs a component before the list's name
    CHECK_FALSE(detail::layer_index("model.layers.x.q_proj", none));
    CHECK_FALSE(detail::layer_index("model.layers.3", none));  // the number must be followed by a dot
    CHECK(detail::layer_index("a.b.12.c", none) == 12);
    CHECK(detail::layer_index("a.b.99999999999999999999.c", none) == detail::unrepresentable_layer);

    const std::vector<std::regex> layers{std::regex("layers")}, h{std::regex("h")},
        either{std::regex("h"), std::regex("blocks")};
    CHECK(detail::layer_index("layers.3.q_proj", layers) == 3);  // ^ alternative
    CHECK(detail::layer_index("model.layers.4.mlp.experts.7.w1", layers) == 4);
    CHECK(detail::layer_index("encoder.block.2.layer.0.x", layers) == std::nullopt);
    CHECK(detail::layer_index("transformer.h.5.attn.c_attn", h) == 5);
    CHECK(detail::layer_index("transformer.xh.5.attn", h) == std::nullopt);  // whole components only
    CHECK(detail::layer_index("vision.blocks.6.attn", either) == 6);
    CHECK(detail::layer_index("m.decoder.layers.2.x", std::vector<std::regex>{std::regex("decoder\\.layers")}) == 2);
}

TEST_CASE("exclude_modules, layers_to_transform and layers_pattern select as peft's check_target_module_exists") {
    AdapterConfig c;
    c.target_modules = {"q_proj", "model.layers.5.self_attn.v_proj"};
    c.exclude_modules = {"model.layers.1.self_attn.q_proj"};
    c.layers_to_transform = {0, 1};
    const ModuleMatcher m(c);
    CHECK(m.targets("model.layers.0.self_attn.q_proj"));
    CHECK_FALSE(m.targets("model.layers.1.self_attn.q_proj"));  // excluded
    CHECK_FALSE(m.targets("model.layers.2.self_attn.q_proj"));  // not in the layers
    CHECK(m.targets("model.layers.5.self_attn.v_proj"));        // named in full: layers do not apply
    CHECK_FALSE(m.targets("model.layers.0.self_attn.v_proj"));
    CHECK(m.excluded("x.model.layers.1.self_attn.q_proj"));

    AdapterConfig r;
    r.target_regex = ".*_proj";
    r.exclude_regex = ".*\\.1\\..*";
    CHECK(r.targets("model.layers.0.mlp.up_proj"));
    CHECK_FALSE(r.targets("model.layers.1.mlp.up_proj"));
    r.layers_to_transform = {0};
    CHECK_THROWS_WITH_AS(ModuleMatcher{r}, doctest::Contains("peft refuses this too"), pissa::invalid_argument);
    AdapterConfig p;
    p.target_modules = {"q_proj"};
    p.layers_pattern = {"layers"};
    CHECK_THROWS_WITH_AS(ModuleMatcher{p}, doctest::Contains("needs layers_to_transform"), pissa::invalid_argument);
    p.layers_to_transform = {2};
    CHECK(ModuleMatcher(p).targets("model.layers.2.self_attn.q_proj"));
    CHECK_FALSE(ModuleMatcher(p).targets("model.h.2.self_attn.q_proj"));
}

TEST_CASE("the selection fields round-trip through adapter_config.json in peft's forms") {
    AdapterConfig c;
    c.target_modules = {"q_proj"};
    c.exclude_regex = ".*lm_head";
    c.layers_to_transform = {0, 3};
    c.layers_pattern = {"layers"};
    const auto j = to_json(c);
    CHECK(j["exclude_modules"] == ".*lm_head");
    CHECK(j["layers_to_transform"] == nlohmann::ordered_json({0, 3}));
    CHECK(j["layers_pattern"] == "layers");
    const AdapterConfig back = parse_adapter_config(j.dump(), "c");
    CHECK(back.exclude_regex == c.exclude_regex);
    CHECK(back.layers_to_transform == c.layers_to_transform);
    CHECK(back.layers_pattern == c.layers_pattern);
    CHECK(to_json(AdapterConfig{})["exclude_modules"].is_null());
    // peft's other forms: a single layer as an int, exclude_modules and layers_pattern as lists.
    const AdapterConfig other = parse_adapter_config(
        R"({"target_modules":["q_proj"],"layers_to_transform":2,"exclude_modules":["a","b"],"layers_pattern":["h","layers"]})",
        "c");
    CHECK(other.layers_to_transform == std::vector<std::int64_t>{2});
    CHECK(other.exclude_modules == std::vector<std::string>{"a", "b"});
    CHECK(other.layers_pattern.size() == 2);
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"target_modules":"q.*","layers_to_transform":[1]})", "cfg.json"),
                         doctest::Contains("cfg.json"), format_error);
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"layers_to_transform":["1"]})", "cfg.json"),
                         doctest::Contains("layers_to_transform"), format_error);
}

TEST_CASE("minimal_target_modules as peft's _find_minimal_target_modules") {
    std::vector<std::string> targets;
    std::set<std::string> others;
    for (int i = 0; i < 100; ++i) {
        targets.push_back("model.decoder.layers." + std::to_string(i) + ".self_attn.q_proj");
        targets.push_back("model.decoder.layers." + std::to_string(i) + ".self_attn.v_proj");
        others.insert("model.encoder.layers." + std::to_string(i) + ".self_attn.k_proj");
    }
    CHECK(minimal_target_modules(targets, others) == std::vector<std::string>{"q_proj", "v_proj"});
    // A suffix another module has is not usable: the next longer one is taken.
    CHECK(minimal_target_modules({"a.x.q", "b.x.q"}, {"c.q"}) == std::vector<std::string>{"x.q"});
    CHECK(minimal_target_modules({"a.q", "b.q"}, {"a", "b", "q"}) == std::vector<std::string>{"a.q", "b.q"});
}

TEST_CASE("all-linear: every linear weight but the output layer and embeddings; 20 or more condensed") {
    ScratchDir dir("targets-all-linear");
    const Checkpoint small = write_names(dir, llama_names(2, true));
    ModuleSelection s;
    s.target_regex = "ALL-LINEAR";
    const auto resolved = resolve_selection(small, s, "CAUSAL_LM");
    CHECK(resolved.target_regex.empty());
    CHECK(resolved.target_modules.size() == 14);  // under 20: full names
    CHECK(std::find(resolved.target_modules.begin(), resolved.target_modules.end(), "lm_head") ==
          resolved.target_modules.end());
    CHECK(resolved.target_modules.front() == "model.layers.0.self_attn.q_proj");

    ScratchDir dir3("targets-all-linear-3");
    const Checkpoint three = write_names(dir3, llama_names(3, true));
    const auto condensed = resolve_selection(three, s, "CAUSAL_LM");
    CHECK(condensed.target_modules ==
          std::vector<std::string>{"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"});
    AdapterConfig config;
    static_cast<ModuleSelection&>(config) = condensed;
    CHECK(select_targets(three, config).size() == 21);

    ScratchDir cls("targets-seq-cls");
    const Checkpoint classifier =
        write_names(cls, {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                          "bert.pooler.dense.weight", "classifier.weight"});
    CHECK(all_linear_modules(classifier, "SEQ_CLS") ==
          std::vector<std::string>{"bert.encoder.layer.0.attention.self.query", "bert.pooler.dense"});
    CHECK(all_linear_modules(classifier, "").size() == 3);  // the head stays without SEQ_CLS (peft)
    s.layers_to_transform = {0};
    CHECK_THROWS_WITH_AS(resolve_selection(small, s, ""), doctest::Contains("all-linear"), pissa::invalid_argument);
}

TEST_CASE("select_targets over 100,000 tensors compiles the regex once") {
    ScratchDir dir("peft-many");
    std::vector<OwnedTensor> tensors;
    for (int i = 0; i < 100'000; ++i)
        tensors.push_back(
            {{"model.layers." + std::to_string(i / 4) + ".p" + std::to_string(i % 4) + ".weight", Dtype::F32, {1, 1}},
             std::vector<unsigned char>(4)});
    write_safetensors(dir / "m.safetensors", tensors);
    AdapterConfig c;
    c.target_regex = R"(.*\.p[01])";
    CHECK(select_targets(Checkpoint(dir / "m.safetensors"), c).size() == 50'000);
}

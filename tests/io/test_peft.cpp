// Tests for io/peft.hpp: peft's key names, config fields, target matching and rank/alpha patterns,
// and the conversion config.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/peft.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

using namespace pissa::io;
using pissa_test::ScratchDir;

TEST_CASE("adapter folders use peft's key names, shapes and config fields") {
    ScratchDir dir("peft-keys");
    Adapter adapter;
    adapter.config.r = 4;
    adapter.config.lora_alpha = 16;
    adapter.config.target_modules = {"q_proj", "v_proj"};
    adapter.config.init_lora_weights = true;
    adapter.config.base_model_name_or_path = "tiny-llama";
    adapter.modules.push_back({{pissa_test::gaussian<float>(4, 12, 1), pissa_test::gaussian<float>(10, 4, 2)},
                               "model.layers.0.self_attn.q_proj"});
    write_adapter(dir / "a", adapter);

    SafetensorsFile weights(dir / "a" / adapter_weights_name);
    const TensorInfo& A = weights.at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    const TensorInfo& B = weights.at("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
    CHECK(A.shape == std::vector<std::uint64_t>{4, 12});
    CHECK(B.shape == std::vector<std::uint64_t>{10, 4});
    CHECK(A.dtype == Dtype::F32);
    CHECK(weights.metadata().at("format") == "pt");

    const auto json = nlohmann::json::parse(pissa_test::read_bytes(dir / "a" / adapter_config_name));
    CHECK(json["peft_type"] == "LORA");
    CHECK(json["task_type"] == "CAUSAL_LM");
    CHECK(json["r"] == 4);
    CHECK(json["lora_alpha"] == 16.0);
    CHECK(json["target_modules"] == nlohmann::json::array({"q_proj", "v_proj"}));
    CHECK(json["init_lora_weights"] == true);
    CHECK(json["use_rslora"] == false);
    CHECK(json["fan_in_fan_out"] == false);
    CHECK(json["bias"] == "none");
    CHECK(json["lora_dropout"] == 0.0);
    CHECK(json["base_model_name_or_path"] == "tiny-llama");
    CHECK(json["rank_pattern"].is_object());

    const Adapter back = read_adapter(dir / "a");
    REQUIRE(back.modules.size() == 1);
    CHECK(back.modules[0].name == "model.layers.0.self_attn.q_proj");
    CHECK(back.modules[0].A == adapter.modules[0].A);
    CHECK(back.modules[0].B == adapter.modules[0].B);
    CHECK(back.config.r == 4);
    CHECK(back.config.scaling_for("model.layers.0.self_attn.q_proj") == doctest::Approx(4.0));
    CHECK(back.modules[0].scaling == 4.0f);  // read_adapter fills each module's scaling from the config
}

TEST_CASE("unknown config fields are ignored on read and kept on rewrite; wrong types are refused") {
    const std::string text = R"({"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":"model\\..*\\.q_proj",
        "layer_replication":null,"megatron_core":"megatron.core","use_rslora":true,"init_lora_weights":"pissa_niter_4"})";
    const AdapterConfig c = parse_adapter_config(text, "cfg.json");
    CHECK(c.target_regex == "model\\..*\\.q_proj");
    CHECK(c.use_rslora);
    CHECK(c.init_lora_weights == "pissa_niter_4");
    CHECK(c.extra.contains("megatron_core"));
    CHECK(to_json(c)["megatron_core"] == "megatron.core");
    CHECK(c.scaling_for("x") == doctest::Approx(16.0 / std::sqrt(8.0)));
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"r":"8"})", "cfg.json"), doctest::Contains("cfg.json: field 'r'"),
                         format_error);
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"peft_type":"IA3"})", "c"), doctest::Contains("not LORA"),
                         format_error);
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"r":8,"r":4})", "c"), doctest::Contains("duplicate key 'r'"),
                         format_error);
}

TEST_CASE("target matching as peft: suffix on whole components, exact name, or full-match regex") {
    AdapterConfig c;
    c.target_modules = {"q_proj", "v_proj"};
    CHECK(c.targets("model.layers.0.self_attn.q_proj"));
    CHECK(c.targets("q_proj"));
    CHECK_FALSE(c.targets("model.layers.0.self_attn.xq_proj"));  // suffix must follow a dot
    CHECK_FALSE(c.targets("model.layers.0.self_attn.q_proj.lora"));
    c.target_modules = {"self_attn.q_proj"};
    CHECK(c.targets("model.layers.3.self_attn.q_proj"));
    c.target_modules.clear();
    c.target_regex = R"(.*\.(0|1)\.self_attn\.(q|k)_proj)";
    CHECK(c.targets("model.layers.1.self_attn.k_proj"));
    CHECK_FALSE(c.targets("model.layers.2.self_attn.k_proj"));
    CHECK_FALSE(c.targets("model.layers.1.self_attn.k_proj.x"));  // full match
}

TEST_CASE("rank_pattern and alpha_pattern: first key in file order with (.*\\.)?(key)$") {
    const AdapterConfig c = parse_adapter_config(
        R"({"r":8,"lora_alpha":16,"rank_pattern":{"layers.1.self_attn.q_proj":4,"q_proj":2},
            "alpha_pattern":{"v_proj":32}})",
        "c");
    CHECK(c.rank_for("model.layers.1.self_attn.q_proj") == 4);
    CHECK(c.rank_for("model.layers.0.self_attn.q_proj") == 2);
    CHECK(c.rank_for("model.layers.0.self_attn.xq_proj") == 8);
    CHECK(c.alpha_for("model.layers.0.self_attn.v_proj") == 32);
    CHECK(c.scaling_for("model.layers.0.self_attn.v_proj") == doctest::Approx(32.0 / 8));
    CHECK(c.scaling_for("model.layers.0.self_attn.q_proj") == doctest::Approx(16.0 / 2));

    const AdapterConfig conv = converted_config(c);
    CHECK(conv.r == 16);
    CHECK(conv.lora_alpha == 32);
    CHECK(conv.rank_pattern[0].second == 8);
    CHECK(conv.rank_pattern[1].second == 4);
    CHECK(conv.alpha_pattern[0].second == 64);
    CHECK(conv.init_lora_weights == true);
    for (const char* m : {"model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "a.k_proj"})
        CHECK(conv.scaling_for(m) == doctest::Approx(c.scaling_for(m)));

    AdapterConfig rs = c;
    rs.use_rslora = true;
    CHECK_THROWS_WITH_AS(converted_config(rs), doctest::Contains("use_rslora"), pissa::invalid_argument);
    rs.rank_pattern.clear();
    rs.alpha_pattern.clear();
    const AdapterConfig rs2 = converted_config(rs);
    CHECK(rs2.lora_alpha == doctest::Approx(16 * std::sqrt(2.0)));
    CHECK(rs2.scaling_for("x") == doctest::Approx(rs.scaling_for("x")));
}

TEST_CASE("adapter files with foreign keys or wrong ranks are refused") {
    ScratchDir dir("peft-bad");
    Adapter a;
    a.config.r = 2;
    a.modules.push_back({{pissa_test::gaussian<float>(2, 5, 1), pissa_test::gaussian<float>(3, 2, 2)}, "m.q_proj"});
    write_adapter(dir / "a", a);
    // rank mismatch against the config
    detail::write_text_file(dir / "a" / adapter_config_name,
                            R"({"peft_type":"LORA","r":4,"target_modules":["q_proj"]})");
    CHECK_THROWS_WITH_AS(read_adapter(dir / "a"), doctest::Contains("configured rank 4"), format_error);
    // a DoRA magnitude key
    write_adapter(dir / "b", a);
    write_safetensors(
        dir / "b" / adapter_weights_name,
        {matrix_tensor("base_model.model.m.q_proj.lora_magnitude_vector", pissa::Matrix<float>::Ones(1, 3))});
    CHECK_THROWS_WITH_AS(read_adapter(dir / "b"), doctest::Contains("is not a LoRA key"), format_error);
    // A without B
    write_safetensors(dir / "b" / adapter_weights_name,
                      {matrix_tensor(lora_key("m.q_proj", 'A'), pissa_test::gaussian<float>(2, 5, 1))});
    CHECK_THROWS_WITH_AS(read_adapter(dir / "b"), doctest::Contains("lora_B"), format_error);
}

TEST_CASE("adapter_config.json: deep, oversized or explosive-to-rewrite configs are refused naming the file") {
    for (std::size_t depth : {max_json_depth + 1, std::size_t{100'000}, std::size_t{1'000'000}}) {
        INFO("depth ", depth);
        const std::string text = R"({"r":8,"unknown":)" + pissa_test::nested_arrays(depth) + "}";
        CHECK_THROWS_WITH_AS(parse_adapter_config(text, "cfg.json"),
                             doctest::Contains("cfg.json: JSON nested deeper than 256 levels"), format_error);
    }
    // Unknown fields are kept, but bounded: 500k values 250 deep would be rewritten as ~250 MB.
    std::string wide = pissa_test::nested_arrays(250, "0");
    wide.insert(250, std::string(2 * 500'000, ' '));
    for (std::size_t i = 250; i < 250 + 2 * 500'000; i += 2) wide[i] = '0', wide[i + 1] = ',';
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"r":8,"unknown":)" + wide + "}", "cfg.json"),
                         doctest::Contains("cfg.json: rewriting it would take"), format_error);
    CHECK_THROWS_WITH_AS(parse_adapter_config(std::string(max_adapter_config_size + 1, ' '), "cfg.json"),
                         doctest::Contains("over the 16777216-byte limit"), format_error);
    CHECK_THROWS_WITH_AS(parse_adapter_config(std::string(R"({"r":8})") + '\0' + "junk", "cfg.json"),
                         doctest::Contains("NUL byte"), format_error);
    // A modest nested unknown field is kept and rewritten.
    const AdapterConfig c = parse_adapter_config(R"({"r":8,"eva_config":{"a":[[1,2],[3]]}})", "cfg.json");
    CHECK(to_json(c)["eva_config"]["a"][0][1] == 2);
}

TEST_CASE("long module names and patterns: bounded with a clear error, no stack overflow") {
    AdapterConfig c;
    c.target_regex = R"(.*\.(q|k)_proj)";
    c.rank_pattern = {{"q_proj", 4}};
    c.alpha_pattern = {{"k_proj", 32.0}};
    const ModuleMatcher m(c);
    // At the limit: matched correctly.
    std::string at_limit;
    while (at_limit.size() < max_module_name_length - 7) at_limit += "x.";
    at_limit = at_limit.substr(0, max_module_name_length - 7) + ".q_proj";
    REQUIRE(at_limit.size() == max_module_name_length);
    CHECK(m.targets(at_limit));
    CHECK(c.targets(at_limit));
    CHECK(m.rank_for(at_limit) == 4);
    CHECK(c.rank_for(at_limit) == 4);
    // Over it (30k characters crashed std::regex's recursive executor): refused, naming the limit.
    const std::string long_name = std::string(30'000, 'a') + ".q_proj";
    for (const std::string& name : {long_name, at_limit + "x"}) {
        CHECK_THROWS_WITH_AS(m.targets(name), doctest::Contains("over the limit of 1024"), pissa::invalid_argument);
        CHECK_THROWS_WITH_AS(c.targets(name), doctest::Contains("module name '"), pissa::invalid_argument);
        CHECK_THROWS_AS(m.rank_for(name), pissa::invalid_argument);
        CHECK_THROWS_AS(c.alpha_for(name), pissa::invalid_argument);
        CHECK_THROWS_AS(AdapterConfig::pattern_matches("q_proj", name), pissa::invalid_argument);
    }
    // Suffix lists need no regex, so no limit.
    AdapterConfig list;
    list.target_modules = {"q_proj"};
    CHECK(list.targets(long_name));
    // Patterns: length and group nesting bounded, at parse time with the file named.
    CHECK_THROWS_WITH_AS(parse_adapter_config(R"({"target_modules":")" + std::string(2000, 'a') + "\"}", "cfg.json"),
                         doctest::Contains("cfg.json: target_modules regex 'aaaa"), format_error);
    CHECK_THROWS_WITH_AS(
        parse_adapter_config(R"({"rank_pattern":{")" + std::string(33, '(') + "a" + std::string(33, ')') + "\":2}}",
                             "c"),
        doctest::Contains("nests groups 33 deep"), format_error);
    CHECK_NOTHROW(parse_adapter_config(
        R"({"rank_pattern":{")" + std::string(32, '(') + "a" + std::string(32, ')') + R"(\\([(]":2}})", "c"));
    // Patterns that backtrack exponentially in a backtracking matcher finish at the length limit.
    AdapterConfig hostile;
    hostile.target_regex = std::string("(a|a?)") + "*(a|aa)*" + "b";
    std::string pattern;
    for (int i = 0; i < 150; ++i) pattern += "(a|.)";
    hostile.rank_pattern = {{pattern, 2}};
    const ModuleMatcher h(hostile);
    const std::string as(max_module_name_length, 'a');
    CHECK_FALSE(h.targets(as));
    CHECK(h.rank_for(as) == hostile.r);
}

TEST_CASE("FIFOs as adapter files are refused, not waited on") {
    pissa_test::Watchdog watchdog(60);
    ScratchDir dir("peft-fifo");
    Adapter adapter;
    adapter.modules.push_back(
        {{pissa_test::gaussian<float>(8, 6, 1), pissa_test::gaussian<float>(5, 8, 2)}, "m.q_proj"});
    write_adapter(dir / "a", adapter);
    write_adapter(dir / "b", adapter);
    std::filesystem::remove(dir / "a" / adapter_config_name);
    pissa_test::make_fifo(dir / "a" / adapter_config_name);
    CHECK(is_adapter_folder(dir / "a"));
    CHECK_THROWS_WITH_AS(read_adapter(dir / "a"), doctest::Contains("adapter_config.json: not a regular file (a FIFO)"),
                         format_error);
    std::filesystem::remove(dir / "b" / adapter_weights_name);
    pissa_test::make_fifo(dir / "b" / adapter_weights_name);
    CHECK_THROWS_WITH_AS(read_adapter(dir / "b"), doctest::Contains("not a regular file (a FIFO)"), format_error);
}

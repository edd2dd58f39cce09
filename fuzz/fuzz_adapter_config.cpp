// libFuzzer target for adapter_config.json (pissa::io::parse_adapter_config in pissa/io/peft.hpp).
// Every input must either parse or throw pissa::io::format_error; any other exception, crash,
// sanitizer report or broken invariant is a bug. For inputs that parse: the config is LORA, every
// pattern compiles within the limits (a ModuleMatcher builds), matching a few module names answers
// as AdapterConfig's own methods do, and the rewrite (to_json, as write_adapter writes it) parses
// back to the same fields (inputs are short, -max_len, so the rewrite stays within the size limits).
#include <pissa/io/peft.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace pissa::io;
    const std::string text(reinterpret_cast<const char*>(data), size);
    AdapterConfig config;
    try {
        config = parse_adapter_config(text, "fuzz-input");
    } catch (const format_error&) {
        return 0;
    }
    if (config.peft_type != "LORA" || config.r < 1) std::abort();
    const ModuleMatcher matcher(config);
    for (const std::string module : {"model.layers.0.self_attn.q_proj", "q_proj", "lm_head", ""}) {
        if (matcher.targets(module) != config.targets(module)) std::abort();
        if (matcher.rank_for(module) != config.rank_for(module)) std::abort();
        if (matcher.alpha_for(module) != config.alpha_for(module)) std::abort();
    }
    const std::string again = to_json(config).dump(2);
    const AdapterConfig back = parse_adapter_config(again, "fuzz-rewrite");
    if (back.r != config.r || back.target_regex != config.target_regex ||
        back.target_modules != config.target_modules || back.rank_pattern != config.rank_pattern)
        std::abort();
    for (const auto& [key, value] : config.extra.items())
        if (!back.extra.contains(key) || back.extra[key] != value) std::abort();
    return 0;
}

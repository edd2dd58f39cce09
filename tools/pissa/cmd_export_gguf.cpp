// pissa export-gguf: a peft LoRA / PiSSA adapter folder -> a GGUF LoRA adapter that llama.cpp loads
// (llama-cli -m base.gguf --lora adapter.gguf), for the Llama, Mistral and Qwen2 families.
#include "tool.hpp"

#include <pissa/io/gguf.hpp>
#include <pissa/io/peft.hpp>

#include <sys/stat.h>

#include <iostream>

namespace pissa_tool {

namespace {

/// The base model folder whose config.json gives the head counts: --base, else the adapter's
/// base_model_name_or_path when that is a local folder with a config.json; empty when neither.
fs::path base_model_folder(const Args& args, const pissa::io::AdapterConfig& config) {
    if (args.has("base")) {
        const fs::path base = args.get("base");
        if (!pissa::io::detail::is_folder(base) || !pissa::io::detail::path_exists(base / "config.json"))
            throw UsageError("--base " + base.string() + ": not a model folder with a config.json");
        return base;
    }
    const fs::path named = config.base_model_name_or_path;
    if (!named.empty() && pissa::io::detail::is_folder(named) && pissa::io::detail::path_exists(named / "config.json"))
        return named;
    return {};
}

/// Refuses an output file that exists (unless --force, and then only a file), whose folder does
/// not exist, or that is one of the inputs.
void check_output_file(const fs::path& out, bool force, const std::vector<fs::path>& inputs) {
    struct stat st {};
    if (::lstat(out.c_str(), &st) == 0) {
        if (!force) throw UsageError(out.string() + " already exists; pass --force to replace it");
        if (S_ISDIR(st.st_mode)) throw UsageError(out.string() + " is a folder; not replacing it");
    }
    const fs::path parent = out.parent_path().empty() ? fs::path(".") : out.parent_path();
    if (!pissa::io::detail::is_folder(parent)) throw UsageError(parent.string() + ": no such folder");
    std::error_code ec;
    for (const auto& input : inputs)
        if (fs::exists(input, ec) && fs::equivalent(out, input, ec))
            throw UsageError("refusing to write " + out.string() + " over the input " + input.string());
}

}  // namespace

int cmd_export_gguf(int argc, char** argv) {
    Args args("export-gguf", "ADAPTER --arch llama|mistral|qwen2 --out FILE.gguf [options]",
              "Writes a peft LoRA or PiSSA adapter as a GGUF LoRA adapter for llama.cpp\n"
              "(llama-cli -m base.gguf --lora FILE.gguf): tensors blk.N.attn_q.weight.lora_a / lora_b, ...;\n"
              "for llama and mistral the q_proj / k_proj rows of B permuted per head as llama.cpp's converter\n"
              "permutes the base weights (head counts from the base model's config.json). llama.cpp scales\n"
              "every module by alpha / rank: a per-module alpha (alpha_pattern) or rsLoRA with rank_pattern\n"
              "is folded into B. For a PiSSA adapter the base is the residual model; for a converted LoRA\n"
              "(pissa convert) the original model.");
    args.positional("ADAPTER", "the adapter folder (adapter_config.json + adapter_model.safetensors)", true)
        .option("arch", "ARCH", "the base model's family: llama, mistral or qwen2 (required)")
        .option("out", "FILE", "output GGUF file (required; must not exist unless --force)")
        .option("base", "MODEL_DIR", "base model folder (config.json: head counts); default: base_model_name_or_path")
        .option("dtype", "TYPE", "f32 or f16", "f32")
        .flag("force", "replace FILE if it exists")
        .flag("json", "print the summary as JSON on stdout instead of a table");
    if (!args.parse(argc, argv)) return 0;
    for (const char* required : {"arch", "out"})
        if (!args.has(required)) throw UsageError(std::string("--") + required + " is required");
    const fs::path adapter_path = args.pos(0);
    if (!pissa::io::is_adapter_folder(adapter_path))
        throw UsageError(adapter_path.string() + ": not an adapter folder (no adapter_config.json)");
    pissa::io::GgufExportOptions options;
    try {
        options.arch = pissa::io::gguf_arch_from_name(args.get("arch"));
    } catch (const pissa::invalid_argument& e) {
        throw UsageError(std::string("--arch: ") + e.what());
    }
    const std::string dtype = args.get("dtype");
    if (dtype != "f32" && dtype != "f16") throw UsageError("--dtype must be f32 or f16, got '" + dtype + "'");
    options.type = dtype == "f16" ? pissa::io::GgmlType::F16 : pissa::io::GgmlType::F32;
    const fs::path out = args.get("out");
    if (out.empty()) throw UsageError("--out is empty");
    const bool force = args.has("force");

    const pissa::io::Adapter adapter = pissa::io::read_adapter(adapter_path);
    const fs::path base = base_model_folder(args, adapter.config);
    if (!base.empty()) options.base = pissa::io::read_base_model_config(base);
    options.name = fs::absolute(adapter_path).lexically_normal().filename().string();
    if (options.name.empty())
        options.name = fs::absolute(adapter_path).lexically_normal().parent_path().filename().string();
    check_output_file(out, force,
                      {adapter_path / pissa::io::adapter_config_name, adapter_path / pissa::io::adapter_weights_name,
                       base.empty() ? fs::path() : base / "config.json"});
    const pissa::io::GgufExportPlan plan = pissa::io::export_gguf(adapter, options, out, force);

    for (const auto& name : plan.skipped)
        std::fprintf(stderr,
                     "pissa export-gguf: warning: module '%s' is not selected by target_modules; skipped "
                     "(peft ignores it too)\n",
                     name.c_str());
    std::error_code ec;
    const auto size = fs::file_size(out, ec);
    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "export-gguf";
        j["out"] = fs::absolute(out).lexically_normal().string();
        j["architecture"] = pissa::io::gguf_general_architecture(options.arch);
        j["dtype"] = dtype;
        j["alpha"] = plan.alpha;
        j["folded"] = plan.folded();
        j["base"] = base.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(base.string());
        j["bytes"] = ec ? 0 : size;
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& m : plan.modules)
            j["modules"].push_back({{"name", m.module},
                                    {"tensor", m.tensor},
                                    {"rank", m.rank},
                                    {"scaling", m.scaling},
                                    {"fold", m.fold},
                                    {"qk_heads", m.qk_heads}});
        j["skipped"] = plan.skipped;
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    std::vector<std::vector<std::string>> rows;
    for (const auto& m : plan.modules)
        rows.push_back({m.module, m.tensor, std::to_string(m.rank), format("%g", m.scaling), format("%g", m.fold),
                        m.qk_heads ? std::to_string(m.qk_heads) + " heads" : "-"});
    print_table({"module", "GGUF tensor", "rank", "scaling", "B fold", "q/k permuted"}, rows);
    std::printf("\nexported %zu modules (%s, %s): adapter.lora.alpha %g%s -> %s (%s)\n", plan.modules.size(),
                pissa::io::gguf_general_architecture(options.arch), dtype.c_str(), plan.alpha,
                plan.folded() ? ", per-module scaling folded into B" : "",
                fs::absolute(out).lexically_normal().string().c_str(), size_text(ec ? 0 : size).c_str());
    return 0;
}

}  // namespace pissa_tool

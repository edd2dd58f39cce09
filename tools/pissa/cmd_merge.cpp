// pissa merge: W + s B A for every weight the adapter adapts (pissa::io::merge_checkpoint); every
// other tensor byte-identical. MODEL is the residual model for a PiSSA adapter, the original model
// for a plain or converted LoRA.
#include "tool.hpp"

#include <pissa/io/merge_checkpoint.hpp>

#include <iostream>

namespace pissa_tool {

int cmd_merge(int argc, char** argv) {
    Args args("merge", "MODEL ADAPTER --out OUT [options]",
              "Merges a peft LoRA adapter into a model: each adapted weight becomes W + s B A (computed in\n"
              "float32, written in the weight's dtype and layout; [in, out] with fan_in_fan_out). Give the\n"
              "residual model for a PiSSA adapter, the original model for a plain or converted LoRA.");
    args.positional("MODEL", "a .safetensors file or a model folder (single file or sharded)", true)
        .positional("ADAPTER", "a peft adapter folder (adapter_config.json + adapter_model.safetensors)", true)
        .option("out", "OUT", "output folder (required; must not exist unless --force)")
        .option("threads", "N", "threads (0: all cores)", "0")
        .flag("force", "replace OUT if it exists")
        .flag("json", "print the summary as JSON on stdout instead of a table");
    if (!args.parse(argc, argv)) return 0;
    if (!args.has("out")) throw UsageError("--out is required");
    set_threads(static_cast<int>(args.get_int("threads", 0, 4096)));
    const fs::path model_path = args.pos(0), adapter_path = args.pos(1);
    if (!fs::exists(model_path)) throw UsageError(model_path.string() + ": no such file or folder");
    if (!pissa::io::is_adapter_folder(adapter_path))
        throw UsageError(adapter_path.string() + ": not an adapter folder (no adapter_config.json)");
    const pissa::io::AdapterConfig config = pissa::io::read_adapter_config(adapter_path);
    if (config.init_lora_weights.is_string()) {
        const std::string init = config.init_lora_weights.get<std::string>();
        if (init.rfind("pissa", 0) == 0)
            std::fprintf(stderr,
                         "pissa merge: warning: %s says init_lora_weights=\"%s\": peft would decompose the base again "
                         "when loading it; merging A and B as stored\n",
                         adapter_path.string().c_str(), init.c_str());
    }
    Progress progress(stderr_is_tty() && !args.has("json"));
    std::uint64_t bytes_done = 0;
    const auto report = pissa::io::merge_checkpoint(model_path, adapter_path, args.get("out"), args.has("force"),
                                                    [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) {
                                                        progress.update(i, n, t.name, bytes_done);
                                                        bytes_done += t.nbytes();
                                                    });
    progress.finish();
    for (const auto& name : report.skipped)
        std::fprintf(stderr,
                     "pissa merge: warning: the adapter holds '%s', which its target_modules do not select; not "
                     "merged (peft ignores it too)\n",
                     name.c_str());
    if (!report.warning.empty()) std::fprintf(stderr, "pissa merge: warning: %s\n", report.warning.c_str());
    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "merge";
        j["model"] = model_path.string();
        j["adapter"] = adapter_path.string();
        j["out"] = report.out.string();
        j["seconds"] = report.seconds;
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& r : report.modules)
            j["modules"].push_back(
                {{"name", r.name}, {"shape", r.shape}, {"scaling", r.scaling}, {"seconds", r.seconds}});
        j["skipped"] = report.skipped;
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    std::vector<std::vector<std::string>> table;
    for (const auto& r : report.modules)
        table.push_back({r.name, shape_text(r.shape), format("%g", r.scaling), format("%.3f s", r.seconds)});
    print_table({"module", "shape", "scaling", "time"}, table);
    std::printf("\nmerged %zu modules into %s (%.2f s)\n", report.modules.size(), report.out.string().c_str(),
                report.seconds);
    return 0;
}

}  // namespace pissa_tool

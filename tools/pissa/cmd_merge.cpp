// pissa merge: W + s B A for every weight the adapter adapts; every other tensor byte-identical.
// MODEL is the residual model for a PiSSA adapter, the original model for a plain or converted LoRA.
#include "tool.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/lora.hpp>

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
    const pissa::io::Checkpoint model(model_path);
    const pissa::io::Adapter adapter = pissa::io::read_adapter(adapter_path);
    const auto& config = adapter.config;
    if (config.init_lora_weights.is_string()) {
        const std::string init = config.init_lora_weights.get<std::string>();
        if (init.rfind("pissa", 0) == 0)
            std::fprintf(stderr,
                         "pissa merge: warning: %s says init_lora_weights=\"%s\": peft would decompose the base again "
                         "when loading it; merging A and B as stored\n",
                         adapter_path.string().c_str(), init.c_str());
    }
    // Check every module against the model before writing anything.
    std::map<std::string, const pissa::io::LoraModule*> by_weight;
    for (const auto& m : adapter.modules) {
        const std::string weight = m.name + ".weight";
        const pissa::io::TensorInfo* t = model.find(weight);
        if (!t) throw pissa::invalid_argument(model_path.string() + ": the adapter adapts '" + m.name +
                                              "' but the model has no tensor '" + weight + "'");
        if (!pissa::io::is_float_matrix(*t))
            throw pissa::invalid_argument(model_path.string() + ": '" + weight + "' is not a 2-D float weight");
        const auto out_dim = static_cast<pissa::Index>(config.fan_in_fan_out ? t->shape[1] : t->shape[0]);
        const auto in_dim = static_cast<pissa::Index>(config.fan_in_fan_out ? t->shape[0] : t->shape[1]);
        if (m.A.cols() != in_dim || m.B.rows() != out_dim)
            throw pissa::invalid_argument(
                model_path.string() + ": '" + weight + "' " + shape_text(t->shape) + " does not fit A [" +
                std::to_string(m.A.rows()) + ", " + std::to_string(m.A.cols()) + "] and B [" +
                std::to_string(m.B.rows()) + ", " + std::to_string(m.B.cols()) + "]" +
                (config.fan_in_fan_out ? " (fan_in_fan_out: stored [in, out])" : ""));
        by_weight[weight] = &m;
    }

    OutputDir out(args.get("out"), args.has("force"), {model_path, adapter_path});
    struct Row {
        std::string name;
        std::vector<std::uint64_t> shape;
        double scaling, seconds;
    };
    std::vector<Row> rows;
    Progress progress(stderr_is_tty() && !args.has("json"));
    std::uint64_t bytes_done = 0;
    const auto start = std::chrono::steady_clock::now();
    pissa::io::rewrite_checkpoint(
        model, out.path(),
        [&](const pissa::io::SafetensorsFile& file, const pissa::io::TensorInfo& t, std::vector<unsigned char>& bytes) {
            const auto it = by_weight.find(t.name);
            if (it == by_weight.end()) return false;
            const auto t0 = std::chrono::steady_clock::now();
            const pissa::io::LoraModule& m = *it->second;
            const double s = config.scaling_for(m.name);
            // Merged in place in its stored dtype inside the output buffer.
            pissa::io::visit_float_dtype(t.dtype, t.name, [&](auto tag) {
                using Storage = decltype(tag);
                auto W = pissa::io::copy_matrix_into<Storage>(file, t, bytes);
                if (config.fan_in_fan_out) {
                    auto Wt = W.transpose();
                    pissa::lora_merge(Wt, m.A, m.B, s);
                } else {
                    pissa::lora_merge(W, m.A, m.B, s);
                }
            });
            rows.push_back({m.name, t.shape, s, seconds_since(t0)});
            return true;
        },
        [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) {
            progress.update(i, n, t.name, bytes_done);
            bytes_done += t.nbytes();
        });
    progress.finish();
    out.commit();
    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "merge";
        j["model"] = model_path.string();
        j["adapter"] = adapter_path.string();
        j["out"] = out.final_path().string();
        j["seconds"] = seconds_since(start);
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& r : rows)
            j["modules"].push_back({{"name", r.name}, {"shape", r.shape}, {"scaling", r.scaling}, {"seconds", r.seconds}});
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    std::vector<std::vector<std::string>> table;
    for (const auto& r : rows)
        table.push_back({r.name, shape_text(r.shape), format("%g", r.scaling), format("%.3f s", r.seconds)});
    print_table({"module", "shape", "scaling", "time"}, table);
    std::printf("\nmerged %zu modules into %s (%.2f s)\n", rows.size(), out.final_path().string().c_str(),
                seconds_since(start));
    return 0;
}

}  // namespace pissa_tool

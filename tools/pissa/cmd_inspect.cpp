// pissa inspect: a checkpoint's tensors (name, dtype, shape, size), or an adapter's rank, alpha,
// scaling, targets and, per module, the norms of A and B.
#include "tool.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/peft.hpp>

#include <iostream>

namespace pissa_tool {

namespace {

int inspect_adapter(const fs::path& path, bool json) {
    const pissa::io::Adapter adapter = pissa::io::read_adapter(path);
    const auto& c = adapter.config;
    std::string targets = c.target_regex;
    if (targets.empty())
        for (const auto& t : c.target_modules) targets += (targets.empty() ? "" : ",") + t;
    if (json) {
        nlohmann::ordered_json j;
        j["kind"] = "adapter";
        j["path"] = path.string();
        j["r"] = c.r;
        j["lora_alpha"] = c.lora_alpha;
        j["use_rslora"] = c.use_rslora;
        j["scaling"] =
            c.use_rslora ? c.lora_alpha / std::sqrt(static_cast<double>(c.r)) : c.lora_alpha / static_cast<double>(c.r);
        j["target_modules"] = pissa::io::to_json(c)["target_modules"];
        j["init_lora_weights"] = c.init_lora_weights;
        j["fan_in_fan_out"] = c.fan_in_fan_out;
        j["metadata"] = adapter.metadata;
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& m : adapter.modules)
            j["modules"].push_back({{"name", m.name},
                                    {"rank", m.A.rows()},
                                    {"in", m.A.cols()},
                                    {"out", m.B.rows()},
                                    {"scaling", c.scaling_for(m.name)},
                                    {"norm_A", m.A.norm()},
                                    {"norm_B", m.B.norm()}});
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    std::printf(
        "adapter %s\n  r %lld, lora_alpha %g, scaling %g%s\n  target_modules %s\n  init_lora_weights %s\n"
        "  fan_in_fan_out %s\n",
        path.string().c_str(), static_cast<long long>(c.r), c.lora_alpha,
        c.use_rslora ? c.lora_alpha / std::sqrt(static_cast<double>(c.r)) : c.lora_alpha / static_cast<double>(c.r),
        c.use_rslora ? " (rsLoRA)" : "", targets.c_str(), c.init_lora_weights.dump().c_str(),
        c.fan_in_fan_out ? "true" : "false");
    for (const auto& [k, v] : adapter.metadata)
        if (k.rfind("pissa.", 0) == 0) std::printf("  %s %s\n", k.c_str(), v.c_str());
    std::printf("\n");
    std::vector<std::vector<std::string>> rows;
    for (const auto& m : adapter.modules)
        rows.push_back({m.name, std::to_string(m.A.rows()),
                        format("[%lld, %lld]", static_cast<long long>(m.B.rows()), static_cast<long long>(m.A.cols())),
                        format("%g", c.scaling_for(m.name)), format("%.4g", m.A.norm()), format("%.4g", m.B.norm())});
    print_table({"module", "rank", "[out, in]", "scaling", "||A||_F", "||B||_F"}, rows);
    return 0;
}

int inspect_checkpoint(const fs::path& path, bool json) {
    const pissa::io::Checkpoint model(path);
    if (json) {
        nlohmann::ordered_json j;
        j["kind"] = "checkpoint";
        j["path"] = path.string();
        j["sharded"] = model.is_sharded();
        j["total_size"] = model.total_size();
        j["tensors"] = nlohmann::ordered_json::array();
        for (const auto& shard : model.shards()) {
            for (const auto& t : shard->tensors())
                j["tensors"].push_back({{"name", t.name},
                                        {"dtype", std::string(pissa::io::dtype_name(t.dtype))},
                                        {"shape", t.shape},
                                        {"bytes", t.nbytes()},
                                        {"file", shard->path().filename().string()}});
            if (!shard->metadata().empty()) j["metadata"][shard->path().filename().string()] = shard->metadata();
        }
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    std::vector<std::vector<std::string>> rows;
    for (const auto& shard : model.shards())
        for (const auto& t : shard->tensors()) {
            std::vector<std::string> row = {t.name, std::string(pissa::io::dtype_name(t.dtype)), shape_text(t.shape),
                                            size_text(t.nbytes())};
            if (model.is_sharded()) row.push_back(shard->path().filename().string());
            rows.push_back(row);
        }
    std::vector<std::string> header = {"tensor", "dtype", "shape", "size"};
    if (model.is_sharded()) header.push_back("file");
    print_table(header, rows);
    std::printf("\n%zu tensors, %s in %zu file(s)\n", model.size(), size_text(model.total_size()).c_str(),
                model.shards().size());
    return 0;
}

}  // namespace

int cmd_inspect(int argc, char** argv) {
    Args args("inspect", "PATH [--json]",
              "For a checkpoint (.safetensors file or model folder): its tensors with dtype, shape and size.\n"
              "For a peft adapter folder: rank, alpha, scaling, targets and per module the norms of A and B.");
    args.positional("PATH", "a .safetensors file, a model folder or an adapter folder", true)
        .flag("json", "print JSON on stdout instead of a table");
    if (!args.parse(argc, argv)) return 0;
    const fs::path path = args.pos(0);
    if (!fs::exists(path)) throw UsageError(path.string() + ": no such file or folder");
    return pissa::io::is_adapter_folder(path) ? inspect_adapter(path, args.has("json"))
                                              : inspect_checkpoint(path, args.has("json"));
}

}  // namespace pissa_tool

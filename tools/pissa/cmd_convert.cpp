// pissa convert: a trained PiSSA adapter + the adapter saved at initialisation -> the rank-2r LoRA
// A' = [A; A0], B' = [B, -B0] that applies to the original, unmodified model (peft's
// save_pretrained(..., path_initial_model_for_weight_conversion=...)).
#include "tool.hpp"

#include <pissa/convert.hpp>
#include <pissa/io/peft.hpp>

#include <iostream>

namespace pissa_tool {

int cmd_convert(int argc, char** argv) {
    Args args("convert", "--initial DIR/pissa_init --trained TRAINED --out OUT [options]",
              "Converts a trained PiSSA adapter into a plain LoRA of rank 2r for the original model:\n"
              "A' = [A; A0], B' = [B, -B0], lora_alpha doubled (times sqrt(2) with rsLoRA), rank_pattern and\n"
              "alpha_pattern values doubled; rsLoRA together with patterns is refused, as peft refuses it.");
    args.option("initial", "DIR", "the adapter saved right after `pissa init` (DIR/pissa_init)")
        .option("trained", "DIR", "the trained PiSSA adapter")
        .option("out", "OUT", "output adapter folder (required; must not exist unless --force)")
        .flag("force", "replace OUT if it exists")
        .flag("json", "print the summary as JSON on stdout instead of a table");
    if (!args.parse(argc, argv)) return 0;
    for (const char* required : {"initial", "trained", "out"})
        if (!args.has(required)) throw UsageError(std::string("--") + required + " is required");
    const fs::path initial_path = args.get("initial"), trained_path = args.get("trained");
    for (const auto& p : {initial_path, trained_path})
        if (!pissa::io::is_adapter_folder(p))
            throw UsageError(p.string() + ": not an adapter folder (no adapter_config.json)");
    const pissa::io::Adapter initial = pissa::io::read_adapter(initial_path);
    const pissa::io::Adapter trained = pissa::io::read_adapter(trained_path);

    if (!(initial.config.init_lora_weights.is_boolean() && initial.config.init_lora_weights.get<bool>()))
        throw pissa::invalid_argument(initial_path.string() +
                                      ": init_lora_weights must be true in the initial "
                                      "adapter (as `pissa init` writes it); otherwise loading it would decompose "
                                      "the residual model again (peft refuses this too)");
    const auto& ti = trained.config;
    const auto& ii = initial.config;
    if (ti.r != ii.r || ti.lora_alpha != ii.lora_alpha || ti.use_rslora != ii.use_rslora ||
        ti.fan_in_fan_out != ii.fan_in_fan_out)
        throw pissa::invalid_argument(
            "the trained and initial adapters differ in r, lora_alpha, use_rslora or "
            "fan_in_fan_out: they are not from the same `pissa init`");
    pissa::io::Adapter converted;
    converted.config = pissa::io::converted_config(trained.config);
    converted.metadata = trained.metadata;
    converted.metadata["pissa.converted_from"] = "pissa";
    if (trained.modules.size() != initial.modules.size())
        throw pissa::invalid_argument("the trained adapter has " + std::to_string(trained.modules.size()) +
                                      " modules, the initial one " + std::to_string(initial.modules.size()));
    for (const auto& m : trained.modules) {
        const pissa::io::LoraModule* m0 = initial.find(m.name);
        if (!m0) throw pissa::invalid_argument(initial_path.string() + ": no module '" + m.name + "'");
        if (m0->A.rows() != m.A.rows() || m0->A.cols() != m.A.cols() || m0->B.rows() != m.B.rows())
            throw pissa::invalid_argument("module '" + m.name + "': trained and initial A, B shapes differ");
        converted.modules.push_back({pissa::pissa_to_lora(m, *m0), m.name});
    }
    pissa::io::OutputFolder out(args.get("out"), args.has("force"), {initial_path, trained_path});
    pissa::io::write_adapter(out.path(), converted);
    out.commit();

    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "convert";
        j["out"] = out.final_path().string();
        j["r"] = converted.config.r;
        j["lora_alpha"] = converted.config.lora_alpha;
        j["use_rslora"] = converted.config.use_rslora;
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& m : converted.modules)
            j["modules"].push_back(
                {{"name", m.name}, {"rank", m.A.rows()}, {"scaling", converted.config.scaling_for(m.name)}});
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    std::vector<std::vector<std::string>> rows;
    for (const auto& m : converted.modules)
        rows.push_back({m.name, std::to_string(m.A.rows()), format("%g", converted.config.scaling_for(m.name)),
                        format("%.4g", m.A.norm()), format("%.4g", m.B.norm())});
    print_table({"module", "rank", "scaling", "||A'||_F", "||B'||_F"}, rows);
    std::printf("\nconverted %zu modules: r %lld, lora_alpha %g -> %s (apply to the original model)\n",
                converted.modules.size(), static_cast<long long>(converted.config.r), converted.config.lora_alpha,
                out.final_path().string().c_str());
    return 0;
}

}  // namespace pissa_tool

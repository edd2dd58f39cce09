// pissa init: split each target weight W into a PiSSA adapter (A, B) and the residual W - s B A
// (pissa::io::init_checkpoint): OUT/ is the residual model, OUT/pissa_init/ the peft adapter.
#include "quant_report.hpp"
#include "tool.hpp"

#include <pissa/io/init_checkpoint.hpp>

#include <iostream>
#include <set>

namespace pissa_tool {

int cmd_init(int argc, char** argv) {
    Args args("init", "[MODEL] --out DIR [options]",
              "Initialises PiSSA adapters as peft's init_lora_weights=\"pissa_niter_K\" (or \"pissa\" with --exact)\n"
              "and writes the layout of the PiSSA reference scripts: DIR/ is the residual model, DIR/pissa_init/\n"
              "the adapter (init_lora_weights: true, so loading it does not decompose again). Without MODEL, a\n"
              "built-in synthetic Llama-shaped model is generated (once, into the cache folder) and used.");
    args.positional("MODEL", "a .safetensors file or a model folder (single file or sharded)", false)
        .option("out", "DIR", "output folder (required; must not exist unless --force)")
        .option("rank", "R", "adapter rank r", "8")
        .option("alpha", "A", "lora_alpha", "rank")
        .option("niter", "K", "randomized SVD power iterations (pissa_niter_K)", "4")
        .flag("exact", "exact truncated SVD (peft's \"pissa\") instead of the randomized one")
        .flag("fused",
              "randomized SVD with the fused power step Q = qr(W^T (W Q)): one pass over W per\n"
              "                           step up to rank 24 (K + 2 passes instead of 2K + 2). Not peft's\n"
              "                           algorithm: the same subspace in exact arithmetic, other rounding")
        .option("targets", "LIST", "comma-separated module-name suffixes", "q_proj,v_proj")
        .option("target-regex", "RE", "full-match regular expression on module names (instead of --targets)")
        .flag("rslora", "rsLoRA scaling alpha / sqrt(r)")
        .option("task-type", "T",
                "peft task_type written to adapter_config.json (CAUSAL_LM, SEQ_CLS, ..., none for null);\n"
                "                           default: from config.json's architectures (LlamaForCausalLM -> CAUSAL_LM,\n"
                "                           a bare model such as BertModel -> null)")
        .flag("fan-in-fan-out", "weights are stored [in, out] (GPT-2 Conv1D)")
        .option("seed", "S", "seed of the randomized SVD (module i uses stream i of it)", "0")
        .option("threads", "N", "threads (0: all cores)", "0")
        .flag("force", "replace DIR if it exists")
        .flag("json", "print the summary as JSON on stdout instead of a table")
        .option("quantize", "nf4",
                "QPiSSA: the residual is written as deq(NF4(W - s B A)) in the model's dtype; the summary\n"
                "                           compares the error ||W - deq(Q) - s B A||_F with QLoRA's and LoftQ's");
    add_quant_options(args);
    if (!args.parse(argc, argv)) return 0;

    pissa::PissaConfig config;
    config.rank = static_cast<pissa::Index>(args.get_int("rank", 1, 1 << 20));
    config.lora_alpha = args.has("alpha") ? args.get_double("alpha") : static_cast<double>(config.rank);
    config.use_rslora = args.has("rslora");
    config.fan_in_fan_out = args.has("fan-in-fan-out");
    const bool exact = args.has("exact");
    if (exact && args.has("niter")) throw UsageError("--exact and --niter exclude each other");
    if (exact && args.has("fused")) throw UsageError("--exact and --fused exclude each other");
    config.method = exact ? pissa::SvdMethod::exact : pissa::SvdMethod::randomized;
    config.randomized.niter = static_cast<int>(args.get_int("niter", 0, 1000));
    config.randomized.fused_power_iteration = args.has("fused");
    const std::uint64_t seed = args.get_u64("seed");
    const bool quantize = args.has("quantize");
    if (quantize && args.get("quantize") != "nf4")
        throw UsageError("--quantize supports nf4 only, got '" + args.get("quantize") + "'");
    if (!quantize && (args.has("quant-iters") || args.has("quant-block")))
        throw UsageError("--quant-iters and --quant-block need --quantize nf4");
    const pissa::QuantInitConfig quant_config = quant_config_from_args(args, config);
    if (!args.has("out")) throw UsageError("--out is required");
    set_threads(static_cast<int>(args.get_int("threads", 0, 4096)));

    pissa::io::InitCheckpointOptions options;
    options.pissa = config;
    options.seed = seed;
    if (quantize) options.quantize = quant_config;
    options.force = args.has("force");
    options.task_type = args.get("task-type");
    const std::set<std::string> task_types = {
        "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "none"};
    if (args.has("task-type") && !task_types.count(options.task_type))
        throw UsageError(
            "--task-type must be one of peft's CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, "
            "QUESTION_ANS, FEATURE_EXTRACTION, or none; got '" +
            options.task_type + "'");
    pissa::io::AdapterConfig selection;
    set_targets_from_args(args, selection);
    options.target_modules = selection.target_modules;
    options.target_regex = selection.target_regex;
    fs::path model_path = args.pos(0);
    if (model_path.empty()) model_path = builtin_model();
    if (!fs::exists(model_path)) throw UsageError(model_path.string() + ": no such file or folder");

    Progress progress(stderr_is_tty() && !args.has("json"));
    std::uint64_t bytes_done = 0;
    pissa::io::InitCheckpointCallbacks callbacks;
    callbacks.progress = [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) {
        progress.update(i, n, t.name, bytes_done);
        bytes_done += t.nbytes();
    };
    const auto report = pissa::io::init_checkpoint(model_path, args.get("out"), options, callbacks);
    progress.finish();
    if (!report.warning.empty()) std::fprintf(stderr, "pissa init: warning: %s\n", report.warning.c_str());
    const double total = report.seconds;
    std::vector<ModuleQuantErrors> errors;
    for (const auto& m : report.modules)
        if (m.quant)
            errors.push_back({m.name, m.shape, m.quant->qlora_frobenius, m.quant->loftq_frobenius,
                              m.quant->qpissa_frobenius, m.seconds});

    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "init";
        j["model"] = model_path.string();
        j["out"] = report.out.string();
        j["adapter"] = report.adapter.string();
        j["method"] = exact ? "exact" : "randomized";
        j["niter"] = exact ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(config.randomized.niter);
        j["fused_power_iteration"] = config.randomized.fused_power_iteration;
        j["seed"] = seed;
        j["rank"] = config.rank;
        j["lora_alpha"] = config.lora_alpha;
        j["scaling"] = config.scaling();
        j["use_rslora"] = config.use_rslora;
        j["fan_in_fan_out"] = config.fan_in_fan_out;
        j["seconds"] = total;
        if (quantize) {
            j["quantize"] = {{"format", "nf4"},
                             {"quant_iters", quant_config.iterations},
                             {"quant_block", quant_config.nf4.block_size},
                             {"norm", "fro"}};
            add_quant_report(j, errors);
            for (std::size_t i = 0; i < report.modules.size(); ++i) {
                j["modules"][i]["rank"] = report.modules[i].rank;
                j["modules"][i]["seed"] = report.modules[i].seed;
            }
            std::cout << j.dump(2) << std::endl;
            return 0;
        }
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& m : report.modules)
            j["modules"].push_back({{"name", m.name},
                                    {"shape", m.shape},
                                    {"rank", m.rank},
                                    {"energy_fraction", m.quality.adapter_energy_fraction},
                                    {"weight_norm", m.quality.weight_norm},
                                    {"residual_norm", m.quality.residual_norm},
                                    {"seconds", m.seconds},
                                    {"seed", m.seed}});
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    if (quantize) {
        print_quant_report(errors, "Frobenius");
        std::printf(
            "\nresidual written as dequantised NF4 (blocks of %lld) after T = %d alternations; QLoRA and "
            "LoftQ are the baselines on the same weights\n",
            static_cast<long long>(quant_config.nf4.block_size), quant_config.iterations);
    } else {
        std::vector<std::vector<std::string>> rows;
        for (const auto& m : report.modules)
            rows.push_back({m.name, shape_text(m.shape), std::to_string(m.rank),
                            format("%.2f%%", 100 * m.quality.adapter_energy_fraction),
                            format("%.4g", m.quality.residual_norm), format("%.4g", m.quality.weight_norm),
                            format("%.3f s", m.seconds)});
        print_table({"module", "shape", "rank", "kept energy", "||W_res||_F", "||W||_F", "time"}, rows);
    }
    std::printf("\n%zu modules, rank %lld, alpha %g (scaling %g), %s, seed %llu, %.2f s\n", report.modules.size(),
                static_cast<long long>(config.rank), config.lora_alpha, config.scaling(),
                exact ? "exact SVD"
                      : format("randomized SVD niter %d%s", config.randomized.niter,
                               config.randomized.fused_power_iteration ? " (fused)" : "")
                            .c_str(),
                static_cast<unsigned long long>(seed), total);
    std::printf("residual model: %s\nadapter:        %s\n", report.out.string().c_str(),
                report.adapter.string().c_str());
    return 0;
}

}  // namespace pissa_tool

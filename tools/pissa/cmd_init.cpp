// pissa init: split each target weight W into a PiSSA adapter (A, B) and the residual W - s B A.
// Writes OUT/ (the residual model: same files, keys, shapes, dtypes and metadata as the input,
// non-target tensors byte-identical, other files copied) and OUT/pissa_init/ (the peft adapter).
#include "quant_report.hpp"
#include "tool.hpp"

#include <pissa/detail/random.hpp>
#include <pissa/init.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/version.hpp>

#include <iostream>
#include <set>
#include <sstream>

namespace pissa_tool {

namespace {

struct ModuleSummary {
    std::string name;
    std::vector<std::uint64_t> shape;
    pissa::Index rank = 0;
    double energy = 0, weight_norm = 0, residual_norm = 0, seconds = 0;
    std::uint64_t seed = 0;
    ModuleQuantErrors quant;  ///< Frobenius errors of QLoRA / LoftQ / QPiSSA (with --quantize nf4)
};

}  // namespace

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
        .flag("fused", "randomized SVD with the fused power step Q = qr(W^T (W Q)): one pass over W per\n"
                       "                           step up to rank 24 (K + 2 passes instead of 2K + 2). Not peft's\n"
                       "                           algorithm: the same subspace in exact arithmetic, other rounding")
        .option("targets", "LIST", "comma-separated module-name suffixes", "q_proj,v_proj")
        .option("target-regex", "RE", "full-match regular expression on module names (instead of --targets)")
        .flag("rslora", "rsLoRA scaling alpha / sqrt(r)")
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

    if (fs::exists(args.get("out")) && !args.has("force"))
        throw UsageError(args.get("out") + " already exists; pass --force to replace it");
    fs::path model_path = args.pos(0);
    if (model_path.empty()) model_path = builtin_model();
    if (!fs::exists(model_path)) throw UsageError(model_path.string() + ": no such file or folder");
    const pissa::io::Checkpoint model(model_path);

    pissa::io::AdapterConfig adapter_config;
    adapter_config.r = config.rank;
    adapter_config.lora_alpha = config.lora_alpha;
    adapter_config.use_rslora = config.use_rslora;
    adapter_config.fan_in_fan_out = config.fan_in_fan_out;
    adapter_config.init_lora_weights = true;
    adapter_config.base_model_name_or_path = fs::absolute(model_path).lexically_normal().string();
    set_targets_from_args(args, adapter_config);
    const auto targets = pissa::io::select_targets(model, adapter_config);
    refuse_embedding_targets(targets);
    const std::set<std::string> target_set(targets.begin(), targets.end());

    OutputDir out(args.get("out"), args.has("force"), {model_path});
    pissa::io::Adapter adapter;
    adapter.config = adapter_config;
    adapter.metadata = {{"format", "pt"},
                        {"pissa.version", format("%d.%d.%d", PISSA_VERSION_MAJOR, PISSA_VERSION_MINOR, PISSA_VERSION_PATCH)},
                        {"pissa.method", exact ? "exact" : "randomized"},
                        {"pissa.init_lora_weights", exact ? "pissa" : format("pissa_niter_%d", config.randomized.niter)},
                        {"pissa.niter", exact ? "" : std::to_string(config.randomized.niter)},
                        {"pissa.fused_power_iteration", config.randomized.fused_power_iteration ? "true" : "false"},
                        {"pissa.seed", std::to_string(seed)},
                        {"pissa.seed_rule", "module i (checkpoint order of targets) uses stream_seed(seed, i)"},
                        {"pissa.rank", std::to_string(config.rank)},
                        {"pissa.lora_alpha", format("%.17g", config.lora_alpha)},
                        {"pissa.use_rslora", config.use_rslora ? "true" : "false"},
                        {"pissa.fan_in_fan_out", config.fan_in_fan_out ? "true" : "false"}};
    if (quantize) {
        adapter.metadata["pissa.quantize"] = "nf4";
        adapter.metadata["pissa.quant_iters"] = std::to_string(quant_config.iterations);
        adapter.metadata["pissa.quant_block"] = std::to_string(quant_config.nf4.block_size);
    }

    std::vector<ModuleSummary> summary;
    Progress progress(stderr_is_tty() && !args.has("json"));
    std::uint64_t bytes_done = 0;
    const auto start = std::chrono::steady_clock::now();
    pissa::io::rewrite_checkpoint(
        model, out.path(),
        [&](const pissa::io::SafetensorsFile& file, const pissa::io::TensorInfo& t, std::vector<unsigned char>& bytes) {
            if (!target_set.count(t.name)) return false;
            const auto t0 = std::chrono::steady_clock::now();
            ModuleSummary row;
            row.name = pissa::io::module_of_weight(t.name);
            row.shape = t.shape;
            row.rank = config.rank;
            row.seed = pissa::detail::stream_seed(seed, summary.size());
            pissa::PissaConfig module_config = config;
            module_config.randomized.seed = row.seed;
            // One matrix at a time, split in place in its stored dtype inside the output buffer
            // (float32 inside for 16-bit storage): the bytes left there are the residual's.
            pissa::io::visit_float_dtype(t.dtype, t.name, [&](auto tag) {
                using Storage = decltype(tag);
                auto W = pissa::io::copy_matrix_into<Storage>(file, t, bytes);
                file.release(t);
                if (quantize) {
                    // QPiSSA: the residual written is deq(NF4(W - s B A)) (the last of T alternations).
                    pissa::QuantInitConfig module_quant = quant_config;
                    module_quant.pissa = module_config;
                    row.quant.module = row.name;
                    row.quant.shape = row.shape;
                    const auto q = run_quant_methods(W, module_quant, pissa::QuantErrorNorm::frobenius, row.quant);
                    adapter.modules.push_back({row.name, q.adapter.A.template cast<float>(), q.adapter.B.template cast<float>()});
                    W = pissa::dequantize_nf4<float>(q.base).template cast<Storage>();
                    return;
                }
                auto result = pissa::init_in_place(W, module_config);
                adapter.modules.push_back({row.name, result.A.template cast<float>(), result.B.template cast<float>()});
                row.energy = result.quality.adapter_energy_fraction;
                row.weight_norm = result.quality.weight_norm;
                row.residual_norm = result.quality.residual_norm;
            });
            row.seconds = seconds_since(t0);
            row.quant.seconds = row.seconds;
            summary.push_back(row);
            return true;
        },
        [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) {
            progress.update(i, n, t.name, bytes_done);
            bytes_done += t.nbytes();
        });
    progress.finish();
    pissa::io::write_adapter(out.path() / "pissa_init", adapter);
    out.commit();
    const double total = seconds_since(start);

    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "init";
        j["model"] = model_path.string();
        j["out"] = out.final_path().string();
        j["adapter"] = (out.final_path() / "pissa_init").string();
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
            j["quantize"] = {{"format", "nf4"}, {"quant_iters", quant_config.iterations},
                             {"quant_block", quant_config.nf4.block_size}, {"norm", "fro"}};
            std::vector<ModuleQuantErrors> errors;
            for (const auto& m : summary) errors.push_back(m.quant);
            add_quant_report(j, errors);
            for (std::size_t i = 0; i < summary.size(); ++i) {
                j["modules"][i]["rank"] = summary[i].rank;
                j["modules"][i]["seed"] = summary[i].seed;
            }
            std::cout << j.dump(2) << std::endl;
            return 0;
        }
        j["modules"] = nlohmann::ordered_json::array();
        for (const auto& m : summary)
            j["modules"].push_back({{"name", m.name}, {"shape", m.shape}, {"rank", m.rank},
                                    {"energy_fraction", m.energy}, {"weight_norm", m.weight_norm},
                                    {"residual_norm", m.residual_norm}, {"seconds", m.seconds}, {"seed", m.seed}});
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    if (quantize) {
        std::vector<ModuleQuantErrors> errors;
        for (const auto& m : summary) errors.push_back(m.quant);
        print_quant_report(errors, "Frobenius");
        std::printf("\nresidual written as dequantised NF4 (blocks of %lld) after T = %d alternations; QLoRA and "
                    "LoftQ are the baselines on the same weights\n",
                    static_cast<long long>(quant_config.nf4.block_size), quant_config.iterations);
    } else {
        std::vector<std::vector<std::string>> rows;
        for (const auto& m : summary)
            rows.push_back({m.name, shape_text(m.shape), std::to_string(m.rank), format("%.2f%%", 100 * m.energy),
                            format("%.4g", m.residual_norm), format("%.4g", m.weight_norm), format("%.3f s", m.seconds)});
        print_table({"module", "shape", "rank", "kept energy", "||W_res||_F", "||W||_F", "time"}, rows);
    }
    std::printf("\n%zu modules, rank %lld, alpha %g (scaling %g), %s, seed %llu, %.2f s\n", summary.size(),
                static_cast<long long>(config.rank), config.lora_alpha, config.scaling(),
                exact ? "exact SVD"
                      : format("randomized SVD niter %d%s", config.randomized.niter,
                               config.randomized.fused_power_iteration ? " (fused)" : "").c_str(),
                static_cast<unsigned long long>(seed), total);
    std::printf("residual model: %s\nadapter:        %s\n", out.final_path().string().c_str(),
                (out.final_path() / "pissa_init").string().c_str());
    return 0;
}

}  // namespace pissa_tool

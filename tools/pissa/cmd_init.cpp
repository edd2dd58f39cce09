// pissa init: split each target weight W into a PiSSA adapter (A, B) and the residual W - s B A
// (pissa::io::init_checkpoint): OUT/ is the residual model, OUT/pissa_init/ the peft adapter.
// pissa join: finish a job run in shards (pissa::io::join_init_checkpoint).
#include "quant_report.hpp"
#include "tool.hpp"

#include <pissa/io/init_checkpoint.hpp>

#include <iostream>
#include <set>

namespace pissa_tool {

namespace {

/// The summary of a job (or of this shard's part of it): a table or JSON on stdout.
int print_init_report(const pissa::io::InitCheckpointReport& report, bool json) {
    const auto& meta = report.metadata;
    auto meta_of = [&](const char* key) {
        const auto it = meta.find(key);
        return it == meta.end() ? std::string() : it->second;
    };
    const std::string method = meta_of("pissa.method"), init = meta_of("pissa.init");
    const bool exact = method == "exact";
    const bool fused = meta_of("pissa.fused_power_iteration") == "true";
    const bool quantize = meta.count("pissa.quantize") > 0;
    const std::string niter = meta_of("pissa.niter"), products = meta_of("pissa.products");
    const double scaling = pissa::lora_scaling(report.config.lora_alpha, report.config.r, report.config.use_rslora);
    std::vector<ModuleQuantErrors> errors;
    for (const auto& m : report.modules)
        if (m.quant)
            errors.push_back({m.name, m.shape, m.quant->qlora_frobenius, m.quant->loftq_frobenius,
                              m.quant->qpissa_frobenius, m.seconds});
    const bool sharded = report.shard.count > 1 && report.shard.source != "join";
    if (!report.warning.empty()) std::fprintf(stderr, "pissa init: warning: %s\n", report.warning.c_str());

    if (json) {
        nlohmann::ordered_json j;
        j["command"] = report.shard.source == "join" ? "join" : "init";
        j["model"] = report.model.string();
        j["out"] = report.out.string();
        j["adapter"] = report.adapter.string();
        j["complete"] = report.complete;
        j["already_complete"] = report.already_complete;
        j["shard"] = {{"index", report.shard.index}, {"count", report.shard.count}, {"source", report.shard.source}};
        j["waiting_for"] = report.waiting_for;
        j["resumed_tensors"] = report.resumed_items;
        j["init"] = init;
        j["method"] = method;
        j["niter"] = niter.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(std::stoi(niter));
        j["fused_power_iteration"] = fused;
        j["products"] = products.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(products);
        j["seed"] = std::stoull(meta_of("pissa.seed").empty() ? "0" : meta_of("pissa.seed"));
        j["rank"] = report.config.r;
        j["lora_alpha"] = report.config.lora_alpha;
        j["scaling"] = scaling;
        j["use_rslora"] = report.config.use_rslora;
        j["fan_in_fan_out"] = report.config.fan_in_fan_out;
        j["seconds"] = report.seconds;
        if (quantize) {
            j["quantize"] = {{"format", "nf4"},
                             {"quant_iters", std::stoi(meta_of("pissa.quant_iters"))},
                             {"quant_block", std::stoll(meta_of("pissa.quant_block"))},
                             {"norm", "fro"}};
            add_quant_report(j, errors);
            for (std::size_t i = 0; i < report.modules.size(); ++i) {
                j["modules"][i]["rank"] = report.modules[i].rank;
                j["modules"][i]["seed"] = report.modules[i].seed;
            }
        } else {
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
        }
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    if (report.already_complete) {
        std::printf("%s is complete with these options; nothing to do\n", report.out.string().c_str());
        return 0;
    }
    if (quantize && !errors.empty()) {
        print_quant_report(errors, "Frobenius");
        std::printf(
            "\nresidual written as dequantised NF4 (blocks of %s) after T = %s alternations; QLoRA and "
            "LoftQ are the baselines on the same weights\n",
            meta_of("pissa.quant_block").c_str(), meta_of("pissa.quant_iters").c_str());
    } else if (!report.modules.empty()) {
        std::vector<std::vector<std::string>> rows;
        for (const auto& m : report.modules)
            rows.push_back({m.name, shape_text(m.shape), std::to_string(m.rank),
                            format("%.2f%%", 100 * m.quality.adapter_energy_fraction),
                            format("%.4g", m.quality.residual_norm), format("%.4g", m.quality.weight_norm),
                            format("%.3f s", m.seconds)});
        print_table({"module", "shape", "rank", "kept energy", "||W_res||_F", "||W||_F", "time"}, rows);
    }
    const std::string how = init == "olora"    ? "OLoRA (leading QR)"
                            : init == "milora" ? "MiLoRA (minor triplets, exact SVD)"
                            : exact            ? "exact SVD"
                                               : format("randomized SVD niter %s%s, %s products", niter.c_str(),
                                             fused ? " (fused)" : "", products.c_str());
    std::printf("\n%zu modules, rank %lld, alpha %g (scaling %g), %s, seed %s, %.2f s\n", report.modules.size(),
                static_cast<long long>(report.config.r), report.config.lora_alpha, scaling, how.c_str(),
                meta_of("pissa.seed").c_str(), report.seconds);
    if (report.resumed_items > 0)
        std::printf("resumed: %zu tensors were already done and verified\n", report.resumed_items);
    if (sharded) {
        std::printf("shard %llu of %llu (from %s) done\n", static_cast<unsigned long long>(report.shard.index),
                    static_cast<unsigned long long>(report.shard.count), report.shard.source.c_str());
        if (!report.complete) {
            std::string waiting;
            for (auto s : report.waiting_for) waiting += (waiting.empty() ? "" : ", ") + std::to_string(s);
            std::printf("waiting for shards %s; the last to finish writes %s (or run: pissa join %s)\n",
                        waiting.c_str(), report.out.string().c_str(), report.out.string().c_str());
            return 0;
        }
    }
    std::printf("residual model: %s\nadapter:        %s\n", report.out.string().c_str(),
                report.adapter.string().c_str());
    return 0;
}

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
        .flag("fused",
              "randomized SVD with the fused power step Q = qr(W^T (W Q)): one pass over W per\n"
              "                           step up to rank 24 (K + 2 passes instead of 2K + 2). Not peft's\n"
              "                           algorithm: the same subspace in exact arithmetic, other rounding")
        .option("products", "auto|float32|bfloat16",
                "randomized SVD: the arithmetic of the products with W. auto: bfloat16 operands with\n"
                "                           float32 sums on a CPU with AMX (a float32 W: all but the last two\n"
                "                           products), float32 elsewhere; float32: as torch.svd_lowrank;\n"
                "                           bfloat16: also with AVX512_BF16 alone",
                "auto")
        .option("init", "pissa|olora",
                "the factorisation: pissa (singular triplets), or olora (peft's \"olora\": B = Q_r, A = R_r of\n"
                "                           the leading QR of W)",
                "pissa")
        .option("components", "principal|minor",
                "which triplets PiSSA keeps: the r largest, or the r smallest (MiLoRA; implies --exact:\n"
                "                           a full SVD of each weight, O(m n min(m, n)))",
                "principal")
        .flag("rslora", "rsLoRA scaling alpha / sqrt(r)")
        .option("rank-pattern", "KEY=R,...",
                "per-module rank (peft's rank_pattern: the first KEY whose regex matches the end of a\n"
                "                           module name after a dot, e.g. v_proj=4 or layers\\.0\\..*=16)")
        .option("alpha-pattern", "KEY=A,...", "per-module lora_alpha (peft's alpha_pattern, same rule)")
        .option("task-type", "T",
                "peft task_type written to adapter_config.json (CAUSAL_LM, SEQ_CLS, ..., none for null);\n"
                "                           default: from config.json's architectures (LlamaForCausalLM -> CAUSAL_LM,\n"
                "                           a bare model such as BertModel -> null)")
        .flag("fan-in-fan-out", "weights are stored [in, out] (GPT-2 Conv1D)")
        .option("seed", "S", "seed of the randomized SVD (module i uses stream i of it)", "0")
        .option("threads", "N", "threads (0: all cores)", "0")
        .flag("force", "replace DIR if it exists")
        .flag("json", "print the summary as JSON on stdout instead of a table")
        .option("shard", "K/N",
                "do shard K of N (0 .. N-1) of the job: several processes or machines share one output\n"
                "                           folder; the last to finish writes the output (or run pissa join DIR).\n"
                "                           auto: K and N from the launcher (Slurm, Open MPI, PMI); auto/N: K from\n"
                "                           JOB_COMPLETION_INDEX (Kubernetes Indexed Job) with N given")
        .flag("resume",
              "continue the job from its journal (after a crash or kill) instead of starting over; a\n"
              "                           finished output with the same options is left alone (exit 0)")
        .option("quantize", "nf4",
                "QPiSSA: the residual is written as deq(NF4(W - s B A)) in the model's dtype; the summary\n"
                "                           compares the error ||W - deq(Q) - s B A||_F with QLoRA's and LoftQ's");
    add_selection_options(args, "q_proj,v_proj");
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
    const std::string init = args.get("init"), components = args.get("components");
    if (init != "pissa" && init != "olora") throw UsageError("--init must be pissa or olora, got '" + init + "'");
    if (components != "principal" && components != "minor")
        throw UsageError("--components must be principal or minor, got '" + components + "'");
    if (init == "olora") {
        if (exact || args.has("niter") || args.has("fused") || components != "principal")
            throw UsageError("--init olora takes no SVD option (--exact, --niter, --fused, --components)");
        config.init = pissa::InitMethod::olora;
    }
    if (components == "minor") {
        if (args.has("niter") || args.has("fused"))
            throw UsageError("--components minor needs the exact SVD; --niter and --fused do not apply");
        config.components = pissa::Components::minor;
        config.method = pissa::SvdMethod::exact;
    }
    config.randomized.niter = static_cast<int>(args.get_int("niter", 0, 1000));
    config.randomized.fused_power_iteration = args.has("fused");
    try {
        config.randomized.products = pissa::parse_product_precision(args.get("products"));
    } catch (const pissa::invalid_argument& e) {
        throw UsageError(std::string("--") + e.what());
    }
    if (args.has("products") && (config.method == pissa::SvdMethod::exact || init == "olora"))
        throw UsageError(
            "--products applies to the randomized SVD only, not to --exact, --components minor or "
            "--init olora");
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
    set_targets_from_args(args, options);
    fs::path model_path = args.pos(0);
    if (model_path.empty()) model_path = builtin_model();
    if (!fs::exists(model_path)) throw UsageError(model_path.string() + ": no such file or folder");

    if (args.has("shard")) options.shard = pissa::io::parse_shard(args.get("shard"));
    options.resume = args.has("resume");

    Progress progress(stderr_is_tty() && !args.has("json"));
    std::uint64_t bytes_done = 0;
    pissa::io::InitCheckpointCallbacks callbacks;
    callbacks.progress = [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) {
        progress.update(i, n, t.name, bytes_done);
        bytes_done += t.nbytes();
    };
    if (options.resume || options.shard.count > 1)
        kept_work = pissa::io::WorkFolder(pissa::io::detail::resolved_path(args.get("out"))).path().string();
    const auto report = pissa::io::init_checkpoint(model_path, args.get("out"), options, callbacks);
    progress.finish();
    return print_init_report(report, args.has("json"));
}

int cmd_join(int argc, char** argv) {
    Args args("join", "DIR [--json]",
              "Finishes a pissa init job run in shards (--shard K/N) whose shards have all finished: joins\n"
              "their parts into DIR, writes the index, the adapter DIR/pissa_init and the summary. The last\n"
              "shard to finish does this itself; run it when that shard could not (it was killed while\n"
              "joining). Safe to run again.");
    args.positional("DIR", "the job's output folder (its work folder .DIR.pissa-work lies beside it)", true)
        .flag("json", "print the summary as JSON on stdout instead of a table");
    if (!args.parse(argc, argv)) return 0;
    kept_work = pissa::io::WorkFolder(pissa::io::detail::resolved_path(args.pos(0))).path().string();
    const auto report = pissa::io::join_init_checkpoint(args.pos(0));
    return print_init_report(report, args.has("json"));
}

}  // namespace pissa_tool

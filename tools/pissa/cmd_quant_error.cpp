// pissa quant-error: how much of the NF4 quantisation error of each target weight QLoRA, LoftQ and
// QPiSSA leave, per module and averaged per module kind (the PiSSA paper's quantisation-error table).
// Reads the model only; writes nothing.
#include "quant_report.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/targets.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/seed.hpp>

#include <iostream>

namespace pissa_tool {

int cmd_quant_error(int argc, char** argv) {
    Args args("quant-error", "[MODEL] [options]",
              "For every target weight W: the error ||W - deq(Q) - s B A|| of QLoRA (Q = NF4(W), no adapter),\n"
              "LoftQ (quantise, then fit the rank-r adapter to the error; T alternations) and QPiSSA (PiSSA split,\n"
              "quantise the residual; T alternations), and each method's reduction 1 - error / QLoRA error.\n"
              "NF4 as bitsandbytes (blocks of 64, no double quantisation). Without MODEL, the built-in model.");
    args.positional("MODEL", "a .safetensors file or a model folder (single file or sharded)", false)
        .option("rank", "R", "adapter rank r (the paper's table: 128)", "128")
        .option("niter", "K", "randomized SVD power iterations of every split", "4")
        .flag("exact", "exact truncated SVD for every split (the reference scripts' torch.linalg.svd)")
        .option("norm", "fro|nuclear", "error norm: Frobenius, or nuclear (the paper's; a full SVD per error)", "fro")
        .flag("fan-in-fan-out", "weights are stored [in, out] (GPT-2 Conv1D)")
        .option("seed", "S", "seed of the randomized SVD (module i uses stream i of it, as pissa init)", "0")
        .option("threads", "N", "threads (0: all cores)", "0")
        .flag("json", "print one JSON object (modules, kinds) on stdout instead of the tables");
    add_selection_options(args, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj");
    add_quant_options(args);
    if (!args.parse(argc, argv)) return 0;

    pissa::PissaConfig pissa_config;
    pissa_config.rank = static_cast<pissa::Index>(args.get_int("rank", 1, 1 << 20));
    pissa_config.lora_alpha = static_cast<double>(pissa_config.rank);  // s B A does not depend on alpha
    pissa_config.fan_in_fan_out = args.has("fan-in-fan-out");
    const bool exact = args.has("exact");
    if (exact && args.has("niter")) throw UsageError("--exact and --niter exclude each other");
    pissa_config.method = exact ? pissa::SvdMethod::exact : pissa::SvdMethod::randomized;
    pissa_config.randomized.niter = static_cast<int>(args.get_int("niter", 0, 1000));
    const pissa::QuantInitConfig config = quant_config_from_args(args, pissa_config);
    const std::string norm_name = args.get("norm");
    if (norm_name != "fro" && norm_name != "nuclear")
        throw UsageError("--norm must be fro or nuclear, got '" + norm_name + "'");
    const auto norm = norm_name == "nuclear" ? pissa::QuantErrorNorm::nuclear : pissa::QuantErrorNorm::frobenius;
    const std::uint64_t seed = args.get_u64("seed");
    set_threads(static_cast<int>(args.get_int("threads", 0, 4096)));

    pissa::io::AdapterConfig selection;
    set_targets_from_args(args, selection);
    fs::path model_path = args.pos(0);
    if (model_path.empty()) model_path = builtin_model();
    if (!fs::exists(model_path)) throw UsageError(model_path.string() + ": no such file or folder");
    const pissa::io::Checkpoint model(model_path);
    static_cast<pissa::io::ModuleSelection&>(selection) =
        pissa::io::resolve_selection(model, selection, pissa::io::infer_task_type(model_path));
    const auto targets = pissa::io::select_targets(model, selection);

    std::vector<ModuleQuantErrors> modules;
    Progress progress(stderr_is_tty() && !args.has("json"));
    std::uint64_t bytes_done = 0;
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < targets.size(); ++i) {
        const auto& file = model.file_of(targets[i]);
        const auto& t = file.at(targets[i]);
        progress.update(i, targets.size(), t.name, bytes_done);
        const auto t0 = std::chrono::steady_clock::now();
        ModuleQuantErrors row;
        row.module = pissa::io::module_of_weight(t.name);
        row.shape = t.shape;
        pissa::QuantInitConfig module_config = config;
        module_config.pissa.randomized.seed = pissa::module_seed(seed, i);
        pissa::io::visit_float_dtype(t.dtype, t.name, [&](auto tag) {
            using Storage = decltype(tag);
            const pissa::RowMatrix<Storage> W = pissa::io::copy_matrix<Storage>(file, t);
            file.release(t);
            const auto errors =
                pissa::compare_quantization_errors(W, module_config, norm == pissa::QuantErrorNorm::nuclear).in(norm);
            row.qlora = errors.qlora;
            row.loftq = errors.loftq;
            row.qpissa = errors.qpissa;
        });
        row.seconds = seconds_since(t0);
        bytes_done += t.nbytes();
        modules.push_back(row);
    }
    progress.finish();
    const double total = seconds_since(start);

    const std::string svd = exact ? "exact" : format("randomized niter %d", pissa_config.randomized.niter);
    if (args.has("json")) {
        nlohmann::ordered_json j;
        j["command"] = "quant-error";
        j["model"] = model_path.string();
        j["rank"] = pissa_config.rank;
        j["quant_iters"] = config.iterations;
        j["quant_block"] = config.nf4.block_size;
        j["norm"] = norm_name;
        j["svd"] = svd;
        j["seed"] = seed;
        j["seconds"] = total;
        add_quant_report(j, modules);
        std::cout << j.dump(2) << std::endl;
        return 0;
    }
    print_quant_report(modules, norm_name == "fro" ? "Frobenius" : "nuclear");
    std::printf("\n%zu modules, rank %lld, T = %d, NF4 blocks of %lld, %s SVD, seed %llu, %.2f s\n", modules.size(),
                static_cast<long long>(pissa_config.rank), config.iterations,
                static_cast<long long>(config.nf4.block_size), svd.c_str(), static_cast<unsigned long long>(seed),
                total);
    return 0;
}

}  // namespace pissa_tool

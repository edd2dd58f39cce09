/// \file io/init_checkpoint.hpp
/// \brief The whole-checkpoint job: PiSSA on every target weight of a model, written as the
/// residual model plus a peft adapter — what peft's `init_lora_weights="pissa"` /
/// `"pissa_niter_K"` followed by saving the residual base and the adapter produces.
///
/// Output layout (the PiSSA reference scripts'): `out/` is the residual model (the input's files,
/// tensor names, order, shapes, dtypes and metadata; target weights replaced by `W - s B A` rounded
/// to their dtype, every other tensor byte-identical, other files of a model folder copied);
/// `out/pissa_init/` is the adapter (`init_lora_weights: true`, so loading it does not decompose
/// the base again). The output is written all-or-nothing (io/output_folder.hpp).
///
/// Data flow: one target at a time is copied from the input into one reused buffer in its stored
/// dtype, split in place there (float32 inside for 16-bit storage), and streamed to the output
/// file while the next tensor is read ahead; memory stays at the largest tensor plus the adapter.
/// Target `i` (checkpoint order) is seeded with `module_seed(seed, i)` (seed.hpp).
#pragma once

#include <pissa/errors.hpp>
#include <pissa/init.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/output_folder.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/qpissa.hpp>
#include <pissa/quality.hpp>
#include <pissa/quant_error.hpp>
#include <pissa/seed.hpp>
#include <pissa/version.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace pissa::io {

/// What init_checkpoint does. The defaults are peft's: rank 8, alpha 8, `q_proj,v_proj`,
/// `pissa_niter_4`, seed 0.
struct InitCheckpointOptions {
    /// Rank, lora_alpha, rsLoRA, fan_in_fan_out, exact or randomized SVD and its options. The
    /// randomized seed inside is ignored: module i uses module_seed(seed, i).
    PissaConfig pissa = default_pissa();
    std::uint64_t seed = 0;
    std::vector<std::string> target_modules{"q_proj", "v_proj"};  ///< peft's list form (name or ".name" suffix)
    std::string target_regex;  ///< peft's string form (full match); used instead of the list when set
    /// QPiSSA: when set, the residual is written as deq(NF4(W - s B A)) after `iterations`
    /// alternations, with this quantiser; its `pissa` member is replaced by `pissa` above.
    std::optional<QuantInitConfig> quantize;
    /// peft's task_type written to adapter_config.json: "CAUSAL_LM", "SEQ_CLS", ...; "none" for
    /// null (peft's default, what a bare encoder such as BertModel needs); empty: inferred from the
    /// model's config.json (infer_task_type).
    std::string task_type;
    bool force = false;                         ///< replace an existing output folder
    std::string adapter_folder = "pissa_init";  ///< the adapter's folder inside the output

    static PissaConfig default_pissa() {
        PissaConfig c;
        c.method = SvdMethod::randomized;
        c.randomized.niter = 4;
        return c;
    }
};

/// One decomposed module.
struct ModuleReport {
    std::string name;                  ///< module name, e.g. model.layers.0.self_attn.q_proj
    std::vector<std::uint64_t> shape;  ///< the weight's stored shape
    Index rank = 0;
    std::uint64_t seed = 0;  ///< the randomized SVD's seed (module_seed(seed, i))
    QualityReport quality;   ///< of the PiSSA split (without quantisation)
    /// With quantisation: ||W - deq(Q) - s B A||_F of QLoRA, LoftQ and QPiSSA on this weight.
    std::optional<QuantErrorComparison> quant;
    double seconds = 0;
};

/// What init_checkpoint wrote.
struct InitCheckpointReport {
    std::filesystem::path out;      ///< the residual model's folder (absolute)
    std::filesystem::path adapter;  ///< the adapter's folder
    Adapter written;                ///< the adapter as written (config, A and B, metadata)
    std::vector<ModuleReport> modules;
    double seconds = 0;
    std::string warning;  ///< a non-fatal problem to report (see OutputFolder::warning)
};

/// Observers of a running job. Both may throw to abort it (the output is then not written).
struct InitCheckpointCallbacks {
    /// Before each tensor of the checkpoint: its index and the count, the tensor.
    std::function<void(std::size_t index, std::size_t count, const TensorInfo& tensor)> progress;
    /// After each decomposed module.
    std::function<void(const ModuleReport& module)> module_done;
};

/// peft applies PiSSA to Linear (and Conv1D) layers only: an nn.Embedding target keeps LoRA's
/// init and stores lora_embedding_A / lora_embedding_B, so a PiSSA adapter written for it would
/// not load as one and the residual base would silently lack s B A. A checkpoint does not record
/// layer types; embeddings are recognised by their conventional names.
/// \throws pissa::invalid_argument naming the first embedding among `targets` (tensor names).
inline void refuse_embedding_targets(const std::vector<std::string>& targets) {
    static const std::set<std::string> embeddings = {"embed_tokens",
                                                     "wte",
                                                     "wpe",
                                                     "word_embeddings",
                                                     "position_embeddings",
                                                     "token_type_embeddings",
                                                     "embed_in",
                                                     "embed_positions",
                                                     "shared"};
    for (const auto& name : targets) {
        const std::string module = module_of_weight(name);
        const std::string last = module.substr(module.rfind('.') + 1);
        if (embeddings.count(last))
            throw pissa::invalid_argument(name +
                                          " is an embedding: peft initialises embedding targets as plain "
                                          "LoRA (lora_embedding_A/B), not PiSSA; leave '" +
                                          last + "' out of the targets");
    }
}

/// peft's task_type for a model, from the class its config.json names (`architectures[0]`, as
/// transformers' save_pretrained writes it): `...ForCausalLM` / `...LMHeadModel` -> CAUSAL_LM,
/// `...ForSequenceClassification` -> SEQ_CLS, `...ForTokenClassification` -> TOKEN_CLS,
/// `...ForQuestionAnswering` -> QUESTION_ANS, `...ForConditionalGeneration` -> SEQ_2_SEQ_LM; ""
/// (null) for anything else, a bare model class or no config.json. A wrong task_type is not
/// harmless: peft wraps the model by it, and e.g. a causal-LM wrapper fails on a BertModel.
inline std::string infer_task_type(const std::filesystem::path& model) {
    const auto config =
        std::filesystem::is_directory(model) ? model / "config.json" : model.parent_path() / "config.json";
    if (!detail::path_exists(config)) return "";
    const std::string text = detail::read_text_file(config, max_adapter_config_size, "a model config");
    const auto doc =
        detail::parse_json_strict<nlohmann::ordered_json>(text.data(), text.data() + text.size(), config.string());
    const auto it = doc.is_object() ? doc.find("architectures") : doc.end();
    if (it == doc.end() || !it->is_array() || it->empty() || !(*it)[0].is_string()) return "";
    const std::string name = (*it)[0].get<std::string>();
    auto ends_with = [&](const std::string& suffix) {
        return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (ends_with("ForCausalLM") || ends_with("LMHeadModel")) return "CAUSAL_LM";
    if (ends_with("ForSequenceClassification")) return "SEQ_CLS";
    if (ends_with("ForTokenClassification")) return "TOKEN_CLS";
    if (ends_with("ForQuestionAnswering")) return "QUESTION_ANS";
    if (ends_with("ForConditionalGeneration") || ends_with("ForSeq2SeqLM")) return "SEQ_2_SEQ_LM";
    return "";
}

/// The adapter_config.json of a job (peft's LoraConfig fields).
inline AdapterConfig adapter_config_for(const InitCheckpointOptions& options, const std::filesystem::path& model) {
    AdapterConfig c;
    c.r = options.pissa.rank;
    c.lora_alpha = options.pissa.lora_alpha;
    c.use_rslora = options.pissa.use_rslora;
    c.fan_in_fan_out = options.pissa.fan_in_fan_out;
    c.init_lora_weights = true;
    c.base_model_name_or_path = std::filesystem::absolute(model).lexically_normal().string();
    c.target_modules = options.target_modules;
    c.target_regex = options.target_regex;
    c.task_type = options.task_type.empty()     ? infer_task_type(model)
                  : options.task_type == "none" ? std::string()
                                                : options.task_type;
    return c;
}

/// The adapter file's metadata: "format" as peft writes it, plus pissa.method, pissa.seed,
/// pissa.seed_rule and the other options of the split, so that it can be reproduced.
inline std::map<std::string, std::string> adapter_metadata_for(const InitCheckpointOptions& options) {
    const PissaConfig& c = options.pissa;
    const bool exact = c.method == SvdMethod::exact;
    auto number = [](double v) {
        char buffer[32];
        std::snprintf(buffer, sizeof buffer, "%.17g", v);
        return std::string(buffer);
    };
    std::map<std::string, std::string> m = {
        {"format", "pt"},
        {"pissa.version", std::to_string(PISSA_VERSION_MAJOR) + "." + std::to_string(PISSA_VERSION_MINOR) + "." +
                              std::to_string(PISSA_VERSION_PATCH)},
        {"pissa.method", exact ? "exact" : "randomized"},
        {"pissa.init_lora_weights", exact ? "pissa" : "pissa_niter_" + std::to_string(c.randomized.niter)},
        {"pissa.niter", exact ? "" : std::to_string(c.randomized.niter)},
        {"pissa.fused_power_iteration", c.randomized.fused_power_iteration ? "true" : "false"},
        {"pissa.seed", std::to_string(options.seed)},
        {"pissa.seed_rule", module_seed_rule},
        {"pissa.rank", std::to_string(c.rank)},
        {"pissa.lora_alpha", number(c.lora_alpha)},
        {"pissa.use_rslora", c.use_rslora ? "true" : "false"},
        {"pissa.fan_in_fan_out", c.fan_in_fan_out ? "true" : "false"}};
    if (options.quantize) {
        m["pissa.quantize"] = "nf4";
        m["pissa.quant_iters"] = std::to_string(options.quantize->iterations);
        m["pissa.quant_block"] = std::to_string(options.quantize->nf4.block_size);
    }
    return m;
}

namespace detail {

/// Refuses a module whose adapter or residual came out non-finite (an alpha so large or small that
/// sqrt(S / s) overflows or underflows, or weights whose squares overflow the compute type).
inline void require_finite_split(const std::string& module, const std::string& file, const QualityReport& q,
                                 bool adapter_finite) {
    if (std::isfinite(q.residual_norm) && std::isfinite(q.weight_norm) && adapter_finite) return;
    throw pissa::invalid_argument(
        file + ": module '" + module + "': the split is not finite (||W||_F = " + std::to_string(q.weight_norm) +
        ", ||W_res||_F = " + std::to_string(q.residual_norm) + (adapter_finite ? "" : ", A or B non-finite") +
        "): lora_alpha or the weight's magnitude is outside what the dtype can represent");
}

}  // namespace detail

/// Runs the job on the checkpoint at `model` (a .safetensors file, a model folder or a sharded
/// folder) and writes `out` (see the file comment).
/// \throws pissa::invalid_argument for bad options, a refused output (io/output_folder.hpp), no
///         target, an embedding target, a non-finite weight or split (naming the module and file);
///         pissa::io::format_error for a malformed input; io_error when reading or writing fails;
///         whatever a callback throws. Nothing is left at `out` unless the job succeeds.
inline InitCheckpointReport init_checkpoint(const std::filesystem::path& model, const std::filesystem::path& out,
                                            const InitCheckpointOptions& options,
                                            const InitCheckpointCallbacks& callbacks = {}) {
    const auto start = std::chrono::steady_clock::now();
    auto seconds_since = [](std::chrono::steady_clock::time_point t) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    };
    require_valid(options.pissa);
    pissa::detail::require(!options.target_regex.empty() || !options.target_modules.empty(),
                           "init_checkpoint: no target modules given");
    pissa::detail::require(!options.adapter_folder.empty() && detail::plain_file_name(options.adapter_folder),
                           "init_checkpoint: the adapter folder must be a plain folder name, got '",
                           options.adapter_folder, "'");
    std::optional<QuantInitConfig> quantize = options.quantize;
    if (quantize) {
        quantize->pissa = options.pissa;
        require_valid(*quantize);
    }
    const Checkpoint checkpoint(model);
    for (const auto& file : checkpoint.other_files())  // copied into the output beside the adapter folder
        pissa::detail::require(file.filename() != options.adapter_folder, "init_checkpoint: ", file.string(),
                               " has the adapter folder's name '", options.adapter_folder,
                               "' and would be copied where the adapter goes; move it out of the model folder");
    InitCheckpointReport report;
    report.written.config = adapter_config_for(options, model);
    report.written.metadata = adapter_metadata_for(options);
    const auto targets = select_targets(checkpoint, report.written.config);
    refuse_embedding_targets(targets);
    const std::set<std::string> target_set(targets.begin(), targets.end());

    OutputFolder folder(out, options.force, {model});
    rewrite_checkpoint(
        checkpoint, folder.path(),
        [&](const SafetensorsFile& file, const TensorInfo& t, std::vector<unsigned char>& bytes) {
            if (!target_set.count(t.name)) return false;
            const auto t0 = std::chrono::steady_clock::now();
            ModuleReport row;
            row.name = module_of_weight(t.name);
            row.shape = t.shape;
            row.rank = options.pissa.rank;
            row.seed = module_seed(options.seed, report.modules.size());
            PissaConfig config = options.pissa;
            config.randomized.seed = row.seed;
            const std::string where = file.path().string() + ": tensor '" + t.name + "'";
            // One matrix at a time, split in place in its stored dtype inside the output buffer:
            // the bytes left there are the residual's.
            visit_float_dtype(t.dtype, t.name, [&](auto tag) {
                using Storage = decltype(tag);
                auto W = copy_matrix_into<Storage>(file, t, bytes);
                file.release(t);
                try {
                    if (quantize) {
                        QuantInitConfig module_quant = *quantize;
                        module_quant.pissa = config;
                        using Scalar = compute_scalar_t<Storage>;
                        QuantizedInit<Scalar> qpissa;
                        row.quant = compare_quantization_errors(W, module_quant, false, &qpissa);
                        const bool finite = qpissa.adapter.A.allFinite() && qpissa.adapter.B.allFinite();
                        QualityReport q;
                        q.weight_norm = W.template cast<double>().norm();
                        q.residual_norm = row.quant->qpissa_frobenius;
                        detail::require_finite_split(row.name, file.path().string(), q, finite);
                        report.written.modules.push_back(
                            {{qpissa.adapter.A.template cast<float>(), qpissa.adapter.B.template cast<float>(),
                              static_cast<float>(qpissa.adapter.scaling)},
                             row.name});
                        W = dequantize_nf4<float>(qpissa.base).template cast<Storage>();
                        return;
                    }
                    auto result = init_in_place(W, config);
                    Matrix<float> A = result.A.template cast<float>(), B = result.B.template cast<float>();
                    detail::require_finite_split(row.name, file.path().string(), result.quality,
                                                 A.allFinite() && B.allFinite());
                    row.quality = result.quality;
                    report.written.modules.push_back(
                        {{std::move(A), std::move(B), static_cast<float>(result.scaling)}, row.name});
                } catch (const pissa::io::format_error&) {
                    throw;
                } catch (const pissa::invalid_argument& e) {
                    // Name the module and file in errors of the math (non-finite values, ranks).
                    const std::string what = e.what();
                    if (what.find(t.name) != std::string::npos || what.find(row.name) != std::string::npos) throw;
                    throw pissa::invalid_argument(where + ": " + what);
                }
            });
            row.seconds = seconds_since(t0);
            report.modules.push_back(row);
            if (callbacks.module_done) callbacks.module_done(report.modules.back());
            return true;
        },
        callbacks.progress ? RewriteProgress(callbacks.progress) : RewriteProgress());
    report.adapter = folder.final_path() / options.adapter_folder;
    write_adapter(folder.path() / options.adapter_folder, report.written);
    folder.commit();
    report.out = folder.final_path();
    report.warning = folder.warning();
    if (const std::string note = checkpoint.not_copied_note(); !note.empty())
        report.warning += (report.warning.empty() ? "" : "; ") + note;
    report.seconds = seconds_since(start);
    return report;
}

}  // namespace pissa::io

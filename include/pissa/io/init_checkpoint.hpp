/// \file io/init_checkpoint.hpp
/// \brief The whole-checkpoint job: PiSSA on every target weight of a model, written as the
/// residual model plus a peft adapter — what peft's `init_lora_weights="pissa"` /
/// `"pissa_niter_K"` followed by saving the residual base and the adapter produces.
///
/// Output layout (the PiSSA reference scripts'): `out/` is the residual model (the input's files,
/// tensor names, order, shapes, dtypes and metadata; target weights replaced by `W - s B A` rounded
/// to their dtype, every other tensor byte-identical, other files of a model folder copied);
/// `out/pissa_init/` is the adapter (`init_lora_weights: true`, so loading it does not decompose
/// the base again).
///
/// Data flow: one target at a time is copied from the input into one of two reused buffers in its
/// stored dtype and split in place there (float32 inside for 16-bit storage); its A and B go to a
/// small side file ("piece"). A writer thread writes, checksums, flushes and journals it while the
/// next target is read and split, and copies the unchanged tensors (io/partitioned_rewrite.hpp).
/// Memory stays at about twice the largest target plus one module's adapter, whatever the model's
/// size. Target `i`
/// (checkpoint order) is seeded with `module_seed(seed, i)` (seed.hpp), so any process can split
/// any module and get the bits a single run gets.
///
/// Scale-out and restarts: the job is assembled in a work folder beside the output
/// (io/work_folder.hpp) from part files (io/partitioned_rewrite.hpp), every completed module
/// journaled (io/journal.hpp). `options.shard` = {k, n} makes this process do only shard k of the
/// deterministic partition (io/shard.hpp); the last shard to finish (or join_init_checkpoint)
/// joins the parts, writes the index, the other files and the adapter, and renames the result to
/// `out`: byte-identical to a single run with the same options and seed. `options.resume`
/// continues after a crash from the last verified module. A plain run (one shard, no resume) is
/// all or nothing: it removes the work folder when it fails, and starts over from a work folder a
/// killed run left.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/init.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/output_folder.hpp>
#include <pissa/io/partitioned_rewrite.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/shard.hpp>
#include <pissa/io/targets.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/io/work_folder.hpp>
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
#include <type_traits>
#include <vector>

namespace pissa::io {

/// What init_checkpoint does. The defaults are peft's: rank 8, alpha 8, `q_proj,v_proj`,
/// `pissa_niter_4`, seed 0. The inherited ModuleSelection chooses the modules (target_modules,
/// `"all-linear"`, exclude_modules, layers_to_transform / layers_pattern) and gives a module its own
/// rank or alpha (rank_pattern, alpha_pattern), with peft's rules (io/peft.hpp, io/targets.hpp).
struct InitCheckpointOptions : ModuleSelection {
    InitCheckpointOptions() { target_modules = {"q_proj", "v_proj"}; }

    /// Rank, lora_alpha, rsLoRA, fan_in_fan_out, exact or randomized SVD and its options; a
    /// rank_pattern / alpha_pattern entry overrides rank / lora_alpha for the modules it matches.
    /// The randomized seed inside is ignored: module i uses module_seed(seed, i).
    PissaConfig pissa = default_pissa();
    std::uint64_t seed = 0;
    /// QPiSSA: when set, the residual is written as deq(NF4(W - s B A)) after `iterations`
    /// alternations, with this quantiser; its `pissa` member is replaced by `pissa` above.
    std::optional<QuantInitConfig> quantize;
    /// peft's task_type written to adapter_config.json: "CAUSAL_LM", "SEQ_CLS", ...; "none" for
    /// null (peft's default, what a bare encoder such as BertModel needs); empty: inferred from the
    /// model's config.json (infer_task_type).
    std::string task_type;
    bool force = false;                         ///< replace an existing output folder
    std::string adapter_folder = "pissa_init";  ///< the adapter's folder inside the output
    /// The part of the job this process does (io/shard.hpp); {0, 1}: all of it.
    ShardSpec shard;
    /// Continue the job from its work folder's journal (after a crash, a kill, a lost machine)
    /// instead of starting over, and keep the work folder when this run fails. An output that is
    /// already complete with the same options is left as it is.
    bool resume = false;

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
    std::filesystem::path model;                  ///< the input (absolute)
    std::filesystem::path out;                    ///< the residual model's folder (absolute)
    std::filesystem::path adapter;                ///< the adapter's folder
    AdapterConfig config;                         ///< the adapter's config (as written or to be written)
    std::map<std::string, std::string> metadata;  ///< the adapter file's metadata (adapter_metadata_for)
    std::filesystem::path work;  ///< the work folder (io/work_folder.hpp), kept until the job is complete
    /// The modules decomposed: the whole job's when this call completed it, else this shard's.
    std::vector<ModuleReport> modules;
    double seconds = 0;
    std::string warning;                     ///< a non-fatal problem to report (see OutputTarget::commit)
    ShardSpec shard;                         ///< the part this call did
    bool complete = false;                   ///< the output is in place
    bool already_complete = false;           ///< resume found it complete with the same options; nothing was done
    std::size_t resumed_items = 0;           ///< tensors found done and verified in the journal (not redone)
    std::vector<std::uint64_t> waiting_for;  ///< shards not finished yet (this shard's part is done)
};

/// Observers of a running job. Both may throw to abort it (the output is then not written).
struct InitCheckpointCallbacks {
    /// Before each tensor of the checkpoint: its index and the count, the tensor.
    std::function<void(std::size_t index, std::size_t count, const TensorInfo& tensor)> progress;
    /// After each decomposed module (its adapter is saved; its residual is written next).
    std::function<void(const ModuleReport& module)> module_done;
    /// While the output is joined: before each output file (index, count, name), and with
    /// (count, count, "") just before the finished output is moved into place.
    JoinProgress joining;
};

/// The adapter_config.json of a job (peft's LoraConfig fields).
inline AdapterConfig adapter_config_for(const InitCheckpointOptions& options, const std::filesystem::path& model) {
    AdapterConfig c;
    c.r = options.pissa.rank;
    c.lora_alpha = options.pissa.lora_alpha;
    c.use_rslora = options.pissa.use_rslora;
    c.fan_in_fan_out = options.pissa.fan_in_fan_out;
    c.init_lora_weights = true;
    c.base_model_name_or_path = std::filesystem::absolute(model).lexically_normal().string();
    static_cast<ModuleSelection&>(c) = options;
    c.task_type = options.task_type.empty()     ? infer_task_type(model)
                  : options.task_type == "none" ? std::string()
                                                : options.task_type;
    return c;
}

/// The adapter file's metadata: "format" as peft writes it, plus pissa.init (pissa, milora or
/// olora), pissa.method (exact, randomized or qr), pissa.seed, pissa.seed_rule and the other
/// options of the split, so that it can be reproduced.
inline std::map<std::string, std::string> adapter_metadata_for(const InitCheckpointOptions& options) {
    const PissaConfig& c = options.pissa;
    const bool olora = c.init == InitMethod::olora, minor = c.components == Components::minor;
    const bool exact = c.method == SvdMethod::exact || minor;
    auto number = [](double v) {
        char buffer[32];
        std::snprintf(buffer, sizeof buffer, "%.17g", v);
        return std::string(buffer);
    };
    std::map<std::string, std::string> m = {
        {"format", "pt"},
        {"pissa.version", std::to_string(PISSA_VERSION_MAJOR) + "." + std::to_string(PISSA_VERSION_MINOR) + "." +
                              std::to_string(PISSA_VERSION_PATCH)},
        {"pissa.init", olora   ? "olora"
                       : minor ? "milora"
                               : "pissa"},
        {"pissa.method", olora   ? "qr"
                         : exact ? "exact"
                                 : "randomized"},
        // peft's value for the same initialisation; none for MiLoRA.
        {"pissa.init_lora_weights", olora   ? "olora"
                                    : minor ? ""
                                    : exact ? "pissa"
                                            : "pissa_niter_" + std::to_string(c.randomized.niter)},
        {"pissa.niter", exact || olora ? "" : std::to_string(c.randomized.niter)},
        {"pissa.fused_power_iteration", c.randomized.fused_power_iteration ? "true" : "false"},
        {"pissa.products", exact || olora ? "" : product_precision_name(c.randomized.products)},
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

/// The `report` metadata of a module's piece (JSON), and back.
inline nlohmann::json to_json(const ModuleReport& m) {
    nlohmann::json j = {{"name", m.name},
                        {"shape", m.shape},
                        {"rank", m.rank},
                        {"seed", m.seed},
                        {"seconds", m.seconds},
                        {"singular_values", m.quality.singular_values},
                        {"weight_norm", m.quality.weight_norm},
                        {"residual_norm", m.quality.residual_norm},
                        {"adapter_energy_fraction", m.quality.adapter_energy_fraction}};
    if (m.quant)
        j["quant"] = {m.quant->qlora_frobenius, m.quant->loftq_frobenius, m.quant->qpissa_frobenius,
                      m.quant->qlora_nuclear,   m.quant->loftq_nuclear,   m.quant->qpissa_nuclear};
    return j;
}

inline ModuleReport module_report_from_json(const nlohmann::json& j) {
    ModuleReport m;
    m.name = j.at("name").get<std::string>();
    m.shape = j.at("shape").get<std::vector<std::uint64_t>>();
    m.rank = j.at("rank").get<Index>();
    m.seed = j.at("seed").get<std::uint64_t>();
    m.seconds = j.at("seconds").get<double>();
    m.quality.singular_values = j.at("singular_values").get<std::vector<double>>();
    m.quality.weight_norm = j.at("weight_norm").get<double>();
    m.quality.residual_norm = j.at("residual_norm").get<double>();
    m.quality.adapter_energy_fraction = j.at("adapter_energy_fraction").get<double>();
    if (j.contains("quant")) {
        const auto q = j.at("quant").get<std::vector<double>>();
        if (q.size() == 6) m.quant = QuantErrorComparison{q[0], q[1], q[2], q[3], q[4], q[5]};
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

/// The randomized SVD's buffers, kept from one module to the next (float32 compute for 16- and
/// 32-bit weights, double for float64 ones): a fresh set per module costs a page fault per 4 KiB.
struct SplitWorkspace {
    pissa::detail::RandomizedSvdWorkspace<float> f32;
    pissa::detail::RandomizedSvdWorkspace<double> f64;

    template <class Scalar>
    pissa::detail::RandomizedSvdWorkspace<Scalar>& get() {
        if constexpr (std::is_same_v<Scalar, float>) return f32;
        else return f64;
    }
};

/// Splits target `t` of `file` in place in `bytes` (its stored dtype; the bytes left there are the
/// residual's) and returns its adapter; fills `row`'s quality (or quantisation errors).
inline LoraModule split_module(const SafetensorsFile& file, const TensorInfo& t, std::vector<unsigned char>& bytes,
                               const PissaConfig& config, const std::optional<QuantInitConfig>& quantize,
                               ModuleReport& row, SplitWorkspace& workspace) {
    LoraModule module;
    module.name = row.name;
    const std::string where = file.path().string() + ": tensor '" + t.name + "'";
    visit_float_dtype(t.dtype, t.name, [&](auto tag) {
        using Storage = decltype(tag);
        using Scalar = compute_scalar_t<Storage>;
        auto W = copy_matrix_into<Storage>(file, t, bytes);
        file.release(t);
        try {
            if (quantize) {
                QuantInitConfig module_quant = *quantize;
                module_quant.pissa = config;
                QuantizedInit<Scalar> qpissa;
                row.quant = compare_quantization_errors(W, module_quant, false, &qpissa);
                const bool finite = qpissa.adapter.A.allFinite() && qpissa.adapter.B.allFinite();
                QualityReport q;
                q.weight_norm = W.template cast<double>().norm();
                q.residual_norm = row.quant->qpissa_frobenius;
                require_finite_split(row.name, file.path().string(), q, finite);
                module.A = qpissa.adapter.A.template cast<float>();
                module.B = qpissa.adapter.B.template cast<float>();
                module.scaling = static_cast<float>(qpissa.adapter.scaling);
                W = dequantize_nf4<float>(qpissa.base).template cast<Storage>();
                return;
            }
            auto result = pissa::detail::init_in_place(W, config, &workspace.get<Scalar>());
            module.A = result.A.template cast<float>();
            module.B = result.B.template cast<float>();
            module.scaling = static_cast<float>(result.scaling);
            require_finite_split(row.name, file.path().string(), result.quality,
                                 module.A.allFinite() && module.B.allFinite());
            row.quality = result.quality;
        } catch (const pissa::io::format_error&) {
            throw;
        } catch (const pissa::invalid_argument& e) {
            // Name the module and file in errors of the math (non-finite values, ranks).
            const std::string what = e.what();
            if (what.find(t.name) != std::string::npos || what.find(row.name) != std::string::npos) throw;
            throw pissa::invalid_argument(where + ": " + what);
        }
    });
    return module;
}

/// The split configuration of one module: `pissa` with the module's rank and lora_alpha
/// (rank_pattern / alpha_pattern applied).
inline PissaConfig module_config(PissaConfig pissa, const ModuleMatcher& matcher, const std::string& module) {
    pissa.rank = matcher.rank_for(module);
    pissa.lora_alpha = matcher.alpha_for(module);
    return pissa;
}

/// Refuses, before any work, a module whose configuration (its rank and alpha) does not fit it.
/// \throws pissa::invalid_argument naming the module.
inline void require_valid_module(const std::string& module, const TensorInfo& t, const PissaConfig& config) {
    try {
        require_valid(config);
    } catch (const pissa::invalid_argument& e) {
        throw pissa::invalid_argument("module '" + module + "': " + e.what());
    }
    const std::uint64_t smaller = std::min(t.shape[0], t.shape[1]);
    pissa::detail::require(static_cast<std::uint64_t>(config.rank) <= smaller, "module '", module, "' [", t.shape[0],
                           ", ", t.shape[1], "]: rank ", config.rank, " is larger than min(out, in) = ", smaller);
}

/// The estimated flops of splitting an [m, n] weight (the partition's cost model; io/shard.hpp).
inline double split_flops(double m, double n, Index rank, const InitCheckpointOptions& options) {
    const PissaConfig& c = options.pissa;
    const double r = static_cast<double>(rank), k = std::min(m, n);
    const double once =
        c.init == InitMethod::olora ? 2 * m * r * r + 4 * m * n * r
        : c.method == SvdMethod::exact || c.components == Components::minor
            ? 8 * m * n * k
            : (2.0 * c.randomized.niter + 2) * 2 * m * n * (r + c.randomized.oversampling) + 2 * m * n * r;
    return options.quantize ? (options.quantize->iterations + 1) * once + 40 * m * n : once;
}

/// Size and modification time of each input file: a resumed job refuses an input that changed.
inline nlohmann::ordered_json input_identity(const Checkpoint& checkpoint) {
    nlohmann::ordered_json files = nlohmann::ordered_json::array();
    auto add = [&](const std::filesystem::path& p) {
        struct stat st {};
        if (::stat(p.c_str(), &st) != 0) throw io_error(p.string() + ": cannot stat: " + errno_text());
        files.push_back({{"file", p.filename().string()},
                         {"size", static_cast<std::uint64_t>(st.st_size)},
                         {"mtime_ns", static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec}});
    };
    for (const auto& shard : checkpoint.shards()) add(shard->path());
    if (checkpoint.is_sharded()) add(checkpoint.root() / index_file_name);
    return files;
}

/// Everything a process of a job derives from the checkpoint and options, identical in all of them.
struct InitJob {
    std::filesystem::path model;  ///< absolute
    std::unique_ptr<Checkpoint> checkpoint;
    RewriteLayout layout;
    std::map<std::size_t, std::size_t> target_number;  ///< item -> target index (checkpoint order)
    std::vector<std::size_t> bounds;                   ///< the partition (io/shard.hpp)
    nlohmann::ordered_json plan;
    std::string digest;
};

/// The piece file of target number `i`: its A and B (peft's keys) and its report.
inline std::filesystem::path piece_path(const WorkFolder& work, std::size_t i) {
    char name[32];
    std::snprintf(name, sizeof name, "%08zu.safetensors", i);
    return work.pieces() / name;
}

/// The modules' reports of pieces [from, to) of a job, read back from their files.
inline std::vector<ModuleReport> read_piece_reports(const WorkFolder& work, std::size_t from, std::size_t to) {
    std::vector<ModuleReport> out;
    for (std::size_t i = from; i < to; ++i) {
        const auto path = piece_path(work, i);
        const SafetensorsFile piece(path);
        const auto it = piece.metadata().find("report");
        if (it == piece.metadata().end()) throw format_error(path.string() + ": no report in its metadata");
        const auto j = nlohmann::json::parse(it->second, nullptr, false);
        if (j.is_discarded()) throw format_error(path.string() + ": its report is not JSON");
        try {
            out.push_back(module_report_from_json(j));
        } catch (const nlohmann::json::exception& e) {
            throw format_error(path.string() + ": its report is malformed: " + e.what());
        }
    }
    return out;
}

/// Writes the adapter folder from the pieces, one module at a time (memory: one module).
inline void write_adapter_from_pieces(const WorkFolder& work, std::size_t count, const std::filesystem::path& dir,
                                      const nlohmann::ordered_json& config,
                                      const std::map<std::string, std::string>& metadata) {
    std::filesystem::create_directories(dir);
    std::vector<TensorSpec> specs;  // the header first: one pass over the pieces' headers
    for (std::size_t i = 0; i < count; ++i) {
        const SafetensorsFile piece(piece_path(work, i));
        for (const auto& t : piece.tensors()) specs.push_back({t.name, t.dtype, t.shape});
    }
    SafetensorsWriter writer(dir / adapter_weights_name, specs, metadata);
    std::vector<unsigned char> buffer;
    for (std::size_t i = 0; i < count; ++i) {
        const SafetensorsFile piece(piece_path(work, i));
        for (const auto& t : piece.tensors()) {
            buffer.resize(static_cast<std::size_t>(t.nbytes()));
            piece.read(t, 0, buffer.data(), buffer.size());
            writer.write(buffer.data(), buffer.size());
        }
    }
    writer.commit();
    write_text_file(dir / adapter_config_name, config.dump(2) + "\n");
}

/// True when `out` holds the complete output of a job with `config` and `metadata`.
inline bool output_matches(const std::filesystem::path& out, const std::string& adapter_folder,
                           const AdapterConfig& config, const std::map<std::string, std::string>& metadata) {
    const auto dir = out / adapter_folder;
    if (!is_adapter_folder(dir) || !path_exists(dir / adapter_weights_name)) return false;
    try {
        return to_json(read_adapter_config(dir)) == to_json(config) &&
               SafetensorsFile(dir / adapter_weights_name).metadata() == metadata;
    } catch (const std::exception&) {
        return false;
    }
}

/// Joins the job if every shard has finished (see init_checkpoint); otherwise lists the shards
/// still running in `report.waiting_for`. Only one process joins at a time (join.lock); one that
/// finds the job already joined by another reports it complete.
inline void join_job(const InitJob& job, const WorkFolder& work, const OutputTarget& target,
                     InitCheckpointReport& report, const JoinProgress& progress) {
    const Checkpoint& checkpoint = *job.checkpoint;
    const std::uint64_t count = job.bounds.size() - 1;
    std::unique_ptr<FileLock> lock;
    try {
        lock = std::make_unique<FileLock>(work.join_lock(), true, "the join of " + report.out.string());
    } catch (const io_error&) {
        if (work.exists()) throw;
    }
    if (!lock || !path_exists(work.plan_file())) {  // another shard joined meanwhile
        report.complete = path_exists(report.out);
        return;
    }
    std::vector<std::map<std::string, std::uint64_t>> done_parts(count);
    std::vector<std::vector<nlohmann::json>> records(count);
    for (std::uint64_t s = 0; s < count; ++s) {
        records[s] = read_journal(work.journal(s, count));
        const bool done = records[s].size() >= 2 && records[s][0] == nlohmann::json{{"plan", job.digest}} &&
                          records[s].back().contains("done");
        if (!done) {
            report.waiting_for.push_back(s);
            continue;
        }
        for (const auto& [name, size] : records[s].back()["parts"].items())
            done_parts[s][name] = size.get<std::uint64_t>();
    }
    if (!report.waiting_for.empty()) return;
    if (count > 1 || report.modules.empty()) report.modules = read_piece_reports(work, 0, job.target_number.size());
    std::filesystem::create_directories(work.out());
    join_parts(job.layout, job.bounds, done_parts, records, work.parts(), work.out(), progress);
    // Everything else in out/ is written anew: a join killed while writing it may have left
    // temporary files there, which would otherwise end up in the output.
    std::set<std::string> joined;
    for (const auto& file : job.layout.files) joined.insert(file.name);
    for (const auto& entry : std::filesystem::directory_iterator(work.out()))
        if (!joined.count(entry.path().filename().string())) std::filesystem::remove_all(entry.path());
    write_checkpoint_companions(checkpoint, work.out());
    write_adapter_from_pieces(work, job.target_number.size(), work.out() / report.adapter.filename(),
                              job.plan.at("adapter_config"),
                              job.plan.at("adapter_metadata").get<std::map<std::string, std::string>>());
    if (progress) progress(job.layout.files.size(), job.layout.files.size(), "");
    report.warning = target.commit(work.out());
    work.remove();  // still holding the lock: a shard waiting for it must find the plan gone, not join again
    lock.reset();
    report.complete = true;
    if (const std::string note = checkpoint.not_copied_note(); !note.empty())
        report.warning += (report.warning.empty() ? "" : "; ") + note;
}

}  // namespace detail

/// Runs this process's shard of the job on the checkpoint at `model` (a .safetensors file, a model
/// folder or a sharded folder) and, when it is the whole job or the last shard to finish, joins the
/// output at `out` (see the file comment). With `options.shard` = {0, 1} and no `resume`, the run is
/// all or nothing: a failure leaves nothing behind.
/// \throws pissa::invalid_argument for bad options, a refused output (io/output_folder.hpp), no
///         target, an embedding target, a non-finite weight or split (naming the module and file), a
///         work folder of another job or a resume with other options; pissa::io::format_error for a
///         malformed input; io_error when reading or writing fails; whatever a callback throws.
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
    pissa::detail::require(options.shard.count >= 1 && options.shard.index < options.shard.count,
                           "init_checkpoint: shard ", options.shard.index, " of ", options.shard.count,
                           " does not exist (shards are 0 .. count-1)");
    std::optional<QuantInitConfig> quantize = options.quantize;
    if (quantize) {
        quantize->pissa = options.pissa;
        require_valid(*quantize);
    }
    const bool all_or_nothing = options.shard.count == 1 && !options.resume;
    detail::InitJob job;
    job.model = detail::resolved_path(model);
    job.checkpoint = std::make_unique<Checkpoint>(model);
    const Checkpoint& checkpoint = *job.checkpoint;
    for (const auto& file : checkpoint.other_files())  // copied into the output beside the adapter folder
        pissa::detail::require(file.filename() != options.adapter_folder, "init_checkpoint: ", file.string(),
                               " has the adapter folder's name '", options.adapter_folder,
                               "' and would be copied where the adapter goes; move it out of the model folder");
    AdapterConfig config = adapter_config_for(options, model);
    static_cast<ModuleSelection&>(config) = resolve_selection(checkpoint, config, config.task_type);
    const ModuleMatcher matcher(config);
    const auto metadata = adapter_metadata_for(options);
    const auto targets = select_targets(checkpoint, config);
    refuse_embedding_targets(targets);
    const std::set<std::string> target_set(targets.begin(), targets.end());

    InitCheckpointReport report;
    report.shard = options.shard;
    report.model = job.model;
    report.config = config;
    report.metadata = metadata;
    report.out = detail::resolved_path(out);
    report.adapter = report.out / options.adapter_folder;
    const WorkFolder work(report.out);
    report.work = work.path();
    // The plan: what every process of the job derives identically.
    job.layout = rewrite_layout(checkpoint);
    std::vector<std::uint64_t> costs;
    std::uint64_t largest_target = 0;  // bytes: the size of the tensor buffers (run_segment)
    nlohmann::ordered_json target_items = nlohmann::ordered_json::array();
    for (std::size_t i = 0; i < job.layout.items.size(); ++i) {
        const auto& item = job.layout.items[i];
        const TensorInfo& t = checkpoint.shards()[item.file]->tensors()[item.tensor];
        double flops = 0;
        if (target_set.count(t.name)) {
            const std::string module = module_of_weight(t.name);
            const PissaConfig split = detail::module_config(options.pissa, matcher, module);
            detail::require_valid_module(module, t, split);
            job.target_number.emplace(i, job.target_number.size());
            target_items.push_back(i);
            largest_target = std::max(largest_target, t.nbytes());
            flops = detail::split_flops(static_cast<double>(t.shape[0]), static_cast<double>(t.shape[1]), split.rank,
                                        options);
        }
        costs.push_back(item_cost(item.nbytes, flops));
    }
    job.bounds = partition_work(costs, options.shard.count);
    job.plan = {{"job", "pissa init"},
                {"model", job.model.string()},
                {"out", report.out.string()},
                {"force", options.force},
                {"adapter_folder", options.adapter_folder},
                {"inputs", detail::input_identity(checkpoint)},
                {"adapter_config", to_json(config)},
                {"adapter_metadata", metadata},
                {"oversampling", options.pissa.randomized.oversampling},
                {"exact_svd",
                 {{"algorithm", static_cast<int>(options.pissa.exact.algorithm)},
                  {"tolerance", options.pissa.exact.tolerance},
                  {"max_iterations", options.pissa.exact.max_iterations}}},
                {"targets", target_items},
                {"shards", options.shard.count},
                {"bounds", job.bounds}};
    job.digest = plan_digest(job.plan);

    if (options.resume && detail::output_matches(report.out, options.adapter_folder, config, metadata)) {
        // Done already. A work folder of this job left beside it (killed between the final rename
        // and the end of the clean-up, which removes the plan first) goes now.
        if (work.exists() && !work.in_use()) {
            bool ours = !detail::path_exists(work.plan_file());
            try {
                ours = ours || plan_digest(work.read_plan()) == job.digest;
            } catch (const format_error&) {  // a damaged plan: not provably ours, left alone
            }
            if (ours) work.remove();
        }
        report.complete = report.already_complete = true;
        report.seconds = seconds_since(start);
        return report;
    }
    if (options.resume && !work.exists() && detail::path_exists(report.out))
        throw pissa::invalid_argument(report.out.string() +
                                      " is a complete output of other options (or not an output of pissa init); "
                                      "--resume does not change it");

    // The output is checked before any work (refused outputs exit before the first byte).
    const OutputTarget target(out, options.force, {model});
    // A plain run starts over from a work folder a killed run left, never from a live one. (Each
    // shard's own journal lock keeps two processes off the same shard.)
    if (all_or_nothing && work.exists()) {
        if (work.in_use())
            throw pissa::invalid_argument(work.path().string() + " is in use by another run writing " +
                                          report.out.string() + "; wait for it to finish");
        work.remove();
    }
    struct Cleanup {  // all-or-nothing: a failed plain run leaves nothing
        const WorkFolder& work;
        const OutputTarget& target;
        bool active;
        ~Cleanup() {
            if (!active) return;
            std::error_code ec;
            std::filesystem::remove_all(work.path(), ec);
            target.remove_created_parents();
        }
    } cleanup{work, target, all_or_nothing};
    work.agree_on_plan(job.plan, options.resume ? "--resume continues a job only with the options it was started with"
                                                : "remove it, or run with the options it was started with");
    Journal journal(work.journal(options.shard.index, options.shard.count),
                    "shard " + std::to_string(options.shard.index) + "/" + std::to_string(options.shard.count) +
                        " of " + report.out.string());

    // This shard's segment.
    const std::size_t first = job.bounds[options.shard.index], last = job.bounds[options.shard.index + 1];
    auto targets_before = [&](std::size_t item) {  // how many targets precede tensor `item`
        const auto it = job.target_number.lower_bound(item);
        return it == job.target_number.end() ? job.target_number.size() : it->second;
    };
    detail::SplitWorkspace workspace;
    const ItemRewrite rewrite = [&](std::size_t item, const SafetensorsFile& file, const TensorInfo& t,
                                    std::vector<unsigned char>& bytes, std::string& note) {
        const auto number = job.target_number.find(item);
        if (number == job.target_number.end()) return false;
        const auto t0 = std::chrono::steady_clock::now();
        ModuleReport row;
        row.name = module_of_weight(t.name);
        row.shape = t.shape;
        PissaConfig split = detail::module_config(options.pissa, matcher, row.name);
        row.rank = split.rank;
        row.seed = module_seed(options.seed, number->second);
        split.randomized.seed = row.seed;
        const LoraModule module = detail::split_module(file, t, bytes, split, quantize, row, workspace);
        row.seconds = seconds_since(t0);
        const auto piece = detail::piece_path(work, number->second);
        write_safetensors(piece,
                          {matrix_tensor(lora_key(module.name, 'A'), module.A, Dtype::F32),
                           matrix_tensor(lora_key(module.name, 'B'), module.B, Dtype::F32)},
                          {{"report", to_json(row).dump()}});
        note = checksum_of_file(piece);
        report.modules.push_back(row);
        if (callbacks.module_done) callbacks.module_done(report.modules.back());
        return true;
    };
    const NoteCheck check_note = [&](std::size_t item, const std::string& note) {
        const auto path = detail::piece_path(work, job.target_number.at(item));
        return detail::path_exists(path) && checksum_of_file(path) == note;
    };
    const auto segment = run_segment(
        checkpoint, job.layout, first, last, work.parts(), journal, nlohmann::json(job.digest), options.resume, rewrite,
        check_note, callbacks.progress ? RewriteProgress(callbacks.progress) : RewriteProgress(), work.out(),
        largest_target, [&](std::size_t item) { return job.target_number.count(item) == 0; });
    report.resumed_items = segment.resumed_items;
    auto resumed =
        detail::read_piece_reports(work, targets_before(first), targets_before(first + segment.resumed_items));
    report.modules.insert(report.modules.begin(), resumed.begin(), resumed.end());

    // Join when every shard is done (the last shard to finish does it).
    detail::join_job(job, work, target, report, callbacks.joining);
    cleanup.active = false;
    report.seconds = seconds_since(start);
    return report;
}

/// Joins a sharded job whose shards have all finished (what the last shard to finish does itself):
/// `out` is the job's output folder; the job's plan, in its work folder, says the rest.
/// \throws pissa::invalid_argument when there is no job for `out` or shards have not finished
///         (naming them); format_error when a part is missing or damaged, or the input changed
///         since the shards ran; io_error when writing fails.
inline InitCheckpointReport join_init_checkpoint(const std::filesystem::path& out, const JoinProgress& progress = {}) {
    const auto start = std::chrono::steady_clock::now();
    InitCheckpointReport report;
    report.out = detail::resolved_path(out);
    const WorkFolder work(report.out);
    report.work = work.path();
    if (!work.exists() || !detail::path_exists(work.plan_file()))
        throw pissa::invalid_argument(report.out.string() + ": no job to join (" + work.path().string() +
                                      " does not exist" +
                                      (detail::path_exists(report.out) ? "; the output is already in place)" : ")"));
    const auto plan = work.read_plan();
    detail::InitJob job;
    std::string adapter_folder;
    bool force = false;
    try {
        job.model = plan.at("model").get<std::string>();
        adapter_folder = plan.at("adapter_folder").get<std::string>();
        force = plan.at("force").get<bool>();
        job.bounds = plan.at("bounds").get<std::vector<std::size_t>>();
        const auto targets = plan.at("targets").get<std::vector<std::size_t>>();
        for (const auto i : targets) job.target_number.emplace(i, job.target_number.size());
        pissa::detail::require(
            job.bounds.size() >= 2 && plan.at("shards").get<std::uint64_t>() + 1 == job.bounds.size(), "bad partition");
    } catch (const std::exception& e) {
        throw format_error(work.plan_file().string() + ": not a plan of pissa init: " + e.what());
    }
    pissa::detail::require(detail::plain_file_name(adapter_folder), work.plan_file().string(),
                           ": bad adapter folder name");
    job.checkpoint = std::make_unique<Checkpoint>(job.model);
    if (detail::input_identity(*job.checkpoint) != plan.at("inputs"))
        throw format_error(job.model.string() + " changed since the shards ran (size or modification time)");
    job.layout = rewrite_layout(*job.checkpoint);
    pissa::detail::require(job.bounds.back() == job.layout.items.size(), work.plan_file().string(),
                           ": the partition does not cover ", job.model.string());
    job.plan = plan;
    job.digest = plan_digest(plan);
    report.shard = {0, job.bounds.size() - 1, "join"};
    report.model = job.model;
    report.adapter = report.out / adapter_folder;
    report.config = parse_adapter_config(plan.at("adapter_config").dump(), work.plan_file().string());
    report.metadata = plan.at("adapter_metadata").get<std::map<std::string, std::string>>();
    const OutputTarget target(report.out, force, {job.model});
    detail::join_job(job, work, target, report, progress);
    if (!report.complete) {
        std::string missing;
        for (auto s : report.waiting_for) missing += (missing.empty() ? "" : ", ") + std::to_string(s);
        throw pissa::invalid_argument(report.out.string() + ": shards " + missing + " of " +
                                      std::to_string(job.bounds.size() - 1) +
                                      " have not finished; run them (with "
                                      "--resume to keep what they did) and join again");
    }
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return report;
}

}  // namespace pissa::io

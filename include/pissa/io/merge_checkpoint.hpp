/// \file io/merge_checkpoint.hpp
/// \brief Merging a peft LoRA adapter into a checkpoint: every adapted weight becomes `W + s B A`
/// (computed in float32, written in the weight's dtype and layout, `[in, out]` with
/// fan_in_fan_out), every other tensor byte-identical — peft's `merge_and_unload()` saved to disk.
/// Give the residual model for a PiSSA adapter, the original model for a plain or converted LoRA.
///
/// Like peft, a module of the adapter file that the adapter's `target_modules` does not select is
/// not applied (peft never creates a LoRA layer for it, and ignores its keys when loading); it is
/// reported in `skipped`.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/output_folder.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/lora.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace pissa::io {

/// One merged module.
struct MergedModule {
    std::string name;
    std::vector<std::uint64_t> shape;
    double scaling = 0;  ///< s of this module (rank_pattern / alpha_pattern / rsLoRA applied)
    double seconds = 0;
};

/// What merge_checkpoint wrote.
struct MergeCheckpointReport {
    std::filesystem::path out;          ///< absolute
    std::vector<MergedModule> modules;  ///< in checkpoint order
    std::vector<std::string> skipped;   ///< adapter modules that target_modules does not select
    double seconds = 0;
    std::string warning;  ///< see OutputFolder::warning
};

/// Before each tensor of the checkpoint: its index, the count, the tensor. May throw to abort.
using MergeProgress = std::function<void(std::size_t index, std::size_t count, const TensorInfo& tensor)>;

/// Checks every applied module of `adapter` against `model` (the weight exists, is a 2-D float
/// tensor of the right shape, A, B and s are finite) and returns them by weight name.
/// \throws pissa::invalid_argument naming the module and the model.
inline std::map<std::string, const LoraModule*> merge_plan(const Checkpoint& model, const Adapter& adapter,
                                                           std::vector<std::string>* skipped = nullptr) {
    const auto& config = adapter.config;
    const ModuleMatcher matcher(config);
    std::map<std::string, const LoraModule*> by_weight;
    const std::string where = model.root().string();
    for (const auto& m : adapter.modules) {
        if (!matcher.targets(m.name)) {
            if (skipped) skipped->push_back(m.name);
            continue;
        }
        const std::string weight = m.name + ".weight";
        const TensorInfo* t = model.find(weight);
        if (!t)
            throw pissa::invalid_argument(where + ": the adapter adapts '" + m.name +
                                          "' but the model has no tensor '" + weight + "'");
        if (!is_float_matrix(*t)) throw pissa::invalid_argument(where + ": '" + weight + "' is not a 2-D float weight");
        const auto out_dim = static_cast<Index>(config.fan_in_fan_out ? t->shape[1] : t->shape[0]);
        const auto in_dim = static_cast<Index>(config.fan_in_fan_out ? t->shape[0] : t->shape[1]);
        if (m.A.cols() != in_dim || m.B.rows() != out_dim)
            throw pissa::invalid_argument(where + ": '" + weight + "' [" + std::to_string(t->shape[0]) + ", " +
                                          std::to_string(t->shape[1]) + "] does not fit A [" +
                                          std::to_string(m.A.rows()) + ", " + std::to_string(m.A.cols()) + "] and B [" +
                                          std::to_string(m.B.rows()) + ", " + std::to_string(m.B.cols()) + "]" +
                                          (config.fan_in_fan_out ? " (fan_in_fan_out: stored [in, out])" : ""));
        const double s = matcher.scaling_for(m.name);
        if (!std::isfinite(s) || !m.A.allFinite() || !m.B.allFinite())
            throw pissa::invalid_argument(
                where + ": module '" + m.name +
                "': " + (std::isfinite(s) ? "A or B holds non-finite values" : "the scaling alpha / r is not finite"));
        by_weight[weight] = &m;
    }
    return by_weight;
}

/// Writes `out`: `model` with the adapter folder `adapter_dir` merged in (see the file comment).
/// \throws pissa::invalid_argument for a module that does not fit the model, non-finite factors or
///         a non-finite merged weight (naming the module), a refused output (io/output_folder.hpp);
///         format_error for malformed files; io_error when reading or writing fails; whatever
///         `progress` throws. Nothing is left at `out` unless the merge succeeds.
inline MergeCheckpointReport merge_checkpoint(const std::filesystem::path& model,
                                              const std::filesystem::path& adapter_dir,
                                              const std::filesystem::path& out, bool force,
                                              const MergeProgress& progress = {}) {
    const auto start = std::chrono::steady_clock::now();
    auto seconds_since = [](std::chrono::steady_clock::time_point t) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    };
    const Checkpoint checkpoint(model);
    const Adapter adapter = read_adapter(adapter_dir);
    MergeCheckpointReport report;
    const auto by_weight = merge_plan(checkpoint, adapter, &report.skipped);
    const auto& config = adapter.config;

    OutputFolder folder(out, force, {model, adapter_dir});
    rewrite_checkpoint(
        checkpoint, folder.path(),
        [&](const SafetensorsFile& file, const TensorInfo& t, std::vector<unsigned char>& bytes) {
            const auto it = by_weight.find(t.name);
            if (it == by_weight.end()) return false;
            const auto t0 = std::chrono::steady_clock::now();
            const LoraModule& m = *it->second;
            const double s = config.scaling_for(m.name);
            // Merged in place in its stored dtype inside the output buffer.
            visit_float_dtype(t.dtype, t.name, [&](auto tag) {
                using Storage = decltype(tag);
                auto W = copy_matrix_into<Storage>(file, t, bytes);
                if (config.fan_in_fan_out) {
                    auto Wt = W.transpose();
                    lora_merge(Wt, m.A, m.B, s);
                } else {
                    lora_merge(W, m.A, m.B, s);
                }
                for (Index i = 0; i < W.rows(); ++i)
                    for (Index j = 0; j < W.cols(); ++j)
                        if (!(Eigen::numext::isfinite)(W(i, j)))
                            throw pissa::invalid_argument(file.path().string() + ": module '" + m.name +
                                                          "': the merged weight W + s B A is not finite (at row " +
                                                          std::to_string(i) + ", column " + std::to_string(j) +
                                                          "): the scaling or the factors are too large");
            });
            report.modules.push_back({m.name, t.shape, s, seconds_since(t0)});
            return true;
        },
        progress ? RewriteProgress(progress) : RewriteProgress());
    folder.commit();
    report.out = folder.final_path();
    report.warning = folder.warning();
    if (const std::string note = checkpoint.not_copied_note(); !note.empty())
        report.warning += (report.warning.empty() ? "" : "; ") + note;
    report.seconds = seconds_since(start);
    return report;
}

}  // namespace pissa::io

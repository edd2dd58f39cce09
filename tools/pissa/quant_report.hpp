/// \file quant_report.hpp
/// \brief What `pissa init --quantize nf4` and `pissa quant-error` share: the quantisation options
/// and the per-module / per-kind error report.
#pragma once

#include "tool.hpp"

#include <pissa/qpissa.hpp>
#include <pissa/quant_error.hpp>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace pissa_tool {

/// Declares --quant-iters and --quant-block on a command.
void add_quant_options(Args& args);

/// QuantInitConfig from --quant-iters / --quant-block around an already parsed PissaConfig.
/// \throws UsageError for values out of range.
pissa::QuantInitConfig quant_config_from_args(const Args& args, const pissa::PissaConfig& pissa);

/// The three methods' errors on one weight, in one norm.
struct ModuleQuantErrors {
    std::string module;  ///< e.g. model.layers.0.self_attn.q_proj
    std::vector<std::uint64_t> shape;
    double qlora = 0, loftq = 0, qpissa = 0;
    double seconds = 0;
};

/// The kind of a module: its path after the layer index ("model.layers.3.self_attn.q_proj" ->
/// "self_attn.q_proj"); the whole path when it has no numeric component.
std::string module_kind(const std::string& module);

/// Errors averaged over the modules of one kind (and over all kinds: kind "all").
struct KindAverage {
    std::string kind;
    int count = 0;
    double qlora = 0, loftq = 0, qpissa = 0;           ///< mean errors
    double loftq_reduction = 0, qpissa_reduction = 0;  ///< mean of the per-module 1 - err / err_QLoRA
};

/// Per kind in order of first appearance, then "all": the mean over the kinds (each kind weighs
/// the same, as the paper's average over q, k, v, o, gate, up, down).
std::vector<KindAverage> average_by_kind(const std::vector<ModuleQuantErrors>& modules);

/// Prints the per-module table and the per-kind averages (stdout).
void print_quant_report(const std::vector<ModuleQuantErrors>& modules, const std::string& norm_name);

/// Adds the arrays `modules` (module, shape, qlora, loftq, qpissa, reductions, seconds) and `kinds`
/// (the per-kind averages) to the JSON object `out`.
void add_quant_report(nlohmann::ordered_json& out, const std::vector<ModuleQuantErrors>& modules);

}  // namespace pissa_tool

/// \file quant_report.hpp
/// \brief What `pissa init --quantize nf4` and `pissa quant-error` share: the quantisation options,
/// running QLoRA, LoftQ and QPiSSA on one weight, and the per-module / per-kind error report.
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

/// Runs QLoRA, LoftQ and QPiSSA with `config` on W (stored layout), measures each error
/// `||W - deq(Q) - s B A||` in `norm` into `errors`, and returns the QPiSSA initialisation
/// (the NF4 base and the adapter that `pissa init --quantize` writes).
template <class Derived>
pissa::QuantizedInit<pissa::compute_scalar_t<typename Derived::Scalar>> run_quant_methods(
    const Eigen::MatrixBase<Derived>& W, const pissa::QuantInitConfig& config, pissa::QuantErrorNorm norm,
    ModuleQuantErrors& errors) {
    auto qlora = pissa::qlora_init(W, config.nf4);
    qlora.fan_in_fan_out = config.pissa.fan_in_fan_out;
    errors.qlora = pissa::quantization_error(W, qlora, norm);
    errors.loftq = pissa::quantization_error(W, pissa::loftq_init(W, config), norm);
    auto qpissa = pissa::qpissa_init(W, config);
    errors.qpissa = pissa::quantization_error(W, qpissa, norm);
    return qpissa;
}

/// The kind of a module: its path after the layer index ("model.layers.3.self_attn.q_proj" ->
/// "self_attn.q_proj"); the whole path when it has no numeric component.
std::string module_kind(const std::string& module);

/// Errors averaged over the modules of one kind (and over all kinds: kind "all").
struct KindAverage {
    std::string kind;
    int count = 0;
    double qlora = 0, loftq = 0, qpissa = 0;     ///< mean errors
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

// Bindings of the whole-checkpoint jobs (pissa::io::init_checkpoint, merge_checkpoint): the same
// library calls as `pissa init` and `pissa merge`. The job runs without the GIL; the callbacks take
// it back, and between tensors a pending KeyboardInterrupt (or any exception a callback raises)
// aborts the job, which then leaves nothing at the output.
#include "core.hpp"

#include <pissa/io/init_checkpoint.hpp>
#include <pissa/io/merge_checkpoint.hpp>

#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>

namespace pissa_python {
namespace {

nb::dict quality_dict(const pissa::QualityReport& q) {
    nb::dict d;
    d["singular_values"] = q.singular_values;
    d["weight_norm"] = q.weight_norm;
    d["residual_norm"] = q.residual_norm;
    d["adapter_energy_fraction"] = q.adapter_energy_fraction;
    return d;
}

nb::dict module_dict(const pissa::io::ModuleReport& m) {
    nb::dict d;
    d["name"] = m.name;
    d["shape"] = m.shape;
    d["rank"] = m.rank;
    d["seed"] = m.seed;
    d["quality"] = quality_dict(m.quality);
    if (m.quant) {
        nb::dict q;
        q["qlora"] = m.quant->qlora_frobenius;
        q["loftq"] = m.quant->loftq_frobenius;
        q["qpissa"] = m.quant->qpissa_frobenius;
        d["quant_error"] = q;
    } else {
        d["quant_error"] = nb::none();
    }
    d["seconds"] = m.seconds;
    return d;
}

/// Takes the GIL, raises a pending signal's exception (KeyboardInterrupt) and calls `callback`
/// when it is not None; a Python exception leaves as nb::python_error and aborts the job.
template <class... Args>
void call_back(const nb::object& callback, Args&&... args) {
    nb::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw nb::python_error();
    if (!callback.is_none()) callback(std::forward<Args>(args)...);
}

nb::dict init_report_dict(const pissa::io::InitCheckpointReport& report) {
    nb::dict d;
    d["out"] = report.out.string();
    d["adapter"] = report.adapter.string();
    nb::list modules;
    for (const auto& m : report.modules) modules.append(module_dict(m));
    d["modules"] = modules;
    d["seconds"] = report.seconds;
    d["warning"] = report.warning;
    d["complete"] = report.complete;
    d["already_complete"] = report.already_complete;
    d["resumed_tensors"] = report.resumed_items;
    nb::list waiting;
    for (auto s : report.waiting_for) waiting.append(s);
    d["waiting_for"] = waiting;
    return d;
}

nb::dict init_checkpoint(const std::string& model, const std::string& out, Eigen::Index rank, double lora_alpha,
                         bool use_rslora, const std::string& method, const std::string& init,
                         const std::string& components, int niter, std::uint64_t seed,
                         const std::vector<std::string>& target_modules, const std::string& target_regex,
                         const std::vector<std::string>& exclude_modules, const std::string& exclude_regex,
                         const std::vector<std::int64_t>& layers_to_transform,
                         const std::vector<std::string>& layers_pattern,
                         const std::vector<std::pair<std::string, Eigen::Index>>& rank_pattern,
                         const std::vector<std::pair<std::string, double>>& alpha_pattern, bool fan_in_fan_out,
                         bool quantize, int quant_iterations, Eigen::Index quant_block_size,
                         const std::string& task_type, bool force, const std::string& adapter_folder,
                         const std::string& shard, bool resume, const std::string& products, nb::object progress,
                         nb::object module_done) {
    pissa::io::InitCheckpointOptions options;
    options.pissa.rank = rank;
    options.pissa.lora_alpha = lora_alpha;
    options.pissa.use_rslora = use_rslora;
    if (method != "exact" && method != "randomized")
        throw pissa::invalid_argument("method must be 'exact' or 'randomized', got '" + method + "'");
    options.pissa.method = method == "exact" ? pissa::SvdMethod::exact : pissa::SvdMethod::randomized;
    if (init != "pissa" && init != "olora")
        throw pissa::invalid_argument("init must be 'pissa' or 'olora', got '" + init + "'");
    if (components != "principal" && components != "minor")
        throw pissa::invalid_argument("components must be 'principal' or 'minor', got '" + components + "'");
    options.pissa.init = init == "olora" ? pissa::InitMethod::olora : pissa::InitMethod::pissa;
    options.pissa.components = components == "minor" ? pissa::Components::minor : pissa::Components::principal;
    options.pissa.randomized.niter = niter;
    options.pissa.randomized.products = pissa::parse_product_precision(products);
    options.pissa.fan_in_fan_out = fan_in_fan_out;
    options.seed = seed;
    options.target_modules = target_modules;
    options.target_regex = target_regex;
    options.exclude_modules = exclude_modules;
    options.exclude_regex = exclude_regex;
    options.layers_to_transform = layers_to_transform;
    options.layers_pattern = layers_pattern;
    options.rank_pattern = rank_pattern;
    options.alpha_pattern = alpha_pattern;
    if (quantize) {
        pissa::QuantInitConfig q;
        q.iterations = quant_iterations;
        q.nf4.block_size = quant_block_size;
        options.quantize = q;
    }
    options.task_type = task_type;
    options.force = force;
    options.adapter_folder = adapter_folder;
    if (!shard.empty()) options.shard = pissa::io::parse_shard(shard);
    options.resume = resume;

    pissa::io::InitCheckpointCallbacks callbacks;
    callbacks.progress = [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) {
        call_back(progress, i, n, t.name);
    };
    callbacks.module_done = [&](const pissa::io::ModuleReport& m) {
        nb::gil_scoped_acquire gil;
        if (!module_done.is_none()) module_done(module_dict(m));
    };
    pissa::io::InitCheckpointReport report;
    {
        nb::gil_scoped_release release;
        report = pissa::io::init_checkpoint(model, out, options, callbacks);
    }
    return init_report_dict(report);
}

nb::dict join_checkpoint(const std::string& out) {
    pissa::io::InitCheckpointReport report;
    {
        nb::gil_scoped_release release;
        report = pissa::io::join_init_checkpoint(out);
    }
    return init_report_dict(report);
}

nb::dict merge_checkpoint(const std::string& model, const std::string& adapter, const std::string& out, bool force,
                          nb::object progress) {
    pissa::io::MergeCheckpointReport report;
    {
        nb::gil_scoped_release release;
        report = pissa::io::merge_checkpoint(
            model, adapter, out, force,
            [&](std::size_t i, std::size_t n, const pissa::io::TensorInfo& t) { call_back(progress, i, n, t.name); });
    }
    nb::dict d;
    d["out"] = report.out.string();
    nb::list modules;
    for (const auto& m : report.modules) {
        nb::dict e;
        e["name"] = m.name;
        e["shape"] = m.shape;
        e["scaling"] = m.scaling;
        e["seconds"] = m.seconds;
        modules.append(e);
    }
    d["modules"] = modules;
    d["skipped"] = report.skipped;
    d["seconds"] = report.seconds;
    d["warning"] = report.warning;
    return d;
}

}  // namespace

void bind_checkpoint(nb::module_& m) {
    using namespace nb::literals;
    m.def("init_checkpoint", &init_checkpoint, "model"_a, "out"_a, "rank"_a, "lora_alpha"_a, "use_rslora"_a, "method"_a,
          "init"_a, "components"_a, "niter"_a, "seed"_a, "target_modules"_a, "target_regex"_a, "exclude_modules"_a,
          "exclude_regex"_a, "layers_to_transform"_a, "layers_pattern"_a, "rank_pattern"_a, "alpha_pattern"_a,
          "fan_in_fan_out"_a, "quantize"_a, "quant_iterations"_a, "quant_block_size"_a, "task_type"_a, "force"_a,
          "adapter_folder"_a, "shard"_a, "resume"_a, "products"_a, "progress"_a.none(), "module_done"_a.none());
    m.def("join_checkpoint", &join_checkpoint, "out"_a);
    m.def("merge_checkpoint", &merge_checkpoint, "model"_a, "adapter"_a, "out"_a, "force"_a, "progress"_a.none());
}

}  // namespace pissa_python

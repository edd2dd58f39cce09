// The quantisation-error report shared by `pissa init --quantize` and `pissa quant-error`.
#include "quant_report.hpp"

#include <cctype>

namespace pissa_tool {

namespace {

/// 1 - error / qlora; 0 for a weight QLoRA already stores exactly (an all-zero matrix).
double reduction(double error, double qlora) { return qlora > 0 ? pissa::error_reduction(error, qlora) : 0.0; }

}  // namespace

void add_quant_options(Args& args) {
    args.option("quant-iters", "T", "alternating iterations T of QPiSSA and LoftQ (the paper reports 1 and 5)", "1")
        .option("quant-block", "B", "NF4 block size (bitsandbytes: 64)", "64");
}

pissa::QuantInitConfig quant_config_from_args(const Args& args, const pissa::PissaConfig& pissa) {
    pissa::QuantInitConfig config;
    config.pissa = pissa;
    config.iterations = static_cast<int>(args.get_int("quant-iters", 1, 1000));
    config.nf4.block_size = static_cast<pissa::Index>(args.get_int("quant-block", 2, 1 << 20));
    if (config.nf4.block_size % 2 != 0)
        throw UsageError("--quant-block must be even (two 4-bit codes per byte), got " + args.get("quant-block"));
    return config;
}

std::string module_kind(const std::string& module) {
    std::size_t start = 0;
    while (start < module.size()) {
        const std::size_t end = std::min(module.find('.', start), module.size());
        const std::string part = module.substr(start, end - start);
        const bool numeric = !part.empty() && std::all_of(part.begin(), part.end(),
                                                          [](unsigned char c) { return std::isdigit(c) != 0; });
        if (numeric && end < module.size()) return module.substr(end + 1);
        start = end + 1;
    }
    return module;
}

std::vector<KindAverage> average_by_kind(const std::vector<ModuleQuantErrors>& modules) {
    std::vector<KindAverage> kinds;
    for (const auto& m : modules) {
        const std::string kind = module_kind(m.module);
        auto it = std::find_if(kinds.begin(), kinds.end(), [&](const KindAverage& k) { return k.kind == kind; });
        if (it == kinds.end()) it = kinds.insert(kinds.end(), KindAverage{kind});
        ++it->count;
        it->qlora += m.qlora;
        it->loftq += m.loftq;
        it->qpissa += m.qpissa;
        it->loftq_reduction += reduction(m.loftq, m.qlora);
        it->qpissa_reduction += reduction(m.qpissa, m.qlora);
    }
    KindAverage all{"all"};
    for (auto& k : kinds) {
        const double n = k.count;
        k.qlora /= n, k.loftq /= n, k.qpissa /= n, k.loftq_reduction /= n, k.qpissa_reduction /= n;
        all.count += k.count;
        all.qlora += k.qlora, all.loftq += k.loftq, all.qpissa += k.qpissa;
        all.loftq_reduction += k.loftq_reduction, all.qpissa_reduction += k.qpissa_reduction;
    }
    if (!kinds.empty()) {
        const double n = static_cast<double>(kinds.size());
        all.qlora /= n, all.loftq /= n, all.qpissa /= n, all.loftq_reduction /= n, all.qpissa_reduction /= n;
        kinds.push_back(all);
    }
    return kinds;
}

void print_quant_report(const std::vector<ModuleQuantErrors>& modules, const std::string& norm_name) {
    auto error_and_reduction = [](double error, double qlora) {
        return format("%.5g (%.1f%%)", error, 100 * reduction(error, qlora));
    };
    std::vector<std::vector<std::string>> rows;
    for (const auto& m : modules)
        rows.push_back({m.module, shape_text(m.shape), format("%.5g", m.qlora), error_and_reduction(m.loftq, m.qlora),
                        error_and_reduction(m.qpissa, m.qlora), format("%.2f s", m.seconds)});
    const std::string unit = " (" + norm_name + ")";
    print_table({"module", "shape", "QLoRA" + unit, "LoftQ (reduction)", "QPiSSA (reduction)", "time"}, rows);

    rows.clear();
    for (const auto& k : average_by_kind(modules))
        rows.push_back({k.kind, std::to_string(k.count), format("%.5g", k.qlora),
                        format("%.5g (%.1f%%)", k.loftq, 100 * k.loftq_reduction),
                        format("%.5g (%.1f%%)", k.qpissa, 100 * k.qpissa_reduction)});
    std::printf(
        "\nmean per module kind (reduction: mean of the per-module 1 - error / QLoRA error; \"all\": mean over "
        "kinds)\n");
    print_table({"kind", "modules", "QLoRA" + unit, "LoftQ (reduction)", "QPiSSA (reduction)"}, rows);
}

void add_quant_report(nlohmann::ordered_json& j, const std::vector<ModuleQuantErrors>& modules) {
    j["modules"] = nlohmann::ordered_json::array();
    for (const auto& m : modules)
        j["modules"].push_back({{"module", m.module},
                                {"shape", m.shape},
                                {"qlora", m.qlora},
                                {"loftq", m.loftq},
                                {"qpissa", m.qpissa},
                                {"loftq_reduction", reduction(m.loftq, m.qlora)},
                                {"qpissa_reduction", reduction(m.qpissa, m.qlora)},
                                {"seconds", m.seconds}});
    j["kinds"] = nlohmann::ordered_json::array();
    for (const auto& k : average_by_kind(modules))
        j["kinds"].push_back({{"kind", k.kind},
                              {"modules", k.count},
                              {"qlora", k.qlora},
                              {"loftq", k.loftq},
                              {"qpissa", k.qpissa},
                              {"loftq_reduction", k.loftq_reduction},
                              {"qpissa_reduction", k.qpissa_reduction}});
}

}  // namespace pissa_tool

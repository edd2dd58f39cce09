/// \file io/targets.hpp
/// \brief Which weights of a checkpoint an adapter covers: peft's module selection applied to the
/// module names a checkpoint shows, `"all-linear"` resolved, long target lists condensed.
///
/// peft selects modules of a live torch model (`named_modules()`); a checkpoint records tensors
/// only. The modules it shows are every dotted prefix of a tensor name (containers included, as
/// named_modules lists them); a weight module is `<module>.weight`, 2-D float. Layer classes are
/// not recorded, so the two places where peft looks at them are followed by convention:
/// - `"all-linear"` (peft `_maybe_include_all_linear_layers`): every Linear / Conv1D layer except the
///   output layer (get_output_embeddings: `lm_head`, ...) and, for SEQ_CLS without one, the
///   classification head `score` or `classifier`. From a checkpoint: every 2-D float weight module
///   that is not an embedding (by its conventional name, is_embedding_name) nor one of those heads.
/// - embeddings as targets: peft gives them plain LoRA (lora_embedding_A/B), not PiSSA; they are
///   refused by name (refuse_embedding_targets).
/// peft then condenses a target list of 20 or more names into the shortest suffixes that match no
/// other module (`_find_minimal_target_modules`); resolve_selection does the same, so that the
/// adapter_config.json written is the one peft writes.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/tensor.hpp>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace pissa::io {

/// peft condenses a list of this many target modules or more (MIN_TARGET_MODULES_FOR_OPTIMIZATION).
inline constexpr std::size_t min_target_modules_to_condense = 20;

/// True for the last name component of an embedding layer by the conventions of transformers'
/// models (`embed_tokens`, `wte`, `word_embeddings`, ...): an nn.Embedding, never a Linear.
inline bool is_embedding_name(const std::string& last) {
    static const std::set<std::string> embeddings = {"embed_tokens",
                                                     "wte",
                                                     "wpe",
                                                     "word_embeddings",
                                                     "position_embeddings",
                                                     "token_type_embeddings",
                                                     "embed_in",
                                                     "embed_positions",
                                                     "shared",
                                                     "relative_attention_bias"};
    return embeddings.count(last) > 0;
}

/// True for a module name that transformers' models use for the output layer (what
/// get_output_embeddings returns): `lm_head`, GPT-NeoX's `embed_out`, BERT's
/// `cls.predictions.decoder`, Whisper's `proj_out`, InternLM's `output`.
inline bool is_output_layer_name(const std::string& module) {
    static const std::set<std::string> names = {"lm_head", "embed_out", "cls.predictions.decoder", "proj_out",
                                                "output"};
    return names.count(module) > 0;
}

/// peft applies PiSSA to Linear (and Conv1D) layers only: an nn.Embedding target keeps LoRA's
/// init and stores lora_embedding_A / lora_embedding_B, so a PiSSA adapter written for it would
/// not load as one and the residual base would silently lack s B A.
/// \throws pissa::invalid_argument naming the first embedding among `targets` (tensor names).
inline void refuse_embedding_targets(const std::vector<std::string>& targets) {
    for (const auto& name : targets) {
        const std::string module = module_of_weight(name);
        const std::string last = module.substr(module.rfind('.') + 1);
        if (is_embedding_name(last))
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

/// The modules a checkpoint shows: "" (the model) and every dotted prefix of every tensor name.
inline std::set<std::string> module_names(const Checkpoint& model) {
    std::set<std::string> out{""};
    for (const auto& shard : model.shards())
        for (const auto& t : shard->tensors())
            for (std::size_t dot = t.name.find('.'); dot != std::string::npos; dot = t.name.find('.', dot + 1))
                out.insert(t.name.substr(0, dot));
    return out;
}

/// The weight modules of a checkpoint (`<module>.weight`, 2-D float), in checkpoint order.
inline std::vector<std::string> weight_modules(const Checkpoint& model) {
    std::vector<std::string> out;
    for (const auto& shard : model.shards())
        for (const auto& t : shard->tensors()) {
            const std::string module = module_of_weight(t.name);
            if (!module.empty() && is_float_matrix(t)) out.push_back(module);
        }
    return out;
}

/// peft's `"all-linear"` on a checkpoint (file comment): the full names of its linear weight
/// modules, in checkpoint order, without the output layer or, for `task_type` SEQ_CLS when there
/// is none, the top-level head `score` (else `classifier`).
inline std::vector<std::string> all_linear_modules(const Checkpoint& model, const std::string& task_type) {
    std::vector<std::string> out;
    const auto modules = weight_modules(model);
    const bool has_output_layer =
        std::any_of(modules.begin(), modules.end(), [](const std::string& m) { return is_output_layer_name(m); });
    std::string head;
    if (!has_output_layer && task_type == "SEQ_CLS")
        for (const char* name : {"score", "classifier"})
            if (head.empty() && std::find(modules.begin(), modules.end(), name) != modules.end()) head = name;
    for (const auto& m : modules) {
        if (is_output_layer_name(m) || m == head || is_embedding_name(m.substr(m.rfind('.') + 1))) continue;
        out.push_back(m);
    }
    return out;
}

/// peft's `_find_minimal_target_modules`: the shortest name suffixes that together match every
/// target and no other module. Targets are visited in the order of their suffix lists (shortest
/// suffix first, compared as Python compares lists of strings); each not yet covered by a chosen
/// suffix gets its shortest suffix that no other module has and that is not chosen yet. Returns
/// the targets themselves when nothing could be chosen.
inline std::vector<std::string> minimal_target_modules(const std::vector<std::string>& targets,
                                                       const std::set<std::string>& others) {
    auto suffixes_of = [](const std::string& name) {  // shortest first: "c", "b.c", "a.b.c"
        std::vector<std::string> out{name};
        for (std::size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1))
            out.push_back(name.substr(dot + 1));
        std::reverse(out.begin(), out.end());
        return out;
    };
    std::set<std::string> other_suffixes;
    for (const auto& o : others)
        for (auto& s : suffixes_of(o)) other_suffixes.insert(std::move(s));
    std::map<std::string, std::vector<std::string>> by_name;
    for (const auto& t : targets) by_name.emplace(t, suffixes_of(t));
    std::vector<std::pair<std::string, std::vector<std::string>>> order(by_name.begin(), by_name.end());
    std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
    std::set<std::string> required;
    for (const auto& [item, suffixes] : order)
        for (const auto& suffix : suffixes) {
            if (required.count(suffix) || other_suffixes.count(suffix)) continue;
            const bool covered = std::any_of(required.begin(), required.end(), [&](const std::string& r) {
                return item.size() > r.size() && item.compare(item.size() - r.size(), r.size(), r) == 0 &&
                       item[item.size() - r.size() - 1] == '.';
            });
            if (!covered) {
                required.insert(suffix);
                break;
            }
        }
    if (required.empty()) {
        std::vector<std::string> all;
        for (const auto& entry : by_name) all.push_back(entry.first);
        return all;
    }
    return std::vector<std::string>(required.begin(), required.end());
}

/// The selection as peft records it after applying it to the checkpoint's model: `"all-linear"`
/// replaced by the full names of all_linear_modules, and a target list of
/// min_target_modules_to_condense names or more condensed by minimal_target_modules when that
/// shortens it (peft's inject_adapter). Other fields unchanged.
inline ModuleSelection resolve_selection(const Checkpoint& model, ModuleSelection selection,
                                         const std::string& task_type) {
    selection.require_valid();  // before "all-linear" becomes a list
    if (selection.all_linear()) {
        selection.target_regex.clear();
        selection.target_modules = all_linear_modules(model, task_type);
        pissa::detail::require(!selection.target_modules.empty(), model.root().string(),
                               ": target_modules all-linear: the model has no linear weight besides its output layer");
    }
    if (!selection.target_regex.empty() || selection.target_modules.size() < min_target_modules_to_condense)
        return selection;
    std::set<std::string> others;
    for (const auto& m : module_names(model))
        if (!detail::suffix_match(selection.target_modules, m)) others.insert(m);
    auto condensed = minimal_target_modules(selection.target_modules, others);
    if (condensed.size() <
        std::set<std::string>(selection.target_modules.begin(), selection.target_modules.end()).size())
        selection.target_modules = std::move(condensed);
    return selection;
}

/// The names of the weights a config targets in a checkpoint: `<module>.weight` tensors that are
/// 2-D float (F32/F16/BF16/F64) and whose module the config targets, in checkpoint order.
/// Linear in the number of tensors (the patterns are compiled once). `"all-linear"` must be
/// resolved first (resolve_selection).
/// \throws pissa::invalid_argument when nothing matches, listing the module names the model has
///         (grouped by their last component, with counts), or for a module name over
///         max_module_name_length when a pattern is used.
inline std::vector<std::string> select_targets(const Checkpoint& model, const AdapterConfig& config) {
    std::vector<std::string> out;
    std::map<std::string, int> available;
    const ModuleMatcher matcher(config);
    for (const auto& module : weight_modules(model)) {
        available[module.substr(module.rfind('.') + 1)]++;
        if (matcher.targets(module)) out.push_back(module + ".weight");
    }
    if (out.empty()) {
        std::string list;
        for (const auto& [name, count] : available)
            list += (list.empty() ? "" : ", ") + name + " (" + std::to_string(count) + ")";
        std::string wanted;
        if (!config.target_regex.empty()) {
            wanted = "regex '" + config.target_regex + "'";
        } else {
            for (const auto& t : config.target_modules) wanted += (wanted.empty() ? "" : ",") + t;
            wanted = "target modules '" + wanted + "'";
        }
        const bool filtered =
            !config.exclude_modules.empty() || !config.exclude_regex.empty() || !config.layers_to_transform.empty();
        throw pissa::invalid_argument(
            model.root().string() + ": " + wanted + (filtered ? " (with exclude_modules / layers_to_transform)" : "") +
            " match no 2-D float weight; the model's weight modules are: " + (list.empty() ? "(none)" : list));
    }
    return out;
}

}  // namespace pissa::io

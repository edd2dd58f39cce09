/// \file io/peft.hpp
/// \brief peft's LoRA adapter folder: `adapter_config.json` + `adapter_model.safetensors`, key
/// naming, target-module selection and per-module rank/alpha, all as peft does them.
///
/// peft's conventions (checked against peft's source, see tests/io/test_peft.cpp):
/// - keys: for a base weight `<module>.weight` the adapter holds
///   `base_model.model.<module>.lora_A.weight` `[r, in]` and `base_model.model.<module>.lora_B.weight`
///   `[out, r]`, float32; the adapter name ("default") does not appear.
/// - target_modules (peft `check_target_module_exists`): a string is a regular expression that must
///   match the whole module name (`re.fullmatch`); a list matches a module whose name equals an
///   entry or ends with `"." + entry`. `"all-linear"` is resolved against a checkpoint first
///   (io/targets.hpp).
/// - exclude_modules: checked first, with the same two forms; an excluded module is never targeted.
/// - layers_to_transform / layers_pattern (list-form target_modules only, as peft requires): a module
///   matched through a suffix (not named in full in the list) must also lie in one of the listed
///   layers; its layer is the first `.<name>.<number>.` of its name, or with layers_pattern the first
///   `<pattern>.<number>.` starting at the name's start or after a dot (detail::layer_index).
/// - rank_pattern / alpha_pattern (peft `get_pattern_key`): the first key `k`, in file order, with
///   `re.match(rf"(.*\.)?({k})$", module)` gives the module's rank / alpha; otherwise `r` / `lora_alpha`.
/// - scaling: alpha / r, or alpha / sqrt(r) with `use_rslora`.
/// Regular expressions use std::regex (ECMAScript), which agrees with Python's `re` on the patterns
/// peft configs use (alternation, classes, `.*`, `\d`, groups); lookbehind and named groups differ,
/// and back-references are refused (libstdc++'s polynomial executor has none).
/// Limits against hostile input: adapter_config.json at most max_adapter_config_size (16 MiB) of
/// JSON nested at most max_json_depth (256) deep; patterns at most max_pattern_length (1024)
/// characters with groups nested at most max_pattern_group_depth (32) deep; module names matched
/// against a pattern at most max_module_name_length (1024) characters (pissa::invalid_argument,
/// or format_error from read_adapter, naming the module and the limit).
#pragma once

#include <pissa/convert.hpp>
#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/lora.hpp>
#include <pissa/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

// GCC 12 reports -Wmaybe-uninitialized false positives inside libstdc++'s <regex> when it is
// instantiated with optimisation and sanitizers (std::function in _StateT); silence it for <regex>.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <regex>

namespace pissa::io {

inline constexpr const char* adapter_config_name = "adapter_config.json";
inline constexpr const char* adapter_weights_name = "adapter_model.safetensors";

/// The largest adapter_config.json read (peft writes about 1 KB; a rank_pattern for every module
/// of a large model is some 100 KB).
inline constexpr std::uint64_t max_adapter_config_size = std::uint64_t{16} << 20;
/// Module names longer than this are refused by regular-expression matching (real ones are under
/// 200 characters). libstdc++'s std::regex recurses once per character in its default executor and
/// overflowed an 8 MiB stack at 16k-32k characters (4k-8k under AddressSanitizer); pissa uses the
/// executor whose recursion is bounded by the pattern instead (libstdc++), and this bound keeps
/// the matching time (name x pattern length) and any other standard library's recursion small.
inline constexpr std::size_t max_module_name_length = 1024;
/// Longest target_modules regex or rank_pattern / alpha_pattern key accepted.
inline constexpr std::size_t max_pattern_length = 1024;
/// Deepest nesting of groups `( ... )` accepted in a pattern: std::regex compiles by recursive
/// descent (it overflowed an 8 MiB stack at 2k-4k nested groups under AddressSanitizer).
inline constexpr std::size_t max_pattern_group_depth = 32;

namespace detail {

/// "the first 60 characters..." of a long name, for messages.
inline std::string shortened(const std::string& s) { return s.size() <= 80 ? s : s.substr(0, 60) + "..."; }

/// Checks a pattern's length and group nesting. \throws pissa::invalid_argument naming `what`.
inline void check_pattern(const std::string& pattern, const std::string& what) {
    pissa::detail::require(pattern.size() <= max_pattern_length, what, " '", shortened(pattern), "' has ",
                           pattern.size(), " characters, over the limit of ", max_pattern_length);
    std::size_t depth = 0, deepest = 0;
    bool in_class = false;
    for (std::size_t i = 0; i < pattern.size(); ++i) {
        const char c = pattern[i];
        if (c == '\\') {
            ++i;  // an escaped character is never a bracket
        } else if (in_class) {
            in_class = c != ']';
        } else if (c == '[') {
            in_class = true;
        } else if (c == '(') {
            deepest = std::max(deepest, ++depth);
        } else if (c == ')' && depth > 0) {
            --depth;
        }
    }
    pissa::detail::require(deepest <= max_pattern_group_depth, what, " '", shortened(pattern), "' nests groups ",
                           deepest, " deep, over the limit of ", max_pattern_group_depth);
}

/// Compiles a pattern (ECMAScript, as peft's re patterns). With libstdc++ the compiled regex uses
/// its polynomial executor: time O(name x pattern) with no backtracking blow-up, and recursion
/// bounded by the pattern, not the name; back-references are then refused (peft patterns have none).
/// \throws pissa::invalid_argument for a pattern over the limits; std::regex_error for a bad one.
inline std::regex compile_pattern(const std::string& pattern, const std::string& what) {
    check_pattern(pattern, what);
#if defined(__GLIBCXX__)
    return std::regex(pattern, std::regex::ECMAScript | std::regex_constants::__polynomial);
#else
    return std::regex(pattern, std::regex::ECMAScript);
#endif
}

/// peft get_pattern_key's regex for a rank_pattern / alpha_pattern key: (.*\.)?(key), full match.
/// The limits apply to the key; the wrapper adds 14 characters and one level of groups.
inline std::regex compile_pattern_key(const std::string& key) {
    check_pattern(key, "rank_pattern / alpha_pattern key");
    const std::string pattern = "(.*\\.)?(" + key + ")";
#if defined(__GLIBCXX__)
    return std::regex(pattern, std::regex::ECMAScript | std::regex_constants::__polynomial);
#else
    return std::regex(pattern, std::regex::ECMAScript);
#endif
}

/// regex_match of a module name, refusing names over max_module_name_length.
/// \throws pissa::invalid_argument naming the module and the limit.
inline bool match_module(const std::regex& re, const std::string& module) {
    pissa::detail::require(module.size() <= max_module_name_length, "module name '", shortened(module), "' has ",
                           module.size(), " characters, over the limit of ", max_module_name_length,
                           " for matching it against target_modules / rank_pattern / alpha_pattern");
    return std::regex_match(module, re);
}

/// peft's list form of target_modules: the name equals an entry or ends with "." + entry.
inline bool suffix_match(const std::vector<std::string>& entries, const std::string& module) {
    for (const auto& t : entries)
        if (module == t || (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
                            module[module.size() - t.size() - 1] == '.'))
            return true;
    return false;
}

/// True when `text[from, to)` is a non-empty run of ASCII digits.
inline bool all_digits(const std::string& text, std::size_t from, std::size_t to) {
    if (from >= to) return false;
    for (std::size_t i = from; i < to; ++i)
        if (text[i] < '0' || text[i] > '9') return false;
    return true;
}

/// Marks a layer number too large for int64: it is in no layers_to_transform list.
inline constexpr std::int64_t unrepresentable_layer = std::numeric_limits<std::int64_t>::min();

/// The layer number peft reads from a module name for layers_to_transform, or nullopt. Without
/// patterns: `re.match(r".*?\.[^.]*\.(\d+)\.", module)`, i.e. the first dot followed by a
/// segment, a dot, an all-digit segment and a dot (the lazy `.*?` takes the first such dot, so a
/// nested index such as an expert's is not taken for the layer's). With patterns (tried in order):
/// `re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module)`: the first start (0, then after each dot)
/// and, from it, the first dot-ended stretch that the pattern matches whole, followed by an all-digit
/// segment and a dot.
inline std::optional<std::int64_t> layer_index(const std::string& module, const std::vector<std::regex>& patterns) {
    std::vector<std::size_t> dots;
    for (std::size_t i = 0; i < module.size(); ++i)
        if (module[i] == '.') dots.push_back(i);
    // The number in the segment after the dot dots[k], when that segment is all digits and is followed by a dot.
    auto number_after = [&](std::size_t k) -> std::optional<std::int64_t> {
        if (k + 1 >= dots.size() || !all_digits(module, dots[k] + 1, dots[k + 1])) return std::nullopt;
        std::int64_t value = 0;
        const char* first = module.data() + dots[k] + 1;
        const auto [end, error] = std::from_chars(first, module.data() + dots[k + 1], value);
        (void)end;
        return error == std::errc() ? value : unrepresentable_layer;
    };
    if (patterns.empty()) {
        for (std::size_t k = 0; k + 1 < dots.size(); ++k)
            if (const auto n = number_after(k + 1)) return n;
        return std::nullopt;
    }
    for (const auto& pattern : patterns) {
        for (std::size_t start = 0, next_dot = 0; start <= module.size();) {
            for (std::size_t k = next_dot; k < dots.size(); ++k)
                if (std::regex_match(module.begin() + static_cast<std::ptrdiff_t>(start),
                                     module.begin() + static_cast<std::ptrdiff_t>(dots[k]), pattern))
                    if (const auto n = number_after(k)) return n;
            if (next_dot >= dots.size()) break;
            start = dots[next_dot++] + 1;
        }
    }
    return std::nullopt;
}

}  // namespace detail

/// peft's module selection: which modules of a model get a LoRA layer, and with which rank and
/// alpha (the rules are in the file comment). AdapterConfig holds it as read from or written to
/// adapter_config.json; io::InitCheckpointOptions holds the one a job applies.
struct ModuleSelection {
    std::vector<std::string> target_modules;  ///< suffix list (used when target_regex is empty)
    /// target_modules given as a string: a full-match regex, or "all-linear" before it is resolved
    /// against a model (io/targets.hpp).
    std::string target_regex;
    std::vector<std::string> exclude_modules;  ///< suffix list of modules never targeted
    std::string exclude_regex;                 ///< exclude_modules given as a string: a full-match regex
    /// Layer numbers a suffix-matched module must lie in (list-form target_modules only); empty: all.
    std::vector<std::int64_t> layers_to_transform;
    /// Regular expressions for the name of the layer list (`layers`, `h`, ...); empty: any name.
    std::vector<std::string> layers_pattern;
    std::vector<std::pair<std::string, Index>> rank_pattern;    ///< in file order
    std::vector<std::pair<std::string, double>> alpha_pattern;  ///< in file order

    /// True for target_modules "all-linear" (any case, as peft compares it).
    bool all_linear() const { return is_all_linear(target_regex); }
    /// True for peft's shorthand "all-linear", in any case.
    static bool is_all_linear(std::string target) {
        std::transform(target.begin(), target.end(), target.begin(),
                       [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        return target == "all-linear";
    }
    /// peft's LoraConfig checks: layers_to_transform and layers_pattern need list-form
    /// target_modules (not a regex, not "all-linear"), and layers_pattern needs layers_to_transform.
    /// \throws pissa::invalid_argument saying which.
    void require_valid() const {
        pissa::detail::require(target_regex.empty() || (layers_to_transform.empty() && layers_pattern.empty()),
                               "layers_to_transform and layers_pattern need target_modules as a list, not the string '",
                               detail::shortened(target_regex), "'",
                               all_linear() ? ", peft's all-linear shorthand" : "", " (peft refuses this too)");
        pissa::detail::require(layers_pattern.empty() || !layers_to_transform.empty(),
                               "layers_pattern needs layers_to_transform (peft refuses it alone too)");
    }
    /// peft get_pattern_key: re.match(rf"(.*\.)?({key})$", module).
    static bool pattern_matches(const std::string& key, const std::string& module) {
        return detail::match_module(detail::compile_pattern_key(key), module);
    }
};

/// The fields of peft's LoraConfig that pissa reads and writes (names as in adapter_config.json).
/// Unknown fields are ignored on read and kept in `extra` so that a rewrite preserves them.
/// The matching methods compile the patterns they use on every call; to match many modules, build
/// a ModuleMatcher once.
struct AdapterConfig : ModuleSelection {
    std::string peft_type = "LORA";
    std::string task_type = "CAUSAL_LM";
    std::string base_model_name_or_path;
    Index r = 8;
    double lora_alpha = 8;
    double lora_dropout = 0.0;
    nlohmann::ordered_json init_lora_weights = true;  ///< true, false, "pissa", "pissa_niter_4", ...
    bool use_rslora = false;
    bool fan_in_fan_out = false;
    std::string bias = "none";
    nlohmann::ordered_json extra = nlohmann::ordered_json::object();  ///< other fields, kept as read

    /// True when peft would put a LoRA layer on the module (see the file comment).
    /// \throws pissa::invalid_argument for a module name over max_module_name_length when a
    ///         pattern is used, or a pattern over the limits (see detail::check_pattern).
    bool targets(const std::string& module) const;
    /// The module's rank: the first matching rank_pattern entry, else r.
    Index rank_for(const std::string& module) const {
        for (const auto& [key, value] : rank_pattern)
            if (pattern_matches(key, module)) return value;
        return r;
    }
    /// The module's lora_alpha: the first matching alpha_pattern entry, else lora_alpha.
    double alpha_for(const std::string& module) const {
        for (const auto& [key, value] : alpha_pattern)
            if (pattern_matches(key, module)) return value;
        return lora_alpha;
    }
    /// The module's scaling s = alpha / r (or alpha / sqrt(r) with rsLoRA).
    double scaling_for(const std::string& module) const {
        return lora_scaling(alpha_for(module), rank_for(module), use_rslora);
    }
};

/// A selection's patterns compiled once, for matching many modules (AdapterConfig's own methods
/// compile on every call). Same answers as AdapterConfig's methods; it copies what it needs, so the
/// config may change or go away afterwards.
class ModuleMatcher {
public:
    /// \throws pissa::invalid_argument for a pattern over the limits, or for layers_to_transform /
    ///         layers_pattern with a string target_modules or layers_pattern without
    ///         layers_to_transform (peft's LoraConfig refuses both); std::regex_error for an
    ///         invalid pattern.
    ModuleMatcher(const ModuleSelection& selection, Index r, double lora_alpha, bool use_rslora)
        : m_suffixes(selection.target_modules),
          m_exclude_suffixes(selection.exclude_modules),
          m_layers(selection.layers_to_transform),
          m_r(r),
          m_alpha(lora_alpha),
          m_rslora(use_rslora) {
        selection.require_valid();
        if (!selection.target_regex.empty())
            m_target =
                std::make_unique<std::regex>(detail::compile_pattern(selection.target_regex, "target_modules regex"));
        if (!selection.exclude_regex.empty())
            m_exclude =
                std::make_unique<std::regex>(detail::compile_pattern(selection.exclude_regex, "exclude_modules regex"));
        for (const auto& pattern : selection.layers_pattern)
            m_layer_patterns.push_back(detail::compile_pattern(pattern, "layers_pattern"));
        for (const auto& [key, value] : selection.rank_pattern)
            m_ranks.emplace_back(detail::compile_pattern_key(key), value);
        for (const auto& [key, value] : selection.alpha_pattern)
            m_alphas.emplace_back(detail::compile_pattern_key(key), value);
    }
    /// A config's selection, r, lora_alpha and use_rslora.
    explicit ModuleMatcher(const AdapterConfig& config)
        : ModuleMatcher(config, config.r, config.lora_alpha, config.use_rslora) {}

    /// AdapterConfig::targets: peft's check_target_module_exists.
    bool targets(const std::string& module) const {
        if (excluded(module)) return false;
        if (m_target) return detail::match_module(*m_target, module);
        // A module named in full is taken as is; layers_to_transform filters suffix matches only.
        if (std::find(m_suffixes.begin(), m_suffixes.end(), module) != m_suffixes.end()) return true;
        if (!detail::suffix_match(m_suffixes, module)) return false;
        if (m_layers.empty()) return true;
        const auto layer = detail::layer_index(checked(module), m_layer_patterns);
        return layer && std::find(m_layers.begin(), m_layers.end(), *layer) != m_layers.end();
    }
    /// True when exclude_modules names the module (peft: it is then never targeted).
    bool excluded(const std::string& module) const {
        if (m_exclude) return detail::match_module(*m_exclude, module);
        return detail::suffix_match(m_exclude_suffixes, module);
    }
    /// AdapterConfig::rank_for.
    Index rank_for(const std::string& module) const {
        for (const auto& [re, value] : m_ranks)
            if (detail::match_module(re, module)) return value;
        return m_r;
    }
    /// AdapterConfig::alpha_for.
    double alpha_for(const std::string& module) const {
        for (const auto& [re, value] : m_alphas)
            if (detail::match_module(re, module)) return value;
        return m_alpha;
    }
    /// AdapterConfig::scaling_for.
    double scaling_for(const std::string& module) const {
        return lora_scaling(alpha_for(module), rank_for(module), m_rslora);
    }

private:
    /// The module name, refused over max_module_name_length as every pattern match refuses it.
    static const std::string& checked(const std::string& module) {
        pissa::detail::require(module.size() <= max_module_name_length, "module name '", detail::shortened(module),
                               "' has ", module.size(), " characters, over the limit of ", max_module_name_length,
                               " for matching it against layers_pattern");
        return module;
    }

    std::vector<std::string> m_suffixes, m_exclude_suffixes;
    std::unique_ptr<std::regex> m_target, m_exclude;
    std::vector<std::int64_t> m_layers;
    std::vector<std::regex> m_layer_patterns;
    std::vector<std::pair<std::regex, Index>> m_ranks;
    std::vector<std::pair<std::regex, double>> m_alphas;
    Index m_r;
    double m_alpha;
    bool m_rslora;
};

inline bool AdapterConfig::targets(const std::string& module) const { return ModuleMatcher(*this).targets(module); }

/// Parses adapter_config.json text: at most max_adapter_config_size bytes of JSON nested at most
/// max_json_depth deep, whose two-space indented rewrite (write_adapter) stays under 4 x
/// max_adapter_config_size bytes; patterns within max_pattern_length and max_pattern_group_depth.
/// Unknown fields are kept in `extra` (bounded by those limits).
/// \throws pissa::io::format_error naming `file` for a wrong type, a non-LORA peft_type, an invalid
///         regular expression or any of the limits.
inline AdapterConfig parse_adapter_config(const std::string& text, const std::string& file) {
    if (text.size() > max_adapter_config_size)
        throw format_error(pissa::detail::concat(file, ": ", text.size(), " bytes, over the ", max_adapter_config_size,
                                                 "-byte limit for an adapter config"));
    detail::JsonStats stats;
    const auto doc =
        detail::parse_json_strict<nlohmann::ordered_json>(text.data(), text.data() + text.size(), file, &stats);
    if (stats.indented_size > 4 * max_adapter_config_size)
        throw format_error(pissa::detail::concat(file, ": rewriting it would take up to ", stats.indented_size,
                                                 " bytes, over the ", 4 * max_adapter_config_size, "-byte limit"));
    if (!doc.is_object()) throw format_error(file + ": not a JSON object");
    AdapterConfig c;
    c.extra = nlohmann::ordered_json::object();
    auto bad = [&](const std::string& key, const char* want) {
        throw format_error(file + ": field '" + key + "' must be " + want);
    };
    // peft's str-or-list fields: a string goes to `one`, a list to `many`, null to neither.
    auto string_or_list = [&](const std::string& key, const nlohmann::ordered_json& value, std::string& one,
                              std::vector<std::string>& many) {
        if (value.is_string()) {
            one = value.get<std::string>();
        } else if (value.is_array()) {
            for (const auto& t : value) {
                if (!t.is_string()) bad(key, "a string or a list of strings");
                many.push_back(t.get<std::string>());
            }
        } else if (!value.is_null()) {
            bad(key, "a string or a list of strings");
        }
    };
    try {
        for (const auto& [key, value] : doc.items()) {
            if (key == "peft_type") {
                if (!value.is_string()) bad(key, "a string");
                c.peft_type = value.get<std::string>();
            } else if (key == "task_type") {
                c.task_type = value.is_string() ? value.get<std::string>() : "";
            } else if (key == "base_model_name_or_path") {
                c.base_model_name_or_path = value.is_string() ? value.get<std::string>() : "";
            } else if (key == "r") {
                if (!value.is_number_integer() || value.get<std::int64_t>() < 1) bad(key, "an integer >= 1");
                c.r = value.get<Index>();
            } else if (key == "lora_alpha") {
                if (!value.is_number()) bad(key, "a number");
                c.lora_alpha = value.get<double>();
            } else if (key == "lora_dropout") {
                if (!value.is_number()) bad(key, "a number");
                c.lora_dropout = value.get<double>();
            } else if (key == "target_modules") {
                string_or_list(key, value, c.target_regex, c.target_modules);
            } else if (key == "exclude_modules") {
                string_or_list(key, value, c.exclude_regex, c.exclude_modules);
            } else if (key == "layers_pattern") {
                std::string one;
                string_or_list(key, value, one, c.layers_pattern);
                if (!one.empty()) c.layers_pattern.push_back(one);
            } else if (key == "layers_to_transform") {
                if (value.is_number_integer()) {
                    c.layers_to_transform.push_back(value.get<std::int64_t>());
                } else if (value.is_array()) {
                    for (const auto& t : value) {
                        if (!t.is_number_integer()) bad(key, "an integer or a list of integers");
                        c.layers_to_transform.push_back(t.get<std::int64_t>());
                    }
                } else if (!value.is_null()) {
                    bad(key, "an integer or a list of integers");
                }
            } else if (key == "init_lora_weights") {
                c.init_lora_weights = value;
            } else if (key == "use_rslora") {
                if (!value.is_boolean()) bad(key, "true or false");
                c.use_rslora = value.get<bool>();
            } else if (key == "fan_in_fan_out") {
                if (!value.is_boolean()) bad(key, "true or false");
                c.fan_in_fan_out = value.get<bool>();
            } else if (key == "bias") {
                if (!value.is_string()) bad(key, "a string");
                c.bias = value.get<std::string>();
            } else if (key == "rank_pattern" || key == "alpha_pattern") {
                if (value.is_null()) continue;
                if (!value.is_object()) bad(key, "an object");
                for (const auto& [k, v] : value.items()) {
                    if (key == "rank_pattern") {
                        if (!v.is_number_integer() || v.get<std::int64_t>() < 1) bad(key, "an object of integers >= 1");
                        c.rank_pattern.emplace_back(k, v.get<Index>());
                    } else {
                        if (!v.is_number()) bad(key, "an object of numbers");
                        c.alpha_pattern.emplace_back(k, v.get<double>());
                    }
                }
            } else {
                c.extra[key] = value;
            }
        }
    } catch (const nlohmann::json::exception& e) {
        throw format_error(file + ": " + e.what());
    }
    if (c.peft_type != "LORA") throw format_error(file + ": peft_type '" + c.peft_type + "' is not LORA");
    try {
        ModuleMatcher check(c);
    } catch (const std::regex_error& e) {
        throw format_error(file + ": invalid regular expression in target_modules or a pattern: " + e.what());
    } catch (const pissa::invalid_argument& e) {
        throw format_error(file + ": " + e.what());
    }
    return c;
}

/// adapter_config.json for a config: peft's field names, then any extra fields read earlier.
inline nlohmann::ordered_json to_json(const AdapterConfig& c) {
    nlohmann::ordered_json j;
    j["alpha_pattern"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : c.alpha_pattern) {
        if (v == std::floor(v) && std::abs(v) < 1e15) {
            j["alpha_pattern"][k] = static_cast<std::int64_t>(v);
        } else {
            j["alpha_pattern"][k] = v;
        }
    }
    j["base_model_name_or_path"] = c.base_model_name_or_path.empty()
                                       ? nlohmann::ordered_json(nullptr)
                                       : nlohmann::ordered_json(c.base_model_name_or_path);
    j["bias"] = c.bias;
    if (!c.exclude_regex.empty()) {
        j["exclude_modules"] = c.exclude_regex;
    } else if (!c.exclude_modules.empty()) {
        j["exclude_modules"] = c.exclude_modules;
    } else {
        j["exclude_modules"] = nullptr;
    }
    j["fan_in_fan_out"] = c.fan_in_fan_out;
    j["inference_mode"] = true;
    j["init_lora_weights"] = c.init_lora_weights;
    if (c.layers_pattern.empty()) {
        j["layers_pattern"] = nullptr;
    } else if (c.layers_pattern.size() == 1) {
        j["layers_pattern"] = c.layers_pattern.front();
    } else {
        j["layers_pattern"] = c.layers_pattern;
    }
    j["layers_to_transform"] =
        c.layers_to_transform.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(c.layers_to_transform);
    if (c.lora_alpha == std::floor(c.lora_alpha) && std::abs(c.lora_alpha) < 1e15) {
        j["lora_alpha"] = static_cast<std::int64_t>(c.lora_alpha);  // peft writes ints as ints
    } else {
        j["lora_alpha"] = c.lora_alpha;
    }
    j["lora_dropout"] = c.lora_dropout;
    j["modules_to_save"] = nullptr;
    j["peft_type"] = c.peft_type;
    j["r"] = c.r;
    j["rank_pattern"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
    if (c.target_regex.empty()) {
        j["target_modules"] = c.target_modules;
    } else {
        j["target_modules"] = c.target_regex;
    }
    j["task_type"] = c.task_type.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(c.task_type);
    j["use_dora"] = false;
    j["use_rslora"] = c.use_rslora;
    for (const auto& [k, v] : c.extra.items()) j[k] = v;
    return j;
}

/// One adapted module of an adapter file: a float32 LoraAdapter (`A [r, in]`, `B [out, r]`, the
/// module's `scaling` from the config) and the module's name (`model.layers.0.self_attn.q_proj`).
struct LoraModule : LoraAdapter<float> {
    std::string name;
};

/// An adapter folder in memory: config, modules (in file order) and the weights file's metadata.
struct Adapter {
    AdapterConfig config;
    std::vector<LoraModule> modules;
    std::map<std::string, std::string> metadata = {{"format", "pt"}};

    /// The module called `name`, or nullptr.
    const LoraModule* find(const std::string& name) const {
        for (const auto& m : modules)
            if (m.name == name) return &m;
        return nullptr;
    }
};

/// peft's key for a module's A or B: `base_model.model.<module>.lora_A.weight`.
inline std::string lora_key(const std::string& module, char which) {
    return "base_model.model." + module + ".lora_" + which + ".weight";
}

/// The module name of a base weight (`x.q_proj.weight` -> `x.q_proj`); empty if not a `.weight`.
inline std::string module_of_weight(const std::string& tensor) {
    const std::string suffix = ".weight";
    if (tensor.size() <= suffix.size() || tensor.compare(tensor.size() - suffix.size(), suffix.size(), suffix) != 0)
        return {};
    return tensor.substr(0, tensor.size() - suffix.size());
}

/// True for a folder holding adapter_config.json.
inline bool is_adapter_folder(const std::filesystem::path& path) {
    return detail::is_folder(path) && detail::path_exists(path / adapter_config_name);
}

/// Reads the adapter_config.json of an adapter folder.
/// \throws pissa::io::format_error naming the file.
inline AdapterConfig read_adapter_config(const std::filesystem::path& dir) {
    const auto config_path = dir / adapter_config_name;
    if (!detail::path_exists(config_path)) throw format_error(dir.string() + ": no " + adapter_config_name);
    return parse_adapter_config(detail::read_text_file(config_path, max_adapter_config_size, "an adapter config"),
                                config_path.string());
}

/// Reads an adapter folder. Every key of the weights file must be a peft LoRA key, each module must
/// have both A and B with B.cols() == A.rows() == its rank (rank_pattern or r).
/// \throws pissa::io::format_error naming the file and key.
inline Adapter read_adapter(const std::filesystem::path& dir) {
    Adapter adapter;
    adapter.config = read_adapter_config(dir);
    const ModuleMatcher matcher(adapter.config);
    const auto weights_path = dir / adapter_weights_name;
    if (!detail::path_exists(weights_path)) throw format_error(dir.string() + ": no " + adapter_weights_name);
    SafetensorsFile file(weights_path);
    adapter.metadata = file.metadata();
    const std::string prefix = "base_model.model.";
    std::map<std::string, std::size_t> index;
    for (const auto& t : file.tensors()) {
        const auto& key = t.name;
        const bool is_a = key.size() > 14 && key.compare(key.size() - 14, 14, ".lora_A.weight") == 0;
        const bool is_b = key.size() > 14 && key.compare(key.size() - 14, 14, ".lora_B.weight") == 0;
        if (key.compare(0, prefix.size(), prefix) != 0 || (!is_a && !is_b) || key.size() <= prefix.size() + 14)
            throw format_error(weights_path.string() + ": key '" + key +
                               "' is not a LoRA key base_model.model.<module>.lora_{A,B}.weight "
                               "(DoRA, embedding adapters and modules_to_save are not supported)");
        if (!is_float_matrix(t))
            throw format_error(weights_path.string() + ": tensor '" + key + "' must be a 2-D float tensor");
        const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - 14);
        auto [it, fresh] = index.emplace(module, adapter.modules.size());
        if (fresh) adapter.modules.push_back({{}, module});
        LoraModule& m = adapter.modules[it->second];
        (is_a ? m.A : m.B) = read_matrix<float>(file, t);
    }
    for (auto& m : adapter.modules) {
        if (m.A.size() == 0 && m.A.rows() == 0)
            throw format_error(weights_path.string() + ": no " + lora_key(m.name, 'A'));
        if (m.B.size() == 0 && m.B.rows() == 0)
            throw format_error(weights_path.string() + ": no " + lora_key(m.name, 'B'));
        Index rank = 0;
        try {
            rank = matcher.rank_for(m.name);
            m.scaling = static_cast<float>(matcher.scaling_for(m.name));
        } catch (const pissa::invalid_argument& e) {
            throw format_error(weights_path.string() + ": " + e.what());
        }
        if (m.A.rows() != rank || m.B.cols() != rank)
            throw format_error(weights_path.string() + ": module '" + m.name + "': A [" + std::to_string(m.A.rows()) +
                               ", " + std::to_string(m.A.cols()) + "] and B [" + std::to_string(m.B.rows()) + ", " +
                               std::to_string(m.B.cols()) + "] do not have the configured rank " +
                               std::to_string(rank));
    }
    return adapter;
}

/// Writes an adapter folder (created if missing): adapter_config.json and adapter_model.safetensors
/// with peft's keys, A and B as F32, modules in order, each file written atomically.
inline void write_adapter(const std::filesystem::path& dir, const Adapter& adapter) {
    std::filesystem::create_directories(dir);
    std::vector<OwnedTensor> tensors;
    for (const auto& m : adapter.modules) {
        tensors.push_back(matrix_tensor(lora_key(m.name, 'A'), m.A, Dtype::F32));
        tensors.push_back(matrix_tensor(lora_key(m.name, 'B'), m.B, Dtype::F32));
    }
    write_safetensors(dir / adapter_weights_name, tensors, adapter.metadata);
    detail::write_text_file(dir / adapter_config_name, to_json(adapter.config).dump(2) + "\n");
}

/// The config of the rank-2r LoRA that a trained PiSSA adapter converts to (peft save_pretrained
/// with path_initial_model_for_weight_conversion): init_lora_weights true, r doubled, lora_alpha
/// doubled (times sqrt(2) with rsLoRA), every rank_pattern / alpha_pattern value doubled.
/// \throws pissa::invalid_argument for rsLoRA together with rank_pattern or alpha_pattern, which
///         peft refuses too (the per-module alpha cannot keep alpha / sqrt(r) fixed by doubling).
inline AdapterConfig converted_config(const AdapterConfig& trained) {
    pissa::detail::require(!(trained.use_rslora && (!trained.rank_pattern.empty() || !trained.alpha_pattern.empty())),
                           "PiSSA -> LoRA conversion is not supported when using rank_pattern or alpha_pattern at the "
                           "same time as use_rslora (peft refuses it too)");
    AdapterConfig c = trained;
    c.init_lora_weights = true;
    c.r = 2 * trained.r;
    c.lora_alpha = convert_lora_alpha(trained.lora_alpha, trained.use_rslora);
    for (auto& [k, v] : c.rank_pattern) v *= 2;
    for (auto& [k, v] : c.alpha_pattern) v *= 2;
    return c;
}

}  // namespace pissa::io

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

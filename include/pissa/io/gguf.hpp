/// \file io/gguf.hpp
/// \brief GGUF LoRA adapters that llama.cpp loads (`llama-cli -m base.gguf --lora adapter.gguf`):
/// a GGUF v3 writer, the Hugging Face -> GGUF tensor names of the Llama, Mistral and Qwen2
/// families, the q/k row permutation llama.cpp's converter applies, and the fold of peft's
/// per-module scaling into llama.cpp's single alpha.
///
/// The facts this follows, from llama.cpp's source (src/llama-adapter.cpp, src/llama-graph.cpp,
/// ggml/src/gguf.cpp, convert_lora_to_gguf.py and the Llama / Qwen2 model classes of its
/// convert_hf_to_gguf.py):
/// - the file: little-endian; magic "GGUF", version 3, tensor count and KV count (uint64); the KV
///   pairs (key string, value type uint32, value); one info per tensor (name, n_dims, the dims in
///   ggml order = the numpy shape reversed, ggml type, offset); then, from the next multiple of the
///   alignment (`general.alignment`, default 32), the data, each tensor at an offset that is the sum
///   of the sizes of the tensors before it, each rounded up to the alignment. Strings are a uint64
///   length and the bytes, no terminator; tensor names are at most 63 bytes (GGML_MAX_NAME 64).
/// - the adapter: `general.type` = "adapter", `general.architecture` = the base model's ("llama" for
///   Llama and Mistral, "qwen2"), `adapter.type` = "lora", `adapter.lora.alpha` (float32); anything
///   else is informative. For the model tensor `BASE.weight` (W `[out, in]`, ggml ne `[in, out]`)
///   the adapter holds `BASE.weight.lora_a` (ne `[in, r]`: peft's A `[r, in]`, bytes unchanged) and
///   `BASE.weight.lora_b` (ne `[r, out]`: peft's B `[out, r]`); llama.cpp checks W.ne[0] == a.ne[0],
///   W.ne[1] == b.ne[1] and a.ne[1] == b.ne[0].
/// - the scale: llama.cpp adds `scale * B (A x)` with `scale = alpha / r_i` (`r_i` = lora_b's ne[0],
///   the module's own rank) and `scale = 1` when alpha is 0; it knows no rsLoRA and no per-module
///   alpha (see fold_factor and plan_gguf_export for how those are carried over).
/// - the permutation: for the LLAMA architecture (LlamaForCausalLM and MistralForCausalLM) the
///   converter reorders the rows of q_proj (with num_attention_heads) and k_proj (with
///   num_key_value_heads) within each head (permute_qk_rows), and applies the same reordering to
///   lora_B of an adapter (A unchanged). Qwen2 keeps the Hugging Face row order.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>
#include <pissa/types.hpp>

#include <nlohmann/json.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace pissa::io {

/// The GGUF version written.
inline constexpr std::uint32_t gguf_version = 3;
/// The data alignment written (GGUF's default), also stated as `general.alignment`.
inline constexpr std::uint32_t gguf_alignment = 32;
/// The longest tensor name llama.cpp accepts (GGML_MAX_NAME - 1: it stores names NUL-terminated).
inline constexpr std::size_t gguf_max_name_length = 63;

/// The ggml element types an adapter is written in (their ggml_type values).
enum class GgmlType : std::uint32_t { F32 = 0, F16 = 1 };

/// A GGUF metadata value: string, uint32, float32 or bool (what an adapter needs).
using GgufValue = std::variant<std::string, std::uint32_t, float, bool>;

/// One metadata key and its value.
struct GgufKv {
    std::string key;
    GgufValue value;
};

/// One tensor of a GGUF file: its name, its numpy shape (outermost first; the file stores it
/// reversed, in ggml order), its type and its bytes (row-major, little-endian).
struct GgufTensor {
    std::string name;
    std::vector<std::uint64_t> shape;
    GgmlType type = GgmlType::F32;
    std::vector<unsigned char> bytes;
};

namespace detail {

/// GGUF value type codes (gguf_type).
enum class GgufTypeCode : std::uint32_t { uint32 = 4, float32 = 6, boolean = 7, string = 8 };

inline void put_u32(std::string& out, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
inline void put_u64(std::string& out, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
inline void put_string(std::string& out, const std::string& s) {
    put_u64(out, s.size());
    out += s;
}
inline void put_value(std::string& out, const GgufValue& value) {
    if (const auto* s = std::get_if<std::string>(&value)) {
        put_u32(out, static_cast<std::uint32_t>(GgufTypeCode::string));
        put_string(out, *s);
    } else if (const auto* u = std::get_if<std::uint32_t>(&value)) {
        put_u32(out, static_cast<std::uint32_t>(GgufTypeCode::uint32));
        put_u32(out, *u);
    } else if (const auto* f = std::get_if<float>(&value)) {
        put_u32(out, static_cast<std::uint32_t>(GgufTypeCode::float32));
        std::uint32_t bits = 0;
        std::memcpy(&bits, f, sizeof bits);
        put_u32(out, bits);
    } else {
        put_u32(out, static_cast<std::uint32_t>(GgufTypeCode::boolean));
        out.push_back(std::get<bool>(value) ? 1 : 0);
    }
}

/// `n` rounded up to a multiple of gguf_alignment.
inline std::uint64_t gguf_padded(std::uint64_t n) { return (n + gguf_alignment - 1) / gguf_alignment * gguf_alignment; }

}  // namespace detail

/// Bytes per element of a ggml type.
inline std::size_t ggml_type_size(GgmlType type) { return type == GgmlType::F16 ? 2 : 4; }

/// Everything of a GGUF file before its data: header, the KV pairs in order followed by
/// `general.alignment` (uint32 gguf_alignment), the tensor infos in order, and the zero padding up
/// to the data. Tensor offsets follow the layout of the file comment.
/// \throws pissa::invalid_argument naming `file` for a duplicate or reserved key (`general.alignment`
///         is written here), an empty, duplicate or over-long tensor name, or a tensor whose byte count
///         differs from its shape and type.
inline std::string gguf_header(const std::vector<GgufKv>& kvs, const std::vector<GgufTensor>& tensors,
                               const std::string& file) {
    std::set<std::string> keys{"general.alignment"};
    for (const auto& kv : kvs)
        pissa::detail::require(!kv.key.empty() && keys.insert(kv.key).second, file, ": GGUF key '", kv.key,
                               "' is empty, duplicated or reserved");
    std::string out = "GGUF";
    detail::put_u32(out, gguf_version);
    detail::put_u64(out, tensors.size());
    detail::put_u64(out, kvs.size() + 1);
    for (const auto& kv : kvs) {
        detail::put_string(out, kv.key);
        detail::put_value(out, kv.value);
    }
    detail::put_string(out, "general.alignment");
    detail::put_value(out, gguf_alignment);
    std::set<std::string> names;
    std::uint64_t offset = 0;
    for (const auto& t : tensors) {
        pissa::detail::require(!t.name.empty() && t.name.size() <= gguf_max_name_length && names.insert(t.name).second,
                               file, ": GGUF tensor name '", t.name, "' is empty, duplicated or longer than ",
                               gguf_max_name_length, " bytes");
        std::uint64_t count = 1;
        for (auto d : t.shape) count *= d;
        pissa::detail::require(
            !t.shape.empty() && t.shape.size() <= 4 && count * ggml_type_size(t.type) == t.bytes.size(), file,
            ": GGUF tensor '", t.name, "': ", t.bytes.size(),
            " bytes do not match its shape and type (1 to 4 dimensions)");
        detail::put_string(out, t.name);
        detail::put_u32(out, static_cast<std::uint32_t>(t.shape.size()));
        for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) detail::put_u64(out, *d);
        detail::put_u32(out, static_cast<std::uint32_t>(t.type));
        detail::put_u64(out, offset);
        offset += detail::gguf_padded(t.bytes.size());
    }
    out.resize(static_cast<std::size_t>(detail::gguf_padded(out.size())), '\0');
    return out;
}

/// Writes a GGUF file atomically (AtomicFile: a temporary file beside `path`, renamed into place),
/// each tensor's data padded with zeros to the alignment. With `replace` false, a file that appears
/// at `path` meanwhile is left alone and the commit fails.
/// \throws pissa::invalid_argument as gguf_header; pissa::io::io_error when writing fails.
inline void write_gguf(const std::filesystem::path& path, const std::vector<GgufKv>& kvs,
                       const std::vector<GgufTensor>& tensors, bool replace = true) {
    const std::string header = gguf_header(kvs, tensors, path.string());
    AtomicFile file(path);
    file.write(header.data(), header.size());
    const char zeros[gguf_alignment] = {};
    for (const auto& t : tensors) {
        file.write(t.bytes.data(), t.bytes.size());
        file.write(zeros, static_cast<std::size_t>(detail::gguf_padded(t.bytes.size()) - t.bytes.size()));
    }
    file.commit(replace);
}

/// The model families an adapter can be exported for.
enum class GgufArch { llama, mistral, qwen2 };

/// The family named `name` ("llama", "mistral", "qwen2").
/// \throws pissa::invalid_argument for any other name, listing the supported ones.
inline GgufArch gguf_arch_from_name(const std::string& name) {
    if (name == "llama") return GgufArch::llama;
    if (name == "mistral") return GgufArch::mistral;
    if (name == "qwen2") return GgufArch::qwen2;
    throw pissa::invalid_argument("architecture '" + name +
                                  "' is not supported for GGUF export; supported: llama, mistral, qwen2");
}

/// The family's name as gguf_arch_from_name reads it (and as config.json's model_type says it).
inline const char* gguf_arch_name(GgufArch arch) {
    return arch == GgufArch::llama ? "llama" : arch == GgufArch::mistral ? "mistral" : "qwen2";
}

/// `general.architecture` of the family's GGUF files: llama.cpp converts Mistral as "llama".
inline const char* gguf_general_architecture(GgufArch arch) { return arch == GgufArch::qwen2 ? "qwen2" : "llama"; }

/// True for the families whose q_proj / k_proj rows llama.cpp's converter permutes (Llama, Mistral).
inline bool gguf_permutes_qk(GgufArch arch) { return arch != GgufArch::qwen2; }

/// The GGUF base name of a Hugging Face module of the Llama / Mistral / Qwen2 layout:
/// `model.layers.N.self_attn.q_proj` -> `blk.N.attn_q` (`k_proj`, `v_proj`, `o_proj` -> `attn_k`,
/// `attn_v`, `attn_output`), `model.layers.N.mlp.gate_proj` -> `blk.N.ffn_gate` (`up_proj`,
/// `down_proj` -> `ffn_up`, `ffn_down`), `lm_head` -> `output`, `model.embed_tokens` -> `token_embd`
/// (the model tensor is the name + ".weight").
/// \throws pissa::invalid_argument naming any other module.
inline std::string gguf_tensor_name(const std::string& module) {
    if (module == "lm_head") return "output";
    if (module == "model.embed_tokens") return "token_embd";
    const std::string prefix = "model.layers.";
    auto refuse = [&]() -> std::string {
        throw pissa::invalid_argument("module '" + detail::shortened(module) +
                                      "' has no GGUF tensor name: only model.layers.N.self_attn.{q,k,v,o}_proj, "
                                      "model.layers.N.mlp.{gate,up,down}_proj, lm_head and model.embed_tokens of "
                                      "the Llama / Mistral / Qwen2 layout are mapped");
    };
    if (module.compare(0, prefix.size(), prefix) != 0) return refuse();
    std::size_t i = prefix.size();
    const std::size_t digits = i;
    while (i < module.size() && module[i] >= '0' && module[i] <= '9') ++i;
    if (i == digits || i - digits > 9 || (module[digits] == '0' && i - digits > 1) || i >= module.size() ||
        module[i] != '.')
        return refuse();
    const std::string block = module.substr(digits, i - digits), rest = module.substr(i + 1);
    static const std::pair<const char*, const char*> names[] = {
        {"self_attn.q_proj", "attn_q"},      {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
        {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"},  {"mlp.up_proj", "ffn_up"},
        {"mlp.down_proj", "ffn_down"}};
    for (const auto& [hf, gguf] : names)
        if (rest == hf) return "blk." + block + "." + gguf;
    return refuse();
}

/// What the export needs from the base model's config.json.
struct BaseModelConfig {
    std::string model_type;            ///< "llama", "mistral", "qwen2", ... (empty when absent)
    Index num_attention_heads = 0;     ///< 0 when absent
    Index num_key_value_heads = 0;     ///< num_attention_heads when absent
    Index num_hidden_layers = 0;       ///< 0 when absent
    bool tie_word_embeddings = false;  ///< lm_head shares token_embd's weight (no output tensor)
};

/// Reads config.json of a model folder (at most max_adapter_config_size bytes of strict JSON).
/// \throws pissa::io::format_error naming the file when it is missing, malformed, or a field has
///         the wrong type (the head and layer counts must be integers >= 1).
inline BaseModelConfig read_base_model_config(const std::filesystem::path& model_dir) {
    const auto path = model_dir / "config.json";
    if (!detail::path_exists(path)) throw format_error(model_dir.string() + ": no config.json");
    const std::string text = detail::read_text_file(path, max_adapter_config_size, "a model config");
    const auto doc = detail::parse_json_strict<nlohmann::json>(text.data(), text.data() + text.size(), path.string());
    if (!doc.is_object()) throw format_error(path.string() + ": not a JSON object");
    BaseModelConfig c;
    auto count = [&](const char* key) -> Index {
        const auto it = doc.find(key);
        if (it == doc.end() || it->is_null()) return 0;
        if (!it->is_number_integer() || it->get<std::int64_t>() < 1 || it->get<std::int64_t>() > (1 << 30))
            throw format_error(path.string() + ": field '" + key + "' must be an integer >= 1");
        return it->get<Index>();
    };
    if (const auto it = doc.find("model_type"); it != doc.end() && it->is_string())
        c.model_type = it->get<std::string>();
    c.num_attention_heads = count("num_attention_heads");
    c.num_key_value_heads = count("num_key_value_heads");
    if (c.num_key_value_heads == 0) c.num_key_value_heads = c.num_attention_heads;
    c.num_hidden_layers = count("num_hidden_layers");
    if (const auto it = doc.find("tie_word_embeddings"); it != doc.end() && !it->is_null()) {
        if (!it->is_boolean())
            throw format_error(path.string() + ": field 'tie_word_embeddings' must be true or false");
        c.tie_word_embeddings = it->get<bool>();
    }
    return c;
}

/// llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute): the rows of each of
/// `heads` heads of `d` rows are reordered from [first half; second half] to the halves interleaved,
/// i.e. `reshape(heads, 2, d / 2, cols).swapaxes(1, 2)`: output row `h d + 2 j + k` is input row
/// `h d + k d / 2 + j`. It turns Hugging Face's rotary layout (rotate_half) into the interleaved
/// pairs of llama.cpp's rope. Applied to lora_B it matches the permuted base weight, since
/// P (B A) = (P B) A.
/// \throws pissa::invalid_argument when the rows do not split into `heads` heads of an even size.
template <class Derived>
RowMatrix<typename Derived::Scalar> permute_qk_rows(const Eigen::MatrixBase<Derived>& m, Index heads) {
    pissa::detail::require(heads >= 1 && m.rows() % (2 * heads) == 0, "q/k permutation: ", m.rows(),
                           " rows do not split into ", heads, " heads of an even number of rows");
    const Index d = m.rows() / heads, half = d / 2;
    RowMatrix<typename Derived::Scalar> out(m.rows(), m.cols());
    for (Index h = 0; h < heads; ++h)
        for (Index j = 0; j < half; ++j)
            for (Index k = 0; k < 2; ++k) out.row(h * d + 2 * j + k) = m.row(h * d + k * half + j);
    return out;
}

/// How an export goes: the family, the element type, and the base model's config (needed to
/// permute q_proj / k_proj for Llama and Mistral; also checked against the adapter when given).
struct GgufExportOptions {
    GgufArch arch = GgufArch::llama;
    GgmlType type = GgmlType::F32;
    std::optional<BaseModelConfig> base;  ///< the base model's config.json, if known
    std::string name;                     ///< `general.name`; not written when empty
};

/// One module of an export: where it goes and what is done to it.
struct GgufModulePlan {
    std::size_t index = 0;  ///< position in Adapter::modules
    std::string module;     ///< Hugging Face module name
    std::string tensor;     ///< GGUF base tensor name (`blk.0.attn_q`)
    Index rank = 0;         ///< r_i (lora_b's ne[0])
    double scaling = 0;     ///< the adapter's s_i (peft)
    double fold = 1;        ///< B' = fold * B (1: B written as it is)
    Index qk_heads = 0;     ///< heads of the q/k permutation of B; 0: not permuted
};

/// The whole export: the alpha written, every exported module's plan in adapter order, and the
/// modules left out.
struct GgufExportPlan {
    double alpha = 0;  ///< `adapter.lora.alpha` (written as float32)
    std::vector<GgufModulePlan> modules;
    std::vector<std::string> skipped;  ///< modules of the file that target_modules does not select (peft ignores them)
    /// True when some module's B is scaled (see fold_factor).
    bool folded() const {
        for (const auto& m : modules)
            if (m.fold != 1) return true;
        return false;
    }
};

/// The factor that makes llama.cpp's scale `alpha / rank` give the adapter's `scaling`:
/// `scaling / (alpha / rank)`, and exactly 1 when it is 1 up to rounding (relative 1e-12), so that
/// B is then written bit for bit.
inline double fold_factor(double scaling, Index rank, double alpha) {
    const double f = scaling * static_cast<double>(rank) / alpha;
    return std::abs(f - 1) <= 1e-12 ? 1.0 : f;
}

/// Plans the export of `adapter` (see the file comment for the facts it follows). Modules of the
/// file that the config's target_modules does not select are left out and listed in `skipped`, as
/// peft ignores them when it loads the adapter.
///
/// alpha: llama.cpp has one alpha for the file and scales module i by alpha / r_i, while peft's s_i
/// is lora_alpha_i / r_i (lora_alpha_i from alpha_pattern) or lora_alpha_i / sqrt(r_i) (rsLoRA).
/// - When every module has the same c_i = s_i r_i (no alpha_pattern, no rsLoRA: c_i = lora_alpha,
///   whatever the rank_pattern; rsLoRA without rank_pattern: c_i = lora_alpha sqrt(r)), alpha = that
///   c and nothing is folded: every B is written as it is.
/// - Otherwise alpha = the c of a module no pattern matches (lora_alpha, times sqrt(r) with rsLoRA),
///   and each module whose c_i differs gets B' = B c_i / alpha (fold_factor), so that
///   (alpha / r_i) B' A = s_i B A.
/// An alpha of 0 (lora_alpha 0) would read as scale 1 in llama.cpp, so alpha 1 is written instead
/// and the B's are folded (to zero).
/// \throws pissa::invalid_argument for fan_in_fan_out (Conv1D layouts have no Llama-family GGUF
///         name), a module with no GGUF name or an embedding module (peft adapts embeddings as
///         lora_embedding_A / B, which pissa does not read), a layer index or lm_head the base
///         config rules out, a base config of another model_type, and for Llama / Mistral q_proj or
///         k_proj without the base config's head counts.
inline GgufExportPlan plan_gguf_export(const Adapter& adapter, const GgufExportOptions& options) {
    const AdapterConfig& config = adapter.config;
    pissa::detail::require(!config.fan_in_fan_out,
                           "fan_in_fan_out adapters (GPT-2 Conv1D weights) cannot be exported to GGUF: only the "
                           "Llama, Mistral and Qwen2 layouts are supported");
    const char* arch = gguf_arch_name(options.arch);
    if (options.base && !options.base->model_type.empty())
        pissa::detail::require(options.base->model_type == arch, "the base model's config.json says model_type '",
                               options.base->model_type, "', not '", arch, "' (--arch)");
    const ModuleMatcher matcher(config);
    GgufExportPlan plan;
    std::vector<double> c;
    for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
        const LoraModule& m = adapter.modules[i];
        if (!matcher.targets(m.name)) {
            plan.skipped.push_back(m.name);
            continue;
        }
        GgufModulePlan p;
        p.index = i;
        p.module = m.name;
        p.tensor = gguf_tensor_name(m.name);
        pissa::detail::require(p.tensor != "token_embd", "module '", m.name,
                               "' is an embedding: embedding adapters are not supported for GGUF export");
        p.rank = m.A.rows();
        p.scaling = matcher.scaling_for(m.name);
        if (options.base) {
            const BaseModelConfig& base = *options.base;
            pissa::detail::require(!(p.tensor == "output" && base.tie_word_embeddings), "module 'lm_head': the base ",
                                   "model ties it to the token embeddings (tie_word_embeddings), so its GGUF has no "
                                   "output tensor to adapt");
            if (p.tensor.compare(0, 4, "blk.") == 0 && base.num_hidden_layers > 0)
                pissa::detail::require(std::stoll(p.tensor.substr(4)) < base.num_hidden_layers, "module '", m.name,
                                       "': the base model has only ", base.num_hidden_layers, " layers");
        }
        const bool is_q = p.tensor.size() > 7 && p.tensor.compare(p.tensor.size() - 7, 7, ".attn_q") == 0;
        const bool is_k = p.tensor.size() > 7 && p.tensor.compare(p.tensor.size() - 7, 7, ".attn_k") == 0;
        if (gguf_permutes_qk(options.arch) && (is_q || is_k)) {
            pissa::detail::require(options.base && options.base->num_attention_heads > 0, "module '", m.name,
                                   "': ", arch,
                                   " GGUF files hold q_proj and k_proj with their rows permuted per attention head, "
                                   "and B must be permuted the same way: that needs num_attention_heads and "
                                   "num_key_value_heads from the base model's config.json (pass --base MODEL_DIR)");
            p.qk_heads = is_q ? options.base->num_attention_heads : options.base->num_key_value_heads;
            pissa::detail::require(m.B.rows() % (2 * p.qk_heads) == 0, "module '", m.name, "': its ", m.B.rows(),
                                   " output rows do not split into ", p.qk_heads,
                                   " heads of an even size: is the base model's config.json the right one?");
        }
        c.push_back(p.scaling * static_cast<double>(p.rank));
        plan.modules.push_back(std::move(p));
    }
    pissa::detail::require(!plan.modules.empty(), "the adapter has no module that its target_modules selects");
    bool same = true;
    for (double ci : c) same = same && std::abs(ci - c.front()) <= 1e-12 * std::abs(c.front());
    plan.alpha = same ? c.front() : lora_scaling(config.lora_alpha, config.r, config.use_rslora) * config.r;
    if (plan.alpha == 0) plan.alpha = 1;
    for (auto& p : plan.modules) p.fold = fold_factor(p.scaling, p.rank, plan.alpha);
    return plan;
}

/// The KV pairs of an adapter file, in the order written: general.architecture, general.type,
/// general.name (when given), adapter.type, adapter.lora.alpha (write_gguf adds general.alignment).
inline std::vector<GgufKv> gguf_adapter_kvs(const GgufExportPlan& plan, const GgufExportOptions& options) {
    std::vector<GgufKv> kvs = {{"general.architecture", std::string(gguf_general_architecture(options.arch))},
                               {"general.type", std::string("adapter")}};
    if (!options.name.empty()) kvs.push_back({"general.name", options.name});
    kvs.push_back({"adapter.type", std::string("lora")});
    kvs.push_back({"adapter.lora.alpha", static_cast<float>(plan.alpha)});
    return kvs;
}

/// The tensors of an adapter file: for each planned module in order, `<tensor>.weight.lora_a` (A `[r, in]`)
/// then `<tensor>.weight.lora_b` (B' `[out, r]`: B permuted and folded as planned).
/// \throws pissa::invalid_argument naming the module for a non-finite value, or one beyond float16's
///         range with F16 output.
inline std::vector<GgufTensor> gguf_adapter_tensors(const Adapter& adapter, const GgufExportPlan& plan,
                                                    const GgufExportOptions& options) {
    const Dtype dtype = options.type == GgmlType::F16 ? Dtype::F16 : Dtype::F32;
    std::vector<GgufTensor> out;
    for (const GgufModulePlan& p : plan.modules) {
        const LoraModule& m = adapter.modules.at(p.index);
        RowMatrix<float> B = m.B;
        if (p.qk_heads > 0) B = permute_qk_rows(B, p.qk_heads);
        if (p.fold != 1) B = (B.cast<double>() * p.fold).cast<float>();
        auto check = [&](const char* which, const RowMatrix<float>& x) {
            pissa::detail::require(x.allFinite(), "module '", m.name, "': ", which, " has a non-finite value");
            const float max = x.size() ? x.cwiseAbs().maxCoeff() : 0.0f;
            pissa::detail::require(dtype != Dtype::F16 || max <= 65504.0f, "module '", m.name, "': ", which,
                                   " has values up to ", max, ", beyond float16's range (65504); export as f32");
        };
        const RowMatrix<float> A = m.A;
        check("A", A);
        check("B", B);
        const std::string name = p.tensor + ".weight.lora_";
        out.push_back({name + "a",
                       {static_cast<std::uint64_t>(m.A.rows()), static_cast<std::uint64_t>(m.A.cols())},
                       options.type,
                       matrix_bytes(A, dtype)});
        out.push_back({name + "b",
                       {static_cast<std::uint64_t>(B.rows()), static_cast<std::uint64_t>(B.cols())},
                       options.type,
                       matrix_bytes(B, dtype)});
    }
    return out;
}

/// Exports `adapter` as a GGUF LoRA adapter at `path` (plan_gguf_export, gguf_adapter_kvs,
/// gguf_adapter_tensors, write_gguf) and returns the plan. Nothing is written unless everything
/// checks out; the file appears whole or not at all.
/// \throws pissa::invalid_argument as those functions; pissa::io::io_error when writing fails.
inline GgufExportPlan export_gguf(const Adapter& adapter, const GgufExportOptions& options,
                                  const std::filesystem::path& path, bool replace = true) {
    GgufExportPlan plan = plan_gguf_export(adapter, options);
    write_gguf(path, gguf_adapter_kvs(plan, options), gguf_adapter_tensors(adapter, plan, options), replace);
    return plan;
}

}  // namespace pissa::io

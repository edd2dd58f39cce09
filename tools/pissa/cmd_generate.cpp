// pissa generate: a deterministic synthetic checkpoint with realistic weight spectra, for the main
// job, the tests and benchmarks when no real model is at hand.
//
// Each projection weight is W = sum_k sigma_k u_k v_k^T + E: a few strong singular directions
// (sigma_k = 0.2 * sqrt(out + in) * 0.7^k, k < 6, unit random directions) over a Gaussian noise bulk
// E with entries N(0, 0.02^2), whose singular values fill [0.02 |sqrt(out) - sqrt(in)|,
// 0.02 (sqrt(out) + sqrt(in))] (Marchenko-Pastur). The strong directions stand well above the bulk,
// as in pretrained LLM weights, so PiSSA's top-r split captures a visible share of the energy.
#include "tool.hpp"

#include <pissa/detail/random.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>

namespace pissa_tool {

namespace {

using pissa::io::Dtype;
using pissa::io::TensorSpec;

struct Planned {
    TensorSpec spec;
    enum Kind { projection, embedding, norm, bias } kind;
};

std::vector<Planned> plan(const GenerateOptions& o, Dtype dtype) {
    const auto H = static_cast<std::uint64_t>(o.hidden), I = static_cast<std::uint64_t>(o.intermediate),
               V = static_cast<std::uint64_t>(o.vocab);
    std::vector<Planned> p;
    auto add = [&](const std::string& name, std::vector<std::uint64_t> shape, Planned::Kind kind) {
        p.push_back({{name, dtype, std::move(shape)}, kind});
    };
    if (o.arch == "gpt2") {  // Conv1D weights are stored [in, out]
        add("transformer.wte.weight", {V, H}, Planned::embedding);
        add("transformer.wpe.weight", {1024, H}, Planned::embedding);
        for (int l = 0; l < o.layers; ++l) {
            const std::string b = "transformer.h." + std::to_string(l) + ".";
            add(b + "ln_1.weight", {H}, Planned::norm);
            add(b + "ln_1.bias", {H}, Planned::bias);
            add(b + "attn.c_attn.weight", {H, 3 * H}, Planned::projection);
            add(b + "attn.c_attn.bias", {3 * H}, Planned::bias);
            add(b + "attn.c_proj.weight", {H, H}, Planned::projection);
            add(b + "attn.c_proj.bias", {H}, Planned::bias);
            add(b + "ln_2.weight", {H}, Planned::norm);
            add(b + "ln_2.bias", {H}, Planned::bias);
            add(b + "mlp.c_fc.weight", {H, 4 * H}, Planned::projection);
            add(b + "mlp.c_fc.bias", {4 * H}, Planned::bias);
            add(b + "mlp.c_proj.weight", {4 * H, H}, Planned::projection);
            add(b + "mlp.c_proj.bias", {H}, Planned::bias);
        }
        add("transformer.ln_f.weight", {H}, Planned::norm);
        add("transformer.ln_f.bias", {H}, Planned::bias);
        return p;
    }
    add("model.embed_tokens.weight", {V, H}, Planned::embedding);
    for (int l = 0; l < o.layers; ++l) {
        const std::string b = "model.layers." + std::to_string(l) + ".";
        add(b + "input_layernorm.weight", {H}, Planned::norm);
        const std::uint64_t kv =
            o.kv_heads > 0 ? H / static_cast<std::uint64_t>(o.heads) * static_cast<std::uint64_t>(o.kv_heads) : H;
        for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"})
            add(b + "self_attn." + m + ".weight", {m[0] == 'k' || m[0] == 'v' ? kv : H, H}, Planned::projection);
        add(b + "post_attention_layernorm.weight", {H}, Planned::norm);
        add(b + "mlp.gate_proj.weight", {I, H}, Planned::projection);
        add(b + "mlp.up_proj.weight", {I, H}, Planned::projection);
        add(b + "mlp.down_proj.weight", {H, I}, Planned::projection);
    }
    add("model.norm.weight", {H}, Planned::norm);
    add("lm_head.weight", {V, H}, Planned::embedding);
    return p;
}

/// The values of one tensor (row-major, float), deterministic in (seed, index).
pissa::RowMatrix<float> values(const Planned& t, std::uint64_t seed, std::uint64_t index) {
    pissa::detail::SplitMix64 rng(pissa::detail::stream_seed(seed, index));
    const auto rows = static_cast<pissa::Index>(t.spec.shape[0]);
    const auto cols = t.spec.shape.size() > 1 ? static_cast<pissa::Index>(t.spec.shape[1]) : pissa::Index(1);
    pissa::RowMatrix<float> m(rows, cols);
    switch (t.kind) {
        case Planned::norm:
            for (pissa::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(1.0 + 0.05 * rng.normal());
            return m;
        case Planned::bias:
            for (pissa::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(0.01 * rng.normal());
            return m;
        case Planned::embedding:
            for (pissa::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(0.02 * rng.normal());
            return m;
        case Planned::projection:
            break;
    }
    for (pissa::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(0.02 * rng.normal());
    constexpr int strong = 6;
    const double top = 0.2 * std::sqrt(static_cast<double>(rows + cols));
    pissa::Matrix<float> U(rows, strong), V(cols, strong);
    for (int k = 0; k < strong; ++k) {
        for (pissa::Index i = 0; i < rows; ++i) U(i, k) = static_cast<float>(rng.normal());
        for (pissa::Index j = 0; j < cols; ++j) V(j, k) = static_cast<float>(rng.normal());
        U.col(k).normalize();
        V.col(k).normalize();
        U.col(k) *= static_cast<float>(top * std::pow(0.7, k));
    }
    m.noalias() += U * V.transpose();
    return m;
}

}  // namespace

void generate_model(const fs::path& dir, const GenerateOptions& o, bool show_progress) {
    pissa::io::Dtype dtype{};
    if (!pissa::io::parse_dtype(o.dtype, dtype) || !pissa::io::is_float_dtype(dtype))
        throw UsageError("--dtype must be F32, F16, BF16 or F64, got '" + o.dtype + "'");
    if (o.arch != "llama" && o.arch != "gpt2") throw UsageError("--arch must be llama or gpt2, got '" + o.arch + "'");
    const auto tensors = plan(o, dtype);
    const std::size_t shards = static_cast<std::size_t>(std::min<int>(o.shards, static_cast<int>(tensors.size())));
    nlohmann::ordered_json index;
    index["metadata"]["total_size"] = 0;
    std::uint64_t total = 0, done_bytes = 0;
    Progress progress(show_progress);
    std::size_t next = 0;
    for (std::size_t s = 0; s < shards; ++s) {
        const std::size_t end = tensors.size() * (s + 1) / shards;
        const std::string file =
            shards == 1 ? "model.safetensors" : format("model-%05zu-of-%05zu.safetensors", s + 1, shards);
        std::vector<TensorSpec> specs;
        for (std::size_t i = next; i < end; ++i) specs.push_back(tensors[i].spec);
        pissa::io::SafetensorsWriter writer(dir / file, specs, {{"format", "pt"}});
        for (std::size_t i = next; i < end; ++i) {
            progress.update(i, tensors.size(), tensors[i].spec.name, done_bytes);
            const auto bytes = pissa::io::matrix_bytes(values(tensors[i], o.seed, i), dtype);
            writer.write(bytes.data(), bytes.size());
            done_bytes += bytes.size();
            index["weight_map"][tensors[i].spec.name] = file;
        }
        for (const auto& t : writer.tensors()) total += t.nbytes();
        writer.commit();
        next = end;
    }
    progress.finish();
    if (shards > 1) {
        index["metadata"]["total_size"] = total;
        pissa::io::detail::write_text_file(dir / pissa::io::index_file_name, index.dump(2) + "\n");
    }
    const char* torch_dtype = dtype == Dtype::BF16  ? "bfloat16"
                              : dtype == Dtype::F16 ? "float16"
                              : dtype == Dtype::F32 ? "float32"
                                                    : "float64";
    nlohmann::ordered_json config;
    if (o.arch == "gpt2") {
        config = {{"architectures", {"GPT2LMHeadModel"}},
                  {"model_type", "gpt2"},
                  {"n_embd", o.hidden},
                  {"n_layer", o.layers},
                  {"n_head", o.heads},
                  {"n_positions", 1024},
                  {"vocab_size", o.vocab},
                  {"torch_dtype", torch_dtype}};
    } else {
        config = {{"architectures", {"LlamaForCausalLM"}},
                  {"model_type", "llama"},
                  {"hidden_size", o.hidden},
                  {"intermediate_size", o.intermediate},
                  {"num_hidden_layers", o.layers},
                  {"num_attention_heads", o.heads},
                  {"num_key_value_heads", o.kv_heads > 0 ? o.kv_heads : o.heads},
                  {"vocab_size", o.vocab},
                  {"max_position_embeddings", 2048},
                  {"rms_norm_eps", 1e-5},
                  {"rope_theta", 10000.0},
                  {"hidden_act", "silu"},
                  {"tie_word_embeddings", false},
                  {"torch_dtype", torch_dtype}};
    }
    config["pissa_synthetic"] = {{"generator", "pissa generate"}, {"seed", o.seed}};
    pissa::io::detail::write_text_file(dir / "config.json", config.dump(2) + "\n");
}

fs::path builtin_model() {
    fs::path cache;
    if (const char* d = std::getenv("PISSA_CACHE_DIR"); d && *d) cache = d;
    else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) cache = fs::path(x) / "pissa";
    else if (const char* h = std::getenv("HOME"); h && *h) cache = fs::path(h) / ".cache" / "pissa";
    else cache = fs::temp_directory_path() / "pissa-cache";
    const fs::path model = cache / "builtin-llama-v1";
    if (fs::exists(model / "model.safetensors") && fs::exists(model / "config.json")) return model;
    std::fprintf(stderr, "pissa: generating the built-in model (4 layers, hidden 512, bf16) into %s\n",
                 model.string().c_str());
    pissa::io::OutputFolder out(model, true, {});
    generate_model(out.path(), GenerateOptions{}, stderr_is_tty());
    out.commit();
    return model;
}

int cmd_generate(int argc, char** argv) {
    Args args("generate", "--out DIR [options]",
              "Writes a deterministic synthetic checkpoint: Llama-shaped (nn.Linear weights [out, in]) or GPT-2\n"
              "shaped (Conv1D weights [in, out], for --fan-in-fan-out), with config.json. Projection weights\n"
              "have a few strong singular directions over a Gaussian noise bulk, like pretrained weights.");
    args.option("out", "DIR", "output folder (required)")
        .option("arch", "NAME", "llama or gpt2", "llama")
        .option("layers", "N", "number of layers", "4")
        .option("hidden", "N", "hidden size", "512")
        .option("intermediate", "N", "MLP size (llama)", "1376")
        .option("heads", "N", "attention heads", "8")
        .option("kv-heads", "N",
                "key/value heads (grouped-query attention, llama: k_proj and v_proj are\n"
                "                           [hidden / heads x N, hidden])",
                "heads")
        .option("vocab", "N", "vocabulary size", "2048")
        .option("dtype", "T", "BF16, F16, F32 or F64", "BF16")
        .option("shards", "N", "number of shard files (>1 writes model.safetensors.index.json)", "1")
        .option("seed", "S", "random seed", "0")
        .flag("force", "replace DIR if it exists");
    if (!args.parse(argc, argv)) return 0;
    GenerateOptions o;
    o.arch = args.get("arch");
    o.layers = static_cast<int>(args.get_int("layers", 1, 1000));
    o.hidden = static_cast<int>(args.get_int("hidden", 8, 65536));
    o.intermediate = static_cast<int>(args.get_int("intermediate", 8, 262144));
    o.heads = static_cast<int>(args.get_int("heads", 1, 1024));
    if (args.has("kv-heads")) {
        o.kv_heads = static_cast<int>(args.get_int("kv-heads", 1, 1024));
        if (o.hidden % o.heads != 0 || o.heads % o.kv_heads != 0)
            throw UsageError("--kv-heads needs --heads dividing --hidden and --kv-heads dividing --heads");
    }
    o.vocab = static_cast<int>(args.get_int("vocab", 8, 1 << 20));
    o.shards = static_cast<int>(args.get_int("shards", 1, 1000));
    o.dtype = args.get("dtype");
    for (auto& c : o.dtype) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    o.seed = args.get_u64("seed");
    if (!args.has("out")) throw UsageError("--out is required");
    pissa::io::OutputFolder out(args.get("out"), args.has("force"), {});
    generate_model(out.path(), o, stderr_is_tty());
    out.commit();
    std::fprintf(stderr, "pissa generate: wrote %s\n", out.final_path().string().c_str());
    return 0;
}

}  // namespace pissa_tool

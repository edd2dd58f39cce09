// Tests for io/gguf.hpp: the GGUF bytes of an exported adapter, read back by a minimal reader written
// here from the format's definition (not the writer's code): header, KVs, tensor infos in ggml order,
// alignment, data; llama.cpp's shape checks; the q/k row permutation against numpy's reshape /
// swapaxes semantics; the scaling fold against the adapter's own s B A; and the refusals.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/gguf.hpp>

#include <cmath>
#include <cstring>
#include <map>

using namespace pissa::io;
using pissa::Index;
using pissa_test::ScratchDir;

namespace {

/// A GGUF file as read back: KVs (type code + value), tensor infos, the data section.
struct ReadGguf {
    std::uint32_t version = 0;
    struct Kv {
        std::uint32_t type = 0;
        std::string str;
        std::uint32_t u32 = 0;
        float f32 = 0;
        bool boolean = false;
    };
    std::vector<std::string> keys;  // in file order
    std::map<std::string, Kv> kvs;
    struct Tensor {
        std::string name;
        std::vector<std::uint64_t> ne;  // ggml order
        std::uint32_t type = 0;
        std::uint64_t offset = 0;
    };
    std::vector<Tensor> tensors;
    std::uint64_t data_offset = 0;
    std::string bytes;

    const Tensor& tensor(const std::string& name) const {
        for (const auto& t : tensors)
            if (t.name == name) return t;
        throw std::runtime_error("no tensor " + name);
    }
    /// The tensor's values as floats (F32 or F16), row-major over the numpy shape (ne reversed).
    std::vector<float> values(const Tensor& t) const {
        std::uint64_t n = 1;
        for (auto d : t.ne) n *= d;
        std::vector<float> out(n);
        const char* p = bytes.data() + data_offset + t.offset;
        for (std::uint64_t i = 0; i < n; ++i) {
            if (t.type == 0) {
                std::memcpy(&out[i], p + 4 * i, 4);
            } else {
                Eigen::half h;
                std::memcpy(static_cast<void*>(&h), p + 2 * i, 2);
                out[i] = static_cast<float>(h);
            }
        }
        return out;
    }
    /// The tensor as a matrix [ne[1], ne[0]] (numpy's [rows, cols]).
    pissa::RowMatrix<float> matrix(const std::string& name) const {
        const Tensor& t = tensor(name);
        REQUIRE(t.ne.size() == 2);
        const auto v = values(t);
        return Eigen::Map<const pissa::RowMatrix<float>>(v.data(), static_cast<Eigen::Index>(t.ne[1]),
                                                         static_cast<Eigen::Index>(t.ne[0]));
    }
};

/// Reads a GGUF file: little-endian fields as the format defines them.
ReadGguf read_gguf(const std::filesystem::path& path) {
    ReadGguf g;
    g.bytes = pissa_test::read_bytes(path);
    std::size_t pos = 0;
    auto take = [&](std::size_t n) {
        REQUIRE(pos + n <= g.bytes.size());
        const char* p = g.bytes.data() + pos;
        pos += n;
        return p;
    };
    auto u32 = [&] {
        std::uint32_t v = 0;
        for (int i = 0; i < 4; ++i) v |= std::uint32_t(static_cast<unsigned char>(take(1)[0])) << (8 * i);
        return v;
    };
    auto u64 = [&] {
        std::uint64_t v = 0;
        for (int i = 0; i < 8; ++i) v |= std::uint64_t(static_cast<unsigned char>(take(1)[0])) << (8 * i);
        return v;
    };
    auto str = [&] {
        const std::uint64_t n = u64();
        return std::string(take(static_cast<std::size_t>(n)), static_cast<std::size_t>(n));
    };
    REQUIRE(std::string(take(4), 4) == "GGUF");
    g.version = u32();
    const std::uint64_t n_tensors = u64(), n_kv = u64();
    for (std::uint64_t i = 0; i < n_kv; ++i) {
        const std::string key = str();
        ReadGguf::Kv kv;
        kv.type = u32();
        if (kv.type == 8) {
            kv.str = str();
        } else if (kv.type == 4) {
            kv.u32 = u32();
        } else if (kv.type == 6) {
            const std::uint32_t bits = u32();
            std::memcpy(&kv.f32, &bits, 4);
        } else if (kv.type == 7) {
            kv.boolean = take(1)[0] != 0;
        } else {
            FAIL("unexpected KV type " << kv.type);
        }
        REQUIRE(g.kvs.emplace(key, kv).second);
        g.keys.push_back(key);
    }
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
        ReadGguf::Tensor t;
        t.name = str();
        const std::uint32_t n_dims = u32();
        for (std::uint32_t d = 0; d < n_dims; ++d) t.ne.push_back(u64());
        t.type = u32();
        t.offset = u64();
        g.tensors.push_back(t);
    }
    const std::uint64_t alignment = g.kvs.count("general.alignment") ? g.kvs["general.alignment"].u32 : 32;
    g.data_offset = (pos + alignment - 1) / alignment * alignment;
    for (std::size_t i = pos; i < g.data_offset; ++i) CHECK(g.bytes[i] == '\0');
    return g;
}

/// numpy's `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`, from
/// the definitions of reshape (row-major index arithmetic) and swapaxes (exchange two indices).
pissa::RowMatrix<float> numpy_permute(const pissa::RowMatrix<float>& w, Index n_head) {
    const Index rows = w.rows(), half = rows / n_head / 2;
    pissa::RowMatrix<float> out(rows, w.cols());
    for (Index r = 0; r < rows; ++r) {
        // r in the swapped shape (n_head, half, 2): indices (h, j, k); it reads source (h, k, j) of
        // the shape (n_head, 2, half).
        const Index h = r / (half * 2), j = (r / 2) % half, k = r % 2;
        out.row(r) = w.row(h * (2 * half) + k * half + j);
    }
    return out;
}

LoraModule make_module(const std::string& name, Index r, Index in, Index out, std::uint64_t seed) {
    LoraModule m;
    m.A = pissa_test::gaussian<float>(r, in, seed);
    m.B = pissa_test::gaussian<float>(out, r, seed + 1);
    m.name = name;
    return m;
}

/// A Llama-shaped adapter: hidden 32, 4 heads of 8 (2 key/value heads), intermediate 24, r 4.
Adapter llama_adapter(double alpha = 8) {
    Adapter a;
    a.config.r = 4;
    a.config.lora_alpha = alpha;
    a.config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"};
    a.modules.push_back(make_module("model.layers.0.self_attn.q_proj", 4, 32, 32, 10));
    a.modules.push_back(make_module("model.layers.0.self_attn.k_proj", 4, 32, 16, 20));
    a.modules.push_back(make_module("model.layers.0.self_attn.v_proj", 4, 32, 16, 30));
    a.modules.push_back(make_module("model.layers.1.self_attn.o_proj", 4, 32, 32, 40));
    a.modules.push_back(make_module("model.layers.1.mlp.down_proj", 4, 24, 32, 50));
    return a;
}

BaseModelConfig llama_base(const std::string& type = "llama") {
    BaseModelConfig c;
    c.model_type = type;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.num_hidden_layers = 2;
    return c;
}

/// llama.cpp's scale for a tensor pair: alpha / rank (rank = lora_b's ne[0]), 1 when alpha is 0.
double llama_scale(const ReadGguf& g, const std::string& base) {
    const float alpha = g.kvs.at("adapter.lora.alpha").f32;
    const auto rank = static_cast<double>(g.tensor(base + ".weight.lora_b").ne[0]);
    return alpha != 0 ? alpha / rank : 1.0;
}

/// The delta llama.cpp adds, scale * B' A, from the file.
pissa::RowMatrix<double> file_delta(const ReadGguf& g, const std::string& base) {
    return llama_scale(g, base) * g.matrix(base + ".weight.lora_b").cast<double>() *
           g.matrix(base + ".weight.lora_a").cast<double>();
}

double rel_err(const pissa::RowMatrix<double>& a, const pissa::RowMatrix<double>& b) {
    return (a - b).norm() / b.norm();
}

}  // namespace

TEST_CASE("gguf: header, KVs, tensor infos in ggml order, 32-byte alignment and data as llama.cpp reads them") {
    ScratchDir dir("gguf-layout");
    Adapter a;
    a.config.r = 4;
    a.config.lora_alpha = 8;
    a.config.target_modules = {"q_proj", "down_proj", "lm_head"};
    a.modules.push_back(make_module("model.layers.0.self_attn.q_proj", 4, 12, 12, 1));
    a.modules.push_back(make_module("model.layers.1.mlp.down_proj", 4, 20, 12, 2));
    a.modules.push_back(make_module("lm_head", 4, 12, 33, 3));
    GgufExportOptions options;
    options.arch = GgufArch::qwen2;
    options.name = "tiny";
    const auto plan = export_gguf(a, options, dir / "a.gguf");
    CHECK(plan.alpha == 8);
    CHECK_FALSE(plan.folded());

    const ReadGguf g = read_gguf(dir / "a.gguf");
    CHECK(g.version == 3);
    CHECK(g.keys == std::vector<std::string>{"general.architecture", "general.type", "general.name", "adapter.type",
                                             "adapter.lora.alpha", "general.alignment"});
    CHECK(g.kvs.at("general.architecture").type == 8);
    CHECK(g.kvs.at("general.architecture").str == "qwen2");
    CHECK(g.kvs.at("general.type").str == "adapter");
    CHECK(g.kvs.at("general.name").str == "tiny");
    CHECK(g.kvs.at("adapter.type").str == "lora");
    CHECK(g.kvs.at("adapter.lora.alpha").type == 6);
    CHECK(g.kvs.at("adapter.lora.alpha").f32 == 8.0f);
    CHECK(g.kvs.at("general.alignment").type == 4);
    CHECK(g.kvs.at("general.alignment").u32 == 32);

    const std::vector<std::string> names = {"blk.0.attn_q.weight.lora_a",   "blk.0.attn_q.weight.lora_b",
                                            "blk.1.ffn_down.weight.lora_a", "blk.1.ffn_down.weight.lora_b",
                                            "output.weight.lora_a",         "output.weight.lora_b"};
    REQUIRE(g.tensors.size() == names.size());
    CHECK(g.data_offset % 32 == 0);
    std::uint64_t expected_offset = 0;
    for (std::size_t i = 0; i < names.size(); ++i) {
        const auto& t = g.tensors[i];
        CHECK(t.name == names[i]);
        CHECK(t.type == 0);
        CHECK(t.offset == expected_offset);  // ggml/src/gguf.cpp: the running sum of padded sizes
        const LoraModule& m = a.modules[i / 2];
        const pissa::Matrix<float>& x = i % 2 == 0 ? m.A : m.B;
        REQUIRE(t.ne.size() == 2);
        CHECK(t.ne[0] == static_cast<std::uint64_t>(x.cols()));  // numpy shape reversed
        CHECK(t.ne[1] == static_cast<std::uint64_t>(x.rows()));
        const pissa::RowMatrix<float> rm = x;
        CHECK(std::memcmp(g.bytes.data() + g.data_offset + t.offset, rm.data(), 4 * rm.size()) == 0);
        expected_offset += (4 * rm.size() + 31) / 32 * 32;
    }
    CHECK(g.bytes.size() == g.data_offset + expected_offset);
    // llama_adapter_lora_init_impl's checks with the model tensor W [out, in] (ne [in, out]).
    for (const auto& m : a.modules) {
        const std::string base = gguf_tensor_name(m.name);
        const auto& ta = g.tensor(base + ".weight.lora_a");
        const auto& tb = g.tensor(base + ".weight.lora_b");
        const std::uint64_t model_ne0 = static_cast<std::uint64_t>(m.A.cols()),
                            model_ne1 = static_cast<std::uint64_t>(m.B.rows());
        CHECK(model_ne0 == ta.ne[0]);
        CHECK(model_ne1 == tb.ne[1]);
        CHECK(ta.ne[1] == tb.ne[0]);
    }
    // Nothing but the file itself is left in the folder.
    CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), {}) == 1);
}

TEST_CASE("gguf: F16 output holds the values rounded to half, with ggml type 1") {
    ScratchDir dir("gguf-f16");
    Adapter a = llama_adapter();
    GgufExportOptions options;
    options.arch = GgufArch::qwen2;
    options.type = GgmlType::F16;
    export_gguf(a, options, dir / "a.gguf");
    const ReadGguf g = read_gguf(dir / "a.gguf");
    for (const auto& t : g.tensors) CHECK(t.type == 1);
    const pissa::RowMatrix<float> A = a.modules[0].A, back = g.matrix("blk.0.attn_q.weight.lora_a");
    for (Index i = 0; i < A.rows(); ++i)
        for (Index j = 0; j < A.cols(); ++j) CHECK(back(i, j) == static_cast<float>(Eigen::half(A(i, j))));
    CHECK(g.kvs.at("adapter.lora.alpha").f32 == 8.0f);
}

TEST_CASE("gguf: Hugging Face -> GGUF names of the Llama / Mistral / Qwen2 layout; others refused") {
    CHECK(gguf_tensor_name("model.layers.0.self_attn.q_proj") == "blk.0.attn_q");
    CHECK(gguf_tensor_name("model.layers.7.self_attn.k_proj") == "blk.7.attn_k");
    CHECK(gguf_tensor_name("model.layers.12.self_attn.v_proj") == "blk.12.attn_v");
    CHECK(gguf_tensor_name("model.layers.3.self_attn.o_proj") == "blk.3.attn_output");
    CHECK(gguf_tensor_name("model.layers.3.mlp.gate_proj") == "blk.3.ffn_gate");
    CHECK(gguf_tensor_name("model.layers.3.mlp.up_proj") == "blk.3.ffn_up");
    CHECK(gguf_tensor_name("model.layers.31.mlp.down_proj") == "blk.31.ffn_down");
    CHECK(gguf_tensor_name("lm_head") == "output");
    CHECK(gguf_tensor_name("model.embed_tokens") == "token_embd");
    for (const char* bad : {"transformer.h.0.attn.c_attn", "model.layers.x.self_attn.q_proj",
                            "model.layers.01.mlp.up_proj", "model.layers.0.self_attn.q_proj.base_layer",
                            "model.layers..mlp.up_proj", "model.norm", "base_model.model.lm_head"})
        CHECK_THROWS_WITH_AS(gguf_tensor_name(bad), doctest::Contains((std::string("module '") + bad + "'").c_str()),
                             pissa::invalid_argument);
    CHECK(gguf_arch_from_name("mistral") == GgufArch::mistral);
    CHECK(std::string(gguf_general_architecture(GgufArch::mistral)) == "llama");
    CHECK(std::string(gguf_general_architecture(GgufArch::qwen2)) == "qwen2");
    CHECK_THROWS_WITH_AS(gguf_arch_from_name("gpt2"), doctest::Contains("'gpt2' is not supported"),
                         pissa::invalid_argument);
}

TEST_CASE("gguf: permute_qk_rows is numpy's reshape(n_head, 2, d/2, cols).swapaxes(1, 2)") {
    const pissa::RowMatrix<float> w = pissa_test::gaussian<float>(24, 5, 7);
    for (Index heads : {1, 2, 3, 6, 12}) CHECK(permute_qk_rows(w, heads) == numpy_permute(w, heads));
    // head 0 of 4 rows [r0, r1, r2, r3] -> [r0, r2, r1, r3]
    const pissa::RowMatrix<float> p = permute_qk_rows(w, 6);
    CHECK(p.row(1) == w.row(2));
    CHECK(p.row(2) == w.row(1));
    CHECK_THROWS_WITH_AS(permute_qk_rows(w, 5), doctest::Contains("do not split into 5 heads"),
                         pissa::invalid_argument);
    CHECK_THROWS_AS(permute_qk_rows(w, 24), pissa::invalid_argument);  // heads of 1 row: no pairs
}

TEST_CASE("gguf: llama and mistral permute q_proj / k_proj rows of B by their head counts; qwen2 does not") {
    ScratchDir dir("gguf-perm");
    const Adapter a = llama_adapter();
    for (GgufArch arch : {GgufArch::llama, GgufArch::mistral, GgufArch::qwen2}) {
        CAPTURE(gguf_arch_name(arch));
        GgufExportOptions options;
        options.arch = arch;
        options.base = llama_base(gguf_arch_name(arch));
        const auto path = dir / (std::string(gguf_arch_name(arch)) + ".gguf");
        const auto plan = export_gguf(a, options, path);
        const ReadGguf g = read_gguf(path);
        CHECK(g.kvs.at("general.architecture").str == (arch == GgufArch::qwen2 ? "qwen2" : "llama"));
        const bool permutes = arch != GgufArch::qwen2;
        CHECK(plan.modules[0].qk_heads == (permutes ? 4 : 0));
        CHECK(plan.modules[1].qk_heads == (permutes ? 2 : 0));
        for (const auto& m : a.modules) {
            const std::string base = gguf_tensor_name(m.name);
            const pissa::RowMatrix<float> A = m.A, B = m.B;
            CHECK(g.matrix(base + ".weight.lora_a") == A);  // A is never permuted
            const bool q = base == "blk.0.attn_q", k = base == "blk.0.attn_k";
            const pissa::RowMatrix<float> expected = permutes && q   ? numpy_permute(B, 4)
                                                     : permutes && k ? numpy_permute(B, 2)
                                                                     : B;
            CHECK(g.matrix(base + ".weight.lora_b") == expected);
        }
    }
}

TEST_CASE("gguf: scaling: one alpha when every module agrees, else per-module scaling folded into B") {
    ScratchDir dir("gguf-fold");
    GgufExportOptions options;
    options.arch = GgufArch::llama;
    options.base = llama_base();
    auto check_effective = [&](const Adapter& a, const std::filesystem::path& path) {
        const ReadGguf g = read_gguf(path);
        const ModuleMatcher matcher(a.config);
        for (const auto& m : a.modules) {
            CAPTURE(m.name);
            const std::string base = gguf_tensor_name(m.name);
            pissa::RowMatrix<float> B = m.B;
            if (base == "blk.0.attn_q") B = numpy_permute(B, 4);
            if (base == "blk.0.attn_k") B = numpy_permute(B, 2);
            const pissa::RowMatrix<double> want =
                matcher.scaling_for(m.name) * B.cast<double>() * pissa::RowMatrix<float>(m.A).cast<double>();
            CHECK(rel_err(file_delta(g, base), want) < 1e-6);
        }
        return g;
    };
    auto with_rank = [](Adapter a, const std::string& module, Index r, std::uint64_t seed) {
        for (auto& m : a.modules)
            if (m.name == module) {
                m.A = pissa_test::gaussian<float>(r, m.A.cols(), seed);
                m.B = pissa_test::gaussian<float>(m.B.rows(), r, seed + 1);
            }
        return a;
    };

    SUBCASE("rank_pattern alone: lora_alpha written, B untouched (llama.cpp divides by each tensor's rank)") {
        Adapter a = with_rank(llama_adapter(), "model.layers.0.self_attn.v_proj", 2, 90);
        a.config.rank_pattern = {{"v_proj", 2}};
        const auto plan = export_gguf(a, options, dir / "a.gguf");
        CHECK(plan.alpha == 8);
        CHECK_FALSE(plan.folded());
        const ReadGguf g = check_effective(a, dir / "a.gguf");
        CHECK(g.kvs.at("adapter.lora.alpha").f32 == 8.0f);
        CHECK(g.matrix("blk.0.attn_v.weight.lora_b") == pissa::RowMatrix<float>(a.modules[2].B));
    }
    SUBCASE("alpha_pattern: lora_alpha written, the other module's B folded") {
        Adapter a = llama_adapter();
        a.config.alpha_pattern = {{"v_proj", 32}};
        const auto plan = export_gguf(a, options, dir / "a.gguf");
        CHECK(plan.alpha == 8);
        CHECK(plan.folded());
        for (const auto& p : plan.modules) CHECK(p.fold == (p.module == "model.layers.0.self_attn.v_proj" ? 4 : 1));
        const ReadGguf g = check_effective(a, dir / "a.gguf");
        CHECK(g.matrix("blk.1.ffn_down.weight.lora_b") == pissa::RowMatrix<float>(a.modules[4].B));
    }
    SUBCASE("rsLoRA without rank_pattern: alpha = lora_alpha sqrt(r), nothing folded") {
        Adapter a = llama_adapter();
        a.config.use_rslora = true;
        const auto plan = export_gguf(a, options, dir / "a.gguf");
        CHECK(plan.alpha == doctest::Approx(16));
        CHECK_FALSE(plan.folded());
        check_effective(a, dir / "a.gguf");
    }
    SUBCASE("rsLoRA with rank_pattern: the modules of another rank folded") {
        Adapter a = with_rank(llama_adapter(), "model.layers.1.mlp.down_proj", 9, 91);
        a.config.use_rslora = true;
        a.config.rank_pattern = {{"down_proj", 9}};
        const auto plan = export_gguf(a, options, dir / "a.gguf");
        CHECK(plan.alpha == doctest::Approx(16));
        CHECK(plan.modules[4].fold == doctest::Approx(3.0 / 2.0));  // s r / alpha = (8 / 3) 9 / 16
        check_effective(a, dir / "a.gguf");
    }
    SUBCASE("alpha_pattern on every module alike: that alpha written, nothing folded") {
        Adapter a = llama_adapter();
        a.config.alpha_pattern = {{"model.*", 2}};
        const auto plan = export_gguf(a, options, dir / "a.gguf");
        CHECK(plan.alpha == 2);
        CHECK_FALSE(plan.folded());
        check_effective(a, dir / "a.gguf");
    }
    SUBCASE("lora_alpha 0: alpha 1 written (0 would mean scale 1), B folded to zero") {
        Adapter a = llama_adapter(0);
        const auto plan = export_gguf(a, options, dir / "a.gguf");
        CHECK(plan.alpha == 1);
        const ReadGguf g = read_gguf(dir / "a.gguf");
        CHECK(g.kvs.at("adapter.lora.alpha").f32 == 1.0f);
        CHECK(g.matrix("blk.0.attn_v.weight.lora_b").isZero(0));
    }
}

TEST_CASE("gguf: refusals name the problem and write nothing") {
    ScratchDir dir("gguf-refuse");
    const auto path = dir / "a.gguf";
    GgufExportOptions options;
    options.arch = GgufArch::llama;
    options.base = llama_base();
    auto refused = [&](const Adapter& a, const GgufExportOptions& o, const std::string& message) {
        CHECK_THROWS_WITH_AS(export_gguf(a, o, path), doctest::Contains(message.c_str()), pissa::invalid_argument);
        CHECK(std::filesystem::is_empty(dir.path()));
    };
    {
        Adapter a = llama_adapter();
        a.config.fan_in_fan_out = true;
        refused(a, options, "fan_in_fan_out");
    }
    {
        Adapter a = llama_adapter();
        a.config.target_modules.push_back("c_attn");
        a.modules.push_back(make_module("transformer.h.0.attn.c_attn", 4, 32, 96, 60));
        refused(a, options, "module 'transformer.h.0.attn.c_attn' has no GGUF tensor name");
    }
    {
        Adapter a = llama_adapter();
        a.config.target_modules.push_back("embed_tokens");
        a.modules.push_back(make_module("model.embed_tokens", 4, 32, 100, 61));
        refused(a, options, "embedding adapters are not supported");
    }
    {
        GgufExportOptions no_base = options;
        no_base.base.reset();
        refused(llama_adapter(), no_base, "pass --base MODEL_DIR");
        no_base.arch = GgufArch::qwen2;  // no permutation, no base config needed
        CHECK_NOTHROW(plan_gguf_export(llama_adapter(), no_base));
        Adapter v_only;
        v_only.config.target_modules = {"v_proj"};
        v_only.modules.push_back(make_module("model.layers.0.self_attn.v_proj", 4, 32, 16, 62));
        no_base.arch = GgufArch::llama;  // no q_proj / k_proj, no base config needed
        CHECK_NOTHROW(plan_gguf_export(v_only, no_base));
    }
    {
        GgufExportOptions other = options;
        other.base->model_type = "qwen2";
        refused(llama_adapter(), other, "model_type 'qwen2', not 'llama'");
        other = options;
        other.base->num_attention_heads = 3;
        refused(llama_adapter(), other, "32 output rows do not split into 3 heads");
        other = options;
        other.base->num_hidden_layers = 1;
        refused(llama_adapter(), other, "the base model has only 1 layers");
        Adapter head = llama_adapter();
        head.config.target_modules.push_back("lm_head");
        head.modules.push_back(make_module("lm_head", 4, 32, 100, 63));
        other = options;
        other.base->tie_word_embeddings = true;
        refused(head, other, "tie_word_embeddings");
    }
    {
        Adapter a = llama_adapter();
        a.modules[3].B(0, 0) = std::nanf("");
        refused(a, options, "module 'model.layers.1.self_attn.o_proj': B has a non-finite value");
        a = llama_adapter();
        a.modules[3].B(0, 0) = 1e5f;
        GgufExportOptions f16 = options;
        f16.type = GgmlType::F16;
        refused(a, f16, "beyond float16's range");
        CHECK_NOTHROW(export_gguf(a, options, path));  // fine in F32
    }
}

TEST_CASE("gguf: modules that target_modules does not select are left out, as peft ignores them") {
    ScratchDir dir("gguf-skip");
    Adapter a = llama_adapter();
    a.config.target_modules = {"q_proj", "down_proj"};
    GgufExportOptions options;
    options.arch = GgufArch::qwen2;
    const auto plan = export_gguf(a, options, dir / "a.gguf");
    CHECK(plan.skipped == std::vector<std::string>{"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                                                   "model.layers.1.self_attn.o_proj"});
    REQUIRE(plan.modules.size() == 2);
    CHECK(plan.modules[1].index == 4);
    const ReadGguf g = read_gguf(dir / "a.gguf");
    REQUIRE(g.tensors.size() == 4);
    CHECK(g.matrix("blk.1.ffn_down.weight.lora_b") == pissa::RowMatrix<float>(a.modules[4].B));
    a.config.target_modules = {"gate_proj"};
    CHECK_THROWS_WITH_AS(export_gguf(a, options, dir / "b.gguf"),
                         doctest::Contains("no module that its target_modules"), pissa::invalid_argument);
}

TEST_CASE("gguf: without replace, an existing file is kept and no temporary file is left") {
    ScratchDir dir("gguf-replace");
    const auto path = dir / "a.gguf";
    pissa_test::write_bytes(path, "keep me");
    GgufExportOptions options;
    options.arch = GgufArch::qwen2;
    CHECK_THROWS_WITH_AS(export_gguf(llama_adapter(), options, path, false), doctest::Contains("appeared"),
                         pissa::invalid_argument);
    CHECK(pissa_test::read_bytes(path) == "keep me");
    CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), {}) == 1);
    export_gguf(llama_adapter(), options, path, true);
    CHECK(read_gguf(path).version == 3);
    CHECK_THROWS_WITH_AS(gguf_header({{"general.alignment", std::uint32_t{64}}}, {}, "x.gguf"),
                         doctest::Contains("'general.alignment' is empty, duplicated or reserved"),
                         pissa::invalid_argument);
    CHECK_THROWS_WITH_AS(gguf_header({}, {{std::string(64, 'n'), {1}, GgmlType::F32, {0, 0, 0, 0}}}, "x.gguf"),
                         doctest::Contains("longer than 63 bytes"), pissa::invalid_argument);
}

TEST_CASE("gguf: read_base_model_config reads head and layer counts; num_key_value_heads defaults to heads") {
    ScratchDir dir("gguf-config");
    pissa_test::write_bytes(dir / "config.json",
                            R"({"model_type":"mistral","num_attention_heads":32,"num_hidden_layers":2,
                                "tie_word_embeddings":false})");
    const BaseModelConfig c = read_base_model_config(dir.path());
    CHECK(c.model_type == "mistral");
    CHECK(c.num_attention_heads == 32);
    CHECK(c.num_key_value_heads == 32);
    CHECK(c.num_hidden_layers == 2);
    CHECK_FALSE(c.tie_word_embeddings);
    pissa_test::write_bytes(dir / "config.json", R"({"num_attention_heads":"32"})");
    CHECK_THROWS_WITH_AS(read_base_model_config(dir.path()),
                         doctest::Contains("field 'num_attention_heads' must be an integer"), format_error);
    CHECK_THROWS_WITH_AS(read_base_model_config(dir / "missing"), doctest::Contains("no config.json"), format_error);
}

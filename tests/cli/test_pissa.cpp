// End-to-end tests of the pissa tool: runs the binary on generated checkpoints (Llama- and GPT-2
// shaped, single and sharded) and checks what it writes with the io library.
#include "cli/cli_support.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/tensor.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <set>

using namespace pissa::io;
using namespace pissa_cli_test;

TEST_CASE("init on the built-in model: residual model + peft adapter with the reference layout") {
    ScratchDir dir("cli-init");
    const Run r = pissa_run(dir, "init --out out");
    INFO(r.err);
    REQUIRE(r.code == 0);
    CHECK(r.out.find("kept energy") != std::string::npos);
    const Checkpoint in(dir / ".cache" / "builtin-llama-v1");
    const Checkpoint out(dir / "out");
    CHECK(fs::exists(dir / "out" / "config.json"));
    CHECK(pissa_test::read_bytes(dir / "out" / "config.json") ==
          pissa_test::read_bytes(dir / ".cache" / "builtin-llama-v1" / "config.json"));
    REQUIRE(out.tensor_names() == in.tensor_names());
    CHECK(out.shards()[0]->metadata() == in.shards()[0]->metadata());
    CHECK(out.shards()[0]->path().filename() == "model.safetensors");

    const Adapter adapter = read_adapter(dir / "out" / "pissa_init");
    CHECK(adapter.modules.size() == 8);  // q_proj, v_proj in 4 layers
    int targets = 0;
    for (const auto& name : in.tensor_names()) {
        const TensorInfo& a = *in.find(name);
        const TensorInfo& b = *out.find(name);
        CHECK(a.dtype == b.dtype);
        CHECK(a.shape == b.shape);
        const std::string module = module_of_weight(name);
        const bool is_target = adapter.config.targets(module);
        if (!is_target) {
            CHECK(bytes_of(in, name) == bytes_of(out, name));
            continue;
        }
        ++targets;
        CHECK(a.dtype == Dtype::BF16);
        const LoraModule* m = adapter.find(module);
        REQUIRE(m != nullptr);
        CHECK(m->A.rows() == 8);
        CHECK(m->A.cols() == static_cast<pissa::Index>(a.shape[1]));
        CHECK(m->B.rows() == static_cast<pissa::Index>(a.shape[0]));
        // W_res + s B A == W up to one bf16 rounding of W_res (relative 2^-8 per entry).
        const pissa::Matrix<double> W = weight(in, name), W_res = weight(out, name);
        const pissa::Matrix<double> back = W_res + (m->B * m->A).cast<double>();  // s = 1 (alpha = r = 8)
        const double err = pissa_test::relative_error(back, W);
        INFO(name, " reconstruction error ", err);
        CHECK(err < 4e-3);
        CHECK(pissa_test::relative_error(W_res, W) > 0.1);  // the principal part really moved to the adapter
    }
    CHECK(targets == 8);

    SafetensorsFile weights(dir / "out" / "pissa_init" / adapter_weights_name);
    const auto& A = weights.at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    const auto& B = weights.at("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
    CHECK(A.dtype == Dtype::F32);
    CHECK(A.shape == std::vector<std::uint64_t>{8, 512});
    CHECK(B.shape == std::vector<std::uint64_t>{512, 8});
    CHECK(weights.metadata().at("format") == "pt");
    CHECK(weights.metadata().at("pissa.method") == "randomized");
    CHECK(weights.metadata().at("pissa.niter") == "4");
    CHECK(weights.metadata().at("pissa.seed") == "0");
    const auto config = nlohmann::json::parse(pissa_test::read_bytes(dir / "out" / "pissa_init" / adapter_config_name));
    CHECK(config["init_lora_weights"] == true);
    CHECK(config["r"] == 8);
    CHECK(config["lora_alpha"] == 8.0);
    CHECK(config["target_modules"] == nlohmann::json::array({"q_proj", "v_proj"}));
    CHECK(config["use_rslora"] == false);
    CHECK(config["fan_in_fan_out"] == false);
    CHECK(config["peft_type"] == "LORA");
    CHECK(config["task_type"] == "CAUSAL_LM");
    CHECK(config["bias"] == "none");
    CHECK(config["lora_dropout"] == 0.0);
    CHECK(entries(dir.path()) == std::set<std::string>{".cache", "out"});
}

TEST_CASE("--seed reproduces a run bit for bit; another seed changes the adapter") {
    ScratchDir dir("cli-seed");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    REQUIRE(pissa_run(dir, "init m --out a --seed 7 --rank 4").code == 0);
    REQUIRE(pissa_run(dir, "init m --out b --seed 7 --rank 4 --threads 1").code == 0);
    REQUIRE(pissa_run(dir, "init m --out c --seed 8 --rank 4").code == 0);
    const auto adapter = [&](const char* d) {
        return pissa_test::read_bytes(dir / d / "pissa_init" / adapter_weights_name);
    };
    CHECK(adapter("a") == adapter("b"));
    CHECK(pissa_test::read_bytes(dir / "a" / "model.safetensors") ==
          pissa_test::read_bytes(dir / "b" / "model.safetensors"));
    CHECK(adapter("a") != adapter("c"));
    // the generator itself is deterministic
    REQUIRE(pissa_run(dir, "generate --out m2 " + small_llama).code == 0);
    CHECK(pissa_test::read_bytes(dir / "m" / "model.safetensors") ==
          pissa_test::read_bytes(dir / "m2" / "model.safetensors"));
}

TEST_CASE("--products: float32 products as torch computes them, recorded in the adapter; bad values refused") {
    ScratchDir dir("cli-products");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    const Run automatic = pissa_run(dir, "init m --out a --rank 4 --json");
    const Run f32 = pissa_run(dir, "init m --out f --rank 4 --products float32 --json");
    INFO(f32.err);
    REQUIRE(automatic.code == 0);
    REQUIRE(f32.code == 0);
    const auto ja = nlohmann::json::parse(automatic.out), jf = nlohmann::json::parse(f32.out);
    CHECK(ja["products"] == "auto");
    CHECK(jf["products"] == "float32");
    CHECK(read_adapter(dir / "f" / "pissa_init").metadata.at("pissa.products") == "float32");
    CHECK(read_adapter(dir / "a" / "pissa_init").metadata.at("pissa.products") == "auto");
    for (std::size_t i = 0; i < ja["modules"].size(); ++i) {
        const double a = ja["modules"][i]["energy_fraction"], b = jf["modules"][i]["energy_fraction"];
        CHECK(std::abs(a - b) <= 1e-3 * a);
    }
    const Run bad = pissa_run(dir, "init m --out b --products fp8");
    CHECK(bad.code == 2);
    CHECK(bad.err.find("--products must be auto, float32 or bfloat16, got 'fp8'") != std::string::npos);
    const Run exact = pissa_run(dir, "init m --out e --exact --products float32");
    CHECK(exact.code == 2);
    CHECK(exact.err.find("--products applies to the randomized SVD only") != std::string::npos);
    CHECK(!std::filesystem::exists(dir / "b"));
}

TEST_CASE("--fused: the fused power step keeps the same subspace and says so in the adapter") {
    ScratchDir dir("cli-fused");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    const Run standard = pissa_run(dir, "init m --out a --rank 4 --json");
    const Run fused = pissa_run(dir, "init m --out f --rank 4 --fused --json");
    INFO(fused.err);
    REQUIRE(standard.code == 0);
    REQUIRE(fused.code == 0);
    const auto js = nlohmann::json::parse(standard.out), jf = nlohmann::json::parse(fused.out);
    CHECK(js["fused_power_iteration"] == false);
    CHECK(jf["fused_power_iteration"] == true);
    REQUIRE(jf["modules"].size() == js["modules"].size());
    for (std::size_t i = 0; i < js["modules"].size(); ++i) {
        // 1e-3: on a CPU with AMX both runs round the products' skinny operand to bfloat16 (the
        // default for a bfloat16 W), which moves the kept energy by a few 1e-4 either way.
        const double a = js["modules"][i]["energy_fraction"], b = jf["modules"][i]["energy_fraction"];
        CHECK(std::abs(a - b) <= 1e-3 * a);
    }
    const Adapter adapter = read_adapter(dir / "f" / "pissa_init");
    CHECK(adapter.metadata.at("pissa.fused_power_iteration") == "true");
    CHECK(read_adapter(dir / "a" / "pissa_init").metadata.at("pissa.fused_power_iteration") == "false");
    const Run refused = pissa_run(dir, "init m --out e --exact --fused");
    CHECK(refused.code == 2);
    CHECK(refused.err.find("--exact and --fused exclude each other") != std::string::npos);
    CHECK(!fs::exists(dir / "e"));
}

TEST_CASE("sharded in, sharded out; --exact; --json; regex targets") {
    ScratchDir dir("cli-sharded");
    REQUIRE(pissa_run(dir, "generate --out m --shards 3 --dtype F16 " + small_llama).code == 0);
    const Run r = pissa_run(dir, "init m --out o --exact --rank 4 --alpha 8 --target-regex '.*\\.(k|o)_proj' --json");
    INFO(r.err);
    REQUIRE(r.code == 0);
    const auto j = nlohmann::json::parse(r.out);
    CHECK(j["method"] == "exact");
    CHECK(j["modules"].size() == 4);
    CHECK(j["modules"][0]["name"] == "model.layers.0.self_attn.k_proj");
    const Checkpoint in(dir / "m"), out(dir / "o");
    REQUIRE(out.is_sharded());
    CHECK(out.shards().size() == 3);
    CHECK(out.index()["weight_map"] == in.index()["weight_map"]);
    CHECK(out.index()["metadata"]["total_size"] == in.total_size());
    for (std::size_t k = 0; k < 3; ++k) CHECK(out.shards()[k]->path().filename() == in.shards()[k]->path().filename());
    const Adapter adapter = read_adapter(dir / "o" / "pissa_init");
    CHECK(adapter.config.target_regex == ".*\\.(k|o)_proj");
    CHECK(adapter.config.lora_alpha == 8);
    for (const auto& name : in.tensor_names()) {
        const LoraModule* m = adapter.find(module_of_weight(name));
        if (!m) {
            CHECK(bytes_of(in, name) == bytes_of(out, name));
            continue;
        }
        const pissa::Matrix<double> W = weight(in, name), W_res = weight(out, name);
        CHECK(pissa_test::relative_error(W_res + 2.0 * (m->B * m->A).cast<double>(), W) < 1e-3);  // s = 8 / 4
    }
    // merging the adapter back into the residual gives the original model (to f16 rounding)
    REQUIRE(pissa_run(dir, "merge o o/pissa_init --out merged").code == 0);
    const Checkpoint merged(dir / "merged");
    CHECK(merged.is_sharded());
    for (const auto& name : in.tensor_names()) {
        if (!is_float_matrix(*in.find(name))) continue;
        CHECK(pissa_test::relative_error(weight(merged, name), weight(in, name)) < 2e-3);
    }
}

TEST_CASE("--rslora: W = W_res + (alpha / sqrt(r)) B A, use_rslora in the config, and merge applies that scaling") {
    ScratchDir dir("cli-rslora");
    REQUIRE(pissa_run(dir, "generate --out m --dtype F32 " + small_llama).code == 0);
    const Run r = pissa_run(dir, "init m --out o --rank 4 --alpha 6 --rslora --targets q_proj,down_proj");
    INFO(r.err);
    REQUIRE(r.code == 0);
    const Checkpoint in(dir / "m"), out(dir / "o");
    const Adapter adapter = read_adapter(dir / "o" / "pissa_init");
    CHECK(adapter.config.use_rslora);
    REQUIRE(adapter.modules.size() == 4);
    for (const LoraModule& m : adapter.modules) {
        CHECK(m.scaling == 3.0f);  // 6 / sqrt(4), where plain LoRA would have 6 / 4
        const std::string name = m.name + ".weight";
        const pissa::Matrix<double> W = weight(in, name), W_res = weight(out, name);
        const pissa::Matrix<double> BA = (m.B * m.A).cast<double>();
        CHECK(pissa_test::relative_error(W_res + 3.0 * BA, W) < 1e-5);
        CHECK(pissa_test::relative_error(W_res + 1.5 * BA, W) > 0.05);
    }
    REQUIRE(pissa_run(dir, "merge o o/pissa_init --out merged").code == 0);
    const Checkpoint merged(dir / "merged");
    for (const LoraModule& m : adapter.modules)
        CHECK(pissa_test::relative_error(weight(merged, m.name + ".weight"), weight(in, m.name + ".weight")) < 1e-5);
}

TEST_CASE("fan_in_fan_out on a GPT-2 style Conv1D checkpoint") {
    ScratchDir dir("cli-gpt2");
    REQUIRE(pissa_run(dir, "generate --arch gpt2 --out g --layers 2 --hidden 32 --vocab 64 --dtype F32").code == 0);
    const Run r = pissa_run(dir, "init g --out o --targets c_attn --fan-in-fan-out --rank 4");
    INFO(r.err);
    REQUIRE(r.code == 0);
    const Checkpoint in(dir / "g"), out(dir / "o");
    const Adapter adapter = read_adapter(dir / "o" / "pissa_init");
    CHECK(adapter.config.fan_in_fan_out);
    REQUIRE(adapter.modules.size() == 2);
    const LoraModule& m = adapter.modules[0];
    CHECK(m.name == "transformer.h.0.attn.c_attn");
    CHECK(m.A.rows() == 4);
    CHECK(m.A.cols() == 32);                                                           // in
    CHECK(m.B.rows() == 96);                                                           // out = 3 * hidden
    const pissa::Matrix<double> W = weight(in, "transformer.h.0.attn.c_attn.weight");  // stored [in, out]
    const pissa::Matrix<double> W_res = weight(out, "transformer.h.0.attn.c_attn.weight");
    CHECK(W_res.rows() == 32);
    CHECK(pissa_test::relative_error(W_res + (m.B * m.A).cast<double>().transpose(), W) < 1e-5);
    // merge honours fan_in_fan_out too
    REQUIRE(pissa_run(dir, "merge o o/pissa_init --out merged").code == 0);
    const Checkpoint merged(dir / "merged");
    CHECK(pissa_test::relative_error(weight(merged, "transformer.h.0.attn.c_attn.weight"), W) < 1e-5);
    // without the flag the [in, out] weight would be decomposed with swapped roles: shapes say so
    REQUIRE(pissa_run(dir, "init g --out plain --targets c_attn --rank 4").code == 0);
    CHECK(read_adapter(dir / "plain" / "pissa_init").modules[0].A.cols() == 96);
}

TEST_CASE("conversion identity: merge(converted LoRA, original) == merge(trained PiSSA adapter, residual)") {
    ScratchDir dir("cli-convert");
    REQUIRE(pissa_run(dir, "generate --out m --dtype F32 " + small_llama).code == 0);
    REQUIRE(pissa_run(dir, "init m --out o --rank 4 --alpha 16 --targets q_proj,v_proj,down_proj").code == 0);
    // "Training": perturb the initial adapter and save it as peft would (config still says pissa).
    Adapter trained = read_adapter(dir / "o" / "pissa_init");
    for (std::size_t k = 0; k < trained.modules.size(); ++k) {
        auto& m = trained.modules[k];
        m.A += 0.05f * pissa_test::gaussian<float>(m.A.rows(), m.A.cols(), 100 + k);
        m.B += 0.05f * pissa_test::gaussian<float>(m.B.rows(), m.B.cols(), 200 + k);
    }
    trained.config.init_lora_weights = "pissa_niter_4";
    write_adapter(dir / "trained", trained);

    const Run c = pissa_run(dir, "convert --initial o/pissa_init --trained trained --out lora");
    INFO(c.err);
    REQUIRE(c.code == 0);
    const Adapter lora = read_adapter(dir / "lora");
    CHECK(lora.config.r == 8);
    CHECK(lora.config.lora_alpha == 32);
    CHECK(lora.config.init_lora_weights == true);
    CHECK(lora.modules.front().A.rows() == 8);

    REQUIRE(pissa_run(dir, "merge m lora --out via_lora").code == 0);
    REQUIRE(pissa_run(dir, "merge o trained --out via_pissa").code == 0);
    const Checkpoint a(dir / "via_lora"), b(dir / "via_pissa"), original(dir / "m");
    for (const auto& name : original.tensor_names()) {
        if (!lora.find(module_of_weight(name))) {
            CHECK(bytes_of(a, name) == bytes_of(original, name));
            continue;
        }
        const double err = pissa_test::relative_error(weight(a, name), weight(b, name));
        INFO(name, " ", err);
        CHECK(err < 1e-5);                                                                  // float32 rounding
        CHECK(pissa_test::relative_error(weight(a, name), weight(original, name)) > 1e-3);  // training did something
    }

    // rsLoRA with patterns is refused, as peft refuses it; nothing is written.
    trained.config.use_rslora = true;
    trained.config.rank_pattern = {{"q_proj", 4}};
    write_adapter(dir / "trained_rs", trained);
    Adapter initial_rs = read_adapter(dir / "o" / "pissa_init");
    initial_rs.config.use_rslora = true;
    write_adapter(dir / "initial_rs", initial_rs);
    const Run refused = pissa_run(dir, "convert --initial initial_rs --trained trained_rs --out lora_rs");
    CHECK(refused.code == 2);
    CHECK(refused.err.find("use_rslora") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "lora_rs"));
    // an initial adapter that still says "pissa" is refused
    const Run wrong = pissa_run(dir, "convert --initial trained --trained trained --out lora2");
    CHECK(wrong.code == 2);
    CHECK(wrong.err.find("init_lora_weights must be true") != std::string::npos);
}

TEST_CASE("the malformed corpus: exit code 2, a clear message naming the file, nothing written") {
    ScratchDir dir("cli-corpus");
    // A valid adapter, so that merge fails on reading the corrupt model, not on a missing adapter.
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    REQUIRE(pissa_run(dir, "init m --out p --rank 2").code == 0);
    const auto before = entries(dir.path());
    std::ifstream expected(fs::path(PISSA_IO_CORPUS) / "expected.txt");
    std::string line;
    int count = 0;
    while (std::getline(expected, line)) {
        const auto tab = line.find('\t');
        const std::string name = line.substr(0, tab), message = line.substr(tab + 1);
        const std::string path = (fs::path(PISSA_IO_CORPUS) / name).string();
        for (const std::string& command :
             {"init '" + path + "' --out o", "inspect '" + path + "'", "merge '" + path + "' p/pissa_init --out o"}) {
            const Run r = pissa_run(dir, command);
            INFO(command, "\n", r.err);
            CHECK(r.code == 2);
            CHECK(r.err.find(message) != std::string::npos);
            CHECK(r.err.find(name) != std::string::npos);
        }
        CHECK(entries(dir.path()) == before);  // no output, no temporary folder
        ++count;
    }
    CHECK(count >= 25);
}

TEST_CASE("usage errors, overwrite protection, --help everywhere") {
    ScratchDir dir("cli-usage");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    for (const char* cmd : {"init", "convert", "merge", "export-gguf", "inspect", "generate"}) {
        const Run r = pissa_run(dir, std::string(cmd) + " --help");
        CHECK(r.code == 0);
        CHECK(r.out.find(std::string("usage: pissa ") + cmd) != std::string::npos);
    }
    CHECK(pissa_run(dir, "").code == 2);
    CHECK(pissa_run(dir, "frobnicate").code == 2);
    CHECK(pissa_run(dir, "init m --out o --bogus").code == 2);
    // grouped-query shapes: heads must divide hidden, key/value heads must divide heads
    for (const char* bad : {"--hidden 64 --heads 5 --kv-heads 1", "--hidden 64 --heads 8 --kv-heads 3"}) {
        const Run r = pissa_run(dir, std::string("generate --out gqa ") + bad);
        CHECK_MESSAGE(r.code == 2, bad);
        CHECK_MESSAGE(r.err.find("--kv-heads needs --heads dividing --hidden") != std::string::npos, bad, r.err);
    }
    CHECK_FALSE(fs::exists(dir / "gqa"));
    CHECK(pissa_run(dir, "init m").code == 2);  // no --out
    CHECK(pissa_run(dir, "init m --out o --rank 0").code == 2);
    CHECK(pissa_run(dir, "init m --out o --rank 65").code == 2);  // > min(out, in) = 64
    CHECK(pissa_run(dir, "init m --out o --exact --niter 2").code == 2);
    CHECK(pissa_run(dir, "init m --out m/inside").code == 2);  // never into the input
    CHECK(pissa_run(dir, "init nothing --out o").code == 2);
    const Run none = pissa_run(dir, "init m --out o --targets wq,wv");
    CHECK(none.code == 2);
    CHECK(none.err.find("q_proj (2)") != std::string::npos);  // lists what the model has
    const Run embedding = pissa_run(dir, "init m --out o --targets q_proj,embed_tokens");
    CHECK(embedding.code == 2);  // peft: plain LoRA there
    CHECK(embedding.err.find("model.embed_tokens.weight is an embedding") != std::string::npos);
    CHECK(entries(dir.path()) == std::set<std::string>{"m"});

    REQUIRE(pissa_run(dir, "init m --out o --rank 2").code == 0);
    const std::string before = pissa_test::read_bytes(dir / "o" / "pissa_init" / adapter_weights_name);
    const Run exists = pissa_run(dir, "init m --out o --rank 4");
    CHECK(exists.code == 2);
    CHECK(exists.err.find("--force") != std::string::npos);
    CHECK(pissa_test::read_bytes(dir / "o" / "pissa_init" / adapter_weights_name) == before);
    CHECK(pissa_run(dir, "init m --out o --rank 4 --force").code == 0);
    CHECK(read_adapter(dir / "o" / "pissa_init").config.r == 4);
    CHECK(pissa_run(dir, "init o --out . --force").code == 2);  // would replace the input's parent
    CHECK(entries(dir.path()) == std::set<std::string>{"m", "o"});

    const Run inspect = pissa_run(dir, "inspect o/pissa_init --json");
    REQUIRE(inspect.code == 0);
    const auto j = nlohmann::json::parse(inspect.out);
    CHECK(j["kind"] == "adapter");
    CHECK(j["r"] == 4);
    CHECK(j["modules"].size() == 4);
    const Run tensors = pissa_run(dir, "inspect m");
    CHECK(tensors.code == 0);
    const auto at = tensors.out.find("model.layers.1.mlp.down_proj.weight ");
    REQUIRE(at != std::string::npos);
    const std::string row = tensors.out.substr(at, tensors.out.find('\n', at) - at);
    CHECK(row.find(" BF16 ") != std::string::npos);
    CHECK(row.find(" [64, 96] ") != std::string::npos);
}

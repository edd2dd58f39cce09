// Tests for io/init_checkpoint.hpp and io/merge_checkpoint.hpp: the whole-checkpoint jobs as a
// library call — the residual plus s B A gives back every target weight, the other tensors and
// files are untouched, the seed rule holds module by module, callbacks see every tensor and can
// abort without leaving output, bad input names the module.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/init.hpp>
#include <pissa/io/init_checkpoint.hpp>
#include <pissa/io/merge_checkpoint.hpp>
#include <pissa/seed.hpp>

#include <limits>

using namespace pissa::io;
using pissa_test::ScratchDir;

namespace {

/// A Llama-like single-file model: two layers of q/k/v projections (BF16, 48 x 32) with a decaying
/// spectrum, an embedding, a norm vector, and a config.json beside it.
void make_model(const std::filesystem::path& dir, Dtype dtype = Dtype::BF16) {
    std::filesystem::create_directories(dir);
    std::vector<OwnedTensor> tensors;
    tensors.push_back(matrix_tensor("model.embed_tokens.weight", pissa_test::gaussian<float>(64, 32, 1), dtype));
    for (int layer = 0; layer < 2; ++layer)
        for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
            const std::string name = "model.layers." + std::to_string(layer) + ".self_attn." + proj + ".weight";
            pissa::Matrix<float> W = pissa_test::gaussian<float>(48, 32, 10 + name.size() + layer);
            for (pissa::Index j = 0; j < W.cols(); ++j) W.col(j) *= std::pow(0.8f, static_cast<float>(j));
            tensors.push_back(matrix_tensor(name, W, dtype));
        }
    tensors.push_back({{"model.norm.weight", Dtype::F32, {32}}, pissa_test::random_bytes(128, 3)});
    write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
    detail::write_text_file(dir / "config.json", "{\"model_type\": \"llama\"}");
}

pissa::Matrix<float> weight(const Checkpoint& model, const std::string& name) {
    return read_matrix<float>(model.file_of(name), *model.find(name));
}

}  // namespace

TEST_CASE("init_checkpoint: residual + s B A is the weight, other tensors and files are unchanged") {
    ScratchDir dir("init-ckpt");
    make_model(dir / "model", Dtype::F32);
    InitCheckpointOptions options;
    options.pissa.rank = 4;
    options.pissa.lora_alpha = 8;  // s = 2
    options.seed = 7;
    std::vector<std::string> progressed, done;
    InitCheckpointCallbacks callbacks;
    callbacks.progress = [&](std::size_t, std::size_t count, const TensorInfo& t) {
        CHECK(count == 8);
        progressed.push_back(t.name);
    };
    callbacks.module_done = [&](const ModuleReport& m) { done.push_back(m.name); };
    const auto report = init_checkpoint(dir / "model", dir / "out", options, callbacks);

    CHECK(progressed.size() == 8);
    REQUIRE(done.size() == 4);  // q_proj and v_proj of two layers
    CHECK(done[0] == "model.layers.0.self_attn.q_proj");
    CHECK(done[1] == "model.layers.0.self_attn.v_proj");
    CHECK(report.out == std::filesystem::weakly_canonical(dir / "out"));
    CHECK(pissa_test::read_bytes(dir / "out/config.json") == pissa_test::read_bytes(dir / "model/config.json"));

    const Checkpoint in(dir / "model"), out(dir / "out");
    const Adapter adapter = read_adapter(dir / "out/pissa_init");
    CHECK(adapter.config.r == 4);
    CHECK(adapter.config.lora_alpha == 8);
    CHECK(adapter.metadata.at("pissa.seed") == "7");
    CHECK(adapter.metadata.at("pissa.seed_rule") == std::string(pissa::module_seed_rule));
    REQUIRE(adapter.modules.size() == 4);
    for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
        const auto& m = adapter.modules[i];
        const std::string name = m.name + ".weight";
        const pissa::Matrix<float> W = weight(in, name), residual = weight(out, name);
        CHECK((residual + 2.0f * m.B * m.A - W).norm() <= 1e-5 * W.norm());
        // The seed rule: module i alone, seeded with module_seed(seed, i), gives the same bits.
        pissa::PissaConfig config = options.pissa;
        config.randomized.seed = pissa::module_seed(7, i);
        const auto alone = pissa::init(W, config);
        CHECK(alone.A == m.A);
        CHECK(alone.B == m.B);
        CHECK(alone.residual == residual);
        CHECK(report.modules[i].seed == pissa::module_seed(7, i));
        CHECK(report.modules[i].quality.residual_norm == doctest::Approx(residual.cast<double>().norm()).epsilon(1e-6));
    }
    for (const char* untouched :
         {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"}) {
        const ByteView a = in.file_of(untouched).bytes(*in.find(untouched));
        const ByteView b = out.file_of(untouched).bytes(*out.find(untouched));
        CHECK(std::string(reinterpret_cast<const char*>(a.data), a.size) ==
              std::string(reinterpret_cast<const char*>(b.data), b.size));
    }
}

TEST_CASE("init_checkpoint: a callback that throws aborts the job and leaves nothing") {
    ScratchDir dir("init-abort");
    make_model(dir / "model");
    InitCheckpointCallbacks callbacks;
    callbacks.module_done = [](const ModuleReport&) { throw std::runtime_error("stop"); };
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", dir / "new/out", {}, callbacks), "stop", std::runtime_error);
    CHECK_FALSE(std::filesystem::exists(dir / "new"));  // not even the parent folder it created
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
    CHECK(entries == 1);  // only the model
}

TEST_CASE("init_checkpoint: bad input is refused before anything is written, naming the problem") {
    ScratchDir dir("init-bad");
    make_model(dir / "model");
    InitCheckpointOptions options;
    options.target_modules = {"embed_tokens"};
    CHECK_THROWS_AS(init_checkpoint(dir / "model", dir / "out", options), pissa::invalid_argument);
    options.target_modules = {"no_such_proj"};
    CHECK_THROWS_AS(init_checkpoint(dir / "model", dir / "out", options), pissa::invalid_argument);
    options.target_modules = {"q_proj"};
    options.pissa.rank = 33;  // > min(48, 32)
    CHECK_THROWS_AS(init_checkpoint(dir / "model", dir / "out", options), pissa::invalid_argument);
    CHECK_FALSE(std::filesystem::exists(dir / "out"));

    // An alpha so large that sqrt(S / s) would underflow float32: refused before any work.
    options.pissa.rank = 4;
    options.pissa.lora_alpha = 1e300;
    CHECK_THROWS_WITH_AS(init_checkpoint(dir / "model", dir / "out", options), doctest::Contains("lora_alpha 1e+300"),
                         pissa::invalid_argument);
    CHECK_FALSE(std::filesystem::exists(dir / "out"));
}

TEST_CASE("init_checkpoint: a non-finite weight is named with its tensor and file") {
    ScratchDir dir("init-nan");
    std::filesystem::create_directories(dir / "model");
    pissa::Matrix<float> W = pissa_test::gaussian<float>(16, 16, 4);
    W(3, 5) = std::numeric_limits<float>::quiet_NaN();
    write_safetensors(dir / "model/model.safetensors", {matrix_tensor("layer.q_proj.weight", W, Dtype::F32)}, {});
    try {
        init_checkpoint(dir / "model", dir / "out", {});
        FAIL("expected an error");
    } catch (const pissa::invalid_argument& e) {
        const std::string what = e.what();
        CHECK(what.find("layer.q_proj.weight") != std::string::npos);
        CHECK(what.find("model.safetensors") != std::string::npos);
        CHECK(what.find("row 3, column 5") != std::string::npos);
    }
}

TEST_CASE("merge_checkpoint: W_res + s B A gives back the model; unselected modules are skipped") {
    ScratchDir dir("merge-ckpt");
    make_model(dir / "model", Dtype::F32);
    InitCheckpointOptions options;
    options.pissa.rank = 4;
    options.target_modules = {"q_proj", "v_proj", "k_proj"};
    init_checkpoint(dir / "model", dir / "init", options);

    // Narrow the adapter's target_modules: k_proj stays in the file but is no longer selected.
    Adapter adapter = read_adapter(dir / "init/pissa_init");
    adapter.config.target_modules = {"q_proj", "v_proj"};
    write_adapter(dir / "adapter", adapter);
    const auto report = merge_checkpoint(dir / "init", dir / "adapter", dir / "merged", false);
    CHECK(report.modules.size() == 4);
    REQUIRE(report.skipped.size() == 2);
    CHECK(report.skipped[0] == "model.layers.0.self_attn.k_proj");

    const Checkpoint original(dir / "model"), merged(dir / "merged"), residual(dir / "init");
    for (const char* name : {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}) {
        const pissa::Matrix<float> W = weight(original, name);
        CHECK((weight(merged, name) - W).norm() <= 1e-5 * W.norm());
    }
    // The skipped module is left as the residual.
    CHECK(weight(merged, "model.layers.0.self_attn.k_proj.weight") ==
          weight(residual, "model.layers.0.self_attn.k_proj.weight"));

    // Non-finite factors are refused before anything is written.
    adapter.modules[0].A(0, 0) = std::numeric_limits<float>::quiet_NaN();
    write_adapter(dir / "bad", adapter);
    CHECK_THROWS_AS(merge_checkpoint(dir / "init", dir / "bad", dir / "merged2", false), pissa::invalid_argument);
    CHECK_FALSE(std::filesystem::exists(dir / "merged2"));
}

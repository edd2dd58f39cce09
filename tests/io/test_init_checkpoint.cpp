// Tests for io/init_checkpoint.hpp: the whole-checkpoint job as a library call — the residual plus
// s B A gives back every target weight, the other tensors and files are untouched, the seed rule
// holds module by module, callbacks see every tensor and can abort without leaving output, bad
// input names the module.
#include "io_support.hpp"
#include "model_support.hpp"
#include "support.hpp"

#include <pissa/init.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/init_checkpoint.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/seed.hpp>

#include <limits>
#include <string>

using namespace pissa::io;
using pissa_test::make_model;
using pissa_test::ScratchDir;
using pissa_test::weight;

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

// Tests for io/merge_checkpoint.hpp: merging an adapter into a checkpoint gives back the model from
// its residual; modules the adapter no longer selects are skipped; non-finite factors are refused
// before anything is written.
#include "io_support.hpp"
#include "model_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/init_checkpoint.hpp>
#include <pissa/io/merge_checkpoint.hpp>
#include <pissa/io/peft.hpp>

#include <filesystem>
#include <limits>

using namespace pissa::io;
using pissa_test::make_model;
using pissa_test::ScratchDir;
using pissa_test::weight;

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

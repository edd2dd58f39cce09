// PiSSA on a whole checkpoint as one library call: what `pissa init MODEL --out OUT` does.
// Usage: init_checkpoint [MODEL OUT]; without arguments it writes a small two-layer model into a
// temporary folder first and initialises that.
#include <pissa/io/init_checkpoint.hpp>

#include <cstdio>
#include <filesystem>

namespace {

/// A two-layer model with q/v projections (bfloat16) and an embedding, as a model folder.
std::filesystem::path write_small_model(const std::filesystem::path& dir) {
    using namespace pissa::io;
    std::vector<OwnedTensor> tensors;
    tensors.push_back(matrix_tensor("model.embed_tokens.weight", pissa::Matrix<float>::Random(256, 64), Dtype::BF16));
    for (const char* name : {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                             "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"})
        tensors.push_back(matrix_tensor(name, pissa::Matrix<float>::Random(64, 64), Dtype::BF16));
    std::filesystem::create_directories(dir);
    write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
    return dir;
}

}  // namespace

int main(int argc, char** argv) {
    const auto scratch = std::filesystem::temp_directory_path() / "pissa-example-init-checkpoint";
    std::filesystem::path model, out;
    if (argc == 3) {
        model = argv[1];
        out = argv[2];
    } else {
        std::filesystem::remove_all(scratch);
        model = write_small_model(scratch / "model");
        out = scratch / "out";
    }
    pissa::io::InitCheckpointOptions options;  // peft's defaults: rank 8, alpha 8, q_proj,v_proj, pissa_niter_4
    options.pissa.rank = 16;
    options.pissa.lora_alpha = 16;
    pissa::io::InitCheckpointCallbacks callbacks;
    callbacks.module_done = [](const pissa::io::ModuleReport& m) {
        std::printf("%-40s %s\n", m.name.c_str(), pissa::to_string(m.quality).c_str());
    };
    try {
        const auto report = pissa::io::init_checkpoint(model, out, options, callbacks);
        std::printf("%zu modules in %.2f s\nresidual model: %s\nadapter:        %s\n", report.modules.size(),
                    report.seconds, report.out.c_str(), report.adapter.c_str());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "init_checkpoint: %s\n", e.what());
        return 1;
    }
    if (argc != 3) std::filesystem::remove_all(scratch);
    return 0;
}

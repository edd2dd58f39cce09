/// \file model_support.hpp
/// \brief A small Llama-like checkpoint for the tests of the whole-checkpoint jobs
/// (io/init_checkpoint.hpp, io/merge_checkpoint.hpp), and reading one of its weights back.
#pragma once

#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/dtype.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

namespace pissa_test {

/// A Llama-like single-file model: two layers of q/k/v projections (BF16, 48 x 32) with a decaying
/// spectrum, an embedding, a norm vector, and a config.json beside it.
inline void make_model(const std::filesystem::path& dir, pissa::io::Dtype dtype = pissa::io::Dtype::BF16) {
    std::filesystem::create_directories(dir);
    std::vector<pissa::io::OwnedTensor> tensors;
    tensors.push_back(
        pissa::io::matrix_tensor("model.embed_tokens.weight", pissa_test::gaussian<float>(64, 32, 1), dtype));
    for (int layer = 0; layer < 2; ++layer)
        for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
            const std::string name = "model.layers." + std::to_string(layer) + ".self_attn." + proj + ".weight";
            pissa::Matrix<float> W = pissa_test::gaussian<float>(48, 32, 10 + name.size() + layer);
            for (pissa::Index j = 0; j < W.cols(); ++j) W.col(j) *= std::pow(0.8f, static_cast<float>(j));
            tensors.push_back(pissa::io::matrix_tensor(name, W, dtype));
        }
    tensors.push_back({{"model.norm.weight", pissa::io::Dtype::F32, {32}}, pissa_test::random_bytes(128, 3)});
    pissa::io::write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
    pissa::io::detail::write_text_file(dir / "config.json", "{\"model_type\": \"llama\"}");
}

inline pissa::Matrix<float> weight(const pissa::io::Checkpoint& model, const std::string& name) {
    return pissa::io::read_matrix<float>(model.file_of(name), *model.find(name));
}

}  // namespace pissa_test

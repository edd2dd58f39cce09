/// \file model_io.hpp
/// \brief The MLP in a safetensors file with the keys of the protocol's pretrained.safetensors:
/// `fc1.weight` [256, 784], `fc1.bias` [256], `fc2.weight` [10, 256], `fc2.bias` [10] (F32; F16,
/// BF16 and F64 are converted on load). Uses pissa's validating reader and atomic writer.
#pragma once

#include "train.hpp"

#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

#include <cstring>
#include <filesystem>
#include <map>
#include <string>

namespace fmnist {

namespace detail {

inline MatrixF read_weight(const pissa::io::SafetensorsFile& file, const std::string& name, Index rows, Index cols) {
    const auto& t = file.at(name);
    const auto [r, c] = pissa::io::matrix_shape(t, file.path().string());
    pissa::detail::require(r == rows && c == cols, file.path().string(), ": tensor '", name, "' has shape [", r, ", ",
                           c, "], expected [", rows, ", ", cols, "]");
    return pissa::io::read_matrix<float>(file, t);
}

inline VectorF read_bias(const pissa::io::SafetensorsFile& file, const std::string& name, Index size) {
    const auto& t = file.at(name);
    pissa::detail::require(t.shape.size() == 1 && t.shape[0] == static_cast<std::uint64_t>(size), file.path().string(),
                           ": tensor '", name, "' must have shape [", size, "]");
    return pissa::io::visit_float_dtype(t.dtype, file.path().string() + ": tensor '" + name + "'", [&](auto tag) {
        using Storage = decltype(tag);
        pissa::Vector<Storage> stored(size);
        const auto bytes = file.bytes(t);
        if (bytes.size) std::memcpy(static_cast<void*>(stored.data()), bytes.data, bytes.size);
        VectorF out = stored.template cast<float>();
        return out;
    });
}

}  // namespace detail

/// Loads the pretrained MLP. \throws pissa::invalid_argument / pissa::io errors naming the file and
/// tensor when a key is missing or a shape is wrong.
inline Mlp load_mlp(const std::filesystem::path& path) {
    const pissa::io::SafetensorsFile file(path);
    Mlp net;
    net.fc1.W = detail::read_weight(file, "fc1.weight", 256, 784);
    net.fc1.b = detail::read_bias(file, "fc1.bias", 256);
    net.fc2.W = detail::read_weight(file, "fc2.weight", 10, 256);
    net.fc2.b = detail::read_bias(file, "fc2.bias", 10);
    return net;
}

/// Saves the MLP with the same keys (F32), plus metadata.
inline void save_mlp(const std::filesystem::path& path, const Mlp& net,
                     const std::map<std::string, std::string>& meta) {
    using pissa::io::matrix_tensor;
    std::vector<pissa::io::OwnedTensor> tensors;
    auto bias = [](const std::string& name, const VectorF& b) {
        auto t = matrix_tensor(name, b.transpose());
        t.spec.shape = {static_cast<std::uint64_t>(b.size())};
        return t;
    };
    tensors.push_back(matrix_tensor("fc1.weight", net.fc1.W));
    tensors.push_back(bias("fc1.bias", net.fc1.b));
    tensors.push_back(matrix_tensor("fc2.weight", net.fc2.W));
    tensors.push_back(bias("fc2.bias", net.fc2.b));
    pissa::io::write_safetensors(path, tensors, meta);
}

}  // namespace fmnist

/// \file data.hpp
/// \brief Fashion-MNIST as the toy protocol uses it (protocol steps 1-2, README.md): normalised inputs,
/// the odd/even subsets, and the portable splitmix64 + Fisher-Yates data order.
#pragma once

#include "idx.hpp"

#include <pissa/detail/random.hpp>
#include <pissa/types.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace fmnist {

using pissa::Index;
using MatrixF = pissa::Matrix<float>;
using RowMatrixF = pissa::RowMatrix<float>;
using VectorF = pissa::Vector<float>;

/// Where Debian's `dataset-fashion-mnist` installs the files.
inline const char* const default_data_dir = "/usr/share/datasets/fashion-mnist";

/// One split: inputs [N, 784] (row-major, one image per row, normalised) and labels 0..9.
struct Split {
    RowMatrixF x;
    std::vector<int> labels;
};

/// Both splits plus the normalisation constants (over all training pixels, float64).
struct Dataset {
    Split train, test;
    double mean = 0, std = 0;
};

/// The help shown when the dataset is missing.
inline std::string install_help(const std::filesystem::path& dir, const std::string& missing) {
    return "Fashion-MNIST not found: " + (dir / missing).string() +
           " does not exist.\n"
           "  Install Debian's package:  sudo apt-get install dataset-fashion-mnist\n"
           "  (scripts/install-deps.sh installs it), or pass --data DIR with the four files\n"
           "  train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz "
           "t10k-labels-idx1-ubyte.gz";
}

/// Reads images and labels of one split and checks that they agree ([N, 28, 28] and [N]).
inline std::pair<IdxArray, std::vector<int>> read_split(const std::filesystem::path& dir, const std::string& prefix) {
    const std::string image_name = prefix + "-images-idx3-ubyte.gz", label_name = prefix + "-labels-idx1-ubyte.gz";
    for (const auto& name : {image_name, label_name})
        if (!std::filesystem::exists(dir / name)) throw idx_error(install_help(dir, name));
    IdxArray images = read_idx(dir / image_name);
    const IdxArray labels = read_idx(dir / label_name);
    if (images.dims.size() != 3 || images.dims[1] != 28 || images.dims[2] != 28)
        throw idx_error((dir / image_name).string() + ": expected images of shape [N, 28, 28]");
    if (labels.dims.size() != 1 || labels.dims[0] != images.dims[0])
        throw idx_error((dir / label_name).string() + ": expected " + std::to_string(images.dims[0]) + " labels");
    std::vector<int> out(labels.data.begin(), labels.data.end());
    for (int l : out)
        if (l > 9) throw idx_error((dir / label_name).string() + ": label " + std::to_string(l) + " outside 0..9");
    return {std::move(images), std::move(out)};
}

/// Normalises pixels: p = pixel / 255 (float64), x = (p - mean) / std, stored as float32.
inline RowMatrixF normalise(const IdxArray& images, double mean, double std) {
    const Index n = images.dims[0];
    RowMatrixF x(n, 784);
    float table[256];  // the value depends on the pixel only: compute each once
    for (int v = 0; v < 256; ++v) table[v] = static_cast<float>((v / 255.0 - mean) / std);
    float* out = x.data();
    for (std::size_t i = 0; i < images.data.size(); ++i) out[i] = table[images.data[i]];
    return x;
}

/// Loads Fashion-MNIST from `dir` as protocol step 1 (README.md) prescribes.
/// \throws idx_error with installation help when a file is missing, or naming the malformed file.
inline Dataset load_dataset(const std::filesystem::path& dir) {
    auto [train_images, train_labels] = read_split(dir, "train");
    auto [test_images, test_labels] = read_split(dir, "t10k");
    Dataset data;
    // mean and population std over all training values of p = pixel / 255, in float64. The sum of
    // pixels is an exact integer and the squares go through a 256-bin histogram, so both constants
    // are as accurate as float64 allows (the protocol's mean to the last bit).
    std::uint64_t histogram[256] = {};
    for (auto v : train_images.data) ++histogram[v];
    std::uint64_t pixel_sum = 0;
    for (int v = 0; v < 256; ++v) pixel_sum += histogram[v] * static_cast<std::uint64_t>(v);
    const double count = static_cast<double>(train_images.data.size());
    data.mean = static_cast<double>(pixel_sum) / (255.0 * count);
    double squares = 0;
    for (int v = 0; v < 256; ++v) {
        const double d = v / 255.0 - data.mean;
        squares += static_cast<double>(histogram[v]) * d * d;
    }
    data.std = std::sqrt(squares / count);
    data.train = {normalise(train_images, data.mean, data.std), std::move(train_labels)};
    data.test = {normalise(test_images, data.mean, data.std), std::move(test_labels)};
    return data;
}

/// The ascending list of positions whose label has the given parity (1 = odd, 0 = even).
inline std::vector<Index> positions_with_parity(const std::vector<int>& labels, int parity) {
    std::vector<Index> out;
    for (std::size_t i = 0; i < labels.size(); ++i)
        if (labels[i] % 2 == parity) out.push_back(static_cast<Index>(i));
    return out;
}

/// Fisher-Yates as in protocol step 2, README.md: for i = n-1 down to 1, j = next() mod (i+1), swap.
template <class T>
void shuffle(std::vector<T>& a, pissa::detail::SplitMix64& rng) {
    for (std::size_t i = a.size(); i-- > 1;) {
        const std::size_t j = static_cast<std::size_t>(rng.next() % (static_cast<std::uint64_t>(i) + 1));
        std::swap(a[i], a[j]);
    }
}

/// The rows `positions[first .. first + count)` of `split`, gathered into a batch [count, 784]
/// with their labels.
inline void gather(const Split& split, const std::vector<Index>& positions, std::size_t first, std::size_t count,
                   MatrixF& x, std::vector<int>& labels) {
    x.resize(static_cast<Index>(count), split.x.cols());
    labels.resize(count);
    for (std::size_t k = 0; k < count; ++k) {
        const Index row = positions[first + k];
        x.row(static_cast<Index>(k)) = split.x.row(row);
        labels[k] = split.labels[static_cast<std::size_t>(row)];
    }
}

}  // namespace fmnist

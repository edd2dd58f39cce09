// Quickstart: PiSSA-initialise one linear layer, check that the layer's output is unchanged, and
// print the quality report. Build: part of pissa's examples (target `quickstart`).
#include <pissa/pissa.hpp>

#include <cstdio>
#include <random>

int main() {
    // A stand-in for a pretrained q_proj weight [out, in]: a few strong directions over a noise bulk,
    // stored row-major as checkpoints store it.
    const pissa::Index out = 512, in = 384, strong = 12;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    pissa::Matrix<float> left(out, strong), right(strong, in), noise(out, in);
    for (auto* m : {&left, &right, &noise})
        for (pissa::Index i = 0; i < m->size(); ++i) m->data()[i] = normal(rng);
    const pissa::RowMatrix<float> W = left * right / 8.0f + 0.05f * noise;

    // peft's init_lora_weights="pissa_niter_4" with r = 16, lora_alpha = 16.
    pissa::PissaConfig config;
    config.rank = 16;
    config.lora_alpha = 16;
    config.method = pissa::SvdMethod::randomized;
    config.randomized.niter = 4;
    const auto split = pissa::init(W, config);

    // The layer's output is unchanged at initialisation: x W^T == x W_res^T + s (x A^T) B^T.
    const pissa::Matrix<float> x = pissa::Matrix<float>::Random(8, in);
    const pissa::Matrix<float> before = x * W.transpose();
    const pissa::Matrix<float> after =
        x * split.residual.transpose() + split.scaling * (x * split.A.transpose()) * split.B.transpose();

    std::printf("W [%ld x %ld] -> A [%ld x %ld], B [%ld x %ld], scaling %.3g\n", static_cast<long>(out),
                static_cast<long>(in), static_cast<long>(split.A.rows()), static_cast<long>(split.A.cols()),
                static_cast<long>(split.B.rows()), static_cast<long>(split.B.cols()), double(split.scaling));
    std::printf("%s\n", pissa::to_string(split.quality).c_str());
    const double change = (after - before).norm() / before.norm();
    std::printf("relative change of the layer output at initialisation: %.2e\n", change);
    return change < 1e-5 ? 0 : 1;
}

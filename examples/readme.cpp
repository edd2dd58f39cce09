#include <pissa/pissa.hpp>
#include <cstdio>

int main() {
    pissa::RowMatrix<float> W = pissa::RowMatrix<float>::Random(1024, 768);  // [out, in], e.g. a q_proj
    pissa::PissaConfig config;           // peft's LoraConfig names
    config.rank = 16;
    config.lora_alpha = 16;
    config.method = pissa::SvdMethod::randomized;  // "pissa_niter_4"; SvdMethod::exact is "pissa"
    config.randomized.niter = 4;
    auto split = pissa::init(W, config);  // A [16, 768], B [1024, 16], residual W - s B A [1024, 768]
    pissa::Matrix<float> x = pissa::Matrix<float>::Random(4, 768);
    pissa::Matrix<float> y = pissa::lora_forward(x, split.residual, split);  // x W_res^T + s (x A^T) B^T
    std::printf("%s; output change %.1e\n", pissa::to_string(split.quality).c_str(),
                (y - x * W.transpose()).norm() / y.norm());
}

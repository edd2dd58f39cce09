// The consumer's program: one PiSSA split, checked. No flags from pissa, only its target.
#include <pissa/pissa.hpp>

#include <cstdio>
#ifdef CONSUMER_HAS_PISSA_IO
#include <pissa/io/safetensors.hpp>
#endif

int main() {
    const pissa::Matrix<double> W = pissa::Matrix<double>::Random(40, 30);
    pissa::PissaConfig config;
    config.rank = 4;
    const auto split = pissa::init(W, config);
    const double error = (split.residual + split.scaling * split.B * split.A - W).norm() / W.norm();
    std::printf("pissa %s: reconstruction error %.2e\n", pissa::version_string, error);
#ifdef CONSUMER_HAS_PISSA_IO
    std::printf("with pissa::io (safetensors reader: %zu bytes)\n", sizeof(pissa::io::SafetensorsFile));
#endif
    return error < 1e-12 ? 0 : 1;
}

/// \file lora_support.hpp
/// \brief A random LoRA layer for the tests of lora.hpp and lora_backward.hpp.
#pragma once

#include "support.hpp"

#include <cstdint>

namespace pissa_test {

/// A random LoRA layer (W, A, B, bias, x) of the given sizes; B is not zero so every path is exercised.
template <class S>
struct Layer {
    Matrix<S> x, W, A, B;
    Vector<S> bias;
    double s;
    Layer(Index batch, Index in, Index out, Index r, std::uint64_t seed, double scaling = 0.75)
        : x(gaussian<S>(batch, in, seed)),
          W(gaussian<S>(out, in, seed + 1)),
          A(gaussian<S>(r, in, seed + 2)),
          B(gaussian<S>(out, r, seed + 3)),
          bias(gaussian<S>(out, 1, seed + 4)),
          s(scaling) {}
};

}  // namespace pissa_test

/// \file quant_blockwise8.hpp
/// \brief bitsandbytes' 8-bit blockwise quantisation with the signed "dynamic" map, used by NF4's
/// double quantisation to compress the per-block absmax values.
///
/// Semantics follow bitsandbytes (bitsandbytes/functional.py `create_dynamic_map`,
/// `quantize_blockwise`; csrc/kernels.cu `kQuantizeBlockwise<..., General8bit>` and `dQuantize<0>`):
/// - values are split into consecutive blocks of `block_size` (256 for the nested absmax);
/// - each block keeps its float32 `absmax2 = max |x|` and each value is scaled by the float32
///   reciprocal, `x * (1.0f / absmax2)` (not a division, as the CUDA kernel does);
/// - the scaled value is mapped to one of the 256 entries of the dynamic map by the CUDA kernel's
///   search (`dQuantize<0>`): a 7-step binary search that compares against the odd-indexed entries,
///   then the nearer of the two bracketing entries (ties go to the upper one); index 255 (+1.0) is
///   never produced (the kernel clamps the upper bracket to 254). This is what a GPU run of
///   bitsandbytes stores; its pure-torch fallback backend takes the plain nearest entry instead.
/// - dequantisation is `map[q] * absmax2` in float32.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/types.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pissa {

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`): for i = 0..6 the midpoints of `linspace(0.1, 1, 2^i + 1)` scaled by `10^(i-6)`,
/// both signs, plus 0 and 1.0; 256 entries sorted ascending (entry 127 is 0, entry 255 is 1.0).
///
/// The arithmetic is float32 as in torch's scalar CPU path (linspace from both ends, midpoint
/// `(a + b) / 2`, then the float32 product with `float(10^(i-6))`).
/// \warning torch's vectorised linspace can round some boundaries differently by one float32 ulp,
/// so an entry may differ from a given torch build by ~1e-7 relative; bitsandbytes stores the map
/// with the quantisation state, so dequantise our codes with this map.
inline const std::array<float, 256>& dynamic_map_8bit() {
    static const std::array<float, 256> map = [] {
        std::vector<float> data;
        data.reserve(256);
        for (int i = 0; i < 7; ++i) {
            const int items = (1 << i) + 1;  // boundaries; 2^i means
            std::vector<float> boundaries(static_cast<std::size_t>(items));
            const float start = 0.1f;
            const float end = 1.0f;
            const float step = (end - start) / static_cast<float>(items - 1);
            const int halfway = items / 2;
            for (int k = 0; k < items; ++k)
                boundaries[static_cast<std::size_t>(k)] =
                    k < halfway ? start + step * static_cast<float>(k) : end - step * static_cast<float>(items - k - 1);
            const float scale = static_cast<float>(std::pow(10.0, i - 6));
            for (int k = 0; k + 1 < items; ++k) {
                const float mean =
                    (boundaries[static_cast<std::size_t>(k)] + boundaries[static_cast<std::size_t>(k + 1)]) / 2.0f;
                data.push_back(scale * mean);
                data.push_back(-scale * mean);
            }
        }
        data.push_back(0.0f);
        data.push_back(1.0f);
        std::sort(data.begin(), data.end());
        std::array<float, 256> out{};
        std::copy(data.begin(), data.end(), out.begin());
        return out;
    }();
    return map;
}

/// Index of `x` (already scaled to about [-1, 1]) in `map`, exactly as bitsandbytes' CUDA
/// `dQuantize<0>` finds it (see the file comment). NaN goes to the lower end of the search.
inline std::uint8_t quantize_8bit_value(const std::array<float, 256>& map, float x) noexcept {
    int pivot = 127;
    int upper = 255;
    int lower = 0;
    float value = map[127];
    for (int step = 64; step > 0; step >>= 1) {
        if (x > value) {
            lower = pivot;
            pivot += step;
        } else {
            upper = pivot;
            pivot -= step;
        }
        value = map[static_cast<std::size_t>(pivot)];
    }
    if (upper == 255) upper = 254;
    const float to_lower = std::fabs(x - map[static_cast<std::size_t>(lower)]);
    const float to_upper = std::fabs(x - map[static_cast<std::size_t>(upper)]);
    return static_cast<std::uint8_t>(to_lower < to_upper ? lower : upper);
}

/// Values quantised to 8 bits in blocks: `codes[i]` indexes `dynamic_map_8bit()`, block `b`
/// (values `b*block_size ..`) has scale `absmax[b]`.
struct Blockwise8bit {
    std::vector<std::uint8_t> codes;  ///< one per value
    std::vector<float> absmax;        ///< one per block: ceil(codes.size() / block_size)
    Index block_size = 256;
};

/// Quantises `values` in blocks of `block_size` (bitsandbytes `quantize_blockwise` with the
/// dynamic map; see the file comment). A block of zeros gets absmax 0 and dequantises to zeros.
/// \param values the values, quantised in order
/// \param block_size >= 1 (bitsandbytes uses 256 for the nested absmax, 4096 by default elsewhere)
/// \throws pissa::invalid_argument for block_size < 1 or a non-finite value.
inline Blockwise8bit quantize_blockwise_8bit(const std::vector<float>& values, Index block_size = 256) {
    detail::require(block_size >= 1, "quantize_blockwise_8bit: block_size must be >= 1, got ", block_size);
    const auto& map = dynamic_map_8bit();
    const Index n = static_cast<Index>(values.size());
    Blockwise8bit out;
    out.block_size = block_size;
    out.codes.resize(values.size());
    out.absmax.resize(static_cast<std::size_t>((n + block_size - 1) / block_size));
    for (Index begin = 0, b = 0; begin < n; begin += block_size, ++b) {
        const Index end = std::min(n, begin + block_size);
        float absmax = 0.0f;
        for (Index i = begin; i < end; ++i) {
            const float v = values[static_cast<std::size_t>(i)];
            detail::require(std::isfinite(v), "quantize_blockwise_8bit: value ", i, " is not finite (", v, ")");
            absmax = std::max(absmax, std::fabs(v));
        }
        out.absmax[static_cast<std::size_t>(b)] = absmax;
        const float reciprocal = 1.0f / absmax;  // inf for an all-zero block, as in the kernel
        for (Index i = begin; i < end; ++i) {
            const float scaled = values[static_cast<std::size_t>(i)] * reciprocal;
            // 0 * inf is NaN in the kernel too; the zero block's codes dequantise to +-0 either way.
            out.codes[static_cast<std::size_t>(i)] = quantize_8bit_value(map, scaled);
        }
    }
    return out;
}

/// `map[codes[i]] * absmax[i / block_size]` in float32 (bitsandbytes `dequantize_blockwise`).
/// \throws pissa::invalid_argument when absmax has the wrong length for codes and block_size.
inline std::vector<float> dequantize_blockwise_8bit(const Blockwise8bit& q) {
    const Index n = static_cast<Index>(q.codes.size());
    detail::require(q.block_size >= 1, "dequantize_blockwise_8bit: block_size must be >= 1, got ", q.block_size);
    const Index blocks = (n + q.block_size - 1) / q.block_size;
    detail::require(static_cast<Index>(q.absmax.size()) == blocks, "dequantize_blockwise_8bit: ", n,
                    " codes in blocks of ", q.block_size, " need ", blocks, " absmax values, got ", q.absmax.size());
    const auto& map = dynamic_map_8bit();
    std::vector<float> out(q.codes.size());
    for (Index i = 0; i < n; ++i)
        out[static_cast<std::size_t>(i)] =
            map[q.codes[static_cast<std::size_t>(i)]] * q.absmax[static_cast<std::size_t>(i / q.block_size)];
    return out;
}

}  // namespace pissa

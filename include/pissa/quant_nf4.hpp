/// \file quant_nf4.hpp
/// \brief NF4 blockwise 4-bit quantisation with bitsandbytes' semantics (QLoRA's storage format).
///
/// What bitsandbytes does (csrc/kernels.cu `kQuantizeBlockwise<T, 64, 2, 0, NF4>`, `dQuantizeNF4`,
/// `nf4_dequantization_lut`; bitsandbytes/backends/default/ops.py `quantize_4bit`,
/// `_dequantize_4bit_impl`), and what this header reproduces bit for bit:
/// - the tensor is flattened in row-major order (`[out, in]` as stored in a checkpoint; element
///   `(i, j)` is number `i * cols + j`) and split into blocks of `block_size` consecutive values
///   (64 by default); the last block may be shorter;
/// - each block stores its float32 `absmax = max |x|`, and each value is scaled by the float32
///   reciprocal: `x * (1.0f / absmax)`;
/// - the scaled value gets the 4-bit code of the nearest NF4 value (`nf4_code_values`) by
///   bitsandbytes' decision tree: strict `>` against the float32 midpoints of adjacent code
///   values, so a value exactly on a midpoint takes the lower code, and NaN takes code 0;
/// - two codes per byte, the FIRST element in the HIGH nibble: `byte k = code(2k) << 4 | code(2k+1)`;
///   an odd element count pads the last low nibble with the code of a 0 (`0b0111`);
/// - an all-zero block has absmax 0, so `1/absmax = inf` and `0 * inf = NaN`: every code is 0
///   (-1.0) and dequantises to `-1 * 0 = -0.0` (as on the GPU);
/// - dequantisation is `nf4_code_values[code] * absmax` in float32, then cast to the output type.
/// Optional double quantisation (bitsandbytes `compress_statistics=True`): the absmax values, less
/// their mean (`offset`), are quantised by quantize_blockwise_8bit in blocks of 256; dequantisation
/// then uses `map[q] * absmax2 + offset` as each block's scale. The 4-bit codes are computed with
/// the exact absmax, as in bitsandbytes.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/quant_blockwise8.hpp>
#include <pissa/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace pissa {

/// The 16 NF4 values, indexed by their 4-bit code (bitsandbytes `nf4_dequantization_lut`).
inline constexpr std::array<float, 16> nf4_code_values = {-1.0f,
                                                          -0.6961928009986877f,
                                                          -0.5250730514526367f,
                                                          -0.39491748809814453f,
                                                          -0.28444138169288635f,
                                                          -0.18477343022823334f,
                                                          -0.09105003625154495f,
                                                          0.0f,
                                                          0.07958029955625534f,
                                                          0.16093020141124725f,
                                                          0.24611230194568634f,
                                                          0.33791524171829224f,
                                                          0.44070982933044434f,
                                                          0.5626170039176941f,
                                                          0.7229568362236023f,
                                                          1.0f};

/// The 15 decision thresholds of bitsandbytes' `dQuantizeNF4`: threshold k separates codes k and
/// k+1 (the float32 midpoint of `nf4_code_values[k]` and `[k+1]`).
inline constexpr std::array<float, 15> nf4_thresholds = {
    -0.8480964004993439f,  -0.6106329262256622f,   -0.4599952697753906f, -0.33967943489551544f, -0.23460740596055984f,
    -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,   0.2035212516784668f,
    0.2920137718319893f,   0.3893125355243683f,    0.5016634166240692f,  0.6427869200706482f,   0.8614784181118011f};

/// 4-bit NF4 code of a value already scaled by its block's reciprocal absmax: the number of
/// thresholds it strictly exceeds (identical to bitsandbytes' decision tree, NaN -> 0).
inline std::uint8_t nf4_encode(float x) noexcept {
    int code = 0;
    for (float t : nf4_thresholds) code += x > t ? 1 : 0;
    return static_cast<std::uint8_t>(code);
}

/// NF4 value of a 4-bit code (only the low nibble is read).
inline float nf4_decode(std::uint8_t code) noexcept { return nf4_code_values[code & 0x0Fu]; }

/// Options of NF4 quantisation.
struct Nf4Options {
    Index block_size = 64;           ///< values per absmax block; even, >= 2 (bitsandbytes: 64 .. 4096)
    bool double_quant = false;       ///< compress the absmax to 8 bits (bitsandbytes compress_statistics)
    Index double_quant_block = 256;  ///< absmax values per 8-bit block (bitsandbytes: 256)
};

/// Throws pissa::invalid_argument for options outside their ranges.
inline void require_valid(const Nf4Options& options) {
    detail::require(options.block_size >= 2 && options.block_size % 2 == 0,
                    "NF4: block_size must be even and >= 2 (bitsandbytes uses 64 .. 4096), got ", options.block_size);
    detail::require(options.double_quant_block >= 1, "NF4: double_quant_block must be >= 1, got ",
                    options.double_quant_block);
}

/// The double-quantised absmax of an Nf4Tensor: `absmax[b] ~= map[codes[b]] * absmax2 + offset`.
struct Nf4NestedAbsmax {
    Blockwise8bit quantized;  ///< 8-bit codes of `absmax - offset`, with their own float32 absmax
    float offset = 0.0f;      ///< mean of the absmax values (float32)
};

/// An NF4-quantised matrix `[rows, cols]` (the row-major flattening of W).
struct Nf4Tensor {
    Index rows = 0;
    Index cols = 0;
    Index block_size = 64;
    std::vector<std::uint8_t> packed;       ///< ceil(n / 2) bytes, first element in the high nibble
    std::vector<float> absmax;              ///< ceil(n / block_size) scales; empty when `nested`
    std::optional<Nf4NestedAbsmax> nested;  ///< the 8-bit absmax when double-quantised

    Index size() const { return rows * cols; }  ///< number of elements n
    Index num_blocks() const { return (size() + block_size - 1) / block_size; }

    /// 4-bit code of element `i` of the row-major flattening (element (r, c) is i = r * cols + c).
    std::uint8_t code(Index i) const {
        const std::uint8_t byte = packed[static_cast<std::size_t>(i / 2)];
        return static_cast<std::uint8_t>(i % 2 == 0 ? byte >> 4 : byte & 0x0Fu);
    }

    /// The scale of every block: `absmax`, or the dequantised nested absmax plus its offset.
    std::vector<float> block_scales() const {
        if (!nested) return absmax;
        std::vector<float> scales = dequantize_blockwise_8bit(nested->quantized);
        for (float& s : scales) s += nested->offset;
        return scales;
    }
};

namespace detail {

/// NF4 quantisation of `n` contiguous float32 values (the kernel behind quantize_nf4).
inline Nf4Tensor quantize_nf4_flat(const float* data, Index rows, Index cols, const Nf4Options& options) {
    const Index n = rows * cols;
    Nf4Tensor out;
    out.rows = rows;
    out.cols = cols;
    out.block_size = options.block_size;
    out.packed.assign(static_cast<std::size_t>((n + 1) / 2), 0);
    std::vector<float> absmax(static_cast<std::size_t>(out.num_blocks()));
    const Index blocks = out.num_blocks();
    const Index bs = options.block_size;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > (Index(1) << 16))
#endif
    for (Index b = 0; b < blocks; ++b) {
        const Index begin = b * bs;
        const Index end = std::min(n, begin + bs);
        float block_max = 0.0f;
        for (Index i = begin; i < end; ++i) block_max = std::max(block_max, std::fabs(data[i]));
        absmax[static_cast<std::size_t>(b)] = block_max;
        const float reciprocal = 1.0f / block_max;  // inf for an all-zero block, as on the GPU
        // Blocks start at even indices (bs is even), so each block owns whole bytes.
        for (Index i = begin; i < end; i += 2) {
            const std::uint8_t hi = nf4_encode(data[i] * reciprocal);
            const float second = i + 1 < end ? data[i + 1] : 0.0f;  // the kernel pads with 0
            const std::uint8_t lo = nf4_encode(second * reciprocal);
            out.packed[static_cast<std::size_t>(i / 2)] = static_cast<std::uint8_t>((hi << 4) | lo);
        }
    }
    if (!options.double_quant) {
        out.absmax = std::move(absmax);
        return out;
    }
    double sum = 0.0;
    for (float a : absmax) sum += a;
    Nf4NestedAbsmax nested;
    nested.offset = static_cast<float>(sum / static_cast<double>(absmax.size()));
    for (float& a : absmax) a -= nested.offset;
    nested.quantized = quantize_blockwise_8bit(absmax, options.double_quant_block);
    out.nested = std::move(nested);
    return out;
}

}  // namespace detail

/// NF4-quantises `W [rows, cols]` with bitsandbytes' semantics (see the file comment).
///
/// \param W any dense Eigen expression of float, double, Eigen::half or Eigen::bfloat16, row- or
///          column-major; it is quantised in row-major element order. Values are converted to
///          float32 first (bitsandbytes quantises 16/32-bit floats only; double is rounded).
/// \param options block size (even) and double quantisation of the absmax
/// \throws pissa::invalid_argument for an empty W, a non-finite value, or invalid options.
template <class Derived>
Nf4Tensor quantize_nf4(const Eigen::MatrixBase<Derived>& W, const Nf4Options& options = {}) {
    static_assert(is_supported_storage_v<typename Derived::Scalar>,
                  "pissa::quantize_nf4: W must hold float, double, Eigen::half or Eigen::bfloat16");
    require_valid(options);
    detail::require(W.rows() > 0 && W.cols() > 0, "quantize_nf4: the matrix is empty (", W.rows(), " x ", W.cols(),
                    ")");
    const RowMatrix<float> flat = W.template cast<float>();
    if (!flat.allFinite()) {
        for (Index i = 0; i < flat.rows(); ++i)
            for (Index j = 0; j < flat.cols(); ++j)
                detail::require(std::isfinite(flat(i, j)), "quantize_nf4: the matrix has a non-finite value (",
                                flat(i, j), ") at row ", i, ", column ", j);
    }
    return detail::quantize_nf4_flat(flat.data(), flat.rows(), flat.cols(), options);
}

/// Dequantises `q` to a `[rows, cols]` matrix: `nf4_code_values[code] * scale` in float32 (bitsandbytes
/// `dequantize_4bit`), then cast to `Scalar` (float, double, Eigen::half or Eigen::bfloat16).
/// \throws pissa::invalid_argument when the tensor's sizes are inconsistent.
template <class Scalar = float>
Matrix<Scalar> dequantize_nf4(const Nf4Tensor& q) {
    static_assert(is_supported_storage_v<Scalar>, "pissa::dequantize_nf4: Scalar must be a supported storage type");
    detail::require(q.rows >= 0 && q.cols >= 0 && q.block_size >= 2 && q.block_size % 2 == 0,
                    "dequantize_nf4: bad shape ", q.rows, " x ", q.cols, " or block_size ", q.block_size);
    const Index n = q.size();
    detail::require(static_cast<Index>(q.packed.size()) == (n + 1) / 2, "dequantize_nf4: ", n, " values need ",
                    (n + 1) / 2, " packed bytes, got ", q.packed.size());
    const std::vector<float> scales = q.block_scales();
    detail::require(static_cast<Index>(scales.size()) == q.num_blocks(), "dequantize_nf4: ", q.num_blocks(),
                    " blocks of ", q.block_size, " need as many scales, got ", scales.size());
    RowMatrix<float> flat(q.rows, q.cols);
    float* out = flat.data();
    for (Index i = 0; i < n; ++i) out[i] = nf4_decode(q.code(i)) * scales[static_cast<std::size_t>(i / q.block_size)];
    return flat.template cast<Scalar>();
}

/// `deq(Q(W))`: W quantised to NF4 and back, in float32 (`[rows, cols]`, column-major).
template <class Derived>
Matrix<float> nf4_round_trip(const Eigen::MatrixBase<Derived>& W, const Nf4Options& options = {}) {
    return dequantize_nf4<float>(quantize_nf4(W, options));
}

}  // namespace pissa

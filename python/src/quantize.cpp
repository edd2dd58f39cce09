// Bindings of NF4 quantisation and the quantised initialisations (QLoRA, LoftQ, QPiSSA).
#include "core.hpp"

#include <pissa/qpissa.hpp>
#include <pissa/quant_nf4.hpp>

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

namespace pissa_python {
namespace {

template <class T>
nb::ndarray<nb::numpy> vector_to_numpy(const std::vector<T>& v) {
    return to_numpy(
        pissa::Vector<T>(Eigen::Map<const pissa::Vector<T>>(v.data(), static_cast<Eigen::Index>(v.size()))));
}

pissa::Nf4Options nf4_options(Eigen::Index block_size, bool double_quant) {
    pissa::Nf4Options options;
    options.block_size = block_size;
    options.double_quant = double_quant;
    return options;
}

pissa::Nf4Tensor quantize_nf4(const InArray& W, const std::string& dtype, Eigen::Index block_size, bool double_quant) {
    return dispatch_float(parse_dtype(dtype), [&](auto tag) {
        using Scalar = decltype(tag);
        require_array<Scalar>(W, 2, "quantize_nf4: W");
        nb::gil_scoped_release release;
        return pissa::quantize_nf4(view<Scalar>(W), nf4_options(block_size, double_quant));
    });
}

/// QLoRA, LoftQ or QPiSSA on one weight: the NF4 base, the adapter and the error after each step.
nb::dict quantized_init(const std::string& which, const InArray& W, const std::string& dtype, Eigen::Index rank,
                        double lora_alpha, bool use_rslora, const std::string& method, int niter, std::uint64_t seed,
                        bool fan_in_fan_out, int iterations, Eigen::Index block_size, bool double_quant) {
    pissa::QuantInitConfig config;
    config.pissa.rank = rank;
    config.pissa.lora_alpha = lora_alpha;
    config.pissa.use_rslora = use_rslora;
    if (method != "exact" && method != "randomized")
        throw pissa::invalid_argument("method must be 'exact' or 'randomized', got '" + method + "'");
    config.pissa.method = method == "exact" ? pissa::SvdMethod::exact : pissa::SvdMethod::randomized;
    config.pissa.randomized.niter = niter;
    config.pissa.randomized.seed = seed;
    config.pissa.fan_in_fan_out = fan_in_fan_out;
    config.iterations = iterations;
    config.nf4 = nf4_options(block_size, double_quant);
    if (which != "qlora" && which != "loftq" && which != "qpissa")
        throw pissa::invalid_argument("quantized init must be 'qlora', 'loftq' or 'qpissa', got '" + which + "'");
    return dispatch_float(parse_dtype(dtype), [&](auto tag) {
        using Scalar = decltype(tag);
        require_array<Scalar>(W, 2, "quantized init: W");
        pissa::QuantizedInit<Scalar> q;
        {
            nb::gil_scoped_release release;
            const auto w = view<Scalar>(W);
            q = which == "qlora"   ? pissa::qlora_init(w, config.nf4)
                : which == "loftq" ? pissa::loftq_init(w, config)
                                   : pissa::qpissa_init(w, config);
        }
        nb::dict d;
        d["base"] = std::move(q.base);
        d["A"] = matrix_to_numpy(q.adapter.A);
        d["B"] = matrix_to_numpy(q.adapter.B);
        d["scaling"] = static_cast<double>(q.adapter.scaling);
        d["error_history"] = q.error_history;
        return d;
    });
}

}  // namespace

void bind_quantize(nb::module_& m) {
    using namespace nb::literals;
    nb::class_<pissa::Nf4Tensor>(
        m, "Nf4Tensor",
        "An NF4-quantised matrix in bitsandbytes' layout: the row-major flattening packed two "
        "4-bit codes per byte (first element in the high nibble), one float32 absmax per block.")
        .def_ro("rows", &pissa::Nf4Tensor::rows)
        .def_ro("cols", &pissa::Nf4Tensor::cols)
        .def_ro("block_size", &pissa::Nf4Tensor::block_size)
        .def_prop_ro(
            "packed", [](const pissa::Nf4Tensor& t) { return vector_to_numpy(t.packed); }, nb::rv_policy::move,
            "uint8 [ceil(rows * cols / 2)]: the packed 4-bit codes")
        .def_prop_ro(
            "absmax", [](const pissa::Nf4Tensor& t) { return vector_to_numpy(t.block_scales()); }, nb::rv_policy::move,
            "float32 [blocks]: the scale of every block (dequantised when double-quantised)")
        .def_prop_ro("double_quant", [](const pissa::Nf4Tensor& t) { return t.nested.has_value(); })
        .def(
            "codes",
            [](const pissa::Nf4Tensor& t) {
                pissa::Vector<std::uint8_t> codes(t.size());
                for (Eigen::Index i = 0; i < t.size(); ++i) codes(i) = t.code(i);
                return to_numpy(std::move(codes));
            },
            "uint8 [rows * cols]: the 4-bit code of every element, row-major")
        .def(
            "dequantize", [](const pissa::Nf4Tensor& t) { return matrix_to_numpy(pissa::dequantize_nf4<float>(t)); },
            "float32 [rows, cols]: the codes times their block's scale (bitsandbytes' dequantize_4bit)");
    m.def("quantize_nf4", &quantize_nf4, "W"_a, "dtype"_a, "block_size"_a, "double_quant"_a);
    m.def("quantized_init", &quantized_init, "which"_a, "W"_a, "dtype"_a, "rank"_a, "lora_alpha"_a, "use_rslora"_a,
          "method"_a, "niter"_a, "seed"_a, "fan_in_fan_out"_a, "iterations"_a, "block_size"_a, "double_quant"_a);
}

}  // namespace pissa_python

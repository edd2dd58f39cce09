// Bindings of the core: the PiSSA split, the two SVDs, the LoRA forward pass and the conversion.
#include "core.hpp"

#include <pissa/pissa.hpp>

#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <nanobind/stl/optional.h>

#include <optional>

namespace pissa_python {
namespace {

nb::dict quality_dict(const pissa::QualityReport& q) {
    nb::dict d;
    d["singular_values"] = q.singular_values;
    d["weight_norm"] = q.weight_norm;
    d["residual_norm"] = q.residual_norm;
    d["adapter_energy_fraction"] = q.adapter_energy_fraction;
    return d;
}

nb::dict convergence_dict(const pissa::ConvergenceReport& r) {
    nb::dict d;
    d["iterations"] = r.iterations;
    d["residual_bound"] = r.residual_bound;
    d["converged"] = r.converged;
    return d;
}

pissa::SvdMethod parse_method(const std::string& method) {
    if (method == "exact") return pissa::SvdMethod::exact;
    if (method == "randomized") return pissa::SvdMethod::randomized;
    throw pissa::invalid_argument("method must be 'exact' or 'randomized', got '" + method + "'");
}

pissa::ExactSvdAlgorithm parse_algorithm(const std::string& algorithm) {
    if (algorithm == "automatic") return pissa::ExactSvdAlgorithm::automatic;
    if (algorithm == "full") return pissa::ExactSvdAlgorithm::full;
    if (algorithm == "block_krylov") return pissa::ExactSvdAlgorithm::block_krylov;
    throw pissa::invalid_argument("algorithm must be 'automatic', 'full' or 'block_krylov', got '" + algorithm + "'");
}

/// The split of one weight: W copied once into the residual's buffer and split there in place
/// (pissa::init_in_place, the same arithmetic as pissa::init and the checkpoint job).
nb::dict init(const InArray& W, const std::string& dtype, Eigen::Index rank, double lora_alpha, bool use_rslora,
              const std::string& method, int niter, Eigen::Index oversampling, std::uint64_t seed, bool fan_in_fan_out,
              const std::string& init_method, const std::string& components, const std::string& products) {
    pissa::PissaConfig config;
    if (init_method != "pissa" && init_method != "olora")
        throw pissa::invalid_argument("init must be 'pissa' or 'olora', got '" + init_method + "'");
    if (components != "principal" && components != "minor")
        throw pissa::invalid_argument("components must be 'principal' or 'minor', got '" + components + "'");
    config.init = init_method == "olora" ? pissa::InitMethod::olora : pissa::InitMethod::pissa;
    config.components = components == "minor" ? pissa::Components::minor : pissa::Components::principal;
    config.rank = rank;
    config.lora_alpha = lora_alpha;
    config.use_rslora = use_rslora;
    config.method = parse_method(method);
    config.randomized.niter = niter;
    config.randomized.oversampling = oversampling;
    config.randomized.seed = seed;
    config.randomized.products = pissa::parse_product_precision(products);
    config.fan_in_fan_out = fan_in_fan_out;
    return dispatch(parse_dtype(dtype), [&](auto tag) {
        using Storage = decltype(tag);
        require_array<typename numpy_element<Storage>::type>(W, 2, "init: W");
        pissa::RowMatrix<Storage> residual;
        pissa::PissaAdapter<pissa::compute_scalar_t<Storage>> adapter;
        {
            nb::gil_scoped_release release;
            residual = view<Storage>(W);
            adapter = pissa::init_in_place(residual, config);
        }
        nb::dict d;
        d["A"] = matrix_to_numpy(adapter.A);
        d["B"] = matrix_to_numpy(adapter.B);
        d["residual"] = to_numpy(std::move(residual));
        d["scaling"] = static_cast<double>(adapter.scaling);
        d["singular_values"] = to_numpy(std::move(adapter.singular_values));
        d["quality"] = quality_dict(adapter.quality);
        d["convergence"] = convergence_dict(adapter.convergence);
        return d;
    });
}

template <class Scalar>
nb::tuple svd_tuple(pissa::SvdResult<Scalar>&& svd) {
    return nb::make_tuple(matrix_to_numpy(svd.U), to_numpy(std::move(svd.S)), matrix_to_numpy(svd.V),
                          convergence_dict(svd.report));
}

nb::tuple randomized_svd(const InArray& W, const std::string& dtype, Eigen::Index rank, int niter,
                         Eigen::Index oversampling, std::uint64_t seed) {
    pissa::RandomizedSvdOptions options;
    options.niter = niter;
    options.oversampling = oversampling;
    options.seed = seed;
    return dispatch_float(parse_dtype(dtype), [&](auto tag) {
        using Scalar = decltype(tag);
        require_array<Scalar>(W, 2, "randomized_svd: W");
        pissa::SvdResult<Scalar> svd;
        {
            nb::gil_scoped_release release;
            svd = pissa::randomized_svd(view<Scalar>(W), rank, options);
        }
        return svd_tuple(std::move(svd));
    });
}

nb::tuple truncated_svd(const InArray& W, const std::string& dtype, Eigen::Index rank, const std::string& algorithm,
                        double tolerance, int max_iterations) {
    pissa::ExactSvdOptions options;
    options.algorithm = parse_algorithm(algorithm);
    options.tolerance = tolerance;
    options.max_iterations = max_iterations;
    return dispatch_float(parse_dtype(dtype), [&](auto tag) {
        using Scalar = decltype(tag);
        require_array<Scalar>(W, 2, "truncated_svd: W");
        pissa::SvdResult<Scalar> svd;
        {
            nb::gil_scoped_release release;
            svd = pissa::truncated_svd(view<Scalar>(W), rank, options);
        }
        return svd_tuple(std::move(svd));
    });
}

nb::ndarray<nb::numpy> lora_forward(const InArray& x, const InArray& W, const InArray& A, const InArray& B,
                                    double scaling, std::optional<InArray> bias, const std::string& dtype) {
    return dispatch_float(parse_dtype(dtype), [&](auto tag) {
        using Scalar = decltype(tag);
        require_array<Scalar>(x, 2, "lora_forward: x");
        require_array<Scalar>(W, 2, "lora_forward: W");
        require_array<Scalar>(A, 2, "lora_forward: A");
        require_array<Scalar>(B, 2, "lora_forward: B");
        if (bias) require_array<Scalar>(*bias, 1, "lora_forward: bias");
        pissa::Matrix<Scalar> y;
        {
            nb::gil_scoped_release release;
            y = bias ? pissa::lora_forward(view<Scalar>(x), view<Scalar>(W), view<Scalar>(A), view<Scalar>(B), scaling,
                                           view_vector<Scalar>(*bias))
                     : pissa::lora_forward(view<Scalar>(x), view<Scalar>(W), view<Scalar>(A), view<Scalar>(B), scaling);
        }
        return matrix_to_numpy(y);
    });
}

nb::tuple pissa_to_lora(const InArray& A, const InArray& B, const InArray& A0, const InArray& B0,
                        const std::string& dtype) {
    return dispatch_float(parse_dtype(dtype), [&](auto tag) {
        using Scalar = decltype(tag);
        require_array<Scalar>(A, 2, "pissa_to_lora: A");
        require_array<Scalar>(B, 2, "pissa_to_lora: B");
        require_array<Scalar>(A0, 2, "pissa_to_lora: A0");
        require_array<Scalar>(B0, 2, "pissa_to_lora: B0");
        // Python gets A and B only (its lora_alpha comes from convert_lora_alpha): any scaling will do.
        auto pair = pissa::pissa_to_lora(view<Scalar>(A), view<Scalar>(B), view<Scalar>(A0), view<Scalar>(B0), 1.0);
        return nb::make_tuple(matrix_to_numpy(pair.A), matrix_to_numpy(pair.B));
    });
}

}  // namespace

void bind_decompose(nb::module_& m) {
    using namespace nb::literals;
    m.def("init", &init, "W"_a, "dtype"_a, "rank"_a, "lora_alpha"_a, "use_rslora"_a, "method"_a, "niter"_a,
          "oversampling"_a, "seed"_a, "fan_in_fan_out"_a, "init"_a, "components"_a, "products"_a);
    m.def("randomized_svd", &randomized_svd, "W"_a, "dtype"_a, "rank"_a, "niter"_a, "oversampling"_a, "seed"_a);
    m.def("truncated_svd", &truncated_svd, "W"_a, "dtype"_a, "rank"_a, "algorithm"_a, "tolerance"_a,
          "max_iterations"_a);
    m.def("lora_forward", &lora_forward, "x"_a, "W"_a, "A"_a, "B"_a, "scaling"_a, "bias"_a.none(), "dtype"_a);
    m.def("pissa_to_lora", &pissa_to_lora, "A"_a, "B"_a, "A0"_a, "B0"_a, "dtype"_a);
    m.def("lora_scaling", &pissa::lora_scaling, "lora_alpha"_a, "rank"_a, "use_rslora"_a);
    m.def("convert_lora_alpha", &pissa::convert_lora_alpha, "lora_alpha"_a, "use_rslora"_a);
    m.def("module_seed", &pissa::module_seed, "seed"_a, "index"_a);
}

}  // namespace pissa_python

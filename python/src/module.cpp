// pissa._core: the nanobind extension behind the `pissa` Python package (pissa/__init__.py holds
// the public, documented API; this module is its private engine).
#include "core.hpp"

#include <pissa/cancel.hpp>
#include <pissa/errors.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/version.hpp>

#include <nanobind/stl/string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nb = nanobind;

NB_MODULE(_core, m) {
    m.doc() = "pissa's C++ engine (use the functions of the pissa package)";
    m.attr("version") = pissa::version_string;
    // Bad input is a ValueError (nanobind's rule for std::invalid_argument, which pissa's
    // invalid_argument and format_error derive from); failed reads and writes are OSError; a failed
    // decomposition is an ArithmeticError.
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const pissa::io::io_error& e) {
            PyErr_SetString(PyExc_OSError, e.what());
        } catch (const pissa::numerical_error& e) {
            PyErr_SetString(PyExc_ArithmeticError, e.what());
        } catch (const pissa::cancelled& e) {
            PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
        }
    });
    m.def(
        "threads",
        [] {
#ifdef _OPENMP
            return omp_get_max_threads();
#else
            return 1;
#endif
        },
        "The number of threads the math uses (OpenMP).");
    m.def(
        "set_threads",
        [](int n) {
            if (n < 1) throw pissa::invalid_argument("set_threads: n must be >= 1, got " + std::to_string(n));
#ifdef _OPENMP
            omp_set_num_threads(n);
#endif
        },
        nb::arg("n"), "Sets the number of threads the math uses (OpenMP); without OpenMP, 1.");
    pissa_python::bind_decompose(m);
    pissa_python::bind_quantize(m);
    pissa_python::bind_checkpoint(m);
}

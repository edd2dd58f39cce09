#include "core.hpp"

#include <pissa/errors.hpp>

namespace pissa_python {

DType parse_dtype(const std::string& name) {
    if (name == "float32") return DType::float32;
    if (name == "float64") return DType::float64;
    if (name == "bfloat16") return DType::bfloat16;
    if (name == "float16") return DType::float16;
    throw pissa::invalid_argument("unsupported dtype '" + name +
                                  "': pissa takes float32, float64, bfloat16 or float16");
}

void throw_array_error(const char* what, std::size_t ndim, std::size_t got_ndim) {
    throw pissa::invalid_argument(std::string(what) + ": expected a " + std::to_string(ndim) +
                                  "-D array of the declared dtype, got " + std::to_string(got_ndim) +
                                  "-D or another dtype");
}

void throw_dtype_error(DType dtype) {
    const char* name = dtype == DType::bfloat16 ? "bfloat16" : dtype == DType::float16 ? "float16" : "this dtype";
    throw pissa::invalid_argument(std::string("this function takes float32 or float64 arrays, got ") + name);
}

}  // namespace pissa_python

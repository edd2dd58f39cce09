/// \file bdcsvd_instances.hpp
/// \brief Eigen's BDCSVD for float and double, compiled here: include this header in exactly one
/// translation unit of a program whose sources all define `PISSA_EXTERN_BDCSVD`.
///
/// With the macro, pissa's headers only declare `Eigen::BDCSVD<Matrix<float>>` and
/// `<Matrix<double>>` (`extern template`), which are most of the compile time of a source file that
/// decomposes; this header defines them once. All sources of the program must be compiled with the
/// same target flags (Eigen's alignment, and with it its allocator, depends on the instruction set).
#pragma once

#include <pissa/detail/bdcsvd.hpp>

template class Eigen::BDCSVD<pissa::Matrix<float>>;
template class Eigen::BDCSVD<pissa::Matrix<double>>;

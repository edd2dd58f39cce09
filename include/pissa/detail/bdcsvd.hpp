/// \file detail/bdcsvd.hpp
/// \brief Eigen's BDCSVD, the one dense SVD pissa uses (full truncated SVD, the small SVDs of the
/// randomized and Krylov methods, nuclear norms), and the option to compile it once per program.
///
/// `Eigen::BDCSVD<Matrix<float>>` and `<Matrix<double>>` are most of the compile time of code that
/// decomposes: about 25 s each with GCC 12 at -O2, against about 15 s for the rest of
/// randomized_svd. A program with many translation units may compile them once: define
/// `PISSA_EXTERN_BDCSVD` for all of them (these headers then only declare the two instantiations)
/// and include <pissa/bdcsvd_instances.hpp> in exactly one. All of them must be compiled with the
/// same target flags: Eigen's alignment, and with it its allocator, depends on the instruction set.
#pragma once

#include <pissa/types.hpp>

#include <Eigen/SVD>

#ifdef PISSA_EXTERN_BDCSVD
extern template class Eigen::BDCSVD<pissa::Matrix<float>>;
extern template class Eigen::BDCSVD<pissa::Matrix<double>>;
#endif

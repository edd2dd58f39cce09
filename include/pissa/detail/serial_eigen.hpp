/// \file detail/serial_eigen.hpp
/// \brief Runs Eigen's own dense operations single-threaded, whatever the OpenMP settings.
///
/// Eigen parallelises large GEMMs (and so its blocked QR) with OpenMP, and recomputes its blocking
/// sizes from the thread count: the rounding, and so the bits of a decomposition, would change
/// with the number of threads. pissa's kernels parallelise the passes over W themselves in a
/// thread-count-independent way; the small dense steps between them (QR of skinny blocks,
/// Rayleigh-Ritz) go through this wrapper. Eigen skips its own threading when called from inside
/// a parallel region of more than one thread, so the work runs in an `omp single` of a two-thread
/// team. No global state (Eigen::setNbThreads) is touched.
#pragma once

#include <exception>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pissa::detail {

/// Calls `work()` so that Eigen's GEMM inside it runs on one thread; exceptions propagate.
template <class Work>
void run_serial_eigen(Work&& work) {
#ifdef _OPENMP
    if (omp_in_parallel() || omp_get_max_threads() == 1) {
        work();
        return;
    }
    std::exception_ptr failure;
#pragma omp parallel num_threads(2)
    {
#pragma omp single
        {
            try {
                work();
            } catch (...) {
                failure = std::current_exception();
            }
        }
    }
    if (failure) std::rethrow_exception(failure);
#else
    work();
#endif
}

/// Runs two independent works at the same time on two threads, each with Eigen serial (as
/// run_serial_eigen); one after the other when OpenMP is off, limited to one thread, or already
/// inside a parallel region. Exceptions propagate.
template <class WorkA, class WorkB>
void run_serial_eigen_pair(WorkA&& work_a, WorkB&& work_b) {
#ifdef _OPENMP
    if (omp_in_parallel() || omp_get_max_threads() == 1) {
        work_a();
        work_b();
        return;
    }
    std::exception_ptr failure[2];
#pragma omp parallel num_threads(2)
    {
#pragma omp for schedule(static)
        for (int which = 0; which < 2; ++which) {
            try {
                if (which == 0) work_a();
                else work_b();
            } catch (...) {
                failure[which] = std::current_exception();
            }
        }
    }
    for (const std::exception_ptr& f : failure)
        if (f) std::rethrow_exception(f);
#else
    work_a();
    work_b();
#endif
}

}  // namespace pissa::detail

/// \file cancel.hpp
/// \brief Cooperative cancellation of long decompositions, e.g. from a SIGINT handler.
///
/// request_cancellation() sets a process-wide flag; every pass over a weight (each product of the
/// randomized and block Krylov SVDs) and every tensor of a checkpoint job checks it first and throws
/// pissa::cancelled, so a decomposition stops within one pass over W rather than at the end of
/// the tensor. The flag is a lock-free atomic, so setting it is async-signal-safe. A thrown
/// pissa::cancelled unwinds like any error: nothing half-written is left (the jobs write all or
/// nothing) and the arguments of in-place functions are left untouched.
#pragma once

#include <pissa/errors.hpp>

#include <atomic>

namespace pissa {

namespace detail {
inline std::atomic<bool> cancellation_flag{false};
static_assert(std::atomic<bool>::is_always_lock_free, "the cancellation flag must be settable from a signal handler");
}  // namespace detail

/// Asks every running pissa computation to stop (async-signal-safe).
inline void request_cancellation() noexcept { detail::cancellation_flag.store(true, std::memory_order_relaxed); }

/// Clears a request, so that later computations run again.
inline void clear_cancellation() noexcept { detail::cancellation_flag.store(false, std::memory_order_relaxed); }

/// True once request_cancellation() was called (and not cleared).
inline bool cancellation_requested() noexcept { return detail::cancellation_flag.load(std::memory_order_relaxed); }

/// Throws pissa::cancelled when cancellation was requested.
inline void throw_if_cancelled() {
    if (cancellation_requested()) throw cancelled("pissa: cancelled");
}

}  // namespace pissa

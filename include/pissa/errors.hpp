/// \file errors.hpp
/// \brief The tiers of failure in pissa.
///
/// 1. Bad caller input (rank out of range, shape mismatch, non-finite weights) throws
///    pissa::invalid_argument, a std::invalid_argument, with a message naming the sizes.
/// 2. A numerical failure (an Eigen decomposition that did not succeed) throws pissa::numerical_error.
/// 3. A computation stopped on request (cancel.hpp) throws pissa::cancelled.
/// 4. A malformed or unsupported file (safetensors, index, adapter config) throws
///    pissa::io::format_error, a pissa::invalid_argument: bad input that happens to live in a file.
/// 5. The operating system refusing a file operation (open, map, write, rename) throws
///    pissa::io::io_error.
/// 6. Internal invariants use PISSA_ASSERT, which defaults to assert() and may be redefined before
///    including any pissa header (the tests redefine it to throw).
#pragma once

#include <cassert>
#include <sstream>
#include <stdexcept>
#include <string>

#ifndef PISSA_ASSERT
#define PISSA_ASSERT(condition) assert(condition)
#endif

namespace pissa {

/// Thrown for bad caller input; the message names the problem and the sizes involved.
class invalid_argument : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

/// Thrown when a numerical routine fails (e.g. an Eigen decomposition reports an error).
class numerical_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Thrown when a computation stops because cancellation was requested (cancel.hpp).
class cancelled : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace io {

/// A malformed or unsupported file (safetensors, index, adapter config). The message names the file
/// and, where there is one, the tensor.
class format_error : public pissa::invalid_argument {
public:
    using pissa::invalid_argument::invalid_argument;
};

/// Thrown when the operating system refuses a file operation (open, map, write, rename).
class io_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

}  // namespace io

namespace detail {

/// Builds a message from any streamable pieces: concat("rank ", r, " > ", n).
template <class... Parts>
std::string concat(const Parts&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    return out.str();
}

/// Throws pissa::invalid_argument with the concatenated message when `condition` is false.
template <class... Parts>
void require(bool condition, const Parts&... parts) {
    if (!condition) throw invalid_argument(concat(parts...));
}

}  // namespace detail
}  // namespace pissa

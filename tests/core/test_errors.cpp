// Tests for errors.hpp: each tier's exception derives from the standard type the header names and
// carries its message; detail::require and detail::concat; PISSA_ASSERT may be redefined first.
#include "support.hpp"

#include <pissa/errors.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>

static_assert(std::is_base_of_v<std::invalid_argument, pissa::invalid_argument>);
static_assert(std::is_base_of_v<std::runtime_error, pissa::numerical_error>);
static_assert(std::is_base_of_v<std::runtime_error, pissa::cancelled>);
static_assert(std::is_base_of_v<pissa::invalid_argument, pissa::io::format_error>);
static_assert(std::is_base_of_v<std::runtime_error, pissa::io::io_error>);
// The tiers stay apart: bad input is not a runtime failure, and the reverse.
static_assert(!std::is_base_of_v<std::runtime_error, pissa::invalid_argument>);
static_assert(!std::is_base_of_v<std::invalid_argument, pissa::numerical_error>);
static_assert(!std::is_base_of_v<std::invalid_argument, pissa::io::io_error>);
static_assert(!std::is_base_of_v<pissa::numerical_error, pissa::cancelled>);

namespace {

/// The message of what `Thrown` becomes when caught as `Caught`, or "" when it is not caught so.
template <class Thrown, class Caught>
std::string caught_as(const std::string& message) {
    try {
        throw Thrown(message);
    } catch (const Caught& e) {
        return e.what();
    } catch (...) {
    }
    return "";
}

}  // namespace

TEST_CASE("each exception carries its message and is caught as the standard type it derives from") {
    CHECK(caught_as<pissa::invalid_argument, std::invalid_argument>("rank 9 > 8") == "rank 9 > 8");
    CHECK(caught_as<pissa::numerical_error, std::runtime_error>("BDCSVD failed") == "BDCSVD failed");
    CHECK(caught_as<pissa::cancelled, std::runtime_error>("cancelled") == "cancelled");
    CHECK(caught_as<pissa::io::format_error, pissa::invalid_argument>("f.safetensors: bad") == "f.safetensors: bad");
    CHECK(caught_as<pissa::io::format_error, std::invalid_argument>("x") == "x");
    CHECK(caught_as<pissa::io::io_error, std::runtime_error>("cannot open") == "cannot open");
    CHECK(caught_as<pissa::io::io_error, std::invalid_argument>("cannot open").empty());
    CHECK(caught_as<pissa::numerical_error, std::invalid_argument>("x").empty());
}

TEST_CASE("detail::require throws pissa::invalid_argument with the concatenated message, only when false") {
    CHECK(pissa::detail::concat("rank ", 9, " > ", 8.5, '!') == "rank 9 > 8.5!");
    CHECK_NOTHROW(pissa::detail::require(true, "never ", 1));
    CHECK_THROWS_WITH_AS(pissa::detail::require(false, "rank ", 9, " > ", 8), "rank 9 > 8", pissa::invalid_argument);
}

TEST_CASE("PISSA_ASSERT keeps a definition made before the pissa headers (the tests' throwing one)") {
    const auto holds = [](int two) { PISSA_ASSERT(two == 2); };
    CHECK_NOTHROW(holds(2));
    CHECK_THROWS_WITH_AS(holds(3), "PISSA_ASSERT failed: two == 2", std::logic_error);
}

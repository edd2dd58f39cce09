// Tests for version.hpp: the macros, pissa::version_string and the project version CMake parses from
// them agree.
#include "support.hpp"

#include <pissa/version.hpp>

#include <string>

static_assert(PISSA_VERSION_MAJOR >= 0 && PISSA_VERSION_MINOR >= 0 && PISSA_VERSION_PATCH >= 0);

TEST_CASE("version_string is MAJOR.MINOR.PATCH of the macros, and the CMake project's version") {
    const std::string from_macros = std::to_string(PISSA_VERSION_MAJOR) + "." + std::to_string(PISSA_VERSION_MINOR) +
                                    "." + std::to_string(PISSA_VERSION_PATCH);
    CHECK(std::string(pissa::version_string) == from_macros);
#ifdef PISSA_TEST_PROJECT_VERSION
    CHECK(std::string(PISSA_TEST_PROJECT_VERSION) == from_macros);
#endif
}

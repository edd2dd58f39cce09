/// \file version.hpp
/// \brief The single source of pissa's version number; CMake parses these three lines.
#pragma once

#define PISSA_VERSION_MAJOR 0
#define PISSA_VERSION_MINOR 1
#define PISSA_VERSION_PATCH 0

namespace pissa {

/// The library version as a "MAJOR.MINOR.PATCH" string.
inline constexpr const char* version_string = "0.1.0";

}  // namespace pissa

// Helpers of the pissa tool's end-to-end tests: run the built binary in a scratch folder, read
// what it wrote.
#pragma once

#include "io/io_support.hpp"
#include "support.hpp"

#include <pissa/io/checkpoint.hpp>
#include <pissa/io/tensor.hpp>

#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>

#include <sys/wait.h>

namespace pissa_cli_test {

using pissa::io::ByteView;
using pissa::io::Checkpoint;
using pissa::io::read_matrix;
using pissa_test::ScratchDir;
namespace fs = std::filesystem;

struct Run {
    int code;
    std::string out, err;
};

/// Runs `pissa <args>` in `dir` with the cache folder inside it; captures stdout and stderr.
inline Run pissa_run(const ScratchDir& dir, const std::string& args) {
    const auto out = dir / ".stdout", err = dir / ".stderr";
    const std::string command = "cd '" + dir.path().string() + "' && PISSA_CACHE_DIR='" + (dir / ".cache").string() +
                                "' '" + PISSA_TOOL + "' " + args + " > '" + out.string() + "' 2> '" + err.string() +
                                "'";
    const int status = std::system(command.c_str());
    Run r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, pissa_test::read_bytes(out), pissa_test::read_bytes(err)};
    fs::remove(out);
    fs::remove(err);
    return r;
}

/// Runs `sh -c` with `script` in `dir` (PISSA is the tool's path); returns the exit code.
inline int shell(const ScratchDir& dir, const std::string& script) {
    const std::string command = "cd '" + dir.path().string() + "' && PISSA='" + PISSA_TOOL + "' PISSA_CACHE_DIR='" +
                                (dir / ".cache").string() + "' sh -c '" + script + "'";
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline const std::string small_llama = "--layers 2 --hidden 64 --intermediate 96 --vocab 128 --heads 4";

inline std::string bytes_of(const Checkpoint& c, const std::string& name) {
    const auto& file = c.file_of(name);
    const ByteView v = file.bytes(file.at(name));
    return std::string(reinterpret_cast<const char*>(v.data), v.size);
}

/// Entries of a folder other than the given ones (to find leftovers such as temporary folders).
inline std::set<std::string> entries(const fs::path& dir) {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
    return out;
}

inline pissa::Matrix<double> weight(const Checkpoint& c, const std::string& name) {
    const auto& file = c.file_of(name);
    return read_matrix<double>(file, file.at(name));
}

}  // namespace pissa_cli_test

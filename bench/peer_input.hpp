// The matrices bench/compare_peers.py hands to the benchmark programs (bench_svd, bench_spectra):
// PISSA_PEER_INPUT="name:path:m:n:r:niter[:dtype];..." names raw row-major [m, n] files, dtype f32
// (float32, the default) or bf16 (bfloat16 bits).
#pragma once

#include <pissa/types.hpp>

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace pissa_bench {

/// One matrix of PISSA_PEER_INPUT and the decomposition to time on it.
struct FileCase {
    std::string name, path;
    pissa::Index m = 0, n = 0, r = 0;
    int niter = 4;  ///< randomized SVD power iterations
    bool bf16 = false;
};

/// The cases of PISSA_PEER_INPUT (none when it is unset); a malformed dtype exits with status 2,
/// naming `program`.
inline std::vector<FileCase> peer_input_cases(const char* program) {
    std::vector<FileCase> cases;
    const char* spec = std::getenv("PISSA_PEER_INPUT");
    if (spec == nullptr) return cases;
    std::stringstream all(spec);
    std::string item;
    while (std::getline(all, item, ';')) {
        if (item.empty()) continue;
        std::stringstream fields(item);
        FileCase c;
        std::string m, n, r, niter, dtype;
        std::getline(fields, c.name, ':');
        std::getline(fields, c.path, ':');
        std::getline(fields, m, ':');
        std::getline(fields, n, ':');
        std::getline(fields, r, ':');
        std::getline(fields, niter, ':');
        std::getline(fields, dtype, ':');
        c.m = std::atoll(m.c_str());
        c.n = std::atoll(n.c_str());
        c.r = std::atoll(r.c_str());
        c.niter = std::atoi(niter.c_str());
        if (dtype != "" && dtype != "f32" && dtype != "bf16") {
            std::fprintf(stderr, "%s: PISSA_PEER_INPUT: dtype of %s must be f32 or bf16, got %s\n", program,
                         c.name.c_str(), dtype.c_str());
            std::exit(2);
        }
        c.bf16 = dtype == "bf16";
        cases.push_back(c);
    }
    return cases;
}

}  // namespace pissa_bench

/// \file seed.hpp
/// \brief The seed rule of a whole-checkpoint job, which adapter metadata records so that a
/// `pissa_niter_K` split can be reproduced bit for bit.
///
/// A job seeded with `seed` decomposes its target weights in checkpoint order (shard by shard, each
/// shard in data order); the randomized SVD of target number `i` (0-based) is seeded with
/// `module_seed(seed, i)`. Each module thus draws from its own stream, and splitting one module
/// alone with that seed (`pissa::init`, the Python package) gives the same bits.
#pragma once

#include <pissa/detail/random.hpp>

#include <cstdint>

namespace pissa {

/// The seed of target number `index` of a job seeded with `seed`: splitmix64 of the seed mixed
/// with the index, so that neighbouring modules' streams do not overlap.
inline std::uint64_t module_seed(std::uint64_t seed, std::uint64_t index) { return detail::stream_seed(seed, index); }

/// The rule in words, as written to the adapter's `pissa.seed_rule` metadata.
inline constexpr const char* module_seed_rule =
    "module i (checkpoint order of targets) uses pissa::module_seed(seed, i)";

}  // namespace pissa

/// \file io/shard.hpp
/// \brief Splitting one checkpoint job over N independent processes (machines, array tasks, MPI
/// ranks): which part is this process's, and the deterministic partition of the work.
///
/// The work is the checkpoint's tensors in checkpoint order (shard file by shard file, each in data
/// order), each with a cost: the bytes it is read and written with plus, for a decomposed weight,
/// its estimated flops (see item_cost). Shard k of N takes one contiguous run of that sequence,
/// cut where the running cost crosses k/N of the total; every process computes the same cut from
/// the same checkpoint and options, without talking to the others. A run of tensors never shares an
/// output file with another shard's run: each shard writes its own part of every file it touches.
#pragma once

#include <pissa/errors.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace pissa::io {

/// This process's part of a job: shard `index` of `count` (0 <= index < count).
struct ShardSpec {
    std::uint64_t index = 0;
    std::uint64_t count = 1;
    std::string source;  ///< where the numbers came from ("--shard", "SLURM_ARRAY_TASK_ID", ...)

    bool operator==(const ShardSpec& o) const { return index == o.index && count == o.count; }
};

namespace detail {

/// Strict decimal parse of a whole string into an unsigned number (no sign, space or suffix).
inline bool parse_decimal(const std::string& text, std::uint64_t& out) {
    if (text.empty() || text.size() > 19) return false;
    out = 0;
    for (const char c : text) {
        if (c < '0' || c > '9') return false;
        out = out * 10 + static_cast<std::uint64_t>(c - '0');
    }
    return true;
}

}  // namespace detail

/// Reads the environment variable `name` (nullptr when unset); tests pass their own.
using EnvironmentLookup = std::function<const char*(const char* name)>;

/// Parses `--shard`'s value: `K/N` (0 <= K < N), `auto` (index and count from the launcher's
/// environment, see shard_from_environment) or `auto/N` (index from the environment, count N: what a
/// Kubernetes Indexed Job needs, whose pods see only `JOB_COMPLETION_INDEX`).
/// \throws pissa::invalid_argument naming the value and what is wrong with it.
inline ShardSpec parse_shard(
    const std::string& text, const EnvironmentLookup& env = [](const char* name) { return std::getenv(name); });

/// The shard of this process from its launcher's environment, checked in this order:
/// - Slurm job arrays: `SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`
///   (combined with a rank below when the array task runs several tasks: index = array index x
///   ranks + rank);
/// - ranks: Open MPI `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE`, then PMI (MPICH, Intel MPI)
///   `PMI_RANK`/`PMI_SIZE`, then Slurm tasks `SLURM_PROCID`/`SLURM_NTASKS`;
/// - Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX`, with the count given (`auto/N`).
/// `count` is the count given with `auto/N` (0: none); when the environment has a count too, they
/// must agree.
/// \throws pissa::invalid_argument when no launcher is recognised, a variable is not a number, or
///         the index is out of range (naming the variables).
inline ShardSpec shard_from_environment(std::uint64_t count, const EnvironmentLookup& env) {
    auto number = [&](const char* name, std::uint64_t& out) {
        const char* value = env(name);
        if (value == nullptr) return false;
        pissa::detail::require(detail::parse_decimal(value, out), "--shard auto: ", name, "='", value,
                               "' is not a non-negative decimal number");
        return true;
    };
    ShardSpec rank{0, 1, ""};
    std::uint64_t i = 0, n = 0;
    for (const auto& [index_name, size_name] :
         {std::pair<const char*, const char*>{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
          {"PMI_RANK", "PMI_SIZE"},
          {"SLURM_PROCID", "SLURM_NTASKS"}}) {
        if (!number(index_name, i)) continue;
        pissa::detail::require(number(size_name, n), "--shard auto: ", index_name, " is set but ", size_name,
                               " is not");
        rank = {i, n, index_name};
        break;
    }
    ShardSpec spec = rank;
    std::uint64_t array_id = 0, array_min = 0, array_count = 0;
    if (number("SLURM_ARRAY_TASK_ID", array_id)) {
        pissa::detail::require(number("SLURM_ARRAY_TASK_COUNT", array_count),
                               "--shard auto: SLURM_ARRAY_TASK_ID is set "
                               "but SLURM_ARRAY_TASK_COUNT is not");
        if (!number("SLURM_ARRAY_TASK_MIN", array_min)) array_min = 0;
        pissa::detail::require(array_id >= array_min && array_id - array_min < array_count,
                               "--shard auto: SLURM_ARRAY_TASK_ID=", array_id, " is outside the array's ", array_count,
                               " tasks from SLURM_ARRAY_TASK_MIN=", array_min,
                               " (arrays with a step, such as 0-15:4, are not supported: use --shard K/N)");
        spec = {(array_id - array_min) * rank.count + rank.index, array_count * rank.count,
                rank.source.empty() ? "SLURM_ARRAY_TASK_ID" : "SLURM_ARRAY_TASK_ID x " + rank.source};
    } else if (rank.source.empty() && number("JOB_COMPLETION_INDEX", i)) {
        pissa::detail::require(count > 0,
                               "--shard auto: JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) gives no "
                               "count; pass it as --shard auto/N with N = the Job's completions");
        spec = {i, count, "JOB_COMPLETION_INDEX"};
    }
    pissa::detail::require(!spec.source.empty(),
                           "--shard auto: no launcher found in the environment (Slurm "
                           "SLURM_ARRAY_TASK_ID or SLURM_PROCID, Open MPI OMPI_COMM_WORLD_RANK, PMI_RANK, Kubernetes "
                           "JOB_COMPLETION_INDEX); pass --shard K/N");
    pissa::detail::require(count == 0 || count == spec.count, "--shard auto/", count, ": the environment (",
                           spec.source, ") says ", spec.count, " shards");
    pissa::detail::require(spec.count > 0 && spec.index < spec.count, "--shard auto: ", spec.source, " gives shard ",
                           spec.index, " of ", spec.count);
    return spec;
}

inline ShardSpec parse_shard(const std::string& text, const EnvironmentLookup& env) {
    const auto slash = text.find('/');
    const std::string first = text.substr(0, slash);
    const std::string second = slash == std::string::npos ? "" : text.substr(slash + 1);
    std::uint64_t count = 0;
    if (first == "auto") {
        pissa::detail::require(slash == std::string::npos || (detail::parse_decimal(second, count) && count > 0),
                               "--shard '", text, "': expected auto or auto/N with N >= 1");
        return shard_from_environment(count, env);
    }
    ShardSpec spec;
    spec.source = "--shard";
    pissa::detail::require(slash != std::string::npos && detail::parse_decimal(first, spec.index) &&
                               detail::parse_decimal(second, spec.count),
                           "--shard '", text, "': expected K/N (shard K of N, counted from 0), auto or auto/N");
    pissa::detail::require(spec.count > 0 && spec.index < spec.count, "--shard '", text,
                           "': the index must be below the count (shards are 0 .. N-1)");
    return spec;
}

/// The estimated cost of one tensor of a job, in nanoseconds of a single core (integers, so that
/// every machine cuts the work at the same places): 1 ns per byte read and written, plus the
/// decomposition's flops at 32 per ns. `flops` is 0 for a tensor copied unchanged.
inline std::uint64_t item_cost(std::uint64_t bytes, double flops) {
    return 2 * bytes + static_cast<std::uint64_t>(std::min(flops / 32, 1e15));
}

/// The partition of `costs` (in work order) into `count` contiguous runs: returns count + 1
/// boundaries, run k being [bounds[k], bounds[k + 1]). Cut k lies where the running cost first
/// reaches k/count of the total (rounded to the nearer item boundary), so no run exceeds its share
/// by more than one item. Runs may be empty (more shards than items).
inline std::vector<std::size_t> partition_work(const std::vector<std::uint64_t>& costs, std::uint64_t count) {
    pissa::detail::require(count > 0 && count < (std::uint64_t{1} << 32), "partition_work: ", count,
                           " shards (1 .. 2^32 - 1)");
    std::vector<std::size_t> bounds(static_cast<std::size_t>(count) + 1, costs.size());
    bounds[0] = 0;
    std::uint64_t total = 0;
    for (auto c : costs) total += c;  // item_cost keeps a whole model far below 2^64
    std::size_t at = 0;
    std::uint64_t before = 0;  // cost of items [0, at)
    for (std::uint64_t k = 1; k < count; ++k) {
        // floor(total * k / count) without overflow (count < 2^32)
        const std::uint64_t target = total / count * k + total % count * k / count;
        while (at < costs.size() && before + costs[at] <= target) before += costs[at++];
        // Item `at` straddles the target: it goes to the run whose share it overlaps more.
        std::size_t cut = at;
        if (at < costs.size() && target - before > before + costs[at] - target) cut = at + 1;
        bounds[static_cast<std::size_t>(k)] = std::max(cut, bounds[static_cast<std::size_t>(k - 1)]);
    }
    return bounds;
}

}  // namespace pissa::io

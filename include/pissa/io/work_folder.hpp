/// \file io/work_folder.hpp
/// \brief The folder where a resumable or sharded job assembles its output: `.NAME.pissa-work`
/// beside the output NAME, the same for every process of the job, so that shards on several
/// machines (over a shared file system) and a later resumed run find each other's work.
///
/// Layout: `plan.json` (what the job is: its input, options and partition; every process must
/// agree on it), `journal/shard-K-of-N.jsonl` (each shard's progress, locked by the process running
/// the shard), `join.lock`, `parts/` (the output files in parts), `pieces/` (per-module side files),
/// `out/` (the joined output, renamed to NAME at the end, after which the folder is removed).
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/checkpoint.hpp>
#include <pissa/io/checksum.hpp>
#include <pissa/io/journal.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

#include <unistd.h>

namespace pissa::io {

/// The first place where two JSON values differ, as a path (`/adapter_config/r`), or "".
inline std::string first_difference(const nlohmann::ordered_json& a, const nlohmann::ordered_json& b,
                                    const std::string& at = "") {
    if (a == b) return "";
    if (a.is_object() && b.is_object()) {
        for (const auto& [key, value] : a.items()) {
            if (!b.contains(key)) return at + "/" + key;
            const std::string d = first_difference(value, b[key], at + "/" + key);
            if (!d.empty()) return d;
        }
        for (const auto& [key, value] : b.items())
            if (!a.contains(key)) return at + "/" + key;
    }
    return at.empty() ? "/" : at;
}

/// A job's work folder; see the file comment.
class WorkFolder {
public:
    /// The work folder of the (resolved, absolute) output folder `out`.
    explicit WorkFolder(const std::filesystem::path& out)
        : m_path(out.parent_path() / ("." + out.filename().string() + ".pissa-work")) {}

    const std::filesystem::path& path() const { return m_path; }
    std::filesystem::path plan_file() const { return m_path / "plan.json"; }
    std::filesystem::path parts() const { return m_path / "parts"; }
    std::filesystem::path pieces() const { return m_path / "pieces"; }
    std::filesystem::path out() const { return m_path / "out"; }
    std::filesystem::path join_lock() const { return m_path / "join.lock"; }
    std::filesystem::path journal(std::uint64_t shard, std::uint64_t count) const {
        return m_path / "journal" / ("shard-" + std::to_string(shard) + "-of-" + std::to_string(count) + ".jsonl");
    }

    bool exists() const { return detail::path_exists(m_path); }

    /// True when a process holds one of the folder's locks (a shard or a join is running).
    bool in_use() const {
        std::error_code ec;
        if (FileLock::held_elsewhere(join_lock())) return true;
        for (std::filesystem::directory_iterator it(m_path / "journal", ec), end; !ec && it != end; it.increment(ec))
            if (FileLock::held_elsewhere(it->path())) return true;
        return false;
    }

    /// Removes the folder, its plan first: a removal cut short leaves a folder without a plan,
    /// which no run trusts. \throws io_error when that fails.
    void remove() const {
        std::error_code ec;
        std::filesystem::remove(plan_file(), ec);
        std::filesystem::remove_all(m_path, ec);
        if (ec) throw io_error(m_path.string() + ": cannot remove: " + ec.message());
    }

    /// The plan recorded in the folder. \throws format_error when it is missing or not JSON.
    nlohmann::ordered_json read_plan() const {
        const std::string text = detail::read_text_file(plan_file(), max_index_size, "a job plan");
        return detail::parse_json_strict<nlohmann::ordered_json>(text.data(), text.data() + text.size(),
                                                                 plan_file().string());
    }

    /// Creates the folder with `plan`, or checks that the plan already there is `plan` (processes
    /// starting together race safely: the plan is linked into place, never replaced).
    /// \throws pissa::invalid_argument naming the first difference, followed by `remedy`.
    void agree_on_plan(const nlohmann::ordered_json& plan, const std::string& remedy) const {
        namespace fs = std::filesystem;
        std::error_code ec;
        for (const auto& dir : {m_path, m_path / "journal", parts(), pieces()}) {
            fs::create_directories(dir, ec);
            if (ec) throw io_error(dir.string() + ": cannot create the folder: " + ec.message());
        }
        const std::string text = plan.dump(2) + "\n";
        const fs::path tmp = m_path / (".plan.json." + std::to_string(::getpid()) + ".tmp");
        detail::write_text_file(tmp, text);
        const bool created = ::link(tmp.c_str(), plan_file().c_str()) == 0;
        fs::remove(tmp, ec);
        if (created) return;
        const auto there = read_plan();
        const std::string difference = first_difference(there, plan);
        if (!difference.empty())
            throw pissa::invalid_argument(m_path.string() + " holds the work of another job (its plan differs at " +
                                          difference + "): " + remedy);
    }

private:
    std::filesystem::path m_path;
};

/// A short identifier of a plan (the checksum of its text): journals start with it.
inline std::string plan_digest(const nlohmann::ordered_json& plan) {
    const std::string text = plan.dump();
    Checksum sum;
    sum.update(text.data(), text.size());
    return sum.hex();
}

}  // namespace pissa::io

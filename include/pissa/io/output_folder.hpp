/// \file io/output_folder.hpp
/// \brief All-or-nothing output folders: everything is written into a temporary folder beside the
/// output, which commit() renames into place. A run that fails or is interrupted leaves nothing
/// (no partial folder, no parent folder it created); a run killed outright leaves a temporary
/// folder named after its host and process, which the next run on the same output removes.
///
/// What the guard refuses, before anything is written (pissa::invalid_argument, naming the path):
/// - an output that exists (as a folder, file or dangling symbolic link), unless `force`;
/// - with `force`, an output that is not a folder;
/// - an output that is an input, inside an input folder, or contains an input;
/// - an output that is the working directory or one of its ancestors;
/// - an output whose parent is a file.
///
/// commit() never replaces what it was not allowed to: without `force`, an output that appeared
/// while the run was going (another run, another program) is left alone and the commit fails; with
/// `force`, only the folder that was there when the run began (same device and inode) is replaced.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/safetensors.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace pissa::io {

namespace detail {

/// True when `inner` is `outer` or inside it (both absolute and normalised).
inline bool path_within(const std::filesystem::path& inner, const std::filesystem::path& outer) {
    auto i = inner.begin();
    for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
        if (i == inner.end() || *i != *o) return false;
    return true;
}

/// The absolute, symlink-resolved form of `p` (resolving as far as the path exists).
inline std::filesystem::path resolved_path(const std::filesystem::path& p) {
    std::error_code ec;
    auto out = std::filesystem::weakly_canonical(std::filesystem::absolute(p), ec);
    if (ec) throw io_error(p.string() + ": cannot resolve the path: " + ec.message());
    if (out.filename().empty()) out = out.parent_path();
    return out;
}

inline std::string host_name() {
    char name[256] = {};
    if (::gethostname(name, sizeof name - 1) != 0 || !*name) return "host";
    std::string out(name);
    for (char& c : out)
        if (c == '/' || c == '.') c = '_';
    return out;
}

/// Removes `.<name>.pissa-tmp-<host>-<pid>-*` folders beside an output that were left by a run of
/// this host whose process no longer exists (killed outright: SIGKILL, power loss, OOM).
inline void remove_stale_temporaries(const std::filesystem::path& out) {
    namespace fs = std::filesystem;
    const std::string prefix = "." + out.filename().string() + ".pissa-tmp-" + host_name() + "-";
    std::error_code ec;
    for (fs::directory_iterator it(out.parent_path(), ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        const std::string rest = name.substr(prefix.size());
        char* stop = nullptr;
        const long pid = std::strtol(rest.c_str(), &stop, 10);
        if (pid <= 0 || stop == rest.c_str() || *stop != '-') continue;
        if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // still running
        std::error_code remove_ec;
        fs::remove_all(it->path(), remove_ec);
    }
}

}  // namespace detail

/// An output folder checked against the rules of the file comment, before anything is written,
/// and what its commit needs to know: whether it replaces a folder that was there, which one.
struct OutputTarget {
    std::filesystem::path out;  ///< absolute, symlinks resolved
    bool force = false;         ///< may replace an existing folder
    bool replaces = false;      ///< a folder was there when checked
    dev_t old_device = 0;       ///< that folder's identity
    ino_t old_inode = 0;
    std::filesystem::path created_parent;  ///< the outermost parent folder created for it, if any

    /// Checks the output folder (see the file comment) and creates its missing parent folders.
    /// \param path the output folder (relative to the working directory, or absolute)
    /// \param force_replace replace it if it exists (only if it is a folder)
    /// \param inputs files or folders the run reads (they must not overlap the output)
    /// \throws pissa::invalid_argument for a refused output, io_error when a folder cannot be created.
    OutputTarget(const std::filesystem::path& path, bool force_replace,
                 const std::vector<std::filesystem::path>& inputs)
        : force(force_replace) {
        namespace fs = std::filesystem;
        if (path.empty()) throw pissa::invalid_argument("no output folder given");
        out = detail::resolved_path(path);
        for (const auto& input : inputs) {
            const fs::path in = detail::resolved_path(input);
            if (detail::path_within(out, in))
                throw pissa::invalid_argument("refusing to write " + out.string() + " into the input " + in.string());
            if (detail::path_within(in, out))
                throw pissa::invalid_argument("refusing to replace " + out.string() + ": it contains the input " +
                                              in.string());
        }
        std::error_code ec;
        const fs::path cwd = fs::current_path(ec);
        if (!ec && detail::path_within(detail::resolved_path(cwd), out))
            throw pissa::invalid_argument("refusing to write " + out.string() +
                                          ": it is the working directory or one of its parents");
        struct stat st {};
        if (::lstat(out.c_str(), &st) == 0) {
            if (!force) throw pissa::invalid_argument(out.string() + " already exists; pass --force to replace it");
            if (!S_ISDIR(st.st_mode))
                throw pissa::invalid_argument(out.string() + " exists and is not a folder; not replacing it");
            replaces = true;
            old_device = st.st_dev;
            old_inode = st.st_ino;
        }
        // Parent folders: find the first missing one (to remove on failure), refuse a file on the way.
        fs::path existing = out.parent_path();
        std::vector<fs::path> missing;
        while (::stat(existing.c_str(), &st) != 0) {
            missing.push_back(existing);
            existing = existing.parent_path();
        }
        if (!S_ISDIR(st.st_mode))
            throw pissa::invalid_argument("cannot create " + out.string() + ": " + existing.string() +
                                          " is not a folder");
        if (!missing.empty()) {
            fs::create_directories(out.parent_path(), ec);
            if (ec) throw io_error(out.parent_path().string() + ": cannot create the folder: " + ec.message());
            created_parent = missing.back();
        }
    }

    /// Moves the finished folder `from` into place as `out`; see the file comment for what it
    /// refuses to replace. Returns a problem to report after success (the old output's leftovers), or "".
    /// \throws pissa::invalid_argument when the output appeared or changed meanwhile (the other
    ///         output is kept); io_error when a rename fails.
    std::string commit(const std::filesystem::path& from) const {
        namespace fs = std::filesystem;
        fs::path old;
        struct stat st {};
        if (::lstat(out.c_str(), &st) == 0) {
            const bool ours = replaces && st.st_dev == old_device && st.st_ino == old_inode;
            if (!ours && !force)
                throw pissa::invalid_argument(out.string() +
                                              " appeared while this run was writing; leaving it as it is");
            if (!S_ISDIR(st.st_mode))
                throw pissa::invalid_argument(out.string() + " is no longer a folder; not replacing it");
            std::random_device random;
            old = out.parent_path() / ("." + out.filename().string() + ".pissa-old-" + detail::host_name() + "-" +
                                       std::to_string(::getpid()) + "-" + std::to_string(random() % 1000000));
            if (::rename(out.c_str(), old.c_str()) != 0)
                throw io_error(out.string() + ": cannot move the old output aside: " + std::strerror(errno));
        }
        if (detail::rename_no_replace(from, out) != 0) {
            const int error = errno;
            if (!old.empty()) ::rename(old.c_str(), out.c_str());
            if (error == EEXIST || error == ENOTEMPTY)
                throw pissa::invalid_argument(out.string() +
                                              " appeared while this run was writing; leaving it as it is");
            throw io_error(out.string() + ": cannot move the output into place: " + std::strerror(error));
        }
        if (old.empty()) return "";
        std::error_code ec;
        fs::remove_all(old, ec);
        return ec ? "the new output is in place, but the old one could not be removed completely from " + old.string() +
                        ": " + ec.message()
                  : "";
    }

    /// Removes the parent folders created for the output, deepest first, while they are empty.
    void remove_created_parents() const {
        if (created_parent.empty()) return;
        for (auto p = out.parent_path(); detail::path_within(p, created_parent); p = p.parent_path()) {
            std::error_code ec;
            if (!std::filesystem::remove(p, ec) || ec) break;
            if (p == created_parent) break;
        }
    }
};

/// The guard of one output folder written in one go; see the file comment.
class OutputFolder {
public:
    /// Checks `out` (OutputTarget) and creates the temporary folder beside it.
    /// \param out the output folder (relative to the working directory, or absolute)
    /// \param force replace `out` if it exists (only if it is a folder)
    /// \param inputs files or folders the run reads (they must not overlap the output)
    /// \throws pissa::invalid_argument for a refused output, io_error when a folder cannot be created.
    OutputFolder(const std::filesystem::path& out, bool force, const std::vector<std::filesystem::path>& inputs)
        : m_target(out, force, inputs) {
        namespace fs = std::filesystem;
        const fs::path& final_out = m_target.out;
        detail::remove_stale_temporaries(final_out);
        std::random_device random;
        m_tmp = final_out.parent_path() / ("." + final_out.filename().string() + ".pissa-tmp-" + detail::host_name() +
                                           "-" + std::to_string(::getpid()) + "-" + std::to_string(random() % 1000000));
        std::error_code ec;
        if (!fs::create_directory(m_tmp, ec) || ec) {
            m_target.remove_created_parents();
            throw io_error(m_tmp.string() + ": cannot create the temporary output folder: " +
                           (ec ? ec.message() : std::string("it exists")));
        }
    }

    ~OutputFolder() {
        if (m_committed || m_tmp.empty()) return;
        std::error_code ec;
        std::filesystem::remove_all(m_tmp, ec);
        m_target.remove_created_parents();
    }
    OutputFolder(const OutputFolder&) = delete;
    OutputFolder& operator=(const OutputFolder&) = delete;

    /// The temporary folder to write into.
    const std::filesystem::path& path() const { return m_tmp; }
    /// Where the output appears after commit() (absolute).
    const std::filesystem::path& final_path() const { return m_target.out; }

    /// Moves the temporary folder into place (OutputTarget::commit).
    void commit() {
        m_warning = m_target.commit(m_tmp);
        m_committed = true;
    }

    /// After a successful commit: a problem the caller may report (the old output's leftovers), or "".
    const std::string& warning() const { return m_warning; }

private:
    OutputTarget m_target;
    std::filesystem::path m_tmp;
    bool m_committed = false;
    std::string m_warning;
};

}  // namespace pissa::io

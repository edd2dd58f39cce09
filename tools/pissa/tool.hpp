/// \file tool.hpp
/// \brief The pissa tool's plumbing: argument parsing, the progress bar, summary tables. No math here.
#pragma once

#include <pissa/errors.hpp>
#include <pissa/io/output_folder.hpp>
#include <pissa/io/peft.hpp>

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace pissa_tool {

namespace fs = std::filesystem;

/// A usage error: bad or missing arguments, an output that exists, ... (exit code 2).
class UsageError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Set by SIGINT/SIGTERM; long loops check it and stop (the output guard then cleans up).
extern std::atomic<bool> interrupted;

/// Set by a command whose work folder outlives a failure (a resumable or sharded job): the error
/// report then says where the work is kept instead of "nothing written".
extern std::string kept_work;

/// A small declarative argument parser: options (`--name VALUE` or `--name=VALUE`), flags, positionals.
class Args {
public:
    Args(std::string command, std::string synopsis, std::string description)
        : m_command(std::move(command)), m_synopsis(std::move(synopsis)), m_description(std::move(description)) {}

    Args& option(const std::string& name, const std::string& metavar, const std::string& help,
                 const std::string& default_value = "") {
        m_specs.push_back({name, metavar, help, default_value, false});
        return *this;
    }
    Args& flag(const std::string& name, const std::string& help) {
        m_specs.push_back({name, "", help, "", true});
        return *this;
    }
    Args& positional(const std::string& name, const std::string& help, bool required) {
        m_positional.push_back({name, help, required});
        return *this;
    }

    /// Parses argv (after the subcommand). Returns false when --help was given (help printed).
    /// \throws UsageError for unknown options, missing values, missing or extra positionals.
    bool parse(int argc, char** argv);

    bool has(const std::string& name) const { return m_values.count(name) > 0; }
    std::string get(const std::string& name) const;
    long long get_int(const std::string& name, long long min, long long max) const;
    double get_double(const std::string& name) const;
    std::uint64_t get_u64(const std::string& name) const;
    /// Positional by index (empty when not given).
    std::string pos(std::size_t i) const { return i < m_args.size() ? m_args[i] : std::string(); }
    void print_help(std::FILE* out) const;

private:
    struct Spec {
        std::string name, metavar, help, default_value;
        bool is_flag;
    };
    struct Positional {
        std::string name, help;
        bool required;
    };
    std::string m_command, m_synopsis, m_description;
    std::vector<Spec> m_specs;
    std::vector<Positional> m_positional;
    std::map<std::string, std::string> m_values;
    std::vector<std::string> m_args;
};

/// A one-line progress bar on stderr (only when stderr is a terminal): item i of n, name, rate, ETA.
class Progress {
public:
    explicit Progress(bool enabled);
    void update(std::size_t i, std::size_t n, const std::string& name, std::uint64_t bytes_done);
    void finish();

private:
    bool m_enabled;
    bool m_drawn = false;
    std::chrono::steady_clock::time_point m_start;
};

/// True when stderr is a terminal.
bool stderr_is_tty();

/// Prints rows as an aligned table with a header line (stdout).
void print_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

/// printf-style formatting into a std::string.
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/// "[4096, 4096]".
std::string shape_text(const std::vector<std::uint64_t>& shape);

/// Human size: "1.5 MiB".
std::string size_text(std::uint64_t bytes);

/// Seconds since `start`.
inline double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Sets the number of OpenMP / Eigen threads (0: leave the default).
void set_threads(int threads);

/// "a,b,,c" -> {"a", "b", "c"}.
std::vector<std::string> split_list(const std::string& text);

/// Declares the module-selection options: --targets (default `default_targets`), --target-regex,
/// --exclude, --exclude-regex, --layers, --layers-pattern.
Args& add_selection_options(Args& args, const std::string& default_targets);

/// Which modules a command works on (peft's target_modules, exclude_modules, layers_to_transform,
/// layers_pattern; rank_pattern and alpha_pattern where the command declares --rank-pattern
/// KEY=R,... and --alpha-pattern KEY=A,...). `--targets all-linear` becomes peft's string form.
/// \throws UsageError for exclusive options together, an empty list, a regex that does not
///         compile, a bad layer number, rank or alpha, or --layers with a string target_modules.
void set_targets_from_args(const Args& args, pissa::io::ModuleSelection& selection);

/// The built-in model: generated once into the cache folder ($PISSA_CACHE_DIR, else
/// $XDG_CACHE_HOME/pissa, else ~/.cache/pissa, else the temp folder) and reused.
fs::path builtin_model();

// Subcommands: each takes argv after the subcommand name and returns the exit code.
int cmd_init(int argc, char** argv);
int cmd_join(int argc, char** argv);
int cmd_convert(int argc, char** argv);
int cmd_merge(int argc, char** argv);
int cmd_export_gguf(int argc, char** argv);
int cmd_inspect(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_quant_error(int argc, char** argv);

/// Options of the synthetic checkpoint generator (`pissa generate`).
struct GenerateOptions {
    std::string arch = "llama";  ///< "llama" (nn.Linear [out, in]) or "gpt2" (Conv1D [in, out])
    int layers = 4;
    int hidden = 512;
    int intermediate = 1376;
    int heads = 8;
    int kv_heads = 0;  ///< key/value heads (grouped-query attention, llama); 0: as many as heads
    int vocab = 2048;
    int shards = 1;
    std::string dtype = "BF16";
    std::uint64_t seed = 0;
};
/// Writes the synthetic checkpoint into the existing folder `dir` (safetensors + config.json).
void generate_model(const fs::path& dir, const GenerateOptions& options, bool show_progress);

}  // namespace pissa_tool

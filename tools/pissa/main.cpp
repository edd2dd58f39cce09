// pissa: the whole PiSSA lifecycle on safetensors checkpoints, without Python.
//   pissa init [MODEL] --out DIR      residual model + peft adapter (DIR/pissa_init)
//   pissa join DIR                                      finish a job run in shards (init --shard K/N)
//   pissa convert --initial I --trained T --out OUT    trained PiSSA adapter -> rank-2r LoRA
//   pissa merge MODEL ADAPTER --out OUT                 W + s B A for every adapted weight
//   pissa export-gguf ADAPTER --arch A --out F.gguf     the adapter as a GGUF LoRA for llama.cpp
//   pissa inspect PATH                                  tensors of a checkpoint, or an adapter
//   pissa generate --out DIR                            the synthetic Llama-shaped test model
//   pissa quant-error [MODEL]                           NF4 error of QLoRA / LoftQ / QPiSSA per module
// Exit codes: 0 success, 2 usage or input error (nothing written), 1 internal error.
#include "tool.hpp"

#include <pissa/cancel.hpp>
#include <pissa/io/peft.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/version.hpp>

#include <Eigen/Core>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pissa_tool {

std::atomic<bool> interrupted{false};
std::string kept_work;

bool Args::parse(int argc, char** argv) {
    for (int i = 0; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            print_help(stdout);
            return false;
        }
        if (a.rfind("--", 0) == 0 && a.size() > 2) {
            std::string name = a.substr(2), value;
            bool inline_value = false;
            if (const auto eq = name.find('='); eq != std::string::npos) {
                value = name.substr(eq + 1);
                name = name.substr(0, eq);
                inline_value = true;
            }
            const Spec* spec = nullptr;
            for (const auto& s : m_specs)
                if (s.name == name) spec = &s;
            if (!spec) throw UsageError("unknown option --" + name);
            if (spec->is_flag) {
                if (inline_value) throw UsageError("--" + name + " takes no value");
                m_values[name] = "1";
            } else {
                if (!inline_value) {
                    if (i + 1 >= argc) throw UsageError("--" + name + " needs a value (" + spec->metavar + ")");
                    value = argv[++i];
                }
                m_values[name] = value;
            }
        } else {
            m_args.push_back(a);
        }
    }
    if (m_args.size() > m_positional.size())
        throw UsageError("unexpected argument '" + m_args[m_positional.size()] + "'");
    for (std::size_t i = m_args.size(); i < m_positional.size(); ++i)
        if (m_positional[i].required) throw UsageError("missing " + m_positional[i].name);
    return true;
}

std::string Args::get(const std::string& name) const {
    if (const auto it = m_values.find(name); it != m_values.end()) return it->second;
    for (const auto& s : m_specs)
        if (s.name == name) return s.default_value;
    return {};
}

namespace {

/// True when `text` is a plain decimal number: digits, at most one point, an optional exponent;
/// no sign, no surrounding space, no hexadecimal, inf or nan (strtod accepts all of those).
bool plain_decimal(const std::string& text) {
    std::size_t i = 0, digits = 0;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++digits;
    if (i < text.size() && text[i] == '.') {
        ++i;
        while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++digits;
    }
    if (digits == 0) return false;
    if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
        ++i;
        if (i < text.size() && (text[i] == '+' || text[i] == '-')) ++i;
        const std::size_t exponent = i;
        while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
        if (i == exponent) return false;
    }
    return i == text.size();
}

/// The whole of `text` as an integer of type T (std::from_chars: no space, no '+', base 10).
template <class T>
bool parse_integer(const std::string& text, T& value) {
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, value, 10);
    return !text.empty() && ec == std::errc() && ptr == end;
}

}  // namespace

long long Args::get_int(const std::string& name, long long min, long long max) const {
    const std::string text = get(name);
    long long v = 0;
    if (!parse_integer(text, v) || v < min || v > max)
        throw UsageError("--" + name + " must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) +
                         "], got '" + text + "'");
    return v;
}

double Args::get_double(const std::string& name) const {
    const std::string text = get(name);
    const double v = plain_decimal(text) ? std::strtod(text.c_str(), nullptr) : 0.0;
    if (!std::isfinite(v) || v <= 0)
        throw UsageError("--" + name + " must be a decimal number > 0 (e.g. 16, 0.5, 1e-3), got '" + text + "'");
    return v;
}

std::uint64_t Args::get_u64(const std::string& name) const {
    const std::string text = get(name);
    std::uint64_t v = 0;
    if (!parse_integer(text, v))
        throw UsageError("--" + name + " must be a non-negative decimal integer below 2^64, got '" + text + "'");
    return v;
}

void Args::print_help(std::FILE* out) const {
    std::fprintf(out, "usage: pissa %s %s\n\n%s\n", m_command.c_str(), m_synopsis.c_str(), m_description.c_str());
    if (!m_positional.empty()) {
        std::fprintf(out, "\narguments:\n");
        for (const auto& p : m_positional) std::fprintf(out, "  %-24s %s\n", p.name.c_str(), p.help.c_str());
    }
    std::fprintf(out, "\noptions:\n");
    for (const auto& s : m_specs) {
        const std::string left = "--" + s.name + (s.is_flag ? "" : " " + s.metavar);
        std::string help = s.help;
        if (!s.default_value.empty()) help += " (default " + s.default_value + ")";
        std::fprintf(out, "  %-24s %s\n", left.c_str(), help.c_str());
    }
    std::fprintf(out, "  %-24s %s\n", "--help", "show this help");
    std::fprintf(out, "\nexit codes: 0 success, 2 usage or input error (nothing written), 1 internal error\n");
}

bool stderr_is_tty() { return ::isatty(STDERR_FILENO) == 1; }

Progress::Progress(bool enabled) : m_enabled(enabled), m_start(std::chrono::steady_clock::now()) {}

void Progress::update(std::size_t i, std::size_t n, const std::string& name, std::uint64_t bytes_done) {
    if (interrupted) throw std::runtime_error("interrupted");
    if (!m_enabled || n == 0) return;
    const double elapsed = seconds_since(m_start);
    const double rate = elapsed > 0 ? static_cast<double>(i) / elapsed : 0.0;
    const double eta = rate > 0 ? static_cast<double>(n - i) / rate : 0.0;
    constexpr int width = 24;
    const int filled = static_cast<int>(width * static_cast<double>(i) / static_cast<double>(n));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.append(static_cast<std::size_t>(width - filled), '.');
    std::string shown = name.size() > 40 ? "..." + name.substr(name.size() - 37) : name;
    std::fprintf(stderr, "\r\033[K[%s] %zu/%zu %-40s %5.1f t/s %6.1f MB/s ETA %3d:%02d", bar.c_str(), i + 1, n,
                 shown.c_str(), rate, elapsed > 0 ? static_cast<double>(bytes_done) / elapsed / 1e6 : 0.0,
                 static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
    std::fflush(stderr);
    m_drawn = true;
}

void Progress::finish() {
    if (m_drawn) std::fprintf(stderr, "\r\033[K");
    m_drawn = false;
}

void print_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
    std::vector<std::size_t> width(header.size());
    for (std::size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
    for (const auto& row : rows)
        for (std::size_t c = 0; c < row.size() && c < width.size(); ++c) width[c] = std::max(width[c], row[c].size());
    auto line = [&](const std::vector<std::string>& cells) {
        std::string out;
        for (std::size_t c = 0; c < cells.size(); ++c) {
            // first column left-aligned (names), the others right-aligned (numbers)
            const std::string pad(width[c] - cells[c].size(), ' ');
            out += c == 0 ? cells[c] + pad : pad + cells[c];
            if (c + 1 < cells.size()) out += "  ";
        }
        std::printf("%s\n", out.c_str());
    };
    line(header);
    std::size_t total = 0;
    for (auto w : width) total += w + 2;
    std::printf("%s\n", std::string(total > 2 ? total - 2 : 0, '-').c_str());
    for (const auto& row : rows) line(row);
}

std::string format(const char* fmt, ...) {
    char buffer[512];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buffer, sizeof buffer, fmt, args);
    va_end(args);
    return buffer;
}

std::string shape_text(const std::vector<std::uint64_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

std::string size_text(std::uint64_t bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = static_cast<double>(bytes);
    int u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        ++u;
    }
    return u == 0 ? std::to_string(bytes) + " B" : format("%.1f %s", v, units[u]);
}

void set_threads(int threads) {
    if (threads <= 0) return;
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    Eigen::setNbThreads(threads);
}

std::vector<std::string> split_list(const std::string& text) {
    std::vector<std::string> out;
    std::stringstream in(text);
    std::string item;
    while (std::getline(in, item, ','))
        if (!item.empty()) out.push_back(item);
    return out;
}

Args& add_selection_options(Args& args, const std::string& default_targets) {
    return args
        .option("targets", "LIST",
                "comma-separated module-name suffixes, or all-linear (peft's: every linear weight but the\n"
                "                           output layer)",
                default_targets)
        .option("target-regex", "RE", "full-match regular expression on module names (instead of --targets)")
        .option("exclude", "LIST", "module-name suffixes never targeted (peft's exclude_modules)")
        .option("exclude-regex", "RE", "full-match regular expression of modules never targeted (instead of --exclude)")
        .option("layers", "LIST",
                "layer numbers (0,1,5) a module matched by a --targets suffix must lie in (peft's\n"
                "                           layers_to_transform)")
        .option("layers-pattern", "NAME",
                "name(s) of the layer list for --layers (peft's layers_pattern: layers, h, ...); default:\n"
                "                           the first numbered component of the module name");
}

namespace {

/// Compiles a regular expression of an option, as the library will. \throws UsageError.
void check_regex(const std::string& option, const std::string& pattern) {
    try {
        std::regex check(pattern);
    } catch (const std::regex_error& e) {
        throw UsageError("--" + option + " is not a valid regular expression: " + std::string(e.what()));
    }
}

/// "KEY=V,KEY=V" -> pairs in order; the value follows the last '=' of an entry.
template <class Value, class Parse>
std::vector<std::pair<std::string, Value>> parse_pattern_option(const Args& args, const std::string& option,
                                                                Parse parse) {
    std::vector<std::pair<std::string, Value>> out;
    for (const auto& entry : split_list(args.get(option))) {
        const auto eq = entry.rfind('=');
        if (eq == std::string::npos || eq == 0 || eq + 1 == entry.size())
            throw UsageError("--" + option + ": '" + entry + "' is not KEY=VALUE");
        const std::string key = entry.substr(0, eq), value = entry.substr(eq + 1);
        check_regex(option, key);
        out.emplace_back(key, parse(value));
    }
    if (out.empty()) throw UsageError("--" + option + " is empty");
    return out;
}

}  // namespace

void set_targets_from_args(const Args& args, pissa::io::ModuleSelection& selection) {
    if (args.has("targets") && args.has("target-regex"))
        throw UsageError("--targets and --target-regex exclude each other");
    if (args.has("exclude") && args.has("exclude-regex"))
        throw UsageError("--exclude and --exclude-regex exclude each other");
    if (args.has("target-regex")) {
        selection.target_regex = args.get("target-regex");
        check_regex("target-regex", selection.target_regex);
    } else {
        selection.target_modules = split_list(args.get("targets"));
        if (selection.target_modules.empty()) throw UsageError("--targets is empty");
        if (selection.target_modules.size() == 1 &&
            pissa::io::ModuleSelection::is_all_linear(selection.target_modules[0])) {
            selection.target_regex = selection.target_modules[0];  // peft's string form
            selection.target_modules.clear();
        }
    }
    if (args.has("exclude")) {
        selection.exclude_modules = split_list(args.get("exclude"));
        if (selection.exclude_modules.empty()) throw UsageError("--exclude is empty");
    }
    if (args.has("exclude-regex")) {
        selection.exclude_regex = args.get("exclude-regex");
        check_regex("exclude-regex", selection.exclude_regex);
    }
    if (args.has("layers")) {
        for (const auto& item : split_list(args.get("layers"))) {
            long long layer = -1;
            const auto [end, error] = std::from_chars(item.data(), item.data() + item.size(), layer);
            if (error != std::errc() || end != item.data() + item.size() || layer < 0)
                throw UsageError("--layers: '" + item + "' is not a layer number (0, 1, ...)");
            selection.layers_to_transform.push_back(layer);
        }
        if (selection.layers_to_transform.empty()) throw UsageError("--layers is empty");
    }
    if (args.has("layers-pattern")) {
        if (!args.has("layers")) throw UsageError("--layers-pattern needs --layers");
        selection.layers_pattern = split_list(args.get("layers-pattern"));
        for (const auto& p : selection.layers_pattern) check_regex("layers-pattern", p);
    }
    if (args.has("layers") && !selection.target_regex.empty())
        throw UsageError("--layers needs --targets as a list of suffixes, not " +
                         std::string(args.has("target-regex") ? "--target-regex" : "all-linear") +
                         " (peft refuses layers_to_transform with a string target_modules)");
    if (args.has("rank-pattern"))
        selection.rank_pattern =
            parse_pattern_option<pissa::Index>(args, "rank-pattern", [&](const std::string& v) -> pissa::Index {
                long long r = 0;
                const auto [end, error] = std::from_chars(v.data(), v.data() + v.size(), r);
                if (error != std::errc() || end != v.data() + v.size() || r < 1 || r > (1 << 20))
                    throw UsageError("--rank-pattern: rank '" + v + "' is not an integer in [1, 1048576]");
                return static_cast<pissa::Index>(r);
            });
    if (args.has("alpha-pattern"))
        selection.alpha_pattern = parse_pattern_option<double>(args, "alpha-pattern", [&](const std::string& v) {
            char* end = nullptr;
            errno = 0;
            const double a = std::strtod(v.c_str(), &end);
            if (end != v.c_str() + v.size() || errno != 0 || !std::isfinite(a) || a <= 0)
                throw UsageError("--alpha-pattern: alpha '" + v + "' is not a number > 0");
            return a;
        });
}

}  // namespace pissa_tool

namespace {

/// The first SIGINT / SIGTERM asks the running job to stop (it unwinds within one pass over the
/// current weight and removes its temporary output); a second one ends the process at once.
/// (The handler is installed with SA_RESETHAND.) Exit status 128 + the signal: 130 for SIGINT.
std::atomic<int> received_signal{0};
void on_signal(int signal) {
    received_signal = signal;
    pissa_tool::interrupted = true;
    pissa::request_cancellation();
}

void install_signal_handlers() {
    struct sigaction action {};
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESETHAND;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
}

/// What a command printed on stdout must have reached it: a full disk or a closed pipe is an
/// error (exit 1), not a silent success. The command's files, if any, are written by then.
int check_stdout(const char* name, int status) {
    std::cout.flush();
    if (std::fflush(stdout) == 0 && !std::ferror(stdout) && std::cout.good()) return status;
    const int error = errno;
    std::fprintf(stderr, "pissa %s: error: writing to standard output failed: %s%s\n", name, std::strerror(error),
                 status == 0 ? " (the command's files were written)" : "");
    return status == 0 ? 1 : status;
}

void print_usage(std::FILE* out) {
    std::fprintf(out,
                 "pissa %d.%d.%d: PiSSA adapters for safetensors checkpoints, files peft loads unchanged\n\n"
                 "usage: pissa <command> [options]   (pissa <command> --help for each)\n\n"
                 "commands:\n"
                 "  init         split a model into a residual model and a PiSSA adapter (DIR/pissa_init);\n"
                 "               --quantize nf4 writes the NF4-quantised residual (QPiSSA)\n"
                 "  join         finish a job run in shards (pissa init --shard K/N)\n"
                 "  convert      turn a trained PiSSA adapter into a rank-2r LoRA for the original model\n"
                 "  merge        write W + s B A for every weight an adapter adapts\n"
                 "  export-gguf  write an adapter as a GGUF LoRA adapter for llama.cpp (llama, mistral, qwen2)\n"
                 "  inspect      list a checkpoint's tensors, or an adapter's rank, alpha and norms\n"
                 "  generate     write the built-in synthetic Llama-shaped checkpoint\n"
                 "  quant-error  NF4 quantisation error of QLoRA, LoftQ and QPiSSA per module\n\n"
                 "exit codes: 0 success, 2 usage or input error (nothing written), 1 internal error\n",
                 PISSA_VERSION_MAJOR, PISSA_VERSION_MINOR, PISSA_VERSION_PATCH);
}

}  // namespace

/// Keeps freed memory in the process: every module's decomposition allocates and frees tens of
/// MB of work space (more at higher ranks), which glibc would otherwise return to the kernel and
/// fault back in, page by page, for the next module (rank 128 on two Llama-7B-shaped layers:
/// 169 000 minor faults and 0.9 s of system time, against 21 000 and 0.5 s). Peak memory stays
/// that of the largest module.
void keep_freed_memory() {
#if defined(__GLIBC__)
    mallopt(M_MMAP_THRESHOLD, 256 << 20);  // blocks below 256 MiB from the heap, reused
    mallopt(M_TRIM_THRESHOLD, 1 << 30);    // the heap's free top kept up to 1 GiB
#endif
}

int main(int argc, char** argv) {
    install_signal_handlers();
    keep_freed_memory();
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    const std::string command = argv[1];
    if (command == "--help" || command == "-h" || command == "help") {
        print_usage(stdout);
        return check_stdout("help", 0);
    }
    if (command == "--version") {
        std::printf("pissa %d.%d.%d\n", PISSA_VERSION_MAJOR, PISSA_VERSION_MINOR, PISSA_VERSION_PATCH);
        return check_stdout("--version", 0);
    }
    using Command = int (*)(int, char**);
    const std::pair<const char*, Command> commands[] = {
        {"init", pissa_tool::cmd_init},         {"convert", pissa_tool::cmd_convert},
        {"merge", pissa_tool::cmd_merge},       {"inspect", pissa_tool::cmd_inspect},
        {"generate", pissa_tool::cmd_generate}, {"quant-error", pissa_tool::cmd_quant_error},
        {"join", pissa_tool::cmd_join},         {"export-gguf", pissa_tool::cmd_export_gguf}};
    for (const auto& [name, run] : commands) {
        if (command != name) continue;
        try {
            return check_stdout(name, run(argc - 2, argv + 2));
        } catch (const pissa_tool::UsageError& e) {
            std::fprintf(stderr, "pissa %s: error: %s\n(see pissa %s --help)\n", name, e.what(), name);
            return 2;
        } catch (const pissa::invalid_argument& e) {  // includes pissa::io::format_error: bad input files
            std::fprintf(stderr, "pissa %s: error: %s\n", name, e.what());
            return 2;
        } catch (const std::exception& e) {
            const std::string kept =
                pissa_tool::kept_work.empty() || !std::filesystem::exists(pissa_tool::kept_work)
                    ? std::string()
                    : "the work done so far is kept in " + pissa_tool::kept_work + "; rerun with --resume to continue";
            if (pissa_tool::interrupted) {
                std::fprintf(stderr, "\npissa %s: interrupted; %s\n", name,
                             kept.empty() ? "nothing written" : kept.c_str());
                return 128 + (received_signal ? received_signal.load() : SIGINT);
            }
            std::fprintf(stderr, "pissa %s: internal error: %s\n", name, e.what());
            if (!kept.empty()) std::fprintf(stderr, "pissa %s: %s\n", name, kept.c_str());
            return 1;
        }
    }
    std::fprintf(stderr, "pissa: unknown command '%s'\n\n", command.c_str());
    print_usage(stderr);
    return 2;
}

// fashion_mnist_finetune: the PiSSA paper's toy experiment (Figure 2a) on Fashion-MNIST, following
// the protocol in README.md beside it: pretrain a 784-256-10 MLP on the odd classes (or load it), fine-tune it on
// the even classes with LoRA, PiSSA (exact), PiSSA (randomized, niter 4) and full fine-tuning over a
// grid of learning rates and seeds, and report the loss curves.
//
//   fashion_mnist_finetune --pretrained pretrained.safetensors --out results/
//
// Writes into --out: table.md (the printed tables), loss_curves.csv and loss_best_lr.svg.
#include "model_io.hpp"
#include "report.hpp"

#include <pissa/svd.hpp>

#include <chrono>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace fmnist;

struct Options {
    std::filesystem::path data = default_data_dir;
    std::filesystem::path pretrained;  // empty: pretrain
    std::filesystem::path save_pretrained;
    std::filesystem::path out = ".";
    int steps = 300;
    std::vector<std::uint64_t> seeds = {0, 1, 2};
    std::vector<double> lrs = {1e-4, 3e-4, 1e-3, 3e-3};
    std::vector<Method> methods = {Method::lora, Method::pissa, Method::pissa_niter_4, Method::full};
    std::size_t train_limit = 0;  // 0: all
    std::size_t test_limit = 0;
    int pretrain_epochs = 2;
    int threads = 0;  // 0: OpenMP's default
};

const char* const usage = R"(usage: fashion_mnist_finetune [options]
  --pretrained FILE   load the pretrained MLP (safetensors: fc1.weight [256,784], fc1.bias, fc2.weight
                      [10,256], fc2.bias), e.g. the protocol's pretrained.safetensors; without it the
                      MLP is pretrained on the odd classes (protocol step 5, README.md)
  --save-pretrained FILE  write the pretrained MLP there (when pretraining)
  --data DIR          Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)
  --out DIR           where table.md, loss_curves.csv and loss_best_lr.svg go (default .)
  --methods LIST      comma-separated subset of lora,pissa,pissa_niter_4,full (default: all)
  --lrs LIST          Adam learning rates (default 1e-4,3e-4,1e-3,3e-3)
  --seeds LIST        seeds (default 0,1,2)
  --steps N           fine-tuning steps of batch 64 (default 300)
  --train-limit N     use only the first N odd and even training images (quick runs)
  --test-limit N      evaluate on the first N odd and even test images only
  --pretrain-epochs N (default 2)
  --threads N         runs in parallel (default: OpenMP's default)
)";

std::vector<std::string> split_list(const std::string& text) {
    std::vector<std::string> out;
    std::stringstream ss(text);
    for (std::string item; std::getline(ss, item, ',');)
        if (!item.empty()) out.push_back(item);
    if (out.empty()) throw std::invalid_argument("empty list '" + text + "'");
    return out;
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::cout << usage;
            std::exit(0);
        }
        if (i + 1 >= argc) throw std::invalid_argument("option " + arg + " needs a value (see --help)");
        const std::string value = argv[++i];
        if (arg == "--data") o.data = value;
        else if (arg == "--pretrained") o.pretrained = value;
        else if (arg == "--save-pretrained") o.save_pretrained = value;
        else if (arg == "--out") o.out = value;
        else if (arg == "--steps") o.steps = std::stoi(value);
        else if (arg == "--train-limit") o.train_limit = std::stoul(value);
        else if (arg == "--test-limit") o.test_limit = std::stoul(value);
        else if (arg == "--pretrain-epochs") o.pretrain_epochs = std::stoi(value);
        else if (arg == "--threads") o.threads = std::stoi(value);
        else if (arg == "--seeds") {
            o.seeds.clear();
            for (const auto& s : split_list(value)) o.seeds.push_back(std::stoull(s));
        } else if (arg == "--lrs") {
            o.lrs.clear();
            for (const auto& s : split_list(value)) o.lrs.push_back(std::stod(s));
        } else if (arg == "--methods") {
            o.methods.clear();
            for (const auto& s : split_list(value)) o.methods.push_back(parse_method(s));
        } else {
            throw std::invalid_argument("unknown option " + arg + " (see --help)");
        }
    }
    if (o.steps < 1) throw std::invalid_argument("--steps must be >= 1");
    for (double lr : o.lrs)
        if (!(lr > 0)) throw std::invalid_argument("--lrs: learning rates must be > 0");
    return o;
}

std::vector<Index> limited(std::vector<Index> v, std::size_t limit) {
    if (limit > 0 && v.size() > limit) v.resize(limit);
    return v;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int run(const Options& o) {
    const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
    const Dataset data = load_dataset(o.data);
    const auto odd_train = limited(positions_with_parity(data.train.labels, 1), o.train_limit);
    const auto even_train = limited(positions_with_parity(data.train.labels, 0), o.train_limit);
    const auto odd_test = limited(positions_with_parity(data.test.labels, 1), o.test_limit);
    const auto even_test = limited(positions_with_parity(data.test.labels, 0), o.test_limit);
    std::cout << "data: " << o.data.string() << format(": mean %.16g, std %.17g", data.mean, data.std)
              << " (protocol: 0.2860405969887955, 0.35302424451492237)\n"
              << "subsets: odd_train " << odd_train.size() << ", even_train " << even_train.size() << ", odd_test "
              << odd_test.size() << ", even_test " << even_test.size() << "\n";

    Mlp pretrained;
    if (!o.pretrained.empty()) {
        pretrained = load_mlp(o.pretrained);
        std::cout << "pretrained: loaded " << o.pretrained.string() << "\n";
    } else {
        pretrained = random_mlp(0);
        const int steps = pretrain(pretrained, data.train, odd_train, o.pretrain_epochs);
        std::cout << "pretrained: " << steps << " Adam steps on odd_train (" << format("%.1f s", seconds_since(start))
                  << ")\n";
        if (!o.save_pretrained.empty()) {
            save_mlp(o.save_pretrained, pretrained,
                     {{"data_mean", format("%.17g", data.mean)}, {"data_std", format("%.17g", data.std)}});
            std::cout << "pretrained: saved to " << o.save_pretrained.string() << "\n";
        }
    }
    const auto odd_eval = evaluate(pretrained, data.test, odd_test);
    const auto even_eval = evaluate(pretrained, data.test, even_test);
    const auto even_train_eval = evaluate(pretrained, data.train, even_train);
    std::cout << format("pretrained: odd_test accuracy %.4f, even_test accuracy %.4f, ", odd_eval.accuracy,
                        even_eval.accuracy)
              << format("cross-entropy on even_train %.4f (protocol: 0.9418, 0, 12.8869)\n", even_train_eval.loss);
    for (const auto* layer : {&pretrained.fc1, &pretrained.fc2}) {
        const auto svd = pissa::truncated_svd(layer->W, 9);
        std::cout << (layer == &pretrained.fc1 ? "fc1" : "fc2")
                  << format(": sigma1 %.4f, sigma8 %.4f, sigma9 %.4f\n", svd.S(0), svd.S(7), svd.S(8));
    }
    std::cout << "protocol: fc1 3.8170, 1.6099, 1.4224; fc2 0.9605, 0.5658, 0.5472\n";
    if (std::find(o.methods.begin(), o.methods.end(), Method::pissa_niter_4) != o.methods.end()) {
        // How much of the top-r energy the randomized SVD captures: ||s B A||_F^2 / sum_{i<=r} sigma_i^2.
        std::cout << "pissa_niter_4 captured top-8 energy (fc1, fc2):";
        for (auto seed : o.seeds) {
            std::cout << " seed " << seed;
            for (int index = 0; index < 2; ++index) {
                Layer layer = index == 0 ? pretrained.fc1 : pretrained.fc2;
                const double top = pissa::truncated_svd(layer.W, 8).S.cast<double>().squaredNorm();
                RunConfig config;
                config.method = Method::pissa_niter_4;
                config.seed = seed;
                attach_adapter(layer, config, index);
                std::cout << format(index == 0 ? " %.4f" : "/%.4f",
                                    (layer.s * layer.B * layer.A).cast<double>().squaredNorm() / top);
            }
            std::cout << ";";
        }
        std::cout << "\n";
    }

    // The grid: one run per method x lr x seed, in parallel (each run single-threaded), full
    // fine-tuning (the slowest) first so the threads finish together.
    std::vector<GridRun> runs;
    for (Method m : {Method::full, Method::lora, Method::pissa, Method::pissa_niter_4})
        if (std::find(o.methods.begin(), o.methods.end(), m) != o.methods.end())
            for (double lr : o.lrs)
                for (auto seed : o.seeds) {
                    RunConfig config;
                    config.method = m;
                    config.lr = lr;
                    config.seed = seed;
                    config.steps = o.steps;
                    runs.push_back({config, {}});
                }
    const auto grid_start = std::chrono::steady_clock::now();
    std::string error;
    int done = 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (std::size_t i = 0; i < runs.size(); ++i) {
        try {
            const auto run_start = std::chrono::steady_clock::now();
            runs[i].result = finetune(pretrained, data.train, even_train, data.test, even_test, runs[i].config);
            const auto& c = runs[i].config;
#pragma omp critical
            {
                std::cout << "[" << ++done << "/" << runs.size() << "] " << method_name(c.method) << " lr "
                          << lr_text(c.lr) << " seed " << c.seed
                          << format(": final window %.4f, even_test acc %.4f",
                                    window_mean(runs[i].result.loss, c.steps), runs[i].result.even_test_accuracy)
                          << format(" (%.1f s)", seconds_since(run_start)) << std::endl;
            }
        } catch (const std::exception& e) {
#pragma omp critical
            error = e.what();
        }
    }
    if (!error.empty()) throw std::runtime_error(error);
    const double grid_seconds = seconds_since(grid_start);
    double merge_change = 0;
    for (const auto& r : runs) merge_change = std::max(merge_change, r.result.merge_max_logit_change);
    std::cout << format("merged adapters (W_base + s B A) vs adapter forward: largest logit change %.2g\n",
                        merge_change);

    std::vector<Method> methods;
    for (Method m : {Method::lora, Method::pissa, Method::pissa_niter_4, Method::full})
        if (std::find(o.methods.begin(), o.methods.end(), m) != o.methods.end()) methods.push_back(m);
    const Grid grid(std::move(runs), methods, o.lrs, o.steps);

    std::ostringstream table;
    table << "Loss at step k = mean of the 10-step window ending at k; cells: mean over seeds [min–max].\n\n";
    print_table(table, grid);
    print_claim_check(table, grid);
    std::cout << "\n" << table.str();

    std::filesystem::create_directories(o.out);
    std::ofstream(o.out / "table.md") << table.str();
    {
        std::ofstream csv(o.out / "loss_curves.csv");
        write_csv(csv, grid);
    }
    {
        std::ofstream svg(o.out / "loss_best_lr.svg");
        write_svg(svg, grid, "Fashion-MNIST odd→even, r=8 on both layers, each method at its best lr");
    }
    std::cout << "\nwrote " << (o.out / "table.md").string() << ", " << (o.out / "loss_curves.csv").string() << ", "
              << (o.out / "loss_best_lr.svg").string() << "\n"
              << format("grid: %.0f runs in %.1f s; total %.1f s", static_cast<double>(grid.runs().size()),
                        grid_seconds, seconds_since(start));
#ifdef _OPENMP
    std::cout << " (" << omp_get_max_threads() << " threads)";
#endif
    std::cout << "\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const std::exception& e) {
        std::cerr << "fashion_mnist_finetune: " << e.what() << "\n";
        return 1;
    }
}

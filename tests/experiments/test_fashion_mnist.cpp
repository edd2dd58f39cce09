// Tests of examples/fashion_mnist_finetune: the IDX reader on hand-made files (plain, gzip'd,
// truncated, malformed), and the protocol's check values (experiments/fashion_mnist_finetune/README.md) on the real
// dataset (splitmix64 outputs, data orders, normalisation, the pretrained model's accuracy and loss, its singular
// values) plus the first fine-tuning window of the two deterministic methods against the reference run (the same
// README).
#include "support.hpp"

#include "model_io.hpp"
#include "report.hpp"

#include <pissa/svd.hpp>

#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

using fmnist::Index;

std::filesystem::path tmp(const std::string& name) { return std::filesystem::path(FMNIST_TMP) / name; }

void write_bytes(const std::filesystem::path& path, const std::vector<std::uint8_t>& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_gzip(const std::filesystem::path& path, const std::vector<std::uint8_t>& bytes) {
    gzFile f = gzopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
    REQUIRE(gzclose(f) == Z_OK);
}

std::vector<std::uint8_t> read_bytes(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A 3 x 2 x 2 IDX array with values 0..11.
std::vector<std::uint8_t> small_idx() {
    std::vector<std::uint8_t> b = {0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2};
    for (std::uint8_t v = 0; v < 12; ++v) b.push_back(v);
    return b;
}

template <class Fn>
std::string error_of(Fn&& fn) {
    try {
        fn();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "<no exception>";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

/// The real dataset, loaded once for all the protocol checks.
const fmnist::Dataset& dataset() {
    static const fmnist::Dataset data = fmnist::load_dataset(fmnist::default_data_dir);
    return data;
}

}  // namespace

TEST_CASE("IDX reader: plain and gzip'd hand-made files") {
    for (bool gz : {false, true}) {
        const auto path = tmp(gz ? "small.idx.gz" : "small.idx");
        gz ? write_gzip(path, small_idx()) : write_bytes(path, small_idx());
        const auto a = fmnist::read_idx(path);
        CHECK(a.dims == std::vector<std::uint32_t>{3, 2, 2});
        REQUIRE(a.data.size() == 12);
        CHECK(a.count() == 12);
        for (std::uint8_t v = 0; v < 12; ++v) CHECK(a.data[v] == v);
    }
    // Big-endian dimensions: 0x00000102 = 258.
    std::vector<std::uint8_t> wide = {0, 0, 8, 1, 0, 0, 1, 2};
    wide.resize(8 + 258, 7);
    CHECK(fmnist::parse_idx(wide, "wide").dims[0] == 258);
}

TEST_CASE("IDX reader: truncated and malformed files give clear errors naming the file") {
    auto bytes = small_idx();
    bytes.resize(bytes.size() - 3);
    write_gzip(tmp("short.idx.gz"), bytes);
    const std::string short_data = error_of([] { fmnist::read_idx(tmp("short.idx.gz")); });
    CHECK(contains(short_data, "short.idx.gz"));
    CHECK(contains(short_data, "truncated IDX data"));
    CHECK(contains(short_data, "announces 12 bytes, the file has 9"));

    // A gzip stream cut in the middle.
    std::vector<std::uint8_t> big = {0, 0, 8, 1, 0, 1, 0, 0};
    pissa::detail::SplitMix64 rng(1);
    for (int i = 0; i < 65536; ++i) big.push_back(static_cast<std::uint8_t>(rng.next()));
    write_gzip(tmp("big.idx.gz"), big);
    auto compressed = read_bytes(tmp("big.idx.gz"));
    CHECK_NOTHROW(fmnist::read_idx(tmp("big.idx.gz")));
    compressed.resize(compressed.size() / 2);
    write_bytes(tmp("cut.idx.gz"), compressed);
    const std::string cut = error_of([] { fmnist::read_idx(tmp("cut.idx.gz")); });
    CHECK(contains(cut, "cut.idx.gz"));
    CHECK(contains(cut, "truncated or corrupt gzip"));

    CHECK(contains(error_of([] { fmnist::parse_idx({0, 0, 8}, "tiny"); }), "tiny: truncated IDX file"));
    CHECK(contains(error_of([] { fmnist::parse_idx({0, 0, 8, 2, 0, 0}, "hdr"); }), "hdr: truncated IDX header"));
    CHECK(contains(error_of([] { fmnist::parse_idx({1, 0, 8, 1, 0, 0, 0, 0}, "magic"); }), "not an IDX file"));
    CHECK(contains(error_of([] {
                       fmnist::parse_idx({0, 0, 0x0d, 1, 0, 0, 0, 0}, "float");
                   }),
                   "unsupported IDX element type 0x0d"));
    CHECK(contains(error_of([] { fmnist::parse_idx({0, 0, 8, 0}, "zero"); }), "zero dimensions"));
    CHECK(contains(error_of([] {
                       fmnist::parse_idx({0, 0, 8, 1, 0, 0, 0, 1, 5, 6}, "long");
                   }),
                   "1 unexpected bytes after the IDX data"));
    CHECK(contains(error_of([] { fmnist::read_idx(tmp("does-not-exist.gz")); }), "cannot open"));
}

TEST_CASE("a missing dataset says how to install it") {
    const std::string message = error_of([] { fmnist::load_dataset(tmp("no-dataset-here")); });
    CHECK(contains(message, "train-images-idx3-ubyte.gz does not exist"));
    CHECK(contains(message, "apt-get install dataset-fashion-mnist"));
    CHECK(contains(message, "--data DIR"));
}

TEST_CASE("protocol check values: splitmix64 and the data orders") {
    pissa::detail::SplitMix64 rng(0);
    CHECK(rng.next() == 0xe220a8397b1dcdafULL);
    CHECK(rng.next() == 0x6e789e6aa1b965f4ULL);
    CHECK(rng.next() == 0x06c45d188009454fULL);

    const auto& data = dataset();
    const auto odd_train = fmnist::positions_with_parity(data.train.labels, 1);
    const auto even_train = fmnist::positions_with_parity(data.train.labels, 0);
    CHECK(odd_train.size() == 30000);
    CHECK(even_train.size() == 30000);
    CHECK(fmnist::positions_with_parity(data.test.labels, 1).size() == 5000);
    CHECK(fmnist::positions_with_parity(data.test.labels, 0).size() == 5000);

    auto pretrain_order = odd_train;
    pissa::detail::SplitMix64 pretrain_rng(0);
    fmnist::shuffle(pretrain_order, pretrain_rng);
    CHECK(std::vector<Index>(pretrain_order.begin(), pretrain_order.begin() + 8) ==
          std::vector<Index>{13009, 10319, 22843, 48750, 52499, 27545, 2542, 33387});

    const std::vector<std::vector<Index>> expected = {{6543, 5228, 11501, 24381, 26290, 13839, 1299, 16781},
                                                      {1752, 20019, 15636, 24446, 15183, 21443, 12251, 23402},
                                                      {29662, 1865, 7831, 9887, 21213, 15025, 14482, 711}};
    for (std::uint64_t seed = 0; seed < 3; ++seed) {
        const auto order = fmnist::finetune_order(30000, seed);
        CHECK(std::vector<Index>(order.begin(), order.begin() + 8) == expected[seed]);
    }
    const auto order0 = fmnist::finetune_order(30000, 0);
    const std::vector<Index> files = {13177, 10623, 23173, 48778, 52673, 27778, 2659, 33716};
    for (std::size_t i = 0; i < 8; ++i) CHECK(even_train[static_cast<std::size_t>(order0[i])] == files[i]);
}

TEST_CASE("protocol check values: normalisation, pretrained model, singular values") {
    const auto& data = dataset();
    CHECK(data.mean == doctest::Approx(0.2860405969887955).epsilon(1e-14));
    CHECK(data.std == doctest::Approx(0.35302424451492237).epsilon(1e-14));
    CHECK(data.train.x.rows() == 60000);
    CHECK(data.test.x.rows() == 10000);
    CHECK(data.train.x.cols() == 784);

    const fmnist::Mlp net = fmnist::load_mlp(FMNIST_PRETRAINED);
    const auto odd_test = fmnist::positions_with_parity(data.test.labels, 1);
    const auto even_test = fmnist::positions_with_parity(data.test.labels, 0);
    const auto even_train = fmnist::positions_with_parity(data.train.labels, 0);
    CHECK(fmnist::evaluate(net, data.test, odd_test).accuracy == doctest::Approx(0.9418).epsilon(1e-9));
    CHECK(fmnist::evaluate(net, data.test, even_test).accuracy == 0.0);
    CHECK(std::abs(fmnist::evaluate(net, data.train, even_train).loss - 12.8869) < 5e-5);

    // The protocol prints 4 decimals: half a unit, plus the float32 SVD's own rounding (~1e-6 relative).
    const auto fc1 = pissa::truncated_svd(net.fc1.W, 9);
    const auto fc2 = pissa::truncated_svd(net.fc2.W, 9);
    CHECK(std::abs(fc1.S(0) - 3.8170) < 6e-5);
    CHECK(std::abs(fc1.S(7) - 1.6099) < 6e-5);
    CHECK(std::abs(fc1.S(8) - 1.4224) < 6e-5);
    CHECK(std::abs(fc2.S(0) - 0.9605) < 6e-5);
    CHECK(std::abs(fc2.S(7) - 0.5658) < 6e-5);
    CHECK(std::abs(fc2.S(8) - 0.5472) < 6e-5);
}

TEST_CASE("the deterministic methods follow the reference run over the first 10 steps") {
    // The reference run, lr 3e-3, seeds 0-2, window 1-10: mean [min-max], printed to 3 decimals.
    struct Expect {
        fmnist::Method method;
        double mean, min, max;
    };
    const auto& data = dataset();
    const fmnist::Mlp net = fmnist::load_mlp(FMNIST_PRETRAINED);
    const auto even_train = fmnist::positions_with_parity(data.train.labels, 0);
    auto some_test = fmnist::positions_with_parity(data.test.labels, 0);
    some_test.resize(100);
    for (const Expect& e :
         {Expect{fmnist::Method::pissa, 4.708, 4.551, 4.862}, Expect{fmnist::Method::full, 2.848, 2.713, 2.990}}) {
        CAPTURE(fmnist::method_name(e.method));
        std::vector<double> windows;
        for (std::uint64_t seed = 0; seed < 3; ++seed) {
            fmnist::RunConfig config;
            config.method = e.method;
            config.lr = 3e-3;
            config.seed = seed;
            config.steps = 10;
            const auto run = fmnist::finetune(net, data.train, even_train, data.test, some_test, config);
            REQUIRE(run.loss.size() == 10);
            // Merging the trained adapters into the residual changes the logits by float rounding only.
            CHECK(run.merge_max_logit_change < 1e-3);
            // Step 1 is the pretrained model on its first batch (PiSSA's init leaves it unchanged):
            // losses near the whole-set 12.9.
            CHECK(run.loss[0] > 10.0);
            windows.push_back(fmnist::window_mean(run.loss, 10));
        }
        const auto s = fmnist::spread(windows);
        CHECK(std::abs(s.mean - e.mean) < 6e-4);
        CHECK(std::abs(s.min - e.min) < 6e-4);
        CHECK(std::abs(s.max - e.max) < 6e-4);
    }
}

TEST_CASE("Adam: the first step moves every entry by lr against the gradient's sign") {
    fmnist::AdamMoments adam;
    fmnist::MatrixF p = fmnist::MatrixF::Zero(2, 3), g(2, 3);
    g << 1, -2, 0.5, -1e-3, 3, -4;
    adam.step(p, g, 1, 1e-2);
    for (Index i = 0; i < p.size(); ++i) CHECK(p(i) == doctest::Approx(-1e-2 * (g(i) > 0 ? 1 : -1)).epsilon(1e-4));
    // Second step with the same gradient: bias correction keeps the step at lr.
    adam.step(p, g, 2, 1e-2);
    for (Index i = 0; i < p.size(); ++i) CHECK(p(i) == doctest::Approx(-2e-2 * (g(i) > 0 ? 1 : -1)).epsilon(1e-4));
}

TEST_CASE("cross-entropy gradient matches finite differences") {
    fmnist::MatrixF logits = pissa_test::gaussian<float>(4, 10, 3) * 3.0f;
    const std::vector<int> labels = {0, 9, 4, 4};
    fmnist::MatrixF grad;
    const double loss = fmnist::cross_entropy(logits, labels, &grad);
    CHECK(loss > 0);
    const float h = 1e-2f;
    for (Index i = 0; i < logits.rows(); ++i)
        for (Index j = 0; j < logits.cols(); ++j) {
            fmnist::MatrixF up = logits, down = logits;
            up(i, j) += h;
            down(i, j) -= h;
            const double fd =
                (fmnist::cross_entropy(up, labels, nullptr) - fmnist::cross_entropy(down, labels, nullptr)) / (2 * h);
            CHECK(grad(i, j) == doctest::Approx(fd).epsilon(1e-3).scale(1.0));
        }
}

TEST_CASE("report: windows, best lr, CSV and SVG") {
    std::vector<fmnist::GridRun> runs;
    for (double lr : {1e-3, 3e-3})
        for (std::uint64_t seed : {0, 1}) {
            fmnist::GridRun r;
            r.config.method = fmnist::Method::lora;
            r.config.lr = lr;
            r.config.seed = seed;
            for (int k = 1; k <= 20; ++k) r.result.loss.push_back(lr * 1000 / k + static_cast<double>(seed));
            runs.push_back(r);
        }
    const fmnist::Grid grid(runs, {fmnist::Method::lora}, {1e-3, 3e-3}, 20);
    CHECK(fmnist::window_mean(runs[0].result.loss, 10) == doctest::Approx(2.9289682539682538 / 10));
    CHECK(grid.best_lr(fmnist::Method::lora) == 1e-3);
    CHECK(fmnist::report_steps(300) == std::vector<int>{10, 30, 100, 300});
    CHECK(fmnist::report_steps(12) == std::vector<int>{10, 12});
    std::ostringstream csv, svg, table;
    fmnist::write_csv(csv, grid);
    const std::string csv_text = csv.str();
    CHECK(csv_text.rfind("method,lr,seed,step,loss\nlora,0.001,0,1,1\n", 0) == 0);
    CHECK(std::count(csv_text.begin(), csv_text.end(), '\n') == 1 + 4 * 20);
    fmnist::write_svg(svg, grid, "title");
    CHECK(contains(svg.str(), "<svg"));
    CHECK(contains(svg.str(), "lora (lr 0.001)"));
    CHECK(contains(svg.str(), "</svg>"));
    fmnist::print_table(table, grid);
    CHECK(contains(table.str(), "| lora | 0.001 **best** |"));
}

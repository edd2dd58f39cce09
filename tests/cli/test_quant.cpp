// End-to-end tests of the tool's quantisation: `pissa init --quantize nf4` (QPiSSA residual written
// as dequantised NF4) and `pissa quant-error`, checked against the library on the same weights.
#include "cli/cli_support.hpp"

#include <pissa/io/peft.hpp>
#include <pissa/io/targets.hpp>
#include <pissa/quant.hpp>
#include <pissa/seed.hpp>

#include <nlohmann/json.hpp>

using namespace pissa::io;
using namespace pissa_cli_test;

namespace {

/// The tool's configuration for module number `index` (seed rule: pissa::module_seed(seed, index)).
pissa::QuantInitConfig module_config(pissa::Index rank, int iterations, std::size_t index,
                                     bool fan_in_fan_out = false) {
    pissa::QuantInitConfig config;
    config.pissa.rank = rank;
    config.pissa.lora_alpha = static_cast<double>(rank);
    config.pissa.method = pissa::SvdMethod::randomized;
    config.pissa.randomized.niter = 4;
    config.pissa.randomized.seed = pissa::module_seed(0, index);
    config.pissa.fan_in_fan_out = fan_in_fan_out;
    config.iterations = iterations;
    return config;
}

std::vector<std::string> targets_of(const Checkpoint& model, const std::vector<std::string>& suffixes) {
    AdapterConfig selection;
    selection.target_modules = suffixes;
    return select_targets(model, selection);
}

}  // namespace

TEST_CASE(
    "init --quantize nf4: the written residual is deq(NF4) of the library's QPiSSA and re-quantises to its codes") {
    ScratchDir dir("cli-qpissa");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    const Run r =
        pissa_run(dir, "init m --out o --rank 4 --quantize nf4 --quant-iters 2 --targets q_proj,down_proj --json");
    INFO(r.err);
    REQUIRE(r.code == 0);
    const auto summary = nlohmann::json::parse(r.out);
    CHECK(summary["quantize"]["format"] == "nf4");
    CHECK(summary["quantize"]["quant_iters"] == 2);
    CHECK(summary["quantize"]["quant_block"] == 64);

    const Checkpoint in(dir / "m"), out(dir / "o");
    const Adapter adapter = read_adapter(dir / "o" / "pissa_init");
    CHECK(adapter.metadata.at("pissa.quantize") == "nf4");
    CHECK(adapter.metadata.at("pissa.quant_iters") == "2");
    const auto targets = targets_of(in, {"q_proj", "down_proj"});
    REQUIRE(targets.size() == 4);
    REQUIRE(summary["modules"].size() == 4);
    for (std::size_t i = 0; i < targets.size(); ++i) {
        const std::string module = module_of_weight(targets[i]);
        INFO(module);
        const auto& file = in.file_of(targets[i]);
        const pissa::RowMatrix<Eigen::bfloat16> W = copy_matrix<Eigen::bfloat16>(file, file.at(targets[i]));
        const auto expected = pissa::qpissa_init(W, module_config(4, 2, i));

        // the adapter is the library's, bit for bit
        const LoraModule* m = adapter.find(module);
        REQUIRE(m != nullptr);
        CHECK(m->A == expected.adapter.A);
        CHECK(m->B == expected.adapter.B);
        // the residual is deq(Q(W_res)) in bf16, and quantising it again gives the same codes
        CHECK(bytes_of(out, targets[i]) ==
              std::string(reinterpret_cast<const char*>(
                              matrix_bytes(pissa::dequantize_nf4<float>(expected.base), Dtype::BF16).data()),
                          static_cast<std::size_t>(W.size()) * 2));
        const auto& written_file = out.file_of(targets[i]);
        const pissa::RowMatrix<Eigen::bfloat16> written =
            copy_matrix<Eigen::bfloat16>(written_file, written_file.at(targets[i]));
        const pissa::Nf4Tensor again = pissa::quantize_nf4(written);
        CHECK(again.packed == expected.base.packed);
        // the reported QPiSSA error is ||W - written - s B A||_F (up to the bf16 rounding of the written values)
        const auto& row = summary["modules"][i];
        CHECK(row["module"] == module);
        const pissa::Matrix<double> error = W.cast<double>() - written.cast<double>() - (m->B * m->A).cast<double>();
        CHECK(error.norm() == doctest::Approx(row["qpissa"].get<double>()).epsilon(1e-2));
        CHECK(row["qpissa"].get<double>() < row["qlora"].get<double>());
        CHECK(row["loftq"].get<double>() < row["qlora"].get<double>());
        CHECK(row["qpissa_reduction"].get<double>() ==
              doctest::Approx(1 - row["qpissa"].get<double>() / row["qlora"].get<double>()));
    }
    // non-target tensors are untouched
    CHECK(bytes_of(in, "model.layers.0.self_attn.k_proj.weight") ==
          bytes_of(out, "model.layers.0.self_attn.k_proj.weight"));
    CHECK(summary["kinds"].back()["kind"] == "all");
    CHECK(summary["kinds"][0]["kind"] == "self_attn.q_proj");
    CHECK(summary["kinds"][0]["modules"] == 2);
}

TEST_CASE("init --quantize nf4 on Conv1D weights (fan_in_fan_out) and with another block size") {
    ScratchDir dir("cli-qpissa-gpt2");
    REQUIRE(pissa_run(dir, "generate --out m --arch gpt2 --layers 1 --hidden 32 --vocab 64 --heads 2").code == 0);
    const Run r =
        pissa_run(dir, "init m --out o --rank 2 --quantize nf4 --quant-block 32 --fan-in-fan-out --targets c_attn");
    INFO(r.err);
    REQUIRE(r.code == 0);
    CHECK(r.out.find("QPiSSA (reduction)") != std::string::npos);
    CHECK(r.out.find("mean per module kind") != std::string::npos);
    const Checkpoint in(dir / "m"), out(dir / "o");
    const std::string name = "transformer.h.0.attn.c_attn.weight";
    const auto& file = in.file_of(name);
    const pissa::RowMatrix<Eigen::bfloat16> W = copy_matrix<Eigen::bfloat16>(file, file.at(name));
    auto config = module_config(2, 1, 0, true);
    config.nf4.block_size = 32;
    const auto expected = pissa::qpissa_init(W, config);
    const auto& written_file = out.file_of(name);
    const pissa::RowMatrix<Eigen::bfloat16> written = copy_matrix<Eigen::bfloat16>(written_file, written_file.at(name));
    pissa::Nf4Options options;
    options.block_size = 32;
    CHECK(pissa::quantize_nf4(written, options).packed == expected.base.packed);
    // T = 1: the codes are those of the plain PiSSA residual (computed in float32, not rounded to bf16)
    auto plain = pissa::init(W.cast<float>(), config.pissa);
    CHECK(pissa::quantize_nf4(plain.residual, options).packed == expected.base.packed);
}

TEST_CASE("quant-error: the same errors as init --quantize, JSON modules and kinds, nuclear norm against the library") {
    ScratchDir dir("cli-quant-error");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    const Run init =
        pissa_run(dir, "init m --out o --rank 4 --quantize nf4 --quant-iters 2 --targets q_proj,down_proj --json");
    REQUIRE(init.code == 0);
    const Run r = pissa_run(dir, "quant-error m --rank 4 --quant-iters 2 --targets q_proj,down_proj --json");
    INFO(r.err);
    REQUIRE(r.code == 0);
    const auto a = nlohmann::json::parse(init.out), b = nlohmann::json::parse(r.out);
    CHECK(b["norm"] == "fro");
    CHECK(b["rank"] == 4);
    REQUIRE(b["modules"].size() == 4);
    for (std::size_t i = 0; i < 4; ++i) {
        CHECK(b["modules"][i]["module"] == a["modules"][i]["module"]);
        CHECK(b["modules"][i]["shape"] == a["modules"][i]["shape"]);
        for (const char* key : {"qlora", "loftq", "qpissa"}) CHECK(b["modules"][i][key] == a["modules"][i][key]);
    }
    CHECK(b["modules"][0]["module"] == "model.layers.0.self_attn.q_proj");
    CHECK(b["modules"][1]["shape"] == nlohmann::json::array({64, 96}));
    CHECK(b["kinds"].size() == 3);  // self_attn.q_proj, mlp.down_proj, all

    const Run nuclear = pissa_run(dir, "quant-error m --rank 4 --targets q_proj --norm nuclear --json");
    INFO(nuclear.err);
    REQUIRE(nuclear.code == 0);
    const auto n = nlohmann::json::parse(nuclear.out);
    const Checkpoint in(dir / "m");
    const auto& file = in.file_of("model.layers.1.self_attn.q_proj.weight");
    const pissa::RowMatrix<Eigen::bfloat16> W =
        copy_matrix<Eigen::bfloat16>(file, file.at("model.layers.1.self_attn.q_proj.weight"));
    const pissa::Matrix<float> w = W.cast<float>();
    const double expected_qlora = pissa::nuclear_norm(w - pissa::nf4_round_trip(w));
    CHECK(n["modules"][1]["qlora"].get<double>() == doctest::Approx(expected_qlora).epsilon(1e-6));
    const auto qpissa = pissa::qpissa_init(W, module_config(4, 1, 1));
    CHECK(n["modules"][1]["qpissa"].get<double>() ==
          doctest::Approx(pissa::quantization_error(W, qpissa, pissa::QuantErrorNorm::nuclear)).epsilon(1e-6));
    // ||E||_* >= ||E||_F
    const Run fro = pissa_run(dir, "quant-error m --rank 4 --targets q_proj --json");
    REQUIRE(fro.code == 0);
    CHECK(n["modules"][1]["qlora"].get<double>() > nlohmann::json::parse(fro.out)["modules"][1]["qlora"].get<double>());

    const Run table = pissa_run(dir, "quant-error m --rank 4 --targets q_proj,v_proj");
    REQUIRE(table.code == 0);
    CHECK(table.out.find("self_attn.v_proj") != std::string::npos);
    CHECK(table.out.find("LoftQ (reduction)") != std::string::npos);
    CHECK(entries(dir.path()) == std::set<std::string>{"m", "o"});  // quant-error writes nothing
}

TEST_CASE("quantisation options: usage errors exit 2 and write nothing") {
    ScratchDir dir("cli-quant-usage");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    const std::pair<const char*, const char*> cases[] = {
        {"init m --out o --quantize int8", "supports nf4 only"},
        {"init m --out o --quant-iters 3", "need --quantize nf4"},
        {"init m --out o --quantize nf4 --quant-block 63", "must be even"},
        {"init m --out o --quantize nf4 --quant-iters 0", "--quant-iters must be an integer"},
        {"quant-error m --norm l1", "--norm must be fro or nuclear"},
        {"quant-error m --rank 65 --targets q_proj", "rank"},
        {"quant-error m --targets nothing_here", "match no 2-D float weight"},
        {"quant-error m --exact --niter 2", "exclude each other"},
    };
    for (const auto& [args, message] : cases) {
        const Run r = pissa_run(dir, args);
        INFO(args, "\n", r.err);
        CHECK(r.code == 2);
        CHECK(r.err.find(message) != std::string::npos);
    }
    CHECK(entries(dir.path()) == std::set<std::string>{"m"});
    const Run help = pissa_run(dir, "quant-error --help");
    CHECK(help.code == 0);
    CHECK(help.out.find("--norm") != std::string::npos);
}

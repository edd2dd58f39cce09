// The tool under hostile use: numbers parsed strictly, scalings it cannot represent refused,
// standard output that cannot be written is an error, and an interrupt stops a run inside a
// tensor with exit 130 and nothing left behind.
#include "cli/cli_support.hpp"

#include <doctest/doctest.h>

using namespace pissa_cli_test;

TEST_CASE("numbers are parsed strictly: no space, sign, hexadecimal, inf or trailing text") {
    ScratchDir dir("cli-numbers");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    for (const char* bad : {"--seed ' -1'",
                            "--seed -1",
                            "--seed +1",
                            "--seed 0x10",
                            "--seed ' 1'",
                            "--seed 1x",
                            "--seed 18446744073709551616",
                            "--rank ' 4'",
                            "--rank +4",
                            "--rank 4.0",
                            "--rank 0x4",
                            "--alpha ' 8'",
                            "--alpha 0x1p3",
                            "--alpha inf",
                            "--alpha nan",
                            "--alpha +8",
                            "--alpha 8e",
                            "--alpha 8,5",
                            "--niter ' 2'",
                            "--threads -1"}) {
        const Run r = pissa_run(dir, std::string("init m --out o ") + bad);
        CHECK_MESSAGE(r.code == 2, bad);
        CHECK_MESSAGE(r.err.find("must be") != std::string::npos, bad, ": ", r.err);
    }
    CHECK(entries(dir.path()) == std::set<std::string>{"m"});
    // The plain forms are accepted.
    CHECK(pissa_run(dir, "init m --out o --seed 18446744073709551615 --rank 4 --alpha 8.5e0 --niter 2").code == 0);
}

TEST_CASE("a scaling float32 adapters cannot represent is refused, naming lora_alpha") {
    ScratchDir dir("cli-alpha");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    for (const char* alpha : {"1e40", "1e39", "1e-39", "1e-20"}) {
        const Run r = pissa_run(dir, std::string("init m --out o --rank 8 --alpha ") + alpha);
        CHECK_MESSAGE(r.code == 2, alpha);
        CHECK_MESSAGE(r.err.find("lora_alpha") != std::string::npos, alpha, ": ", r.err);
    }
    CHECK(entries(dir.path()) == std::set<std::string>{"m"});
}

TEST_CASE("standard output that cannot be written is an error") {
    ScratchDir dir("cli-stdout");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    CHECK(shell(dir, "\"$PISSA\" inspect m --json > /dev/full 2> err") == 1);
    CHECK(pissa_test::read_bytes(dir / "err").find("standard output") != std::string::npos);
    CHECK(shell(dir, "\"$PISSA\" inspect m > /dev/full 2> err") == 1);
    CHECK(shell(dir, "\"$PISSA\" --help > /dev/full 2> err") == 1);
    // init's files are written by the time the summary fails: exit 1, and the message says so.
    CHECK(shell(dir, "\"$PISSA\" init m --out o --json > /dev/full 2> err") == 1);
    CHECK(pissa_test::read_bytes(dir / "err").find("files were written") != std::string::npos);
    CHECK(fs::is_directory(dir / "o" / "pissa_init"));
}

TEST_CASE("SIGINT during a decomposition: exit 130, no output, no temporary folder") {
    ScratchDir dir("cli-sigint");
    // Exact rank-64 splits of 14 matrices of 1024 x 2816: many seconds on any machine, so the
    // interrupt after one second lands inside the job (most likely inside a tensor).
    REQUIRE(pissa_run(dir, "generate --out m --layers 2 --hidden 1024 --intermediate 2816 --vocab 64 --heads 8").code ==
            0);
    const int code = shell(dir,
                           "\"$PISSA\" init m --out o --exact --rank 64 --threads 1 "
                           "--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj 2> err & "
                           "pid=$!; sleep 1; kill -INT $pid; wait $pid");
    CHECK(code == 130);
    CHECK(pissa_test::read_bytes(dir / "err").find("interrupted; nothing written") != std::string::npos);
    CHECK(entries(dir.path()) == std::set<std::string>{"m", "err"});
}

TEST_CASE("unlisted .safetensors files and subfolders are not copied into the output, with a warning") {
    ScratchDir dir("cli-unlisted");
    REQUIRE(pissa_run(dir, "generate --out m --shards 2 " + small_llama).code == 0);
    fs::copy_file(dir / "m" / "model-00001-of-00002.safetensors", dir / "m" / "consolidated.safetensors");
    fs::create_directories(dir / "m" / "original");
    const Run r = pissa_run(dir, "init m --out o --rank 2");
    REQUIRE(r.code == 0);
    CHECK(r.err.find("warning: not copied from") != std::string::npos);
    CHECK(r.err.find("consolidated.safetensors original/") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "o" / "consolidated.safetensors"));
    CHECK_FALSE(fs::exists(dir / "o" / "original"));
    CHECK(fs::exists(dir / "o" / "config.json"));
}

TEST_CASE("input paths that name no file, and a file where the adapter goes, are bad input: exit 2") {
    ScratchDir dir("cli-input-paths");
    REQUIRE(pissa_run(dir, "generate --out m --shards 2 " + small_llama).code == 0);
    fs::copy(dir / "m", dir / "loop", fs::copy_options::recursive);
    fs::remove(dir / "loop" / "model-00002-of-00002.safetensors");
    fs::create_symlink("model-00002-of-00002.safetensors", dir / "loop" / "model-00002-of-00002.safetensors");
    Run r = pissa_run(dir, "init loop --out o --rank 2");
    CHECK(r.code == 2);
    CHECK(r.err.find("model-00002-of-00002.safetensors: cannot open") != std::string::npos);
    fs::create_symlink("nowhere.safetensors", dir / "dangling.safetensors");
    r = pissa_run(dir, "inspect dangling.safetensors");
    CHECK(r.code == 2);
    CHECK(r.err.find("dangling.safetensors") != std::string::npos);
    fs::copy(dir / "m", dir / "clash", fs::copy_options::recursive);
    pissa_test::write_bytes(dir / "clash" / "pissa_init", "notes");
    r = pissa_run(dir, "init clash --out o --rank 2");
    CHECK(r.code == 2);
    CHECK(r.err.find("adapter folder's name 'pissa_init'") != std::string::npos);
    CHECK(entries(dir.path()) == std::set<std::string>{"m", "loop", "dangling.safetensors", "clash"});
}

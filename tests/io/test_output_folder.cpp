// Tests for io/output_folder.hpp: all-or-nothing output folders that never replace what they were
// not allowed to.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/output_folder.hpp>

#include <fstream>

#include <sys/wait.h>

using pissa::io::OutputFolder;
using pissa_test::ScratchDir;
namespace fs = std::filesystem;

namespace {

std::size_t entries(const fs::path& dir) {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
    return n;
}

void touch(const fs::path& file, const std::string& text = "x") { pissa_test::write_bytes(file, text); }

}  // namespace

TEST_CASE("an output folder appears only on commit, and nothing is left without it") {
    ScratchDir dir("out-basic");
    {
        OutputFolder out(dir / "a/b/out", false, {});
        touch(out.path() / "file");
        CHECK_FALSE(fs::exists(dir / "a/b/out"));
        out.commit();
        CHECK(out.final_path() == fs::weakly_canonical(dir / "a/b/out"));
    }
    CHECK(pissa_test::read_bytes(dir / "a/b/out/file") == "x");
    {
        OutputFolder out(dir / "c/d/out", false, {});
        touch(out.path() / "file");
    }
    CHECK_FALSE(fs::exists(dir / "c"));  // the parents it created are removed too
    CHECK(entries(dir.path()) == 1);
}

TEST_CASE("an output that appears during the run is not replaced without force") {
    ScratchDir dir("out-race");
    OutputFolder first(dir / "out", false, {});
    touch(first.path() / "first");
    // A second run (or another program) creates the output meanwhile.
    {
        OutputFolder second(dir / "out", false, {});
        touch(second.path() / "second");
        second.commit();
    }
    CHECK_THROWS_AS(first.commit(), pissa::invalid_argument);
    CHECK(fs::exists(dir / "out/second"));
    CHECK_FALSE(fs::exists(dir / "out/first"));
}

TEST_CASE("force replaces the folder that was there at the start") {
    ScratchDir dir("out-force");
    fs::create_directories(dir / "out");
    touch(dir / "out/old");
    CHECK_THROWS_AS(OutputFolder(dir / "out", false, {}), pissa::invalid_argument);
    {
        OutputFolder out(dir / "out", true, {});
        touch(out.path() / "new");
        out.commit();
        CHECK(out.warning().empty());
    }
    CHECK(fs::exists(dir / "out/new"));
    CHECK_FALSE(fs::exists(dir / "out/old"));
    CHECK(entries(dir.path()) == 1);
}

TEST_CASE("refused outputs: a file, a dangling link, an input, the working directory, under a file") {
    ScratchDir dir("out-refused");
    touch(dir / "file");
    CHECK_THROWS_AS(OutputFolder(dir / "file", true, {}), pissa::invalid_argument);
    fs::create_symlink(dir / "nowhere", dir / "dangling");
    CHECK_THROWS_AS(OutputFolder(dir / "dangling", false, {}), pissa::invalid_argument);
    CHECK_THROWS_AS(OutputFolder(dir / "file/out", false, {}), pissa::invalid_argument);
    fs::create_directories(dir / "model");
    CHECK_THROWS_AS(OutputFolder(dir / "model", true, {dir / "model"}), pissa::invalid_argument);
    CHECK_THROWS_AS(OutputFolder(dir / "model/out", false, {dir / "model"}), pissa::invalid_argument);
    CHECK_THROWS_AS(OutputFolder(dir.path(), true, {dir / "model"}), pissa::invalid_argument);
    const fs::path cwd = fs::current_path();
    fs::current_path(dir / "model");
    CHECK_THROWS_AS(OutputFolder(".", true, {}), pissa::invalid_argument);
    CHECK_THROWS_AS(OutputFolder(dir.path(), true, {}), pissa::invalid_argument);
    fs::current_path(cwd);
}

TEST_CASE("a temporary folder left by a killed run is removed by the next run on the same output") {
    ScratchDir dir("out-stale");
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        OutputFolder out(dir / "out", false, {});
        touch(out.path() / "partial");
        ::_exit(0);  // no destructor: as SIGKILL would leave it
    }
    int status = 0;
    ::waitpid(child, &status, 0);
    CHECK(entries(dir.path()) == 1);  // the dead run's temporary folder
    {
        OutputFolder out(dir / "out", false, {});
        CHECK(entries(dir.path()) == 1);  // the stale one gone, ours there
    }
    CHECK(entries(dir.path()) == 0);
}

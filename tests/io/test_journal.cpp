// Tests for io/journal.hpp: records survive reopening, a torn or damaged record ends what is
// trusted, keep() cuts back, and the lock keeps a second writer out.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/errors.hpp>
#include <pissa/io/journal.hpp>

#include <string>

using namespace pissa::io;
using pissa_test::ScratchDir;

TEST_CASE("Journal: records survive reopening; a torn or damaged record ends what is trusted") {
    ScratchDir dir("journal");
    const auto path = dir / "j.jsonl";
    {
        Journal j(path, "test journal");
        CHECK(j.read().empty());
        j.append({{"plan", "x"}});
        j.append({{"from", 0}, {"to", 2}});
        j.append({{"from", 2}, {"to", 3}});
        // a second writer of the same journal is refused while the first holds it
        CHECK_THROWS_WITH_AS(Journal(path, "test journal"), doctest::Contains("in use by another process"),
                             pissa::invalid_argument);
        CHECK(FileLock::held_elsewhere(path));
    }
    CHECK_FALSE(FileLock::held_elsewhere(path));
    CHECK(read_journal(path).size() == 3);
    const std::string text = pissa_test::read_bytes(path);

    // a torn last line (power loss mid-write): the records before it stay
    pissa_test::write_bytes(path, text.substr(0, text.size() - 5));
    CHECK(read_journal(path).size() == 2);
    // a damaged byte in the second record: it and everything after are dropped
    std::string damaged = text;
    damaged[text.find("\"to\":2") + 5] = '7';
    pissa_test::write_bytes(path, damaged);
    CHECK(read_journal(path).size() == 1);
    // keep() cuts the file back to the records kept; appending goes on from there
    pissa_test::write_bytes(path, text);
    {
        Journal j(path, "test journal");
        REQUIRE(j.read().size() == 3);
        j.keep(2);
        j.append({{"done", true}});
    }
    const auto records = read_journal(path);
    REQUIRE(records.size() == 3);
    CHECK(records[1]["to"] == 2);
    CHECK(records[2].contains("done"));
    CHECK(read_journal(dir / "missing.jsonl").empty());
}

// Tests for io/checksum.hpp: the streaming checksum is independent of how the bytes are split and
// sensitive to every byte and the length; the checksums of files and byte ranges are its value.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/checksum.hpp>
#include <pissa/io/safetensors.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

using namespace pissa::io;
using pissa_test::ScratchDir;

TEST_CASE("Checksum: independent of how the bytes are split, sensitive to every byte and the length") {
    const auto bytes = pissa_test::random_bytes(1000, 5);
    Checksum whole;
    whole.update(bytes.data(), bytes.size());
    for (std::size_t step : {1, 3, 31, 32, 33, 500}) {
        Checksum pieces;
        for (std::size_t at = 0; at < bytes.size(); at += step)
            pieces.update(bytes.data() + at, std::min(step, bytes.size() - at));
        CHECK(pieces.value() == whole.value());
    }
    for (std::size_t i : {0, 31, 32, 500, 999}) {
        auto changed = bytes;
        changed[i] ^= 1;
        Checksum other;
        other.update(changed.data(), changed.size());
        CHECK(other.value() != whole.value());
    }
    Checksum shorter, zeros_a, zeros_b;
    shorter.update(bytes.data(), bytes.size() - 1);
    CHECK(shorter.value() != whole.value());
    const std::vector<unsigned char> zeros(64, 0);
    zeros_a.update(zeros.data(), 63);
    zeros_b.update(zeros.data(), 64);
    CHECK(zeros_a.value() != zeros_b.value());
    CHECK(whole.hex().size() == 16);
}

TEST_CASE("checksum_of_file and checksum_of_range read the bytes the streaming checksum sees") {
    ScratchDir dir("checksum");
    const auto bytes = pissa_test::random_bytes(3000, 9);
    const auto path = dir / "bytes.bin";
    pissa_test::write_bytes(path, std::string(bytes.begin(), bytes.end()));
    Checksum whole, middle;
    whole.update(bytes.data(), bytes.size());
    middle.update(bytes.data() + 100, 2000);
    CHECK(checksum_of_file(path) == whole.hex());
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    CHECK(checksum_of_range(fd, 100, 2000, "bytes.bin").value() == middle.value());
    CHECK_THROWS_AS(checksum_of_range(fd, 2000, 1001, "bytes.bin"), io_error);  // past the end
    ::close(fd);
    CHECK_THROWS_AS(checksum_of_file(dir / "missing.bin"), format_error);
}

// Tests for io/safetensors.hpp: files of every dtype round-trip byte for byte, the header's layout on
// disk, the writer's refusals, the malformed corpus rejected with clear messages, and files that
// are not regular or change while open.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

#include <fstream>
#include <sstream>

using namespace pissa::io;
using pissa_test::ScratchDir;

namespace {
const Dtype all_dtypes[] = {Dtype::BOOL, Dtype::U8,  Dtype::I8,  Dtype::F8_E5M2, Dtype::F8_E4M3,
                            Dtype::I16,  Dtype::U16, Dtype::F16, Dtype::BF16,    Dtype::I32,
                            Dtype::U32,  Dtype::F32, Dtype::F64, Dtype::I64,     Dtype::U64};
}

TEST_CASE("every dtype round-trips byte for byte, with metadata and odd shapes") {
    ScratchDir dir("st-roundtrip");
    std::vector<OwnedTensor> tensors;
    std::uint32_t seed = 1;
    for (Dtype d : all_dtypes) {
        const std::vector<std::vector<std::uint64_t>> shapes = {{3, 5}, {7}, {}, {2, 0, 4}, {2, 3, 1, 2}};
        for (std::size_t s = 0; s < shapes.size(); ++s) {
            std::uint64_t n = 1;
            for (auto v : shapes[s]) n *= v;
            tensors.push_back({{std::string(dtype_name(d)) + ".t" + std::to_string(s), d, shapes[s]},
                               pissa_test::random_bytes(n * dtype_size(d), seed++)});
        }
    }
    const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "grüße \"quoted\""}};
    const auto path = dir / "all.safetensors";
    write_safetensors(path, tensors, metadata);

    SafetensorsFile file(path);
    CHECK(file.metadata() == metadata);
    REQUIRE(file.tensors().size() == tensors.size());
    for (const auto& t : tensors) {
        const TensorInfo& info = file.at(t.spec.name);
        CHECK(info.dtype == t.spec.dtype);
        CHECK(info.shape == t.spec.shape);
        const ByteView view = file.bytes(info);
        REQUIRE(view.size == t.bytes.size());
        CHECK(std::equal(t.bytes.begin(), t.bytes.end(), view.data));
    }
    // Written in declared order: the data area follows the declaration.
    for (std::size_t i = 0; i < tensors.size(); ++i) CHECK(file.tensors()[i].name == tensors[i].spec.name);
}

TEST_CASE("header is padded with spaces to a multiple of 8 and the file is rewritten identically") {
    ScratchDir dir("st-pad");
    for (int len = 1; len <= 9; ++len) {
        const std::string name(static_cast<std::size_t>(len), 'w');
        const auto path = dir / (name + ".safetensors");
        write_safetensors(path, {matrix_tensor(name, pissa::Matrix<float>::Ones(2, 3))});
        const std::string bytes = pissa_test::read_bytes(path);
        std::uint64_t n = 0;
        for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
        CHECK((8 + n) % 8 == 0);
        CHECK(bytes[8] == '{');
        const std::string json = bytes.substr(8, n);
        CHECK(json.find_last_not_of(' ') == json.rfind('}'));
        CHECK(bytes.size() == 8 + n + 24);
        // Reading and writing again reproduces the file exactly.
        SafetensorsFile file(path);
        std::vector<OwnedTensor> again;
        for (const auto& t : file.tensors()) {
            const ByteView v = file.bytes(t);
            again.push_back({{t.name, t.dtype, t.shape}, std::vector<unsigned char>(v.data, v.data + v.size)});
        }
        write_safetensors(dir / "again.safetensors", again, file.metadata());
        CHECK(pissa_test::read_bytes(dir / "again.safetensors") == bytes);
    }
}

TEST_CASE("writer refuses wrong sizes and leaves nothing behind when not committed") {
    ScratchDir dir("st-writer");
    const auto path = dir / "x.safetensors";
    {
        SafetensorsWriter writer(path, {{"a", Dtype::F32, {2}}, {"b", Dtype::I8, {3}}});
        const float a[2] = {1, 2};
        writer.write(a, sizeof a);
        CHECK_THROWS_WITH_AS(writer.write(a, 2), doctest::Contains("tensor 'b': got 2 bytes"), pissa::invalid_argument);
        CHECK_THROWS_AS(writer.commit(), pissa::invalid_argument);
    }
    CHECK(std::filesystem::is_empty(dir.path()));
    CHECK_THROWS_WITH_AS(SafetensorsWriter(path, {{"a", Dtype::F32, {1}}, {"a", Dtype::F32, {1}}}),
                         doctest::Contains("duplicated"), pissa::invalid_argument);
    CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("the malformed corpus is rejected, each file with its message naming the file") {
    const std::filesystem::path corpus = PISSA_IO_CORPUS;
    std::ifstream expected(corpus / "expected.txt");
    std::string line;
    int count = 0;
    while (std::getline(expected, line)) {
        const auto tab = line.find('\t');
        const std::string name = line.substr(0, tab), message = line.substr(tab + 1);
        INFO("corpus file ", name, ", expected message ", message);
        const auto path = corpus / name;
        bool threw = false;
        try {
            SafetensorsFile file(path);
        } catch (const format_error& e) {
            threw = true;
            const std::string what = e.what();
            INFO("got: ", what);
            CHECK(what.find(message) != std::string::npos);
            CHECK(what.find(name) != std::string::npos);
        }
        CHECK(threw);
        // The same bytes parsed from memory, as the fuzzer does, are rejected the same way.
        const std::string bytes = pissa_test::read_bytes(path);
        CHECK_THROWS_AS(parse_safetensors_header(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(),
                                                 bytes.size(), name),
                        format_error);
        ++count;
    }
    CHECK(count >= 25);
    CHECK_NOTHROW(SafetensorsFile(corpus / "valid_small.safetensors"));
    CHECK(SafetensorsFile(corpus / "valid_empty.safetensors").tensors().empty());
}

TEST_CASE("truncating a valid file anywhere is rejected, never read past the end") {
    ScratchDir dir("st-trunc");
    const auto path = dir / "v.safetensors";
    write_safetensors(path,
                      {matrix_tensor("a", pissa::Matrix<float>::Ones(3, 3)),
                       matrix_tensor("b", pissa::Matrix<float>::Ones(2, 2), Dtype::BF16)},
                      {{"format", "pt"}});
    const std::string bytes = pissa_test::read_bytes(path);
    for (std::size_t cut = 0; cut < bytes.size(); ++cut) {
        INFO("cut at ", cut);
        CHECK_THROWS_AS(parse_safetensors_header(reinterpret_cast<const unsigned char*>(bytes.data()), cut, cut, "v"),
                        format_error);
    }
    // Changing one digit of an offset breaks the tiling.
    std::string broken = bytes;
    const auto at = broken.find("[36,44]");
    REQUIRE(at != std::string::npos);
    broken.replace(at, 7, "[36,40]");
    CHECK_THROWS_WITH_AS(parse_safetensors_header(reinterpret_cast<const unsigned char*>(broken.data()), broken.size(),
                                                  broken.size(), "v"),
                         doctest::Contains("needs 8"), format_error);
}

TEST_CASE("only spaces and JSON whitespace may pad the header: a NUL and what follows it are refused") {
    const std::filesystem::path corpus = PISSA_IO_CORPUS;
    CHECK(SafetensorsFile(corpus / "valid_space_padding.safetensors").tensors().empty());
    CHECK(SafetensorsFile(corpus / "valid_whitespace_padding.safetensors").tensors().empty());
    CHECK_THROWS_WITH_AS(SafetensorsFile(corpus / "nul_after_json.safetensors"),
                         doctest::Contains("NUL byte at header offset 2"), format_error);
    // A NUL inside a metadata string is refused too (JSON strings cannot hold a raw one).
    std::string bytes = pissa_test::read_bytes(corpus / "valid_small.safetensors");
    bytes[bytes.find("pt")] = '\0';
    CHECK_THROWS_WITH_AS(
        parse_safetensors_header(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), bytes.size(), "x"),
        doctest::Contains("NUL byte"), format_error);
}
TEST_CASE("FIFOs, devices and folders are refused before they are opened; symlinks to files are fine") {
    pissa_test::Watchdog watchdog(60);
    ScratchDir dir("st-fifo");
    pissa_test::make_fifo(dir / "fifo.safetensors");
    CHECK_THROWS_WITH_AS(SafetensorsFile(dir / "fifo.safetensors"), doctest::Contains("not a regular file (a FIFO)"),
                         format_error);
    CHECK_THROWS_WITH_AS(SafetensorsFile("/dev/null"), doctest::Contains("not a regular file (a device)"),
                         format_error);
    CHECK_THROWS_WITH_AS(SafetensorsFile(dir.path()), doctest::Contains("not a regular file (a folder)"), format_error);
    write_safetensors(dir / "real.safetensors", {matrix_tensor("w", pissa::Matrix<float>::Ones(2, 2))});
    std::filesystem::create_symlink(dir / "real.safetensors", dir / "link.safetensors");
    CHECK(SafetensorsFile(dir / "link.safetensors").tensors().size() == 1);
    std::filesystem::create_symlink(dir / "fifo.safetensors", dir / "fifo-link.safetensors");
    CHECK_THROWS_AS(SafetensorsFile(dir / "fifo-link.safetensors"), format_error);
    std::filesystem::create_symlink(dir / "loop-b", dir / "loop-a");
    std::filesystem::create_symlink(dir / "loop-a", dir / "loop-b");
    // A path that names no file is bad input (exit 2 in the tool), not an I/O fault.
    CHECK_THROWS_WITH_AS(SafetensorsFile(dir / "loop-a"), doctest::Contains("symbolic links"), format_error);
    CHECK_THROWS_WITH_AS(SafetensorsFile(dir / "missing"), doctest::Contains("cannot open"), format_error);
}

TEST_CASE("a file truncated after opening: copies report an io_error naming file and tensor, no SIGBUS") {
    ScratchDir dir("st-shrink");
    const auto path = dir / "w.safetensors";
    const pissa::Matrix<float> a = pissa_test::gaussian<float>(64, 64, 1), b = pissa_test::gaussian<float>(64, 64, 2);
    write_safetensors(path, {matrix_tensor("a", a), matrix_tensor("b", b)});
    SafetensorsFile file(path);
    std::vector<unsigned char> buffer;
    CHECK(copy_matrix_into<float>(file, file.at("b"), buffer) == pissa::RowMatrix<float>(b));
    std::filesystem::resize_file(path, file.header().data_offset + 100);  // inside tensor 'a'
    for (const char* name : {"a", "b"}) {
        INFO("tensor ", name);
        CHECK_THROWS_WITH_AS(copy_matrix_into<float>(file, file.at(name), buffer),
                             doctest::Contains((path.string() + ": tensor '" + name + "'").c_str()), io_error);
        CHECK_THROWS_WITH_AS(copy_matrix<float>(file, file.at(name)),
                             doctest::Contains("shorter than when it was opened"), io_error);
        CHECK_THROWS_AS(read_matrix<double>(file, file.at(name)), io_error);
    }
    std::filesystem::resize_file(path, 4);
    CHECK_THROWS_AS(SafetensorsFile{path}, format_error);
}

TEST_CASE("the writer takes a tensor in parts") {
    ScratchDir dir("st-parts");
    const auto bytes = pissa_test::random_bytes(40, 3);
    SafetensorsWriter writer(dir / "p.safetensors",
                             {{"a", Dtype::U8, {40}}, {"e", Dtype::U8, {0}}, {"b", Dtype::U8, {2}}});
    writer.write_part(bytes.data(), 15);
    CHECK_THROWS_AS(writer.write(bytes.data(), 25), pissa::invalid_argument);  // mid-tensor
    CHECK_THROWS_AS(writer.write_part(bytes.data(), 26), pissa::invalid_argument);
    writer.write_part(bytes.data() + 15, 25);
    writer.write_part(nullptr, 0);
    writer.write(bytes.data(), 2);
    writer.commit();
    SafetensorsFile file(dir / "p.safetensors");
    const ByteView v = file.bytes(file.at("a"));
    CHECK(std::equal(v.data, v.data + v.size, bytes.begin()));
}

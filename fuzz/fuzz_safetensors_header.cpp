// libFuzzer target for the safetensors header parser (pissa/io/safetensors_header.hpp).
// Every input must either parse or throw pissa::io::format_error; any other exception, crash,
// sanitizer report or broken invariant is a bug. For inputs that parse, the invariants are:
// every tensor lies inside the data area, the offsets tile it, and serialising the header again and
// re-parsing it (with the same data area) gives the same tensors and metadata.
#include <pissa/io/safetensors_header.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace pissa::io;
    SafetensorsHeader header;
    try {
        header = parse_safetensors_header(data, size, size, "fuzz-input");
    } catch (const format_error&) {
        return 0;
    }
    std::uint64_t covered = 0;
    for (const auto& t : header.tensors) {
        if (t.begin != covered || t.end < t.begin || t.end > header.data_size) std::abort();
        if (t.nbytes() != t.numel() * dtype_size(t.dtype)) std::abort();
        covered = t.end;
    }
    if (covered != header.data_size || header.data_offset + header.data_size != size) std::abort();

    std::string again = serialize_safetensors_header(header.tensors, header.metadata);
    again.append(reinterpret_cast<const char*>(data) + header.data_offset, header.data_size);
    const SafetensorsHeader reparsed = parse_safetensors_header(reinterpret_cast<const unsigned char*>(again.data()),
                                                                again.size(), again.size(), "fuzz-roundtrip");
    if (reparsed.metadata != header.metadata || reparsed.tensors.size() != header.tensors.size()) std::abort();
    for (std::size_t i = 0; i < header.tensors.size(); ++i) {
        const auto &a = header.tensors[i], &b = reparsed.tensors[i];
        if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.begin != b.begin || a.end != b.end)
            std::abort();
    }
    return 0;
}

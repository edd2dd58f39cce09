#!/usr/bin/env python3
"""Writes the malformed safetensors corpus (and two valid seeds) next to this script.

Each malformed file breaks exactly one rule of PISSA.md's safetensors section; expected.txt lists
`file<TAB>substring of the error message` for tests/io and tests/cli. The files are committed; rerun
this script only to change the corpus.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def header_bytes(text):
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def st(entries, data, metadata=None):
    obj = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    obj.update(entries)
    return header_bytes(json.dumps(obj, separators=(",", ":"))) + data


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


cases = {}
expected = {}


def case(name, content, message):
    cases[name] = content
    expected[name] = message


valid = st({"a": t("F32", [2, 2], 0, 16), "b": t("BF16", [4], 16, 24)}, bytes(range(24)), {"format": "pt"})
cases["valid_small.safetensors"] = valid
cases["valid_empty.safetensors"] = header_bytes("{}")

case("truncated_length.safetensors", b"\x10\x00\x00", "shorter than the 8-byte header length")
case("truncated_header.safetensors", valid[:20], "runs past the end of the file")
case("length_past_eof.safetensors", struct.pack("<Q", 1 << 40) + b"{}      ", "exceeds the 100,000,000-byte limit")
case("length_past_eof_small.safetensors", struct.pack("<Q", 4096) + b'{"a":1} ', "runs past the end of the file")
case("not_json.safetensors", header_bytes("{not json"), "invalid JSON")
case("not_object.safetensors", header_bytes("[1,2,3]"), "does not start with '{'")
case("overlap.safetensors", st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, bytes(12)), "overlap tensor 'a'")
case("gap.safetensors", st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 12, 20)}, bytes(20)), "gap of 4 bytes")
case("gap_at_start.safetensors", st({"a": t("F32", [2], 4, 12)}, bytes(12)), "gap of 4 bytes")
case("trailing_bytes.safetensors", st({"a": t("F32", [2], 0, 8)}, bytes(12)), "4 bytes after the last tensor")
case("past_eof.safetensors", st({"a": t("F32", [4], 0, 16)}, bytes(8)), "reach past the end of the file")
case("wrong_size.safetensors", st({"a": t("F32", [2, 3], 0, 20)}, bytes(20)), "needs 24")
case("end_before_begin.safetensors", st({"a": t("F32", [0], 8, 0)}, bytes(8)), "end before they begin")
case("overflow_shape.safetensors",
     st({"a": t("F32", [4294967296, 4294967296, 16], 0, 0)}, b""), "overflows a 64-bit element count")
case("overflow_bytes.safetensors",
     st({"a": t("F64", [2305843009213693952, 4], 0, 0)}, b""), "overflows a 64-bit")
case("overflow_wrap.safetensors",
     st({"a": t("U8", [4294967296, 4294967296], 0, 0)}, b""), "overflows a 64-bit element count")
case("negative_shape.safetensors", st({"a": t("F32", [-1, 2], 0, 8)}, bytes(8)), "not a non-negative integer")
case("float_offset.safetensors",
     header_bytes('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}}') + bytes(8), "data_offsets")
case("huge_number.safetensors",
     header_bytes('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,99999999999999999999999]}}') + bytes(8),
     "data_offsets")
case("bad_dtype.safetensors", st({"a": t("F17", [2], 0, 8)}, bytes(8)), "unknown dtype 'F17'")
case("missing_dtype.safetensors",
     header_bytes('{"a":{"shape":[2],"data_offsets":[0,8]}}') + bytes(8), "missing string 'dtype'")
case("duplicate_name.safetensors",
     header_bytes('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                  '"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}') + bytes(16), "duplicate key 'a'")
case("duplicate_field.safetensors",
     header_bytes('{"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}}') + bytes(8),
     "duplicate key 'dtype'")
case("non_utf8_name.safetensors",
     header_bytes(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}') + bytes(8), "not valid UTF-8")
case("overlong_utf8.safetensors",
     header_bytes(b'{"a\xc0\xaf":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}') + bytes(8), "not valid UTF-8")
case("surrogate_utf8.safetensors",
     header_bytes(b'{"a\xed\xa0\x80":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}') + bytes(8),
     "not valid UTF-8")
case("metadata_not_string.safetensors",
     st({"a": t("F32", [2], 0, 8)}, bytes(8), {"format": 1}), "__metadata__ entry 'format' is not a string")
case("entry_not_object.safetensors", header_bytes('{"a":[1,2]}'), "entry is not an object")
# Only JSON whitespace may follow the object (the reference reader is serde_json::from_str; writers pad
# with spaces): a NUL and anything after it is refused, not ignored.
case("nul_after_json.safetensors", struct.pack("<Q", 16) + b'{}\x00junk' + b' ' * 9, "NUL byte at header offset 2")
case("nul_padding.safetensors", struct.pack("<Q", 8) + b"{}\x00\x00\x00\x00\x00\x00", "NUL byte at header offset 2")
case("deep_nesting.safetensors", header_bytes('{"__metadata__":' + "[" * 300 + "]" * 300 + "}"),
     "nested deeper than 256 levels")
cases["valid_space_padding.safetensors"] = struct.pack("<Q", 16) + b"{}" + b" " * 14
cases["valid_whitespace_padding.safetensors"] = struct.pack("<Q", 8) + b"{}\n\t\r   "

for name, content in {**cases}.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(content)
with open(os.path.join(HERE, "expected.txt"), "w") as f:
    for name in sorted(expected):
        f.write(f"{name}\t{expected[name]}\n")
print(f"wrote {len(cases)} files")

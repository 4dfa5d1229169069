"""APR v2 files: the doc's golden example byte for byte, Rust f32 number formatting, round trips,
every dequantizer against hand-built blocks, and every refusal with a message naming the problem.

Files for the reader are mostly built here by an independent little writer (`build`), straight
from ../shared/docs/apr-format.md, so the reader is not only checked against our own writer.
"""

import decimal
import json
import struct
import zlib

import numpy
import pytest

from minitrain.config import ModelConfig
from minitrain.errors import InputError
from minitrain.formats.apr import RawTensor, bf16, read_apr, write_apr
from minitrain.formats.apr_meta import TYPED_FIELDS, merge_strings, metadata_json, model_metadata, rust_f32

# ------------------------------------------------------------------------------------- helpers


def pad(b):
    return bytes(b) + bytes(-len(b) % 64)


def build(entries, data, meta=b"{}", magic=b"APR\0", flags=0x0400, footer=True):
    """An APR file from index entries (name, dtype, shape, offset, size), in the order given, and
    the data region's bytes."""
    index = b"".join(struct.pack("<H", len(n.encode())) + n.encode() + struct.pack(f"<BB{len(s)}Q", c, len(s), *s)
                     + struct.pack("<QQ", off, size) for n, c, s, off, size in entries)
    index_off = 64 + len(pad(meta))
    h = struct.pack("<4sBBHIQIQQI20s", magic, 2, 0, flags, len(entries), 64, len(meta), index_off,
                    index_off + len(pad(index)), 0, bytes(20))
    body = h[:40] + struct.pack("<I", zlib.crc32(h[:40] + h[44:])) + h[44:] + pad(meta) + pad(index) + data
    return body + (struct.pack("<I", zlib.crc32(body)) if footer else b"")


def one(name, code, shape, raw):
    return build([(name, code, shape, 0, len(raw))], pad(raw))


def reseal(b):
    """Recompute the header CRC and the footer after patching bytes."""
    b = bytearray(b)
    b[40:44] = struct.pack("<I", zlib.crc32(b[:40] + b[44:64]))
    b[-4:] = struct.pack("<I", zlib.crc32(b[:-4]))
    return bytes(b)


def patch(b, at, new):
    return b[:at] + new + b[at + len(new):]


def load(tmp_path, blob, name="m.apr"):
    path = tmp_path / name
    path.write_bytes(blob)
    return read_apr(path)


def refused(tmp_path, blob, *words):
    with pytest.raises(InputError) as e:
        load(tmp_path, blob)
    message = str(e.value)
    assert str(tmp_path / "m.apr") in message and "\n" not in message
    for word in words:
        assert word in message, message
    return message


GOLDEN_META = {"model_type": "linear_regression", "name": "golden-v2", "version": "0.0.0-golden",
               "created_at": "1700000000", "param_count": 8}
GOLDEN_TENSORS = [("weights", numpy.array([1, 2, 0.5, -0.5, 4, -2, 0.25, 8], numpy.float32)),
                  ("bias", numpy.array([0.125], numpy.float32))]
# Byte positions in the golden file: the index starts at 256 with "bias" (32 bytes), then "weights".
BIAS_DTYPE, BIAS_SIZE, WEIGHTS_OFFSET = 256 + 6, 256 + 24, 288 + 19


@pytest.fixture
def golden(tmp_path):
    write_apr(tmp_path / "golden.apr", GOLDEN_TENSORS, GOLDEN_META)
    return (tmp_path / "golden.apr").read_bytes()


# ------------------------------------------------------------------------------- golden example

def test_golden_example_byte_for_byte(golden, tmp_path):
    """§9.2's hexdump, transcribed: every byte is pinned there (the rest is zero padding)."""
    header = bytes.fromhex("41505200 02000004 02000000 40000000 00000000 bd000000 00010000 00000000"
                           "80010000 00000000 028cc03b 00000000" + "00" * 16)
    meta = (b'{"model_type":"linear_regression","name":"golden-v2","license":null,"data_source":null,'
            b'"data_license":null,"version":"0.0.0-golden","created_at":"1700000000","total_size":0,'
            b'"param_count":8}')
    index = bytes.fromhex("04006269617300010100000000000000 00000000000000000400000000000000"
                          "07007765696768747300010800000000 00000040000000000000002000000000 000000")
    weights = bytes.fromhex("0000803f 00000040 0000003f 000000bf 00008040 000000c0 0000803e 00000041")
    expected = (header + pad(meta) + pad(index) + pad(bytes.fromhex("0000003e")) + pad(weights)
                + bytes.fromhex("353f0f55"))
    assert len(meta) == 189 and len(index) == 67 and len(expected) == 516
    assert golden == expected
    assert metadata_json(GOLDEN_META) == meta
    f = load(tmp_path, golden)
    h = f.header
    assert (h["magic"], h["version"], h["flags"], h["tensor_count"]) == ("APR\0", (2, 0), 0x0400, 2)
    assert (h["metadata_offset"], h["metadata_size"], h["tensor_index_offset"], h["data_offset"]) == (64, 189, 256, 384)
    assert h["checksum"] == 0x3BC08C02 and f.has_footer
    assert [(t.name, t.offset, t.size) for t in f.tensors.values()] == [("bias", 0, 4), ("weights", 64, 32)]
    assert f.metadata == {**GOLDEN_META, "license": None, "data_source": None, "data_license": None,
                          "total_size": 0}
    numpy.testing.assert_array_equal(f.array("weights"), GOLDEN_TENSORS[0][1])


def test_golden_all_null_variant_is_1092_bytes_and_readable(golden, tmp_path):
    """The older writers spell unset Option fields as null. The doc pins only the size (1092) and
    the count (26 fields that the newest writer omits), not the field list; every §3.1 field
    written in order, unset ones null, is consistent with both. Not a byte-for-byte check."""
    values = {**GOLDEN_META, "total_size": 0}
    meta = ("{" + ",".join(f'"{k}":{json.dumps(values.get(k))}' for k in TYPED_FIELDS) + "}").encode()
    assert sum(k not in values and k not in ("license", "data_source", "data_license") for k in TYPED_FIELDS) == 26
    index_and_data = golden[256:-4]  # the same index and data, after a longer metadata section
    body = bytearray(golden[:64]) + pad(meta) + index_and_data
    body[20:24], body[24:32] = struct.pack("<I", len(meta)), struct.pack("<Q", 64 + len(pad(meta)))
    body[32:40] = struct.pack("<Q", 64 + len(pad(meta)) + 128)
    blob = reseal(bytes(body) + bytes(4))
    assert len(blob) == 1092
    f = load(tmp_path, blob)
    assert f.metadata["name"] == "golden-v2" and f.metadata["rope_theta"] is None
    numpy.testing.assert_array_equal(f.array("bias"), [0.125])


# ---------------------------------------------------------------------------- number formatting

@pytest.mark.parametrize("value, text", [
    (1e-6, "0.000001"), (1e-5, "0.00001"), (1e-7, "1e-7"), (1e-8, "1e-8"), (1.5e-7, "1.5e-7"),
    (10000.0, "10000.0"), (1000000.0, "1000000.0"), (0.1, "0.1"), (0.5, "0.5"), (123456.79, "123456.79"),
    (3.4028235e38, "3.4028235e38"), (1.17549435e-38, "1.1754944e-38"), (1e12, "1000000000000.0"),
    (1e13, "1e13"), (1e14, "1e14"), (1e16, "1e16"), (-2.5, "-2.5"), (0.0, "0.0"), (1e-45, "1e-45"),
    (float("nan"), "null"), (float("inf"), "null"),
])
def test_rust_f32_formatting(value, text):
    assert rust_f32(value) == text


def test_rust_f32_digits_are_the_shortest_round_trip():
    """Against NumPy's own shortest-repr algorithm (Dragon4) on random f32 bit patterns."""
    bits = numpy.random.default_rng(0).integers(1, 0x7F800000, 3000, dtype=numpy.uint32)
    for f in bits.view(numpy.float32):
        ours = rust_f32(f)
        assert decimal.Decimal(ours) == decimal.Decimal(numpy.format_float_scientific(f, unique=True)), ours
        assert numpy.float32(ours) == f


def test_metadata_field_order_omission_and_custom_keys():
    meta = {"zeta": [1, "é"], "rope_theta": 10000, "name": None, "hidden_size": 8, "model_type": "qwen2",
            "license": "MIT", "alpha": {"b": 1, "a": None}}
    assert metadata_json(meta).decode() == (
        '{"model_type":"qwen2","license":"MIT","data_source":null,"data_license":null,"total_size":0,'
        '"param_count":0,"hidden_size":8,"rope_theta":10000.0,"zeta":[1,"é"],"alpha":{"b":1,"a":null}}')
    assert metadata_json({}) == (b'{"model_type":"","license":null,"data_source":null,"data_license":null,'
                                 b'"total_size":0,"param_count":0}')


# ---------------------------------------------------------------------------------- round trips

def test_f32_round_trip_is_bit_exact_and_a_read_only_view(tmp_path):
    rng = numpy.random.default_rng(1)
    special = numpy.array([numpy.inf, -numpy.inf, -0.0, 1e-45, numpy.nan], numpy.float32)
    special = numpy.concatenate([special, numpy.uint32([0x7FC01234, 0xFFA00001]).view(numpy.float32)])
    tensors = {"a.special": special, "b.matrix": rng.standard_normal((5, 7)).astype(numpy.float32)}
    tensors["c.transposed"] = rng.standard_normal((6, 3)).astype(numpy.float32).T  # not contiguous
    tensors["d.big_endian"] = rng.standard_normal(9).astype(">f4")
    tensors["e.scalar"] = numpy.array(3.5, numpy.float32)
    tensors["f.empty"] = numpy.zeros((0, 4), numpy.float32)
    write_apr(tmp_path / "x.apr", tensors, {"model_type": "test"})
    f = read_apr(tmp_path / "x.apr")
    for name, a in tensors.items():
        got = f.array(name)
        assert got.dtype == numpy.float32 and got.shape == a.shape
        numpy.testing.assert_array_equal(got.view(numpy.uint32), a.astype(numpy.float32).view(numpy.uint32))
    view = f.array("b.matrix")
    assert not view.flags.writeable and numpy.shares_memory(view, f._data)


def test_f16_and_bf16_round_trips(tmp_path):
    x = numpy.random.default_rng(2).standard_normal((4, 5)).astype(numpy.float32) * 100
    # bf16 keeps 7 mantissa bits: 1 + 2^-8 is a tie (to even: 1), 1 + 3*2^-8 a tie (up), and so on.
    edge = numpy.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -1.5, numpy.inf, numpy.nan, 3.4e38],
                       numpy.float32)
    write_apr(tmp_path / "x.apr", [("h", x.astype(numpy.float16)), ("b", bf16(edge)), ("bx", bf16(x))], {})
    f = read_apr(tmp_path / "x.apr")
    assert {t.name: t.dtype_code for t in f.tensors.values()} == {"b": 30, "bx": 30, "h": 1}
    numpy.testing.assert_array_equal(f.array("h"), x.astype(numpy.float16).astype(numpy.float32))
    # 3.4e38 lies past the midpoint of bf16's largest finite value and 2^128: it rounds to inf.
    numpy.testing.assert_array_equal(f.array("b"), [1, 1 + 2 ** -6, 1 + 2 ** -7, -1.5, numpy.inf, numpy.nan, numpy.inf])
    numpy.testing.assert_allclose(f.array("bx"), x, rtol=2 ** -8)


def test_writer_output_without_footer_is_accepted(golden, tmp_path):
    f = load(tmp_path, golden[:-4])
    assert not f.has_footer
    numpy.testing.assert_array_equal(f.array("bias"), [0.125])


def test_streaming_order_data_is_found_by_offset(tmp_path):
    """AprV2StreamingWriter sorts only the index: here "b" was written first, so its data comes first."""
    a, b = numpy.arange(3, dtype=numpy.float32), numpy.arange(10, 15, dtype=numpy.float32)
    blob = build([("a", 0, (3,), 64, 12), ("b", 0, (5,), 0, 20)], pad(b.tobytes()) + pad(a.tobytes()))
    f = load(tmp_path, blob)
    numpy.testing.assert_array_equal(f.array("a"), a)
    numpy.testing.assert_array_equal(f.array("b"), b)


def test_index_is_sorted_by_utf8_bytes(tmp_path):
    names = ["model.layers.2.w", "model.layers.10.w", "zébra", "z", "lm_head.weight"]
    write_apr(tmp_path / "m.apr", [(n, numpy.full(2, i, numpy.float32)) for i, n in enumerate(names)], {})
    f = read_apr(tmp_path / "m.apr")
    assert list(f.tensors) == sorted(names, key=str.encode) == ["lm_head.weight", "model.layers.10.w",
                                                               "model.layers.2.w", "z", "zébra"]
    assert [t.offset for t in f.tensors.values()] == [0, 64, 128, 192, 256]  # data in index order too
    assert all(f.array(n).tolist() == [i, i] for i, n in enumerate(names))


def test_write_is_atomic_and_checks_its_input(tmp_path):
    path = tmp_path / "m.apr"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="float64"):
        write_apr(path, [("w", numpy.zeros(3))], {})
    with pytest.raises(ValueError, match="given twice"):
        write_apr(path, [("w", numpy.zeros(3, numpy.float32)), ("w", numpy.zeros(3, numpy.float32))], {})
    with pytest.raises(ValueError, match="do not fit"):
        write_apr(path, [("w", RawTensor(12, (256,), bytes(100)))], {})
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.apr"]
    write_apr(path, {"w": numpy.ones(3, numpy.float32)}, {})
    assert read_apr(path).array("w").tolist() == [1, 1, 1] and not (tmp_path / "m.apr.tmp").exists()


# ------------------------------------------------------------------------- quantized dequantizers

def test_apr_q8_and_legacy_code_9(tmp_path):
    q = numpy.array([-127, -1, 0, 1, 64, 127], numpy.int8)
    raw = struct.pack("<f", 0.25) + q.tobytes()
    for code in (129, 9):
        f = load(tmp_path, one("w", code, (2, 3), raw))
        assert f.tensors["w"].dtype_name == "Q8"
        numpy.testing.assert_array_equal(f.array("w"), (q * 0.25).reshape(2, 3))


def pack_apr_q4(scale, nibbles):
    return struct.pack("<e", scale) + bytes(nibbles[2 * j] | nibbles[2 * j + 1] << 4 for j in range(16))


def test_apr_q4_with_partial_and_all_zero_blocks(tmp_path):
    rng = numpy.random.default_rng(3)
    n0, n2 = rng.integers(0, 16, 32), numpy.concatenate([rng.integers(0, 16, 8), numpy.full(24, 8)])
    raw = pack_apr_q4(0.5, n0) + pack_apr_q4(1.0, [8] * 32) + pack_apr_q4(0.125, n2)  # 72 values: 32 + 32 + 8
    expected = numpy.concatenate([(n0 - 8) * 0.5, numpy.zeros(32), (n2[:8] - 8) * 0.125])
    for code in (128, 8):
        f = load(tmp_path, one("w", code, (8, 9), raw))
        assert f.tensors["w"].size == 18 * 3
        numpy.testing.assert_array_equal(f.array("w"), expected.reshape(8, 9))


def pack_q4_k(d, dmin, sc, m, q):
    """A GGML Q4_K block: sc, m are eight 6-bit sub-block scales and mins, q 256 nibbles."""
    s = bytearray(12)
    for j in range(4):
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6
        s[j + 4] = m[j] | (m[j + 4] >> 4) << 6
        s[j + 8] = (sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4
    qs = bytes(q[64 * j + i] | q[64 * j + 32 + i] << 4 for j in range(4) for i in range(32))
    return struct.pack("<ee", d, dmin) + bytes(s) + qs


def random_q4_k(rng, count):
    """count blocks: (bytes, their 256*count values by the formula x = d*sc*q - dmin*m)."""
    raw, values = b"", []
    for _ in range(count):
        d, dmin = rng.choice([0.5, 0.03125, 2.0]), rng.choice([0.25, 0.0078125])
        sc, m, q = rng.integers(0, 64, 8), rng.integers(0, 64, 8), rng.integers(0, 16, 256)
        sc[4:6], m[6:8] = 63, 48  # exercise the high bits of the packed j >= 4 entries
        raw += pack_q4_k(d, dmin, sc, m, q)
        values += [d * sc[e // 32] * q[e] - dmin * m[e // 32] for e in range(256)]
    return raw, numpy.array(values)


def test_q4_k_flat_and_row_aligned(tmp_path):
    rng = numpy.random.default_rng(4)
    raw, values = random_q4_k(rng, 2)  # flat: 300 values in 2 blocks, the rest of block 2 dropped
    f = load(tmp_path, one("w", 12, (3, 100), raw))
    numpy.testing.assert_allclose(f.array("w"), values[:300].reshape(3, 100), rtol=1e-6, atol=1e-6)
    raw, values = random_q4_k(rng, 4)  # row-aligned: each row of 300 padded to 2 blocks (flat would be 3)
    f = load(tmp_path, one("w", 12, (2, 300), raw))
    expected = values.reshape(2, 512)[:, :300]
    numpy.testing.assert_allclose(f.array("w"), expected, rtol=1e-6, atol=1e-6)


def pack_q6_k(d, scales, q):
    """A GGML Q6_K block: sixteen int8 scales, q 256 six-bit values."""
    ql, qh = bytearray(128), bytearray(64)
    for h in range(2):
        for i in range(32):
            a, b, c, e = (int(q[128 * h + 32 * k + i]) for k in range(4))
            ql[64 * h + i] = (a & 0xF) | (c & 0xF) << 4
            ql[64 * h + 32 + i] = (b & 0xF) | (e & 0xF) << 4
            qh[32 * h + i] = a >> 4 | (b >> 4) << 2 | (c >> 4) << 4 | (e >> 4) << 6
    return bytes(ql) + bytes(qh) + struct.pack("16b", *scales) + struct.pack("<e", d)


def random_q6_k(rng, count):
    raw, values = b"", []
    for _ in range(count):
        d, scales, q = rng.choice([0.5, 0.015625]), rng.integers(-128, 128, 16), rng.integers(0, 64, 256)
        raw += pack_q6_k(d, scales, q)
        values += [d * scales[e // 16] * (q[e] - 32) for e in range(256)]
    return raw, numpy.array(values)


def test_q6_k_flat_and_row_aligned(tmp_path):
    rng = numpy.random.default_rng(5)
    raw, values = random_q6_k(rng, 2)
    f = load(tmp_path, one("w", 14, (300,), raw))
    numpy.testing.assert_allclose(f.array("w"), values[:300], rtol=1e-6)
    raw, values = random_q6_k(rng, 4)
    f = load(tmp_path, one("w", 14, (2, 1, 300), raw))
    numpy.testing.assert_allclose(f.array("w"), values.reshape(2, 1, 512)[..., :300], rtol=1e-6)


def test_quantized_tensors_written_raw_read_back(tmp_path):
    raw, values = random_q4_k(numpy.random.default_rng(6), 1)
    write_apr(tmp_path / "q.apr", [("q", RawTensor(12, (16, 16), raw))], {})
    numpy.testing.assert_allclose(read_apr(tmp_path / "q.apr").array("q").ravel(), values, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- refusals

def test_missing_empty_and_short_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_apr(tmp_path / "m.apr")
    refused(tmp_path, b"", "empty file")
    refused(tmp_path, b"APR\0" + bytes(20), "file too small: 24 bytes, an APR header is 64")
    (tmp_path / "dir.apr").mkdir()
    with pytest.raises(InputError, match="dir.apr: cannot read"):
        read_apr(tmp_path / "dir.apr")


def test_magic(golden, tmp_path):
    refused(tmp_path, b"GGUF" + golden[4:], "not an APR file (magic 47475546")
    for v1 in (b"APRN", b"APR1"):
        refused(tmp_path, v1 + golden[4:], "APR v1", v1.decode(), "not an APR v2 LLM file")
    f = load(tmp_path, reseal(b"APR2" + golden[4:]))
    assert f.header["magic"] == "APR2" and f.array("bias").tolist() == [0.125]


def test_header_checksum_mismatch(golden, tmp_path):
    refused(tmp_path, patch(golden, 44, b"\1"), "header checksum mismatch", "0x3bc08c02")


@pytest.mark.parametrize("bit, name, note", [(0x0001, "LZ4_COMPRESSED", "without compressing"),
                                             (0x0002, "ZSTD_COMPRESSED", "zstd"), (0x0004, "ENCRYPTED", "encrypted"),
                                             (0x0008, "SIGNED", "signed"),
                                             (0x0800, "LAYOUT_COLUMN_MAJOR", "column-major")])
def test_refused_flags_by_name(golden, tmp_path, bit, name, note):
    refused(tmp_path, reseal(patch(golden, 6, struct.pack("<H", 0x0400 | bit))), name, note, f"0x{bit:04x}")


def test_informational_flags_and_no_layout_flag_are_fine(golden, tmp_path):
    for flags in (0x0400 | 0x0010 | 0x0020 | 0x0080 | 0x0200, 0):
        assert load(tmp_path, reseal(patch(golden, 6, struct.pack("<H", flags)))).header["flags"] == flags


def test_bad_metadata(golden, tmp_path):
    refused(tmp_path, reseal(patch(golden, 64, b"x")), "metadata is not valid UTF-8 JSON")
    refused(tmp_path, build([], b"", meta=b"[1,2]"), "metadata is a JSON list, expected an object")
    refused(tmp_path, reseal(patch(golden, 20, struct.pack("<I", 10 ** 6))), "metadata", "runs past the end")


def test_index_order_and_bounds(tmp_path):
    blob = build([("b", 0, (1,), 0, 4), ("a", 0, (1,), 64, 4)], pad(bytes(4)) + pad(bytes(4)))
    refused(tmp_path, blob, "tensor index not sorted: 'a' after 'b'")
    blob = build([("a", 0, (1,), 0, 4), ("a", 0, (1,), 64, 4)], pad(bytes(4)) + pad(bytes(4)))
    refused(tmp_path, blob, "duplicate tensor name: 'a'")
    blob = build([("a", 0, (1,), 0, 4)], pad(bytes(4)))  # the index starts at 128; claim a 500-byte name
    refused(tmp_path, reseal(patch(blob, 128, struct.pack("<H", 500))),
            "tensor index entry 0 (name) runs past the index")


@pytest.mark.parametrize("code", [2, 77, 255])
def test_unsupported_dtype_codes(golden, tmp_path, code):
    refused(tmp_path, reseal(patch(golden, BIAS_DTYPE, bytes([code]))), "tensor bias", f"unsupported dtype code {code}")


def test_integer_dtypes_are_not_weights(golden, tmp_path):
    refused(tmp_path, reseal(patch(golden, BIAS_DTYPE, bytes([4]))),
            "tensor bias: dtype 4 (I32) is not a floating-point weight type minitrain loads")


def test_size_mismatch_out_of_bounds_and_truncation(golden, tmp_path):
    refused(tmp_path, reseal(patch(golden, BIAS_SIZE, struct.pack("<Q", 8))),
            "tensor bias: F32 [1] needs 4 bytes, the index says 8")
    refused(tmp_path, reseal(patch(golden, WEIGHTS_OFFSET, struct.pack("<Q", 1 << 40))),
            "truncated: 516 bytes", "tensor weights's data", "runs past the end")
    refused(tmp_path, golden[:460], "truncated: 460 bytes, the index needs 512", "tensor weights")
    refused(tmp_path, golden[:500], "truncated: 500 bytes, the index needs 512", "padding")


def test_footer_checksum_and_trailing_bytes(golden, tmp_path):
    refused(tmp_path, golden[:-4] + b"\0\0\0\0", "footer checksum mismatch", "0x00000000", "0x550f3f35")
    refused(tmp_path, patch(golden, 400, b"\1"), "footer checksum mismatch")
    refused(tmp_path, golden + b"\0", "5 trailing bytes")
    refused(tmp_path, golden[:-2], "2 trailing bytes")


def test_unknown_tensor_name(golden, tmp_path):
    with pytest.raises(InputError, match="no tensor named 'nope'"):
        load(tmp_path, golden).array("nope")


# ------------------------------------------------------------------------------ model metadata

TINY = ModelConfig(family="llama", hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=4, intermediate_size=16, vocab_size=8, max_position_embeddings=32, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=True)


def test_model_metadata_json():
    assert metadata_json(model_metadata(TINY, 123)).decode() == (
        '{"model_type":"llama","license":null,"data_source":null,"data_license":null,'
        '"original_format":"safetensors","total_size":0,"param_count":123,"architecture":"llama",'
        '"hf_architecture":"LlamaForCausalLM","hf_model_type":"llama","hidden_size":8,"num_layers":1,"num_heads":2,'
        '"num_kv_heads":1,"vocab_size":8,"intermediate_size":16,"max_position_embeddings":32,"rope_theta":10000.0,'
        '"rope_type":2,"rms_norm_eps":0.00001,"head_dim":4}')


def test_model_metadata_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")], unk_token="<unk>"))
    tok.add_special_tokens(["</s>", "<s>"])
    meta = model_metadata(TINY, 123, tok)
    custom = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    assert custom == {"tokenizer.vocabulary": ["<unk>", "a", "b", "ab", "</s>", "<s>", "<unk>", "<unk>"],
                      "tokenizer.vocab_size": 8, "tokenizer.model": "BPE", "tokenizer.bos_token_id": 5,
                      "tokenizer.eos_token_id": 4, "tokenizer.merges": ["a b"], "tokenizer.json": tok.to_str()}
    write_apr(tmp_path / "m.apr", [("w", numpy.zeros(1, numpy.float32))], meta)
    assert read_apr(tmp_path / "m.apr").metadata == {**meta, "license": None, "data_source": None,
                                                     "data_license": None, "total_size": 0}
    assert merge_strings(["a b", ["c", "d"], ("Ġ", "t")]) == ["a b", "c d", "Ġ t"]

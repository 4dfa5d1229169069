"""aprender's APR v2 model files (`.apr`): a streaming writer, byte-identical to `apr convert`'s
layout, and a memory-mapped reader that checks everything it can and says what is wrong.

The layout (../shared/docs/apr-format.md; all integers little-endian):

    [0, 64)    header: magic "APR\\0", version 2.0, u16 flags (0x0400 row-major), u32 tensor_count,
               u64 metadata_offset (64), u32 metadata_size (unpadded), u64 tensor_index_offset,
               u64 data_offset, u32 CRC-32 of bytes [0,40)+[44,64), 20 reserved zero bytes
    metadata   compact UTF-8 JSON, zero-padded to a multiple of 64
    index      one packed entry per tensor, sorted by the UTF-8 bytes of its name: u16 name_len,
               name, u8 dtype, u8 ndim, u64 dims (outermost first, as in numpy), u64 offset
               (relative to data_offset), u64 size; zero-padded to a multiple of 64
    data       each tensor's bytes, zero-padded to a multiple of 64, found by its offset (a
               streaming writer stores them in insertion order, not index order)
    footer     optional u32 CRC-32 of every byte before it

Dtype codes and their decoding live in apr_quant.py. The CRC-32 is zlib's (IEEE, reflected).
"""

import json
import os
import struct
import zlib
from dataclasses import dataclass

import numpy

from minitrain.errors import InputError
from minitrain.formats import apr_quant
from minitrain.formats.apr_meta import metadata_json

MAGIC = b"APR\0"
HEADER = struct.Struct("<4sBBHIQIQQI20s")  # the 64-byte header, field by field as above
ROW_MAJOR = 0x0400  # LAYOUT_ROW_MAJOR: set by every v2 writer
_CHUNK = 16 << 20  # bytes per write or CRC step

# Every named header flag bit (doc §2), for display.
FLAG_NAMES = {0x0001: "LZ4_COMPRESSED", 0x0002: "ZSTD_COMPRESSED", 0x0004: "ENCRYPTED", 0x0008: "SIGNED",
              0x0010: "SHARDED", 0x0020: "QUANTIZED", 0x0040: "HAS_FILTERBANK", 0x0080: "HAS_MODEL_CARD",
              0x0100: "STREAMING", 0x0200: "HAS_VOCAB", 0x0400: "LAYOUT_ROW_MAJOR", 0x0800: "LAYOUT_COLUMN_MAJOR"}

# Header flags a reader must refuse, with why (doc §2 and §7); the others are informational.
REFUSED_FLAGS = {
    0x0001: "the payload is declared LZ4-compressed; aprender's own writer sets this bit without compressing, "
            "so clearing it may make the file readable, but minitrain refuses it as declared",
    0x0002: "the payload is declared zstd-compressed, which minitrain does not read",
    0x0004: "the payload is declared encrypted, which minitrain does not read",
    0x0008: "the file is declared signed, which minitrain cannot verify",
    0x0800: "the tensors are declared column-major; APR LLM weights are row-major (aprender refuses this bit too)",
}


def _align64(n):
    return -(-n // 64) * 64


# ------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class RawTensor:
    """A tensor already in an APR encoding: `dtype` code, `shape`, little-endian bytes `data`."""
    dtype: int
    shape: tuple
    data: bytes


def bf16(array):
    """The BF16 (dtype 30) encoding of a float32 array, rounded to nearest even; NaN stays NaN."""
    x = numpy.ascontiguousarray(array, numpy.float32)
    bits = x.view(numpy.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # add half an ulp (ties to even), truncate
    raw = numpy.where(numpy.isnan(x), (bits >> 16) | 0x40, rounded).astype("<u2")  # NaN stays quiet NaN
    return RawTensor(apr_quant.BF16, x.shape, raw.tobytes())


ENCODE = {"f32": lambda a: numpy.asarray(a, numpy.float32), "f16": lambda a: numpy.asarray(a).astype(numpy.float16),
          "bf16": bf16}  # the tensor encodings a model is written in


def apr_tensors(config, arrays, dtype="f32"):
    """(name, encoded tensor) pairs of a model for write_apr, a tied head added as a copy of the
    embedding (as `apr convert` writes it)."""
    encode = ENCODE[dtype]
    for name, a in arrays.items():
        yield name, encode(a)
    if config.tie_word_embeddings and "lm_head.weight" not in arrays:
        yield "lm_head.weight", encode(arrays["model.embed_tokens.weight"])


def write_apr(path, tensors, metadata):
    """Write (name, tensor) pairs (or a name -> tensor dict) and a metadata dict as an APR v2 file
    the way AprV2Writer does (doc §10): index and data in sorted-name order, each section padded
    to 64, a CRC-32 footer.

    A tensor is a float32 array (dtype 0), a float16 array (dtype 1), or a RawTensor (e.g. from
    bf16()). The file is streamed: one chunk of one tensor is copied at a time, the footer CRC is
    updated chunk by chunk, and the file appears at `path` only when complete (written to
    `path`.tmp, fsynced, renamed)."""
    pairs = tensors.items() if isinstance(tensors, dict) else tensors
    entries = sorted((_entry(name, tensor) for name, tensor in pairs), key=lambda e: e[0])
    for a, b in zip(entries, entries[1:]):
        if a[0] == b[0]:
            raise ValueError(f"tensor {a[0].decode()!r} is given twice")
    meta = metadata_json(metadata)
    index, offset = bytearray(), 0
    for name, code, shape, size, _ in entries:
        index += struct.pack(f"<H{len(name)}sBB{len(shape)}QQQ", len(name), name, code, len(shape), *shape,
                             offset, size)
        offset += _align64(size)
    index_offset = 64 + _align64(len(meta))
    header = bytearray(HEADER.pack(MAGIC, 2, 0, ROW_MAJOR, len(entries), 64, len(meta), index_offset,
                                   index_offset + _align64(len(index)), 0, bytes(20)))
    header[40:44] = struct.pack("<I", zlib.crc32(header[:40] + header[44:]))
    tmp = os.fspath(path) + ".tmp"
    try:
        with open(tmp, "wb") as f:
            out = _CrcWriter(f)
            for section in (header, meta, index):
                out.write(section)
                out.pad64()
            for *_, chunks in entries:
                for chunk in chunks():
                    out.write(chunk)
                out.pad64()
            f.write(struct.pack("<I", out.crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _CrcWriter:
    """A file being written, with the position and the running CRC-32 of everything so far."""

    def __init__(self, f):
        self.f, self.crc, self.pos = f, 0, 0

    def write(self, data):
        self.f.write(data)
        self.crc, self.pos = zlib.crc32(data, self.crc), self.pos + len(data)

    def pad64(self):
        self.write(bytes(_align64(self.pos) - self.pos))


def _entry(name, tensor):
    """(name bytes, dtype code, shape, byte size, chunks): chunks() yields the data's bytes."""
    key = name.encode()
    if len(key) > 256:  # aprender truncates longer names (MAX_TENSOR_NAME_LEN); we refuse them
        raise ValueError(f"tensor name {name!r} is {len(key)} bytes; APR names are at most 256")
    if isinstance(tensor, RawTensor):
        code, shape, size = tensor.dtype, tuple(tensor.shape), len(tensor.data)
        if code not in apr_quant.NAMES or size not in apr_quant.expected_sizes(code, shape):
            raise ValueError(f"tensor {name}: {size} bytes of dtype {code} do not fit shape {list(shape)}")
        view = memoryview(tensor.data).cast("B")
        chunks = lambda: (view[i:i + _CHUNK] for i in range(0, size, _CHUNK))  # noqa: E731
    else:
        codes = {numpy.dtype(numpy.float32): apr_quant.F32, numpy.dtype(numpy.float16): apr_quant.F16}
        if not isinstance(tensor, numpy.ndarray) or tensor.dtype.newbyteorder("=") not in codes:
            raise ValueError(f"tensor {name}: expected a float32 or float16 array or a RawTensor, "
                             f"got {getattr(tensor, 'dtype', type(tensor).__name__)}")
        code, shape, size = codes[tensor.dtype.newbyteorder("=")], tensor.shape, tensor.nbytes
        chunks = lambda: _array_chunks(tensor)  # noqa: E731
    if len(shape) > 8:
        raise ValueError(f"tensor {name}: {len(shape)} dimensions; APR allows at most 8")
    return key, code, shape, size, chunks


def _array_chunks(a):
    """The array's bytes in C order, little-endian, about _CHUNK at a time (a contiguous array is
    not copied; otherwise one chunk of rows at a time is)."""
    a = a.reshape(1) if a.ndim == 0 else a
    rows = max(1, _CHUNK // max(1, a[0].nbytes if len(a) else 1))
    for i in range(0, len(a), rows):
        yield memoryview(numpy.ascontiguousarray(a[i:i + rows], a.dtype.newbyteorder("<"))).cast("B")


# ------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype_code: int
    dtype_name: str
    shape: tuple
    offset: int  # relative to header["data_offset"]
    size: int  # bytes, without padding


class AprFile:
    """An opened APR file: header (dict), metadata (dict), tensors (name -> TensorInfo, in index
    order), has_footer; array(name) decodes one tensor from the memory map."""

    def __init__(self, path, header, metadata, tensors, has_footer, data):
        self.path, self.header, self.metadata, self.tensors = path, header, metadata, tensors
        self.has_footer = has_footer
        self._data = data  # the whole file, memory-mapped read-only (uint8)

    def array(self, name):
        """The tensor as float32: F32 as a read-only view of the file, other dtypes decoded once."""
        if name not in self.tensors:
            raise InputError(f"{self.path}: no tensor named {name!r} (the file has {len(self.tensors)} tensors)")
        t = self.tensors[name]
        start = self.header["data_offset"] + t.offset
        return apr_quant.decode(t.dtype_code, self._data[start:start + t.size], t.shape)


def read_apr(path):
    """Open an APR v2 file, checking in order: existence, size, magic, header CRC, flags, metadata,
    index (bounds, sort order, dtypes, sizes), truncation, footer CRC. Any failure is an InputError
    naming the file and the problem."""
    path = os.fspath(path)
    try:
        n = os.stat(path).st_size
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    if n == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an APR model")
    if n < 64:
        raise InputError(f"{path}: file too small: {n} bytes, an APR header is 64")
    try:
        data = numpy.memmap(path, dtype=numpy.uint8, mode="r").view(numpy.ndarray)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    header = _read_header(path, bytes(data[:64]))
    metadata = _read_metadata(path, data, header, n)
    tensors = _read_index(path, data, header, n)
    return AprFile(path, header, metadata, tensors, _check_extent(path, data, header, tensors, n), data)


def _read_header(path, h):
    magic = h[:4]
    if magic in (b"APRN", b"APR1"):
        raise InputError(f"{path}: this is an APR v1 file (magic {magic.decode()}: aprender's classical ML / "
                         f"whisper container), not an APR v2 LLM file")
    if magic not in (MAGIC, b"APR2"):
        raise InputError(f"{path}: not an APR file (magic {magic.hex()}, expected 41505200 \"APR\\0\")")
    _, major, minor, flags, count, meta_off, meta_size, index_off, data_off, crc, _ = HEADER.unpack(h)
    found = zlib.crc32(h[:40] + h[44:])
    if crc != found:
        raise InputError(f"{path}: header checksum mismatch: the header says 0x{crc:08x}, "
                         f"its bytes give 0x{found:08x} (corrupt header)")
    refused = [f"{FLAG_NAMES[bit]} (0x{bit:04x}): {why}" for bit, why in REFUSED_FLAGS.items() if flags & bit]
    if refused:
        raise InputError(f"{path}: refused header flag " + "; ".join(refused))
    return {"magic": magic.decode("latin-1"), "version": (major, minor), "flags": flags, "tensor_count": count,
            "metadata_offset": meta_off, "metadata_size": meta_size, "tensor_index_offset": index_off,
            "data_offset": data_off, "checksum": crc}


def _read_metadata(path, data, header, n):
    start, end = header["metadata_offset"], header["metadata_offset"] + header["metadata_size"]
    if end > n:
        raise InputError(f"{path}: metadata [{start}, {end}) runs past the end of the file ({n} bytes)")
    try:
        metadata = json.loads(bytes(data[start:end]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: metadata is not valid UTF-8 JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: metadata is a JSON {type(metadata).__name__}, expected an object")
    return metadata


def _read_index(path, data, header, n):
    start, end = header["tensor_index_offset"], header["data_offset"]
    if not start <= end <= n:
        raise InputError(f"{path}: truncated or corrupt: the tensor index [{start}, {end}) does not fit the file "
                         f"({n} bytes)")
    index, pos, tensors, previous = bytes(data[start:end]), 0, {}, None

    def take(count, what):
        nonlocal pos
        if pos + count > len(index):
            raise InputError(f"{path}: tensor index entry {i} ({what}) runs past the index region [{start}, {end})")
        pos += count
        return index[pos - count:pos]

    for i in range(header["tensor_count"]):
        raw_name = take(*struct.unpack("<H", take(2, "name length")), "name")
        try:
            name = raw_name.decode()
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: tensor index entry {i}: its name is not UTF-8 ({e.reason} at its byte "
                             f"{e.start})") from None
        code, ndim = take(2, "dtype and ndim")
        shape = struct.unpack(f"<{ndim}Q", take(8 * ndim, "shape"))
        offset, size = struct.unpack("<QQ", take(16, "offset and size"))
        if previous is not None and raw_name <= previous:
            problem = "duplicate tensor name" if raw_name == previous else "tensor index not sorted"
            raise InputError(f"{path}: {problem}: {name!r} after {previous.decode()!r}")
        previous = raw_name
        if code in apr_quant.NOT_WEIGHTS:
            raise InputError(f"{path}: tensor {name}: dtype {code} ({apr_quant.NOT_WEIGHTS[code]}) is not a "
                             f"floating-point weight type minitrain loads")
        if code not in apr_quant.NAMES:
            raise InputError(f"{path}: tensor {name}: unsupported dtype code {code} (supported: 0 F32, 1 F16, "
                             f"30 BF16, 12 Q4_K, 14 Q6_K, 128/8 APR Q4, 129/9 APR Q8)")
        sizes = apr_quant.expected_sizes(code, shape)
        if size not in sizes:
            shown = list(shape) if len(shape) <= 4 else f"of {len(shape)} dimensions {list(shape[:3])}..."
            needs = " or ".join(f"{s:,}" if s < 10**18 else "over 10^18" for s in sizes)
            raise InputError(f"{path}: tensor {name}: {apr_quant.NAMES[code]} {shown} needs {needs} bytes, the index "
                             f"says {size:,}")
        tensors[name] = TensorInfo(name, code, apr_quant.NAMES[code], shape, offset, size)
    return tensors


def _check_extent(path, data, header, tensors, n):
    """Check the file's length against the index, and the footer CRC when there is one; return
    whether there is a footer. Data is located by offsets, in whatever order it was written."""
    base = header["data_offset"]
    required = max([base + t.offset + _align64(t.size) for t in tensors.values()], default=base)
    if n < required:
        cut = [t for t in tensors.values() if base + t.offset + t.size > n]
        where = (f"tensor {cut[0].name}'s data [{base + cut[0].offset}, {base + cut[0].offset + cut[0].size}) "
                 f"runs past the end" if cut else "only the last tensor's zero padding is missing")
        raise InputError(f"{path}: truncated: {n} bytes, the index needs {required} ({where})")
    if n == required:
        return False
    if n != required + 4:
        raise InputError(f"{path}: {n - required} trailing bytes after the tensor data (expected nothing "
                         f"or a 4-byte CRC footer; the index ends at byte {required})")
    crc = 0
    for i in range(0, required, _CHUNK):
        crc = zlib.crc32(data[i:min(i + _CHUNK, required)], crc)
    stored = int.from_bytes(bytes(data[required:]), "little")
    if crc != stored:
        raise InputError(f"{path}: footer checksum mismatch: the footer says 0x{stored:08x}, the "
                         f"{required} bytes before it give 0x{crc:08x} (corrupt or modified file)")
    return True

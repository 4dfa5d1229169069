"""Reading safetensors files into float32 NumPy arrays, memory-mapped.

The format: an 8-byte little-endian header length n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data;
offsets are relative to the end of the header. We read it ourselves (rather than through the
`safetensors` package) because NumPy has no bfloat16: BF16 is widened to F32 here by shifting
its 16 bits into the high half of a 32-bit float. Writing uses the `safetensors` package.
"""

import json
import math
import os
import re

import numpy
import safetensors.numpy

from minitrain.errors import InputError

DTYPES = {"F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.uint16, "F64": numpy.float64}


def bf16_to_f32(raw_u16):
    return (raw_u16.astype(numpy.uint32) << 16).view(numpy.float32)


def read_header(path):
    """(tensor name -> its checked header entry, the data's first byte, the file's size)."""
    header, _, base, size = read_header_and_metadata(path)
    return header, base, size


def read_header_and_metadata(path):
    """read_header's, with the header's `__metadata__` (None where there is none) second."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise InputError(f"{path}: truncated safetensors header, or not a safetensors file ({n} header bytes "
                             f"announced, the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info, size - 8 - n)
    return header, metadata, 8 + n, size


def _check_entry(path, name, info, data_bytes):
    """A header entry's dtype, shape and data_offsets are of the right kinds and inside the data."""
    def counts(value, length=None):
        return (isinstance(value, list) and (length is None or len(value) == length)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise InputError(f"{path}: tensor {name}: expected {{dtype, shape, data_offsets}}, found {info!r}"[:300])
    if not counts(info.get("shape")):
        raise InputError(f"{path}: tensor {name}: shape {info.get('shape')!r} is not a list of sizes")
    offsets = info.get("data_offsets")
    if not counts(offsets, 2) or offsets[0] > offsets[1] or offsets[1] > data_bytes:
        raise InputError(f"{path}: tensor {name}: data_offsets {offsets!r} are not [begin, end] inside the "
                         f"{data_bytes} data bytes (truncated or corrupt)")


def check_size(path, name, info, dtype, data_bytes):
    """InputError unless a header entry's data_offsets span exactly its shape's bytes in `dtype`."""
    begin, end = info["data_offsets"]
    nbytes = math.prod(info["shape"]) * numpy.dtype(dtype).itemsize
    if end - begin != nbytes:
        raise InputError(f"{path}: tensor {name} {info['dtype']}{list(info['shape'])} needs {nbytes} bytes at "
                         f"[{begin}, {end}), the file has {data_bytes} data bytes (truncated or corrupt)")


def load(path, names=None):
    """name -> float32 array (float64 for F64) for every tensor in the file (or those in `names`);
    F32 and F64 tensors are read-only views of the memory-mapped file, not copies."""
    header, base, size = read_header(path)
    data = numpy.memmap(path, dtype=numpy.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if names is not None and name not in names:
            continue
        dtype, shape = info.get("dtype"), tuple(info.get("shape", ()))
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {name} has dtype {dtype}; supported: F32, F16, BF16, F64")
        check_size(path, name, info, DTYPES[dtype], size - base)
        begin, end = info["data_offsets"]
        raw = data[base + begin: base + end].view(DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            out[name] = bf16_to_f32(raw)
        else:  # F32 and F64 as read-only views of the file (a float64 run resumes exactly); F16 widened
            out[name] = raw.astype(numpy.float64 if dtype == "F64" else numpy.float32, copy=False)
    return out


def save(path, arrays):
    """Write name -> array as a safetensors file that transformers loads (format "pt"). The
    library's I/O failures ("... I/O error: No space left on device (os error 28)") come out as
    the OSError they are."""
    try:
        safetensors.numpy.save_file({n: numpy.ascontiguousarray(a) for n, a in arrays.items()}, str(path),
                                    metadata={"format": "pt"})
    except safetensors.SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None

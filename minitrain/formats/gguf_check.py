"""A GGUF file's layout checked before gguf-py reads it.

gguf-py's GGUFReader trusts the file: a count or length past the end reads short arrays (a failed
reshape, an index error, or a loop that never advances), a string is decoded where it is used (a
UnicodeDecodeError in whatever command touches it), a tensor with a zero dimension or an offset
past the end is handed back as it is. `check(path)` walks the same layout first -- the header,
every key and value, every tensor's info, each against the bytes that remain -- and raises one
InputError naming the key, tensor or byte at fault, so that what gguf-py hands back afterwards is
whole:

    header        magic "GGUF", version 2 or 3 (little-endian), tensor count, key count
    key-value     key (u64 length + UTF-8), value type (u32), value: a scalar, a string (u64
                  length + UTF-8), or an array (element type, u64 count, elements; no nested arrays)
    tensor info   name (u64 length + UTF-8, unique), n_dims (1..4), dims (u64 each, >= 1),
                  ggml type (one gguf-py knows), offset (u64) from the start of the data section
    data section  at the next multiple of general.alignment (u32, a power of two; default 32);
                  each tensor's bytes (dims' product / block size * type size) inside the file

Counts are checked against the bytes left before anything is looped over (a 2^40-element array
in a 20 kB file is refused at once, not read element by element).
"""

import math
import mmap
import struct
from pathlib import Path

from minitrain.errors import InputError

VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # GGUFValueType
STRING, ARRAY, UINT32 = 8, 9, 4
DEFAULT_ALIGNMENT = 32


class _Walk:
    """A cursor over the file's bytes; every read names what it reads when the bytes run out."""

    def __init__(self, path, data):
        self.path, self.data, self.at = path, data, 0

    def fail(self, what):
        raise InputError(f"{self.path}: {what}")

    def take(self, fmt, what):
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.data):
            self.fail(f"truncated: {what} at byte {self.at:,} runs past the end ({len(self.data):,} bytes)")
        value = struct.unpack_from("<" + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def left(self):
        return len(self.data) - self.at

    def text(self, what):
        start = self.at
        n = self.take("Q", f"the length of {what}")
        if n > self.left():
            self.fail(f"{what} at byte {start:,} is {n:,} bytes long, past the end of the file")
        raw = self.data[self.at:self.at + n]
        self.at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} at byte {start:,} is not UTF-8 ({e.reason} at its byte {e.start})")

    def value(self, kind, what):
        """A scalar's or a string's value; an array is walked, not kept."""
        if kind in SCALARS:
            return self.take(SCALARS[kind], what)
        if kind == STRING:
            return self.text(what)
        if kind != ARRAY:
            self.fail(f"{what} has value type {kind}, which GGUF does not define (0..12)")
        element = self.take("I", f"the element type of {what}")
        count = self.take("Q", f"the length of {what}")
        if element not in SCALARS and element != STRING:
            self.fail(f"{what} is an array of value type {element}; GGUF readers take arrays of scalars or strings")
        smallest = 8 if element == STRING else struct.calcsize("<" + SCALARS[element])
        if count * smallest > self.left():
            self.fail(f"{what} claims {count:,} elements, more than the {self.left():,} bytes left hold")
        if element == STRING:
            for i in range(count):
                self.text(f"{what}[{i}]")
        else:  # whole, since it fits
            self.at += count * smallest

    def unique(self, seen, what, label):
        """A string (text's) that must not be among `seen`, which it joins."""
        name = self.text(what)
        if name in seen:
            self.fail(f"{label} {name} appears twice")
        seen.add(name)
        return name


def check(path):
    """InputError unless `path`, whose "GGUF" magic open_gguf has read, is a file whose every key,
    string and tensor is whole (see the module's docstring); returns nothing."""
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise InputError(f"{path}: empty file, not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(_Walk(path, data), size)


def _check(w, size):
    from gguf import GGML_QUANT_SIZES

    types = {kind.value: kind for kind in GGML_QUANT_SIZES}  # ggml type code -> the types gguf-py reads
    w.take("4s", "the magic")  # "GGUF": open_gguf has read it
    version = w.take("I", "the version")
    if version not in VERSIONS:
        w.fail(f"GGUF version {version} (read little-endian); minitrain reads versions "
               f"{' and '.join(map(str, VERSIONS))}, little-endian")
    tensor_count, key_count = w.take("Q", "the tensor count"), w.take("Q", "the key count")
    if key_count * 12 > w.left() or tensor_count * 24 > w.left():  # the smallest key and tensor info
        w.fail(f"header claims {key_count:,} keys and {tensor_count:,} tensors, more than the file's "
               f"{size:,} bytes hold")
    keys, alignment = set(), DEFAULT_ALIGNMENT
    for k in range(key_count):
        key = w.unique(keys, f"key #{k}", "key")
        kind = w.take("I", f"the value type of key {key}")
        value = w.value(kind, f"key {key}")
        if key == "general.alignment":
            if kind != UINT32 or value == 0 or value & (value - 1):
                w.fail(f"general.alignment is {value!r}; expected a uint32 power of two")
            alignment = value
    tensors, names = [], set()
    for t in range(tensor_count):
        name = w.unique(names, f"the name of tensor #{t}", "tensor")
        n_dims = w.take("I", f"the dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            w.fail(f"tensor {name} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
        dims = [w.take("Q", f"dimension {i} of tensor {name}") for i in range(n_dims)]
        if min(dims) < 1:
            w.fail(f"tensor {name} has a zero dimension (shape {dims} in ggml's order)")
        code = w.take("I", f"the type of tensor {name}")
        kind = types.get(code)
        if kind is None:
            w.fail(f"tensor {name} has ggml type {code}, which gguf-py does not know")
        block, type_size = GGML_QUANT_SIZES[kind]
        if dims[0] % block:
            w.fail(f"tensor {name} is {kind.name}, whose rows are blocks of {block} values, but its rows have "
                   f"{dims[0]:,}")
        offset = w.take("Q", f"the data offset of tensor {name}")
        tensors.append((name, offset, math.prod(dims) // block * type_size))
    start = -(-w.at // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment:
            w.fail(f"tensor {name}'s data offset {offset:,} is not a multiple of the alignment {alignment}")
        if start + offset + nbytes > size:
            w.fail(f"truncated: tensor {name}'s {nbytes:,} bytes at byte {start + offset:,} end past the file's "
                   f"{size:,} bytes")


KINDS = {int: "an integer", float: "a number", str: "a string", "strings": "an array of strings",
         "ints": "an array of integers"}


def typed(values, key, kind, source):
    """values[key] (gguf.fields' reading) when it is of `kind` (int, float, str, "strings" or
    "ints"), None when the key is absent; otherwise InputError naming the key and what it holds."""
    value = values.get(key)
    if value is None:
        return None
    if kind in ("strings", "ints"):
        element = str if kind == "strings" else int
        fits = isinstance(value, list) and all(isinstance(v, element) and not isinstance(v, bool) for v in value)
    else:
        fits = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
    if not fits:
        shown = f"a list of {len(value):,}" if isinstance(value, list) else repr(value)[:60]
        raise InputError(f"{source}: GGUF key {key} holds {shown}; expected {KINDS[kind]}")
    return value

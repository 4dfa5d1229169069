"""Trace files (`minitrain trace`, tools/hf_trace.py): safetensors, tensors in execution order.

A trace is a plain safetensors file any reader opens; what makes it a trace is the manifest in
its header's `__metadata__` under "minitrain.trace" (a JSON string): the tensors' execution
order, what computed them (source, dtype), the model's configuration and the batch's shape, the
optimizer's settings, the loss. docs/auditing.md lists the tensors' names. Tensors are written
as they come: each goes to a spool file beside the output at once (nothing is held), and `close`
writes the header and then the spooled data after it.

A file another trainer wrote (any subset of the names, any float dtype, no manifest) is read too:
its order is the order of its data in the file.
"""

import json
import os
import shutil
from pathlib import Path

import numpy

from minitrain.errors import InputError, writing
from minitrain.formats.safetensors_io import bf16_to_f32, read_header

MANIFEST = "minitrain.trace"  # the __metadata__ key of the manifest
_CODES = {numpy.dtype(numpy.float64): "F64", numpy.dtype(numpy.float32): "F32", numpy.dtype(numpy.int64): "I64"}
_READ = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.uint16,
         "I64": numpy.int64, "I32": numpy.int32}


class TraceWriter:
    """Tensors added one by one (`add`), the file made by `close(manifest)`; a failed write
    leaves nothing behind (WriteFailed, exit 3)."""

    def __init__(self, path):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool")
        self.entries = {}  # name -> header entry, in the order added
        self.size = 0  # data bytes so far
        with writing(self.spool_path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.spool = open(self.spool_path, "wb")

    def add(self, name, array):
        """Write `array` (float64, float32 or int64) under `name` (once per name)."""
        if name in self.entries:
            raise ValueError(f"trace tensor {name} written twice")
        a = numpy.ascontiguousarray(array)
        with writing(self.spool_path):
            self.spool.write(memoryview(a).cast("B"))
        self.entries[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                              "data_offsets": [self.size, self.size + a.nbytes]}
        self.size += a.nbytes

    def close(self, manifest):
        """Write the file: the header (the entries, then the manifest with `order`) and the data."""
        header = dict(self.entries)
        header["__metadata__"] = {MANIFEST: json.dumps({**manifest, "order": list(self.entries)})}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors writer pads
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            with writing(partial, needed=8 + len(raw) + self.size):
                self.spool.close()
                with open(partial, "wb") as out, open(self.spool_path, "rb") as data:
                    out.write(len(raw).to_bytes(8, "little") + raw)
                    shutil.copyfileobj(data, out, 1 << 24)
                os.replace(partial, self.path)
        finally:
            self.discard(partial)

    def discard(self, *more):
        self.spool.close()
        for p in (self.spool_path, *more):
            p.unlink(missing_ok=True)


class Trace:
    """A trace read back: `names` in execution order, `manifest` (None for a file without one),
    `shape(name)`, `array(name)` as float64 (integers as int64)."""

    def __init__(self, path):
        self.path = str(path)
        header, self.base, _ = read_header(self.path)
        self.header = header
        self.manifest = _manifest(self.path)
        order = self.manifest.get("order") if self.manifest else None
        by_offset = sorted(header, key=lambda n: (header[n]["data_offsets"][0], n))
        self.names = order if isinstance(order, list) and sorted(order) == sorted(header) else by_offset
        for name in self.names:
            dtype = header[name]["dtype"]
            if dtype not in _READ:
                raise InputError(f"{self.path}: tensor {name} has dtype {dtype}; a trace holds "
                                 f"{', '.join(_READ)}")
            begin, end = header[name]["data_offsets"]
            need = int(numpy.prod(header[name]["shape"], dtype=numpy.int64)) * numpy.dtype(_READ[dtype]).itemsize
            if end - begin != need:
                raise InputError(f"{self.path}: tensor {name} {dtype}{header[name]['shape']} needs {need} bytes, "
                                 f"its data_offsets give {end - begin} (truncated or corrupt)")
        self.data = numpy.memmap(self.path, dtype=numpy.uint8, mode="r") if header else None

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def is_integer(self, name):
        return self.header[name]["dtype"] in ("I64", "I32")

    def array(self, name):
        info = self.header[name]
        begin, end = info["data_offsets"]
        raw = self.data[self.base + begin: self.base + end].view(_READ[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            raw = bf16_to_f32(raw)
        return raw.astype(numpy.int64 if self.is_integer(name) else numpy.float64)


def _manifest(path):
    """The manifest of a trace file, or None (a safetensors file without one)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__")
    text = meta.get(MANIFEST) if isinstance(meta, dict) else None
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: __metadata__ {MANIFEST} is not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: __metadata__ {MANIFEST} is not a JSON object")
    return manifest

"""Trace files (`minitrain trace`, tools/hf_trace.py): safetensors, tensors in execution order.

A trace is a plain safetensors file any reader opens; what makes it a trace is the manifest in
its header's `__metadata__` under "minitrain.trace" (a JSON string): the tensors in execution
order with their shapes and dtypes, what computed them (source, dtype), the model's configuration and the batch's shape, the
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

from minitrain.config import ModelConfig
from minitrain.errors import InputError, writing
from minitrain.formats import safetensors_io
from minitrain.formats.safetensors_io import bf16_to_f32, check_size, read_header_and_metadata

MANIFEST = "minitrain.trace"  # the __metadata__ key of the manifest
_CODES = {numpy.dtype(numpy.float64): "F64", numpy.dtype(numpy.float32): "F32", numpy.dtype(numpy.int64): "I64"}
_READ = {**safetensors_io.DTYPES, "I64": numpy.int64, "I32": numpy.int32}  # a model file's dtypes, and the batch's


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
        a = numpy.asarray(array)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray would make a scalar 1-D)
        with writing(self.spool_path):
            self.spool.write(memoryview(a).cast("B"))
        self.entries[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                              "data_offsets": [self.size, self.size + a.nbytes]}
        self.size += a.nbytes

    def close(self, manifest):
        """Write the file: the header (the entries, then the manifest with `order`) and the data."""
        header = dict(self.entries)
        listed = [[name, e["shape"], e["dtype"]] for name, e in self.entries.items()]  # in the order written
        header["__metadata__"] = {MANIFEST: json.dumps({**manifest, "tensors": listed})}
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
    """A trace read back: `names` in execution order, `manifest` (None for a file without one)
    and its model's `config`, `shape(name)`, `array(name)` as float64 (integers as int64). A
    manifest's fields and the shapes of the tensors it names are checked here: what reads a
    Trace may trust them."""

    def __init__(self, path):
        self.path = str(path)
        header, metadata, self.base, size = read_header_and_metadata(self.path)
        self.header, self.config = header, None
        self.manifest = _manifest(metadata, self.path)
        listed = self.manifest.get("tensors") if self.manifest else None
        order = [t[0] for t in listed if isinstance(t, list) and t] if isinstance(listed, list) else None
        by_offset = sorted(header, key=lambda n: (header[n]["data_offsets"][0], n))
        named = order and all(isinstance(n, str) for n in order) and sorted(order) == sorted(header)
        self.names = order if named else by_offset
        for name in self.names:
            dtype = header[name]["dtype"]
            if dtype not in _READ:
                raise InputError(f"{self.path}: tensor {name} has dtype {dtype}; a trace holds "
                                 f"{', '.join(_READ)}")
            check_size(self.path, name, header[name], _READ[dtype], size - self.base)
        if self.manifest:
            self.config = _checked(self.manifest, self.path)
            self._check_tensors()

    def _check_tensors(self):
        """Each tensor the manifest's model names has its shape; the batch's ids are in range."""
        m, B, T = self.config, self.manifest["batch_size"], self.manifest["seq_len"]
        for name in self.names:
            want = expected_shape(name, m, B, T)
            if want is not None and self.shape(name) != want:
                raise InputError(f"{self.path}: tensor {name} has shape {list(self.shape(name))}; a trace of its "
                                 f"manifest's model and batch has {list(want)}")
        for name, low in (("input_ids", 0), ("targets", -100)):
            if name in self.header and not self.is_integer(name):
                raise InputError(f"{self.path}: tensor {name} is {self.header[name]['dtype']}, not integers")
            ids = self.array(name) if name in self.header else numpy.zeros(0, numpy.int64)
            bad = (ids < 0) & (ids != low) | (ids >= m.vocab_size)
            if bad.any():
                at = tuple(int(i) for i in numpy.argwhere(bad)[0])
                raise InputError(f"{self.path}: {name}{list(at)} is {ids[at]}, outside the vocabulary of "
                                 f"{m.vocab_size:,}")

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def is_integer(self, name):
        return self.header[name]["dtype"] in ("I64", "I32")

    def array(self, name):
        info = self.header[name]
        dtype = numpy.dtype(_READ[info["dtype"]])
        begin, end = info["data_offsets"]
        raw = numpy.fromfile(self.path, dtype, (end - begin) // dtype.itemsize, offset=self.base + begin)
        raw = raw.reshape(info["shape"])
        if info["dtype"] == "BF16":
            raw = bf16_to_f32(raw)
        return raw.astype(numpy.int64 if self.is_integer(name) else numpy.float64)


# The shape of each name, by its last part (docs/auditing.md's table); B, T, H, ... as there.
_SHAPES = {"embed": "BTH", "attn_norm": "BTH", "q": "BTq", "k": "BTk", "v": "BTk", "q_norm": "BTNd", "k_norm": "BTKd",
           "q_rope": "BTNd", "k_rope": "BTKd", "attn": "BTNd", "o_proj": "BTH", "attn_residual": "BTH", "mlp_norm": "BTH", "gate": "BTI", "up": "BTI",
           "act": "BTI", "down": "BTH", "mlp_residual": "BTH", "norm": "BTH", "logits": "BTV", "loss": "",
           "input_ids": "BT", "targets": "BT", "positions": "BT"}
TOP = ("input_ids", "targets", "positions", "embed", "norm", "logits", "loss")  # the names outside the layers
_PARAMS = {"embed_tokens.weight": "VH", "lm_head.weight": "VH", "q_norm.weight": "d", "k_norm.weight": "d",
           "norm.weight": "H", "layernorm.weight": "H",
           "q_proj.weight": "qH", "k_proj.weight": "kH", "v_proj.weight": "kH", "o_proj.weight": "Hq",
           "q_proj.bias": "q", "k_proj.bias": "k", "v_proj.bias": "k", "gate_proj.weight": "IH",
           "up_proj.weight": "IH", "down_proj.weight": "HI"}


def base_name(name):
    """The forward or parameter name under a gradient's or a step's: grad.X, step.m.X -> X."""
    return name.split(".", 2)[2] if name.startswith("step.") else name.removeprefix("grad.")


def expected_shape(name, m, B, T):
    """The shape a trace of model config `m` at batch (B, T) gives tensor `name` (a forward
    name, a parameter's, or either under grad. or step.*.); None for a name it does not know."""
    base = base_name(name)
    size = {"B": B, "T": T, "H": m.hidden_size, "I": m.intermediate_size, "V": m.vocab_size, "d": m.head_dim,
            "N": m.num_attention_heads, "K": m.num_key_value_heads, "q": m.num_attention_heads * m.head_dim,
            "k": m.num_key_value_heads * m.head_dim}
    parts = base.split(".")
    if parts[0] in ("model", "lm_head"):  # a parameter: model.layers.3.self_attn.q_proj.weight, ...
        dims = next((d for suffix, d in _PARAMS.items() if base.endswith(suffix)), None)
    elif len(parts) == 3 and parts[0] == "layers":  # layers.3.q
        dims = _SHAPES.get(parts[2])
    else:
        dims = _SHAPES.get(base) if base in TOP else None
    return None if dims is None else tuple(size[c] for c in dims)


_MODEL_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "max_position_embeddings")


def _checked(manifest, path):
    """The manifest's fields that diff reads, each of the right type -> its ModelConfig."""
    def bad(field, expected):
        return InputError(f"{path}: manifest {field}: expected {expected}, found {json.dumps(manifest.get(field))[:80]}")

    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and numpy.isfinite(value) and value >= 0

    model = manifest.get("model")
    if not isinstance(model, dict) or not all(count(model.get(k)) for k in _MODEL_INTS) \
            or not all(number(model.get(k)) for k in ("rope_theta", "rms_norm_eps")) \
            or not isinstance(model.get("tie_word_embeddings"), bool):
        raise bad("model", "a model configuration (positive integer sizes, numbers, tie_word_embeddings true or false)")
    for field in ("batch_size", "seq_len"):
        if not count(manifest.get(field)):
            raise bad(field, "a positive integer")
    if manifest.get("dtype") not in ("fp64", "fp32", "bf16"):
        raise bad("dtype", "fp64, fp32 or bf16")
    opt = manifest.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and opt.get("name") in ("adamw", "sgd") and number(opt.get("lr"))
                                and (opt["name"] == "sgd" or all(number(opt.get(k)) and opt[k] < 1
                                                                 for k in ("beta1", "beta2", "eps")))):
        raise bad("optimizer", "{name: adamw or sgd, lr, and AdamW's beta1, beta2, eps}")
    try:
        return ModelConfig(**model)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: manifest model: {e}") from None


def _manifest(meta, path):
    """The manifest in a trace file's header metadata, or None (a safetensors file without one)."""
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

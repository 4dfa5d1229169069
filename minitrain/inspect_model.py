"""`minitrain inspect PATH`: what a model file or directory holds, and what minitrain would load.

For an `.apr` file: the header (version, flags by name, footer), the metadata, the architecture
minitrain would load (or why it would refuse), and the tensor table (name, dtype, shape, bytes).
For a `.gguf` file: its version, its keys, the architecture, and its tensors as the file names and
types them (shapes in NumPy's row-major order). For a Hugging Face directory: config.json, the
architecture, and the tensors from the safetensors headers.
"""

import json
import math
from pathlib import Path

from minitrain.errors import InputError
from minitrain.formats import gguf, hf, safetensors_io
from minitrain.formats.apr import FLAG_NAMES, read_apr


def inspect(path, arch=None, rope_layout=None):
    """The description as a dict: format, metadata, architecture, tensors (and format details)."""
    from minitrain.formats.sources import load_source, source_kind

    p = Path(path)
    kind = source_kind(p)
    architecture = _architecture(lambda: load_source(p, arch, rope_layout)[0])
    return {**_inspect_format(p, kind, architecture), "chat_template": _chat_template(p)}


def _chat_template(p):
    """Whether the model keeps a chat template: {present, chars, sha256, origin} (or the reason it
    cannot be read)."""
    import hashlib

    from minitrain.chat import model_template

    try:
        template = model_template(p)
    except InputError as e:
        return {"present": False, "error": str(e)}
    if template is None:
        return {"present": False}
    return {"present": True, "chars": len(template.text), "sha256": hashlib.sha256(template.text.encode()).hexdigest(),
            "origin": template.origin}


def _inspect_format(p, kind, architecture):
    if kind == "hf":
        return _inspect_hf(p, architecture)
    if kind == "gguf":
        reader = gguf.open_gguf(p)
        values = gguf.fields(reader)
        return {"format": "gguf", "version": str(values.pop("GGUF.version")),
                "metadata": {k: v for k, v in values.items() if not k.startswith("GGUF.")},
                "architecture": architecture,
                "tensors": [{"name": t.name, "dtype": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)],
                             "nbytes": int(t.n_bytes)} for t in reader.tensors]}
    apr = read_apr(p)
    h = apr.header
    return {"format": "apr", "version": ".".join(map(str, h["version"])), "magic": h["magic"],
            "flags": [name for bit, name in FLAG_NAMES.items() if h["flags"] & bit], "footer": apr.has_footer,
            "metadata": apr.metadata, "architecture": architecture,
            "tensors": [{"name": t.name, "dtype": t.dtype_name, "shape": list(t.shape), "nbytes": t.size}
                        for t in apr.tensors.values()]}


def _inspect_hf(directory, architecture):
    metadata = hf.load_json(directory / "config.json")
    tensors = []
    for f in hf._shard_files(directory):
        header = safetensors_io.read_header(f)[0]
        tensors += [{"name": n, "dtype": t["dtype"], "shape": t["shape"],
                     "nbytes": t["data_offsets"][1] - t["data_offsets"][0]} for n, t in header.items()]
    tensors.sort(key=lambda t: t["name"].encode())
    return {"format": "hf-safetensors", "metadata": metadata,
            "architecture": architecture, "tensors": tensors}


def _architecture(load):
    """The config minitrain would train, or the one-line reason it would refuse the file."""
    try:
        return {"ok": True, **load().as_dict()}
    except InputError as e:
        return {"ok": False, "error": str(e)}


def _short(value):
    """A metadata value for the human view: long lists summarized."""
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} items: {', '.join(json.dumps(v) for v in value[:3])}, ...]"
    return json.dumps(value, ensure_ascii=False)


def render(info):
    lines = []
    if info["format"] == "apr":
        lines.append(f"format        APR v{info['version']} (magic {info['magic']!r}), flags "
                     f"{', '.join(info['flags']) or 'none'}, footer CRC {'present and verified' if info['footer'] else 'absent'}")
    elif info["format"] == "gguf":
        lines.append(f"format        GGUF v{info['version']} (llama.cpp)")
    else:
        lines.append("format        Hugging Face checkpoint directory (config.json + safetensors)")
    arch = info["architecture"]
    if arch["ok"]:
        fields = ", ".join(f"{k}={v}" for k, v in arch.items() if k not in ("ok", "family"))
        lines.append(f"architecture  {arch['family']}: {fields}")
    else:
        lines.append(f"architecture  not loadable: {arch['error']}")
    chat = info["chat_template"]
    lines.append("chat template " + (f"{chat['chars']:,} characters, sha256 {chat['sha256'][:16]}, from {chat['origin']}"
                                     if chat["present"] else chat.get("error", "none")))
    lines.append("metadata")
    lines += [f"  {key}: {_short(value) if key != 'tokenizer.chat_template' else '(above)'}"
              for key, value in info["metadata"].items() if key != "chat_template"]
    total = sum(t["nbytes"] for t in info["tensors"])
    params = sum(math.prod(t["shape"]) for t in info["tensors"])
    lines.append(f"tensors       {len(info['tensors'])} ({params:,} values, {total:,} bytes)")
    width = max((len(t["name"]) for t in info["tensors"]), default=4)
    lines += [f"  {t['name'].ljust(width)}  {t['dtype']:<5}  {str(t['shape']):<14}  {t['nbytes']:>12,}"
              for t in info["tensors"]]
    return "\n".join(lines)

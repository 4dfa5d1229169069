"""`minitrain inspect PATH`: what a model file or directory holds, and what minitrain would load.

For an `.apr` file: the header (version, flags by name, footer), the metadata, the architecture
minitrain would load (or why it would refuse), and the tensor table (name, dtype, shape, bytes).
For a `.gguf` file: its version, its keys, the architecture, and its tensors as the file names and
types them (shapes in NumPy's row-major order). For a Hugging Face directory: config.json, the
architecture, and the tensors from the safetensors headers.
"""

import hashlib
import json
import math

from minitrain.errors import InputError
from minitrain.formats.sources import load_source, model_template, open_model


def inspect(path, arch=None, rope_layout=None):
    """The description as a dict: format, metadata, architecture, tensors (and format details)."""
    source = open_model(path)
    architecture = _architecture(lambda: load_source(path, arch, rope_layout)[0])
    described = source.describe()  # format, its details, metadata, tensors
    tensors = described.pop("tensors")
    return {**described, "architecture": architecture, "tensors": tensors, "chat_template": _chat_template(path)}


def _chat_template(p):
    """Whether the model keeps a chat template: {present, chars, sha256, origin} (or the reason it
    cannot be read)."""
    try:
        template = model_template(p)
    except InputError as e:
        return {"present": False, "error": str(e)}
    if template is None:
        return {"present": False}
    return {"present": True, "chars": len(template.text), "sha256": hashlib.sha256(template.text.encode()).hexdigest(),
            "origin": template.origin}


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

"""`minitrain convert SRC DST`: any model source (.apr, .gguf, Hugging Face directory) to any
of the three; DST's extension picks the format (.apr, .gguf, none = an HF directory), and any
other extension is an error rather than a guess.

- .apr: F32, F16 (NumPy's round-to-nearest-even, what the newest aprender does) or BF16, HF names
  and shapes, the architecture metadata `apr convert` writes, a tied head stored as a copy of the
  embedding (as `apr convert` does), the tokenizer's vocabulary and merges when there is one.
- .gguf: F32, F16, BF16 or Q8_0 matrices (formats/gguf.py), llama.cpp's names and q/k order, and
  the tokenizer, which llama.cpp cannot run without.
- an HF directory: config.json + model.safetensors in F32, and tokenizer.json when there is one,
  loadable by transformers.

The tokenizer is --tokenizer, else SRC's own (an HF directory's tokenizer.json, a GGUF's). The
chat template travels too: --chat-template, else SRC's own (minitrain/chat.py), written where each
format keeps it: APR metadata `chat_template`, GGUF `tokenizer.chat_template`, an HF directory's
chat_template.jinja and tokenizer_config.json (with the special tokens it uses).
F32 is lossless every way; a quantized GGUF is dequantized once, exactly, and stays so.
"""

import shutil
from pathlib import Path

import numpy

from minitrain.chat import template_for
from minitrain.config import parameter_count
from minitrain.errors import InputError, write_failed
from minitrain.formats import gguf, hf
from minitrain.formats.apr import ENCODE, apr_tensors, write_apr
from minitrain.formats.apr_meta import chat_metadata, model_metadata
from minitrain.formats.sources import (NoTokenizer, checked_tokenizer, load_source, model_tokenizer, open_model,
                                       special_tokens)

TARGETS = {".apr": ("APR v2", tuple(ENCODE)), ".gguf": ("GGUF", tuple(gguf.WRITABLE)),
           "": ("Hugging Face directory", ("f32",))}


def convert(src, dst, dtype="f32", tokenizer_path=None, arch=None, rope_layout=None, chat_template=None):
    """Convert and return a one-line description of what was written."""
    src, dst = Path(src), Path(dst)
    if dst.suffix not in TARGETS:
        raise InputError(f"{dst}: extension {dst.suffix!r} names no format; write .apr, .gguf, or a directory "
                         "name without an extension (Hugging Face)")
    what, dtypes = TARGETS[dst.suffix]
    if dtype not in dtypes:
        raise InputError(f"--dtype {dtype}: {what} output is written as {', '.join(dtypes)}")
    open_model(src)  # exists
    cfg, arrays = load_source(src, arch, rope_layout)
    if tokenizer_path is not None:
        tokenizer = checked_tokenizer(tokenizer_path, cfg)
    else:  # the source's own, if it has one
        try:
            tokenizer_path = model_tokenizer(src)
            tokenizer = checked_tokenizer(tokenizer_path, cfg)
        except NoTokenizer as e:
            if dst.suffix == ".gguf":
                raise InputError(f"{dst}: a GGUF file needs the tokenizer, and {e}") from None
            tokenizer_path = tokenizer = None
    template = template_for(src, chat_template)
    tokens = special_tokens(src, tokenizer) if template else {}
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{dst}: cannot create its directory {dst.parent} ({e.strerror})") from None
    with_tokenizer = (f", tokenizer from {tokenizer_path}" if tokenizer else "") + \
                     (f", chat template from {template.origin}" if template else "")
    made = not dst.exists()
    try:
        return _write(src, dst, dtype, cfg, arrays, tokenizer, template, tokens) + with_tokenizer
    except OSError as e:  # a full disk, most often: the writers remove their temporary files
        if made and dst.is_dir():
            shutil.rmtree(dst)  # a Hugging Face directory this call began
        raise write_failed(dst, e, sum(numpy.asarray(a).nbytes for a in arrays.values())) from None


def _write(src, dst, dtype, cfg, arrays, tokenizer, template, tokens):
    """Write DST in its format; -> the description of what was written (convert's line)."""
    if dst.suffix == ".apr":
        tensors = list(apr_tensors(cfg, arrays, dtype))
        meta = model_metadata(cfg, parameter_count(cfg), tokenizer)
        write_apr(dst, tensors, {**meta, **chat_metadata(template, tokens)})
        return f"{src} -> {dst}: APR v2, {dtype.upper()}, {len(tensors)} tensors"
    if dst.suffix == ".gguf":
        end_of_turn = tokenizer.token_to_id(tokens["eos_token"]) if tokens.get("eos_token") else None
        fallback = gguf.write_gguf(dst, cfg, arrays, tokenizer, dtype, chat_template=template and template.text,
                                   end_of_turn=end_of_turn)
        note = f" ({len(fallback)} matrices in F16: rows not a multiple of 32)" if fallback else ""
        return f"{src} -> {dst}: GGUF {cfg.family}, {dtype.upper()}{note}"
    hf.save_dir(dst, cfg, arrays)
    if tokenizer:
        tokenizer.save(str(dst / "tokenizer.json"))
    if template:
        hf.write_chat_template(dst, template.text, tokens)
    return f"{src} -> {dst}: Hugging Face directory (config.json + model.safetensors, F32), {len(arrays)} tensors"

"""`minitrain convert SRC DST`: a Hugging Face checkpoint directory to an `.apr` file, or back.

HF -> APR: the weights in F32, F16 (NumPy's round-to-nearest-even, what the newest aprender does)
or BF16, HF names and shapes, the architecture metadata `apr convert` writes, a tied head stored
as a copy of the embedding (as `apr convert` does), and the tokenizer when the directory has a
tokenizer.json. APR -> HF: config.json + model.safetensors in F32, loadable by transformers.
F32 both ways is lossless.
"""

from pathlib import Path

import numpy

from minitrain.config import parameter_count
from minitrain.errors import InputError
from minitrain.formats import hf
from minitrain.formats.apr import bf16, write_apr
from minitrain.formats.apr_meta import model_metadata

ENCODE = {"f32": lambda a: numpy.asarray(a, numpy.float32), "f16": lambda a: numpy.asarray(a).astype(numpy.float16),
          "bf16": bf16}


def apr_tensors(config, arrays, dtype="f32"):
    """(name, encoded tensor) pairs for write_apr, a tied head added as a copy of the embedding."""
    encode = ENCODE[dtype]
    for name, a in arrays.items():
        yield name, encode(a)
    if config.tie_word_embeddings and "lm_head.weight" not in arrays:
        yield "lm_head.weight", encode(arrays["model.embed_tokens.weight"])


def checked_tokenizer(path, config):
    """A tokenizers.Tokenizer whose vocabulary fits the model's embedding rows."""
    from minitrain.tokenize import load_tokenizer

    tokenizer = load_tokenizer(path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise InputError(f"{path}: tokenizer vocabulary {size} is larger than the model's vocab_size "
                         f"{config.vocab_size}")
    return tokenizer


def convert(src, dst, dtype="f32"):
    """Convert and return a one-line description of what was written."""
    from minitrain.formats.sources import load_apr

    src, dst = Path(src), Path(dst)
    if dtype not in ENCODE:
        raise InputError(f"--dtype {dtype!r}: expected f32, f16 or bf16")
    if src.is_dir():
        cfg, arrays = hf.load_dir(src)
        tokenizer = checked_tokenizer(src / "tokenizer.json", cfg) if (src / "tokenizer.json").exists() else None
        tensors = list(apr_tensors(cfg, arrays, dtype))
        write_apr(dst, tensors, model_metadata(cfg, parameter_count(cfg), tokenizer))
        return f"{src} -> {dst}: APR v2, {dtype.upper()}, {len(tensors)} tensors" + \
            (", tokenizer embedded" if tokenizer else "")
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    if dtype != "f32":
        raise InputError(f"--dtype {dtype}: an APR file converts to a Hugging Face directory in f32 only")
    cfg, arrays = load_apr(src)
    hf.save_dir(dst, cfg, arrays)
    return f"{src} -> {dst}: Hugging Face directory (config.json + model.safetensors, F32), {len(arrays)} tensors"

"""GGUF files (llama.cpp's format): a llama, qwen2 or qwen3 model read into fp32, and written back.

Read and written with the `gguf` package, llama.cpp's own gguf-py, imported by `_gguf()` only
where a GGUF is read or written (a training run from an .apr or HF model needs no gguf-py): its
reader memory-maps the file, its `quants` dequantize every block type. What is ours is the
mapping, checked as strictly as the other sources:

- the architecture from `general.architecture` (llama, qwen2) and every hyperparameter from its
  `<arch>.*` key (HPARAMS); a missing key is an error, never llama.cpp's default. Optional keys
  (head and rope widths, vocab_size) must agree with the tensors. Floats are stored as f32; we
  take the shortest decimal that is that f32 (1e-05, not 9.99999974e-06).
- tensor names through TENSORS / LAYER_TENSORS (nothing unknown, nothing missing), shapes from
  ggml's [ne0 = columns, ne1 = rows] to NumPy's (rows, columns), types in READABLE dequantized
  to float32;
- a llama's q/k rows un-permuted from llama.cpp's interleaved order (rope_layout.py); qwen2 and
  qwen3 are stored in the Hugging Face order already. `output.weight` absent means a tied head.
- Llama 3's RoPE scaling is llama.cpp's `rope_freqs.weight` tensor: per frequency the divisor
  f_i / f'_i (1 kept, `factor` stretched, 1 / ((1 - a) / factor + a) between; ops/rope.py), as
  llama.cpp's converter computes it. Its four parameters are written beside it as
  `minitrain.rope_scaling.*` keys; a file without them (llama.cpp's converter writes none) is read
  as Meta's Llama 3.1-3.3 scaling (low_freq_factor 1, high_freq_factor 4, original context 8192)
  with the largest divisor as the factor, and the tensor must then be exactly that scaling's.

Writing does the inverse, with 1-D tensors (norms, biases) in F32 as llama.cpp's converter does,
the matrices in the chosen type, and the tokenizer (gguf_vocab.py), so llama.cpp runs the file.
"""

import functools
import os
from dataclasses import asdict, replace
from dataclasses import fields as fields_of
from pathlib import Path

import numpy

from minitrain.config import ModelConfig, RopeScaling, tensor_table
from minitrain.errors import InputError
from minitrain.formats import gguf_check, gguf_vocab
from minitrain.formats.rope_layout import hf_to_interleaved, interleaved_to_hf, permute_qk
from minitrain.model import check_tensors
from minitrain.ops.rope import inv_freq, llama3_inv_freq

READABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")  # GGMLQuantizationType names
WRITABLE = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}  # general.file_type
FAMILIES = ("llama", "qwen2", "qwen3")
ROPE_FREQS = "rope_freqs.weight"
SCALING_KEYS = "minitrain.rope_scaling."  # + a RopeScaling field
META_SCALING = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)  # Llama 3.1-3.3

HPARAMS = {  # ModelConfig field -> GGUF key after "<arch>."
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rope_theta": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
}
FLOAT_HPARAMS = ("rope_theta", "rms_norm_eps")
HEAD_DIM_KEYS = ("attention.key_length", "attention.value_length", "rope.dimension_count")

TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
LAYER_TENSORS = {  # after "blk.<i>." : after "model.layers.<i>."
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf():
    import gguf  # llama.cpp's gguf-py (the package, not this module)

    return gguf


def open_gguf(path):
    """A gguf.GGUFReader over `path`; InputError unless it is a whole GGUF file (gguf_check.py)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"{p}: not a GGUF file (magic {magic.hex() or 'none: empty file'}, expected 47475546 "
                             "\"GGUF\")")
        stat = p.stat()
        return _reader(str(p.resolve()), stat.st_mtime_ns, stat.st_size, str(p))
    except OSError as e:
        raise InputError(f"{p}: cannot read it ({e.strerror})") from None


@functools.lru_cache(maxsize=1)
def _reader(path, mtime_ns, size, shown):
    """The last file opened stays open: a command that reads a model and then its tokenizer
    parses the keys (a 49 152-token vocabulary takes seconds in gguf-py) once."""
    gguf_check.check(shown)
    return _gguf().GGUFReader(path)


def close():
    """Let go of the file _reader keeps open, and of what it parsed (a run that has its model and
    tokenizer in memory needs neither)."""
    _reader.cache_clear()


def fields(reader):
    """Every key -> its value (str, int, float, bool, or a list of them)."""
    return {key: f.contents() for key, f in reader.fields.items()}


def hf_name(name, source):
    """The Hugging Face name of a GGUF tensor name."""
    if name in TENSORS:
        return TENSORS[name]
    block, _, rest = name.partition(".")[2].partition(".")
    if name.startswith("blk.") and block.isdigit() and rest in LAYER_TENSORS:
        return f"model.layers.{block}.{LAYER_TENSORS[rest]}"
    raise InputError(f"{source}: unexpected tensor {name} (minitrain knows {', '.join(TENSORS)} and "
                     f"blk.N.{{{', '.join(LAYER_TENSORS)}}})")


def config_from_fields(values, shapes, tied, source, rope_freqs=None):
    """The ModelConfig of a GGUF file from its keys, checked against its tensor shapes (HF names)
    and its rope_freqs tensor (or None)."""
    arch = gguf_check.typed(values, "general.architecture", str, source)
    if arch is None:
        raise InputError(f"{source}: GGUF key general.architecture is missing")
    if arch not in FAMILIES:
        raise InputError(f"{source}: architecture {arch!r} is not supported; supported: {', '.join(FAMILIES)}")
    for key, plain in ((f"{arch}.rope.scaling.type", "none"), (f"{arch}.expert_count", 0)):
        if values.get(key, plain) != plain:
            raise InputError(f"{source}: {key} is {values[key]!r}: not supported (plain RoPE, dense MLP only)")

    def need(field):
        key = f"{arch}.{HPARAMS[field]}"
        value = gguf_check.typed(values, key, float if field in FLOAT_HPARAMS else int, source)
        if value is None:
            raise InputError(f"{source}: GGUF key {key} is missing ({field}); it has no safe default")
        if field not in FLOAT_HPARAMS and value < 1:
            raise InputError(f"{source}: GGUF key {key} ({field}) is {value}; expected a positive integer")
        return float(str(numpy.float32(value))) if field in FLOAT_HPARAMS else value

    hp = {f: need(f) for f in HPARAMS}
    heads = hp["num_attention_heads"]
    head_dim = shapes["model.layers.0.self_attn.q_proj.weight"][0] // heads \
        if "model.layers.0.self_attn.q_proj.weight" in shapes else hp["hidden_size"] // heads
    vocab = shapes["model.embed_tokens.weight"][0] if "model.embed_tokens.weight" in shapes else None
    for key, want in [(k, head_dim) for k in HEAD_DIM_KEYS] + [("vocab_size", vocab)]:
        found = values.get(f"{arch}.{key}")
        if found is not None and want is not None and found != want:
            raise InputError(f"{source}: {arch}.{key} is {found} but the tensors say {want}")
    if vocab is None:
        raise InputError(f"{source}: no token_embd.weight tensor")
    try:
        cfg = ModelConfig(family=arch, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tied, **hp)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None
    return cfg if rope_freqs is None else replace(cfg, rope_scaling=_scaling(values, rope_freqs, cfg, source))


def rope_divisors(cfg):
    """(head_dim/2,) float32: llama.cpp's rope_freqs tensor for cfg's Llama 3 scaling, f_i / f'_i,
    from the fp32 frequencies in double precision, as llama.cpp's converter computes it
    (convert_hf_to_gguf.py, LlamaModel), the bands those of ops/rope.py's llama3_inv_freq."""
    f = inv_freq(numpy, cfg.head_dim, cfg.rope_theta, None, numpy.dtype(numpy.float32)).astype(numpy.float64)
    return (f / llama3_inv_freq(numpy, f, cfg.rope_scaling)).astype(numpy.float32)


def _scaling(values, rope_freqs, cfg, source):
    """The RopeScaling of a file with a rope_freqs tensor: its minitrain.rope_scaling.* keys, or
    Meta's Llama 3 bands (see the module's docstring); the tensor must be what it gives (to 4
    float32 ulps: the fp32 frequencies come from another pow)."""
    if rope_freqs.shape != (cfg.head_dim // 2,):
        raise InputError(f"{source}: {ROPE_FREQS} has shape {list(rope_freqs.shape)}, expected "
                         f"[{cfg.head_dim // 2}] (head_dim / 2)")
    keys = {f.name: values.get(SCALING_KEYS + f.name) for f in fields_of(RopeScaling)}
    keys = {k: float(str(numpy.float32(v))) if isinstance(v, float) else v for k, v in keys.items()}  # f32, shortest
    found = "its minitrain.rope_scaling keys"
    if all(v is None for v in keys.values()):
        keys, found = {"factor": float(rope_freqs.max()), **META_SCALING}, "Meta's Llama 3 bands (1, 4, 8192)"
    try:
        scaling = RopeScaling(**keys)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: {e}") from None
    expected = rope_divisors(replace(cfg, rope_scaling=scaling))
    if not numpy.allclose(rope_freqs, expected, rtol=4 * 2.0 ** -24, atol=0):
        i = int(numpy.argmax(numpy.abs(rope_freqs - expected) / expected))
        raise InputError(f"{source}: {ROPE_FREQS} is not the llama3 scaling of {found} (factor {scaling.factor}): "
                         f"element {i} is {rope_freqs[i]:.9g}, expected {expected[i]:.9g}; convert from the "
                         "Hugging Face directory instead")
    return scaling


def load_gguf(path):
    """(ModelConfig, HF name -> float32 array in the Hugging Face layout) from a GGUF file."""
    source, gguf = str(path), _gguf()
    reader = open_gguf(path)
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    infos = {hf_name(t.name, source): t for t in reader.tensors if t is not freqs}
    for t in infos.values():
        if t.tensor_type.name not in READABLE:
            raise InputError(f"{source}: tensor {t.name} is {t.tensor_type.name}; minitrain reads "
                             f"{', '.join(READABLE)}")
    shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in infos.items()}  # ggml ne -> (rows, cols)
    arrays = {n: gguf.quants.dequantize(t.data, t.tensor_type).reshape(shapes[n]) for n, t in infos.items()}
    head, embed = arrays.pop("lm_head.weight", None), arrays.get("model.embed_tokens.weight")
    tied = head is None or (embed is not None and head.shape == embed.shape and bool(numpy.array_equal(head, embed)))
    if not tied:
        arrays["lm_head.weight"] = head
    if freqs is not None and freqs.tensor_type.name != "F32":
        raise InputError(f"{source}: {ROPE_FREQS} is {freqs.tensor_type.name}, expected F32")
    cfg = config_from_fields(fields(reader), shapes, tied, source,
                             None if freqs is None else numpy.array(freqs.data, dtype=numpy.float32).reshape(-1))
    check_tensors(cfg, {n: a.shape for n, a in arrays.items()}, source)
    if cfg.family == "llama":
        arrays = permute_qk(arrays, cfg, interleaved_to_hf)
    return cfg, arrays


def read_tokenizer(path):
    """The tokenizers.Tokenizer a GGUF file carries."""
    return gguf_vocab.tokenizer_from_fields(fields(open_gguf(path)), str(path))


def write_gguf(path, cfg, arrays, tokenizer, dtype="f32", name=None, chat_template=None, end_of_turn=None):
    """Write a GGUF file llama.cpp loads; return the names of matrices stored as F16 because q8_0
    needs rows of whole 32-value blocks (llama.cpp's converter falls back the same way). A chat
    template (text) goes under tokenizer.chat_template, where llama.cpp and ollama read it, and the
    id of the token that ends a turn under tokenizer.ggml.eot_token_id."""
    if dtype not in WRITABLE:
        raise InputError(f"--dtype {dtype!r}: a GGUF file is written as {', '.join(WRITABLE)}")
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    qtype, file_type = Q[WRITABLE[dtype][0]], WRITABLE[dtype][1]
    tokenizer_keys = gguf_vocab.gguf_fields(tokenizer, cfg.vocab_size, "the tokenizer")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, cfg.family)
    writer.add_name(name or path.stem)
    writer.add_file_type(file_type)
    if qtype == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for field, key in HPARAMS.items():
        add = writer.add_float32 if field in FLOAT_HPARAMS else writer.add_uint32
        add(f"{cfg.family}.{key}", getattr(cfg, field))
    for key in HEAD_DIM_KEYS:
        writer.add_uint32(f"{cfg.family}.{key}", cfg.head_dim)
    writer.add_uint32(f"{cfg.family}.vocab_size", cfg.vocab_size)
    for key, value in tokenizer_keys:
        writer.add_key_value(key, value, *_value_type(value))
    if cfg.rope_scaling is not None:
        for key, value in asdict(cfg.rope_scaling).items():
            (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(SCALING_KEYS + key, value)
        writer.add_tensor(ROPE_FREQS, rope_divisors(cfg), raw_dtype=Q.F32)
    if chat_template:
        writer.add_chat_template(chat_template)
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)
    if cfg.family == "llama":
        arrays = permute_qk(arrays, cfg, hf_to_interleaved)
    names = {hf: g for g, hf in TENSORS.items()}
    names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}"
                  for i in range(cfg.num_hidden_layers) for g, hf in LAYER_TENSORS.items()})
    fallback = []
    for hf in tensor_table(cfg):
        a = numpy.ascontiguousarray(arrays[hf], dtype=numpy.float32)
        kind = Q.F32 if a.ndim == 1 else qtype
        if kind == Q.Q8_0 and not gguf.quants.Q8_0.can_quantize(a):
            kind = Q.F16
            fallback.append(hf)
        writer.add_tensor(names[hf], gguf.quants.quantize(a, kind), raw_dtype=kind)
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException:  # nothing half-written stays
        tmp.unlink(missing_ok=True)
        raise
    return fallback


def _value_type(value):
    """(GGUFValueType, element type for arrays) of a tokenizer value."""
    V = _gguf().GGUFValueType
    element = value[0] if isinstance(value, list) else value
    kind = {str: V.STRING, bool: V.BOOL, int: V.INT32 if isinstance(value, list) else V.UINT32}[type(element)]
    return (V.ARRAY, kind) if isinstance(value, list) else (kind, None)

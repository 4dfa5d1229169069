"""The metadata of APR files: aprender's JSON field order and omission rules, Rust-style f32
numbers, and the architecture and tokenizer keys of an LLM (../shared/docs/apr-format.md §3)."""

import json
import math
from fractions import Fraction

import numpy

ROPE_NEOX = 2  # rope_type 2: rotate_half pairs (i, i + d/2), Hugging Face's layout; 0 = adjacent pairs

# The typed metadata fields in serialization order (doc §3.1, newest header_impl.rs). Those in
# _ALWAYS are written even when absent, with that default; every other absent one is omitted.
TYPED_FIELDS = (
    "model_type name description author license data_source data_license version source original_format "
    "created_at total_size param_count quantization sharding chat_template chat_format special_tokens "
    "architecture hf_architecture hf_model_type hidden_size num_layers num_heads num_kv_heads vocab_size "
    "intermediate_size max_position_embeddings rope_theta rope_type rms_norm_eps head_dim num_experts "
    "num_experts_per_tok moe_intermediate_size").split()
_ALWAYS = {"model_type": "", "license": None, "data_source": None, "data_license": None,
           "total_size": 0, "param_count": 0}
_F32_FIELDS = {"rope_theta", "rms_norm_eps"}  # Rust f32 fields: printed by rust_f32()


def _json(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def rust_f32(x):
    """`x` as Rust serde_json prints an f32 (it calls ryu's format32): the shortest decimal that
    reads back as the same f32, laid out by its decimal point position kk (10^(kk-1) <= |x| < 10^kk).

    The thresholds are those of dtolnay/ryu src/pretty/mod.rs `format32`:
        0 <= k and kk <= 13   digits, k zeros, ".0"          10000.0, 1000000.0
        0 < kk <= 13          digits with a point inside     123456.79
        -6 < kk <= 0          "0.", -kk zeros, digits        0.5, 0.000001
        otherwise             d[.ddd]e<kk-1>                 1e-7, 1.5e-7, 1e13, 3.4028235e38
    where the value is digits * 10^k. Non-finite values are null, as serde_json writes them."""
    f = numpy.float32(x)
    if not numpy.isfinite(f):
        return "null"
    if f == 0:
        return "-0.0" if numpy.signbit(f) else "0.0"
    digits, k = _shortest_f32(abs(f))
    s, kk = str(digits), len(str(digits)) + k
    sign = "-" if f < 0 else ""
    if 0 <= k and kk <= 13:
        return sign + s + "0" * k + ".0"
    if 0 < kk <= 13:
        return sign + s[:kk] + "." + s[kk:]
    if -6 < kk <= 0:
        return sign + "0." + "0" * -kk + s
    return sign + (s[0] + ("." + s[1:] if len(s) > 1 else "")) + f"e{kk - 1}"


def _shortest_f32(f):
    """(digits, k): the shortest digits * 10^k that rounds to the positive f32 `f`, the closest
    such if several (ties to an even last digit), computed exactly with fractions."""
    v = Fraction(float(f))
    below = Fraction(float(numpy.nextafter(f, numpy.float32(0))))
    top = f == numpy.finfo(numpy.float32).max  # its upper neighbour would be 2^128 (inf)
    above = Fraction(2 ** 128) if top else Fraction(float(numpy.nextafter(f, numpy.float32(numpy.inf))))
    lo, hi = (below + v) / 2, (v + above) / 2  # numbers in (lo, hi) read back as f
    inclusive = int(f.view(numpy.uint32)) % 2 == 0  # a tie rounds to the even mantissa: f
    e = math.floor(math.log10(f))
    e += (Fraction(10) ** (e + 1) <= v) - (Fraction(10) ** e > v)  # 10^e <= v < 10^(e+1)
    for p in range(1, 10):
        unit = Fraction(10) ** (e - p + 1)
        down = math.floor(v / unit)
        fits = [d for d in (down, down + 1) if lo < d * unit < hi or (inclusive and d * unit in (lo, hi))]
        if fits:
            digits, k = min(fits, key=lambda d: (abs(d * unit - v), d % 2)), e - p + 1
            while digits % 10 == 0:
                digits, k = digits // 10, k + 1
            return digits, k
    raise AssertionError(f"no 9-digit decimal reads back as {f!r}")


def metadata_json(metadata):
    """The metadata as aprender writes it: compact JSON, non-ASCII raw, the typed fields first in
    their order (absent ones omitted except model_type, license, data_source, data_license,
    total_size, param_count), then the other (custom) keys in the dict's order."""
    parts = []
    for key in TYPED_FIELDS:
        value = metadata.get(key)
        if value is None and key not in _ALWAYS:
            continue
        value = _ALWAYS[key] if value is None else value
        parts.append(_json(key) + ":" + (rust_f32(value) if key in _F32_FIELDS else _json(value)))
    parts += [_json(key) + ":" + _json(value) for key, value in metadata.items() if key not in TYPED_FIELDS]
    return ("{" + ",".join(parts) + "}").encode()


def model_metadata(config, param_count, tokenizer=None):
    """The metadata `apr convert` writes for an LLM with a config.json beside it (doc §3.2(1)),
    from a ModelConfig, with three deliberate differences: param_count is the real count (aprender
    leaves 0), original_format is "safetensors" (aprender writes "gguf" on this path, a quirk),
    and rope_type is 2 (NEOX, rotate_half) for every family: aprender writes 0 for llama, which
    pairs adjacent elements and silently ruins Hugging Face Llama weights in any reader that
    obeys it. With a tokenizers.Tokenizer, the tokenizer.* keys are added (tokenizer_metadata)."""
    c = config
    meta = {"model_type": c.family, "original_format": "safetensors", "param_count": int(param_count),
            "architecture": c.family, "hf_architecture": c.hf_class, "hf_model_type": c.family,
            "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta, "rope_type": ROPE_NEOX, "rms_norm_eps": c.rms_norm_eps,
            "head_dim": c.head_dim}
    if c.rope_scaling is not None:  # a custom key: aprender has no typed field for it (a reader that
        meta["rope_scaling"] = c.rope_scaling.as_hf()  # ignores it computes plain RoPE)
    if tokenizer is not None:
        meta.update(tokenizer_metadata(tokenizer, c.vocab_size))
    return meta


BOS_NAMES, EOS_NAMES = ("<s>", "<|begin_of_text|>"), ("<|endoftext|>", "</s>", "<eos>")


TOKENIZER_JSON = "tokenizer.json"  # minitrain's own key: the whole tokenizer.json, as a string


def chat_metadata(template, tokens):
    """What an APR file keeps of a chat: chat_template (a Template's text), and chat_bos_token,
    chat_eos_token (the end of a turn) where the model names them; {} without a template."""
    if template is None:
        return {}
    return {"chat_template": template.text, **{f"chat_{k}": v for k, v in tokens.items() if v}}


def tokenizer_metadata(tokenizer, vocab_size):
    """The tokenizer.* custom keys realizar reads (doc §3.2): the vocabulary indexed by id,
    padded with "<unk>" to max(vocab_size, max id + 1), the model type, the BOS/EOS ids when one
    of the usual names is present, and the merges as "a b" strings. Plus TOKENIZER_JSON, the
    tokenizer itself (its pre-tokenizer, normalizer and decoder, which those keys lack), so the
    file is its own --tokenizer; aprender ignores the key."""
    whole = tokenizer.to_str()
    spec = json.loads(whole)["model"]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    words = ["<unk>"] * max(vocab_size, max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        words[i] = token
    meta = {"tokenizer.vocabulary": words, "tokenizer.vocab_size": len(words), "tokenizer.model": spec["type"],
            TOKENIZER_JSON: whole}
    for key, names in (("tokenizer.bos_token_id", BOS_NAMES), ("tokenizer.eos_token_id", EOS_NAMES)):
        found = [vocab[n] for n in names if n in vocab]
        if found:
            meta[key] = found[0]
    if "merges" in spec:
        meta["tokenizer.merges"] = merge_strings(spec["merges"])
    return meta


def merge_strings(merges):
    """tokenizer.json merges as "a b" strings: older files store them so, newer ones as [a, b]."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]

"""The tokenizer inside a GGUF file, both ways: the `tokenizer.ggml.*` keys <-> a
`tokenizers.Tokenizer`.

GGUF keeps a byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2") as data: the vocabulary in
id order (`tokens`, spelled in GPT-2's byte alphabet, so a space is "Ġ"), each token's kind
(`token_type`: 1 normal, 3 control, 4 user-defined, 5 unused), the merges in rank order as "a b"
strings, and the *name* of the pre-tokenizer (`pre`): the regex that splits text into words
before the merges run lives in llama.cpp's source (src/llama-vocab.cpp), under that name.
PRE_TOKENIZERS writes the names minitrain knows as `tokenizers` pre-tokenizers making the same
splits, in the form the models' own tokenizer.json files use:

    gpt-2      GPT-2's regex ('s|'t|... ?\\p{L}+| ?\\p{N}+|...), which is ByteLevel's own
    smollm     each digit alone first, then GPT-2's regex (SmolLM, StarCoder)
    qwen2      Qwen2's regex (letters with one leading non-letter, single digits, ...)
    llama-bpe  Llama 3's regex (digits in runs of up to 3), merges ignored for whole-word tokens

Control tokens become special added tokens and user-defined ones plain added tokens (both are
matched whole in the text, as llama.cpp does). Writing goes the other way: a tokenizer.json's
pre-tokenizer must equal one of these (trim_offsets, which changes only offsets, aside), else
the error names the supported ones; ids the tokenizer does not use, up to the model's vocab_size
rows, are written as "[PAD<id>]" of type unused, as llama.cpp's own converter does.
"""

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from minitrain.errors import InputError
from minitrain.formats.apr_meta import BOS_NAMES, merge_strings
from minitrain.formats.gguf_check import typed
from minitrain.formats.vocab import find_eos

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# name -> (pre-tokenizer factory, BPE ignore_merges)
PRE_TOKENIZERS = {
    "gpt-2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False), False),
    "smollm": (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]), False),
    "qwen2": (lambda: _split_then_bytes(_QWEN2), False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3), True),
}


def tokenizer_from_fields(fields, source):
    """A tokenizers.Tokenizer from a GGUF file's tokenizer.ggml.* values (key -> value)."""
    def need(key, kind):
        value = typed(fields, key, kind, source)
        if value is None:
            raise InputError(f"{source}: GGUF key {key} is missing (no tokenizer to read)")
        return value

    kind = need("tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise InputError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; minitrain reads byte-level "
                         "BPE tokenizers ('gpt2')")
    pre = need("tokenizer.ggml.pre", str)
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                         f"{', '.join(PRE_TOKENIZERS)}")
    tokens, merges = need("tokenizer.ggml.tokens", "strings"), need("tokenizer.ggml.merges", "strings")
    kinds = typed(fields, "tokenizer.ggml.token_type", "ints", source) or [NORMAL] * len(tokens)
    if len(kinds) != len(tokens):
        raise InputError(f"{source}: tokenizer.ggml.token_type has {len(kinds):,} entries for "
                         f"{len(tokens):,} tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise InputError(f"{source}: tokenizer.ggml.merges holds {bad!r}, not two tokens separated by one space")
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    try:
        model = models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=ignore_merges)
    except Exception as e:  # the library raises a bare Exception: a merge of tokens outside the vocabulary
        raise InputError(f"{source}: tokenizer.ggml.tokens and .merges make no BPE tokenizer ({e})") from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = make_pre()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, kinds) if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, kinds) if k == USER_DEFINED])
    return tokenizer


def pre_tokenizer_name(tokenizer, source):
    """The llama.cpp name of a tokenizer's pre-tokenizer (see PRE_TOKENIZERS)."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise InputError(f"{source}: a {model['type']} tokenizer with a {(spec.get('decoder') or {}).get('type')} "
                         "decoder; GGUF export supports byte-level BPE tokenizers only")
    found = _without_offsets(spec.get("pre_tokenizer"))
    for name, (make_pre, ignore_merges) in PRE_TOKENIZERS.items():
        if found == _without_offsets(json.loads(make_pre().__getstate__())) and \
                bool(model.get("ignore_merges")) == ignore_merges:
            return name
    raise InputError(f"{source}: its pre-tokenizer is none of those llama.cpp knows by name that minitrain "
                     f"writes ({', '.join(PRE_TOKENIZERS)}); llama.cpp could not split text as it does")


def _without_offsets(node):
    """A pre-tokenizer's JSON without trim_offsets (it moves offsets, never ids)."""
    if isinstance(node, dict):
        return {k: _without_offsets(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_without_offsets(v) for v in node]
    return node


def gguf_fields(tokenizer, vocab_size, source):
    """(key, value) pairs of tokenizer.ggml.* for a model with `vocab_size` embedding rows."""
    pre = pre_tokenizer_name(tokenizer, source)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"{source}: tokenizer id {max(vocab.values())} is past the model's {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    kinds = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], kinds[i] = token, NORMAL
    for i, added in tokenizer.get_added_tokens_decoder().items():
        kinds[i] = CONTROL if added.special else USER_DEFINED
    spec = json.loads(tokenizer.to_str())["model"]
    out = [("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", pre), ("tokenizer.ggml.tokens", tokens),
           ("tokenizer.ggml.token_type", kinds), ("tokenizer.ggml.merges", merge_strings(spec["merges"])),
           ("tokenizer.ggml.eos_token_id", find_eos(tokenizer, source)), ("tokenizer.ggml.add_bos_token", False)]
    bos = next((vocab[n] for n in BOS_NAMES if n in vocab), None)
    if bos is not None:
        out.append(("tokenizer.ggml.bos_token_id", bos))
    return out

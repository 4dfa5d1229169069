"""Hugging Face checkpoint directories: config.json + model.safetensors (or shards with an index).

Strict, as ../shared/docs/reference.md section 2 asks: the architecture comes from config.json,
with no silent defaults for what matters (a missing rope_theta is an error, not 10 000); every
tensor of the architecture must be present with exactly its shape; nothing unexpected; weights
in F32, F16 or BF16 are widened to F32.
"""

import json
from dataclasses import fields
from pathlib import Path

import numpy

from minitrain.config import FAMILIES, ModelConfig, RopeScaling
from minitrain.errors import InputError
from minitrain.formats import safetensors_io
from minitrain.formats.json_file import load_json
from minitrain.model import check_tensors

ENCODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
            "t5", "mt5", "bart", "mbart", "modernbert"}
INDEX = "model.safetensors.index.json"


def config_from_hf(d, source):
    """A ModelConfig from a parsed config.json; InputError naming the field on anything we can
    not honour exactly (a value of the wrong type or out of range included)."""
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"{source}: model_type {model_type!r} is not a name; supported: {', '.join(FAMILIES)}")
    if model_type in ENCODERS or d.get("is_encoder_decoder"):
        raise InputError(f"{source}: model_type {model_type!r} is an encoder model; minitrain trains "
                         f"decoder-only Llama/Qwen2/Qwen3 models")
    if model_type not in FAMILIES:
        raise InputError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")

    def field(key, kind, required=True, default=None):
        """d[key] as a positive int, a positive number, a bool or a mapping (`kind`)."""
        value = d.get(key)
        if value is None:
            if required:
                raise InputError(f"{source}: field {key} is missing")
            return default
        fine = {"int": isinstance(value, int) and not isinstance(value, bool) and value > 0,
                "number": isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"),
                "bool": isinstance(value, bool), "mapping": isinstance(value, dict)}[kind]
        if not fine:
            expected = {"int": "a positive integer", "number": "a positive number", "bool": "true or false",
                        "mapping": "an object"}[kind]
            raise InputError(f"{source}: field {key} is {value!r}, expected {expected}")
        return value

    scaling = None
    for key in ("rope_parameters", "rope_scaling"):  # transformers v5 writes the first, earlier ones the second
        rope = field(key, "mapping", required=False, default={})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3":
            found = _llama3_scaling(rope, f"{source}: {key}")
            if scaling is not None and found != scaling:
                raise InputError(f"{source}: rope_parameters and rope_scaling give different llama3 scalings")
            scaling = found
        elif kind != "default":
            raise InputError(f"{source}: {key} rope type {kind!r} is not supported (only plain RoPE and llama3)")
    theta = d.get("rope_theta")
    if theta is None:
        theta = (d.get("rope_parameters") or {}).get("rope_theta")
        d = {**d, "rope_theta": theta}
    if theta is None:
        raise InputError(f"{source}: rope_theta is missing (neither top-level rope_theta nor "
                         f"rope_parameters.rope_theta); it has no safe default (10 000 Llama, 1 000 000 Qwen2)")
    if d.get("hidden_act", "silu") != "silu":
        raise InputError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    if (model_type != "qwen2" and d.get("attention_bias")) or d.get("mlp_bias"):
        raise InputError(f"{source}: attention_bias/mlp_bias on a {model_type} model is not supported")
    if d.get("use_sliding_window"):
        raise InputError(f"{source}: use_sliding_window is true; only full causal attention is supported")

    heads, hidden = field("num_attention_heads", "int"), field("hidden_size", "int")
    try:
        return ModelConfig(
            family=model_type,
            hidden_size=hidden,
            num_hidden_layers=field("num_hidden_layers", "int"),
            num_attention_heads=heads,
            num_key_value_heads=field("num_key_value_heads", "int", False, heads),  # transformers: absent = MHA
            head_dim=field("head_dim", "int", False, hidden // heads),
            intermediate_size=field("intermediate_size", "int"),
            vocab_size=field("vocab_size", "int"),
            max_position_embeddings=field("max_position_embeddings", "int"),
            rope_theta=float(field("rope_theta", "number")),
            rms_norm_eps=float(field("rms_norm_eps", "number")),
            tie_word_embeddings=field("tie_word_embeddings", "bool", False, False),  # transformers' default for all three
            rope_scaling=scaling,
        )
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def _llama3_scaling(rope, where):
    """RopeScaling from a rope_parameters / rope_scaling mapping of type llama3; InputError naming a
    missing or bad field (none has a default: each changes every frequency band)."""
    names = [f.name for f in fields(RopeScaling)]
    missing = [n for n in names if n not in rope]
    if missing:
        raise InputError(f"{where}: llama3 rope scaling without {', '.join(missing)}")
    try:
        return RopeScaling(**{n: rope[n] for n in names})
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def config_to_hf(cfg):
    """config.json fields for transformers (classic top-level rope_theta: v4 and v5 read it)."""
    d = {
        "architectures": [cfg.hf_class],
        "model_type": cfg.family,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    d.update({"llama": {"attention_bias": False, "mlp_bias": False}, "qwen2": {"use_sliding_window": False},
              "qwen3": {"attention_bias": False, "use_sliding_window": False}}[cfg.family])
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = cfg.rope_scaling.as_hf()
    return d


def shard_files(directory):
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors."""
    index = directory / INDEX
    if index.exists():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no weight_map")
        bad = next(((n, f) for n, f in weight_map.items() if not isinstance(f, str) or f in ("", "..")
                    or Path(f).name != f), None)
        if bad is not None:
            raise InputError(f"{index}: weight_map[{bad[0]!r}] is {json.dumps(bad[1])[:80]}; expected the name of a "
                             "shard file beside the index")
        return sorted({directory / f for f in weight_map.values()})
    single = directory / "model.safetensors"
    if not single.exists():
        raise InputError(f"{directory}: no model.safetensors and no {INDEX}")
    return [single]


def load_dir(path):
    """(ModelConfig, name -> float32 array) from a Hugging Face checkpoint directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    cfg = config_from_hf(load_json(directory / "config.json"), str(directory / "config.json"))
    arrays, origin = {}, {}
    for f in shard_files(directory):
        if not f.exists():
            raise InputError(f"{f}: shard listed in {INDEX} does not exist")
        for name, a in safetensors_io.load(f).items():
            if name in arrays:
                raise InputError(f"{f}: tensor {name} is also in {origin[name]}")
            arrays[name], origin[name] = a, f.name
    if _head_is_tied(cfg, arrays, directory):
        arrays.pop("lm_head.weight", None)
    check_tensors(cfg, {n: a.shape for n, a in arrays.items()}, str(directory))
    return cfg, arrays


def _head_is_tied(cfg, arrays, directory):
    """True when the head is the embedding. A stored lm_head.weight must then be bit-identical to
    it; an untied config needs its own lm_head.weight (checked by the tensor table)."""
    head = arrays.get("lm_head.weight")
    if not cfg.tie_word_embeddings or head is None:
        return cfg.tie_word_embeddings
    embed = arrays.get("model.embed_tokens.weight")
    if embed is None or head.shape != embed.shape or not numpy.array_equal(head, embed):
        raise InputError(f"{directory}: config says tie_word_embeddings but lm_head.weight differs from "
                         f"model.embed_tokens.weight")
    return True


def save_dir(path, cfg, arrays):
    """Write config.json + model.safetensors (F32) that transformers' from_pretrained loads."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    safetensors_io.save(directory / "model.safetensors", {n: numpy.asarray(a, dtype=numpy.float32)
                                                         for n, a in arrays.items()})


def tokenizer_config(directory):
    """tokenizer_config.json of a checkpoint directory ({} without one)."""
    path = Path(directory) / "tokenizer_config.json"
    return load_json(path) if path.is_file() else {}


def write_chat_template(directory, text, tokens):
    """A chat template as transformers reads it: chat_template.jinja (what it writes today) and, in
    tokenizer_config.json, the template and the special tokens it uses (`tokens`: bos_token,
    eos_token; kept beside whatever the file already holds)."""
    directory = Path(directory)
    (directory / "chat_template.jinja").write_text(text, encoding="utf-8")
    config = tokenizer_config(directory)
    config.update({"chat_template": text, "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                   **{k: v for k, v in tokens.items() if v}})
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

"""Model sources for `--init` and `eval --init`: an `.apr` file or a Hugging Face directory.

The rules for an APR file (../shared/docs/reference.md section 2): the architecture comes from
the metadata, cross-checked against the tensors. A field the tensor shapes determine exactly
(hidden size, layers, vocabulary, intermediate size, the q/k widths) may be absent from the
metadata, but where both exist they must agree; a field the shapes cannot determine
(rope_theta, rms_norm_eps, max_position_embeddings, the head count when head_dim is absent too)
must be present: no silent defaults. `lm_head.weight` absent, or bit-identical to the
embedding, means a tied head.
"""

import re
from pathlib import Path

import numpy

from minitrain.config import FAMILIES, ModelConfig
from minitrain.errors import InputError
from minitrain.formats import hf
from minitrain.formats.apr import read_apr
from minitrain.formats.apr_meta import ROPE_NEOX
from minitrain.model import Model, check_tensors

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def load_model(path):
    """A Model with the weights of `path`, strictly checked."""
    p = Path(path)
    if p.is_dir():
        cfg, arrays = hf.load_dir(p)
    elif not p.exists():
        raise InputError(f"{p}: no such file or directory")
    else:
        cfg, arrays = load_apr(p)
    return Model.from_arrays(cfg, arrays)


def load_apr(path):
    """(ModelConfig, name -> float32 array) from an APR v2 file."""
    apr = read_apr(path)
    arrays = {n: apr.array(n) for n in apr.tensors}
    head, embed = arrays.pop("lm_head.weight", None), arrays.get("model.embed_tokens.weight")
    tied = head is None or (embed is not None and head.shape == embed.shape and bool(numpy.array_equal(head, embed)))
    cfg = config_from_apr(apr.metadata, {n: t.shape for n, t in apr.tensors.items()}, tied, str(path))
    if not tied:
        arrays["lm_head.weight"] = head
    check_tensors(cfg, {n: a.shape for n, a in arrays.items()}, str(path))
    return cfg, arrays


def config_from_apr(meta, shapes, tied, source):
    """The architecture of an APR file from its metadata, checked against its tensor shapes."""
    # every type key present must agree with the tensors ("auto"/"unknown" say nothing)
    kinds = {str(meta.get(k) or "").lower() for k in ("hf_model_type", "architecture", "model_type")}
    kinds -= {"", "auto", "unknown"}
    if kinds & hf.ENCODERS or any(n.startswith(("bert.", "encoder.", "roberta.")) or ".encoder." in n for n in shapes):
        raise InputError(f"{source}: an encoder model ({', '.join(sorted(kinds & hf.ENCODERS)) or 'encoder tensors'}); "
                         "minitrain trains decoder-only Llama/Qwen2 models")
    if any(n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) for n in shapes):
        raise InputError(f"{source}: has q_norm/k_norm tensors (a Qwen3 model), which minitrain does not support")
    if "model.embed_tokens.weight" not in shapes or "model.layers.0.self_attn.q_proj.weight" not in shapes:
        raise InputError(f"{source}: no model.embed_tokens.weight / model.layers.0.self_attn.q_proj.weight: not a "
                         "Llama/Qwen2 checkpoint with Hugging Face tensor names")
    family = "qwen2" if "model.layers.0.self_attn.q_proj.bias" in shapes else "llama"
    if kinds - FAMILIES.keys():
        raise InputError(f"{source}: model type {', '.join(sorted(kinds - FAMILIES.keys()))} is not supported; "
                         f"supported: {', '.join(FAMILIES)}")
    if kinds - {family}:
        raise InputError(f"{source}: metadata says {', '.join(sorted(kinds))} but the tensors are {family!r} "
                         f"({'with' if family == 'qwen2' else 'without'} q/k/v biases)")
    if meta.get("rope_type", ROPE_NEOX) != ROPE_NEOX:
        raise InputError(f"{source}: rope_type {meta['rope_type']} (adjacent pairs); minitrain implements the "
                         f"Hugging Face rotate_half layout, rope_type {ROPE_NEOX} (weights converted from GGUF for "
                         "adjacent pairs would be silently wrong)")

    V, H = shapes["model.embed_tokens.weight"]
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := _LAYER.match(n)))
    q_rows = shapes["model.layers.0.self_attn.q_proj.weight"][0]
    kv_rows = shapes["model.layers.0.self_attn.k_proj.weight"][0] if "model.layers.0.self_attn.k_proj.weight" in shapes else None
    inter = shapes["model.layers.0.mlp.gate_proj.weight"][0] if "model.layers.0.mlp.gate_proj.weight" in shapes else None

    def agree(key, from_shapes):
        value = meta.get(key)
        if value is None:
            return from_shapes
        if from_shapes is not None and value != from_shapes:
            raise InputError(f"{source}: metadata {key} {value} but the tensors say {from_shapes}")
        return value

    def need(key):
        if meta.get(key) is None:
            raise InputError(f"{source}: metadata field {key} is missing and the tensor shapes cannot determine "
                             "it (no default is safe)")
        return meta[key]

    head_dim = meta.get("head_dim")
    heads = agree("num_heads", q_rows // head_dim if head_dim else None)
    if heads is None:
        raise InputError(f"{source}: metadata has neither num_heads nor head_dim; q_proj's {q_rows} rows "
                         "cannot be split into heads without one of them")
    head_dim = agree("head_dim", q_rows // heads)
    kv_heads = agree("num_kv_heads", kv_rows // head_dim if kv_rows else None)
    try:
        return ModelConfig(
            family=family, hidden_size=agree("hidden_size", H), num_hidden_layers=agree("num_layers", layers),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            intermediate_size=agree("intermediate_size", inter), vocab_size=agree("vocab_size", V),
            max_position_embeddings=need("max_position_embeddings"), rope_theta=float(need("rope_theta")),
            rms_norm_eps=float(need("rms_norm_eps")), tie_word_embeddings=tied)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: {e}") from None

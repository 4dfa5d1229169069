"""An APR file as a model: its architecture from the metadata, checked against the tensors, and
the row order of its q/k.

The rules for an APR file (../shared/docs/reference.md section 2): the architecture comes from
the metadata, cross-checked against the tensors. A field the tensor shapes determine exactly
(hidden size, layers, vocabulary, intermediate size, the q/k widths) may be absent from the
metadata, but where both exist they must agree; a field the shapes cannot determine
(rope_theta, rms_norm_eps, max_position_embeddings, the head count when head_dim is absent too)
must be present, or supplied by `--arch NAME`: no silent defaults. `lm_head.weight` absent, or
bit-identical to the embedding, means a tied head.

aprender's files, as they are (../shared/docs/apr-format.md): `apr pretrain` (entrenar) names the
architecture by its Hugging Face class ("Qwen2ForCausalLM"), marks `format:
"entrenar-checkpoint"`, and its CPU trainer writes no hyperparameters at all (hence `--arch`). It
trains rotate_half RoPE on Hugging Face rows and writes no rope_type: an absent rope_type is the
Hugging Face layout. rope_type 0 is ambiguous: `apr import` of an HF model writes it over HF rows,
its raw GGUF import over llama.cpp's interleaved rows, so it is refused unless `--rope-layout`
says which (rope_layout.py).
"""

import json
import re

import numpy

from minitrain.config import FAMILIES, PRESETS, ModelConfig
from minitrain.errors import InputError
from minitrain.formats import hf
from minitrain.formats.apr import read_apr
from minitrain.formats.apr_meta import ROPE_NEOX
from minitrain.formats.rope_layout import interleaved_to_hf, permute_qk
from minitrain.model import check_tensors

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
ROPE_ADJACENT = 0  # APR rope_type 0: adjacent pairs in the math; over HF or interleaved rows, see above
_CLASSES = {cls.lower(): family for family, cls in FAMILIES.items()}  # "qwen2forcausallm" -> "qwen2"
# APR metadata key -> ModelConfig field, for what --arch may supply
_APR_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
               "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
               "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta",
               "rms_norm_eps": "rms_norm_eps"}


def load_apr(path, arch=None, rope_layout=None):
    """(ModelConfig, name -> float32 array in the Hugging Face layout) from an APR v2 file."""
    apr = read_apr(path)
    arrays = {n: apr.array(n) for n in apr.tensors}
    head, embed = arrays.pop("lm_head.weight", None), arrays.get("model.embed_tokens.weight")
    tied = head is None or (embed is not None and head.shape == embed.shape and bool(numpy.array_equal(head, embed)))
    cfg = config_from_apr(apr.metadata, {n: t.shape for n, t in apr.tensors.items()}, tied, str(path), arch)
    if not tied:
        arrays["lm_head.weight"] = head
    check_tensors(cfg, {n: a.shape for n, a in arrays.items()}, str(path))
    if _rope_layout(apr.metadata, rope_layout, str(path)) == "interleaved":
        arrays = permute_qk(arrays, cfg, interleaved_to_hf)
    return cfg, arrays


def _rope_layout(meta, given, source):
    """The row order of the file's q/k: from rope_type, or from --rope-layout where it is 0."""
    rope_type = meta.get("rope_type")
    if rope_type not in (None, ROPE_NEOX, ROPE_ADJACENT):
        raise InputError(f"{source}: rope_type {rope_type!r}: expected {ROPE_NEOX} (split halves) or "
                         f"{ROPE_ADJACENT} (adjacent pairs)")
    if rope_type == ROPE_ADJACENT and given is None:
        raise InputError(f"{source}: rope_type 0 is ambiguous: aprender writes it over Hugging Face rows "
                         "(apr import/convert of an HF model) and over llama.cpp's interleaved rows (its GGUF "
                         "import); say which with --rope-layout hf or --rope-layout interleaved")
    if rope_type != ROPE_ADJACENT and given == "interleaved":
        said = "rope_type 2 says" if rope_type == ROPE_NEOX else "no rope_type means (entrenar writes none)"
        raise InputError(f"{source}: {said} Hugging Face rows (split halves); --rope-layout interleaved "
                         "contradicts it")
    return given or "hf"


def config_from_apr(meta, shapes, tied, source, arch=None):
    """The architecture of an APR file from its metadata, checked against its tensor shapes;
    the preset `arch` supplies the fields the metadata lacks."""
    # every type key present must agree with the tensors ("auto"/"unknown" say nothing)
    kinds = {str(meta.get(k) or "").lower() for k in ("hf_model_type", "architecture", "model_type")}
    kinds = {_CLASSES.get(k, k) for k in kinds - {"", "auto", "unknown"}}
    if kinds & hf.ENCODERS or any(n.startswith(("bert.", "encoder.", "roberta.")) or ".encoder." in n for n in shapes):
        raise InputError(f"{source}: an encoder model ({', '.join(sorted(kinds & hf.ENCODERS)) or 'encoder tensors'}); "
                         "minitrain trains decoder-only Llama/Qwen2 models")
    if "model.embed_tokens.weight" not in shapes or "model.layers.0.self_attn.q_proj.weight" not in shapes:
        raise InputError(f"{source}: no model.embed_tokens.weight / model.layers.0.self_attn.q_proj.weight: not a "
                         "Llama/Qwen2/Qwen3 checkpoint with Hugging Face tensor names")
    family = _family(shapes)
    if kinds - FAMILIES.keys():
        raise InputError(f"{source}: model type {', '.join(sorted(kinds - FAMILIES.keys()))} is not supported; "
                         f"supported: {', '.join(FAMILIES)} ({', '.join(FAMILIES.values())})")
    if kinds - {family}:
        raise InputError(f"{source}: metadata says {', '.join(sorted(kinds))} but the tensors are {family!r} "
                         f"({_SIGNS[family]})")

    V, H = shapes["model.embed_tokens.weight"]
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := _LAYER.match(n)))
    q_rows = shapes["model.layers.0.self_attn.q_proj.weight"][0]
    kv_rows = shapes["model.layers.0.self_attn.k_proj.weight"][0] if "model.layers.0.self_attn.k_proj.weight" in shapes else None
    inter = shapes["model.layers.0.mlp.gate_proj.weight"][0] if "model.layers.0.mlp.gate_proj.weight" in shapes else None
    if arch is not None and PRESETS[arch].family != family:
        raise InputError(f"{source}: the tensors are a {family} model ({_SIGNS[family]}); --arch {arch} is "
                         f"{PRESETS[arch].family}")
    given = dict(meta)
    if arch is not None:  # the preset fills what the metadata lacks; check_arch compares the rest
        preset = PRESETS[arch]
        given.update({k: getattr(preset, f) for k, f in _APR_FIELDS.items() if meta.get(k) is None})
        if "rope_scaling" not in meta:
            given["rope_scaling"] = preset.rope_scaling and preset.rope_scaling.as_hf()

    def agree(key, from_shapes):
        value = given.get(key)
        if value is None:
            return from_shapes
        if from_shapes is not None and value != from_shapes:
            origin = "metadata" if meta.get(key) is not None else f"--arch {arch}"
            raise InputError(f"{source}: {origin} {key} {value} but the tensors say {from_shapes}")
        return value

    def need(key):
        if given.get(key) is None:
            raise InputError(f"{source}: metadata field {key} is missing and the tensor shapes cannot determine "
                             f"it (no default is safe); add --arch NAME to supply it ({', '.join(PRESETS)})")
        return given[key]

    # the head split: the file's own num_heads (checked by its head_dim, if any), else head_dim's
    head_dim = given.get("head_dim") if meta.get("num_heads") is None else meta.get("head_dim")
    heads = agree("num_heads", q_rows // head_dim if head_dim else None)
    if heads is None:
        raise InputError(f"{source}: metadata has neither num_heads nor head_dim; q_proj's {q_rows} rows "
                         "cannot be split into heads without one of them; add --arch NAME to supply them")
    head_dim = agree("head_dim", q_rows // heads)
    kv_heads = agree("num_kv_heads", kv_rows // head_dim if kv_rows else None)
    try:
        return ModelConfig(
            family=family, hidden_size=agree("hidden_size", H), num_hidden_layers=agree("num_layers", layers),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            intermediate_size=agree("intermediate_size", inter), vocab_size=agree("vocab_size", V),
            max_position_embeddings=need("max_position_embeddings"), rope_theta=float(need("rope_theta")),
            rms_norm_eps=float(need("rms_norm_eps")), tie_word_embeddings=tied,
            rope_scaling=_scaling(given.get("rope_scaling"), source))
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: {e}") from None


_SIGNS = {"llama": "without q/k/v biases or q/k norms", "qwen2": "with q/k/v biases", "qwen3": "with q/k norms"}


def _family(shapes):
    """The family the tensor names show: Qwen3's q/k norms, Qwen2's q/k/v biases, else Llama."""
    if "model.layers.0.self_attn.q_norm.weight" in shapes:
        return "qwen3"
    return "qwen2" if "model.layers.0.self_attn.q_proj.bias" in shapes else "llama"


def _scaling(value, source):
    """RopeScaling from the metadata's `rope_scaling` (absent or null: plain RoPE)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("rope_type") != "llama3":
        raise InputError(f"{source}: metadata rope_scaling {json.dumps(value)[:80]}: expected an object with "
                         "rope_type llama3 and its factor, low_freq_factor, high_freq_factor, "
                         "original_max_position_embeddings")
    return {k: v for k, v in value.items() if k != "rope_type"}

"""Architectures as data: the config fields, the presets, and the expected tensor table.

Facts from ../shared/docs/reference.md section 1. The tensor table (Hugging Face name -> shape,
row-major [out, in]) is what the model builder creates and what every loader checks a
checkpoint against, tensor by tensor.
"""

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" or "qwen2" (the Hugging Face model_type)
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}: expected one of {sorted(FAMILIES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) in (int, float) and not value > 0:
                raise ValueError(f"config field {f.name} must be positive, got {value}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def qkv_bias(self):
        """Qwen2 has biases on q_proj, k_proj and v_proj (and nowhere else); Llama has none."""
        return self.family == "qwen2"

    @property
    def hf_class(self):
        return FAMILIES[self.family]

    def as_dict(self):
        return asdict(self)


FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

PRESETS = {
    "llama-370m": ModelConfig(
        family="llama", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, intermediate_size=2816, vocab_size=50257, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        head_dim=64, intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Small members of each family: the same structure and GQA ratio (4:1 and 7:1), for demos
    # and tests. The vocabulary fits the demo's byte-level BPE tokenizer.
    "tiny-llama": ModelConfig(
        family="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, intermediate_size=688, vocab_size=8192, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny-qwen2": ModelConfig(
        family="qwen2", hidden_size=224, num_hidden_layers=4, num_attention_heads=7, num_key_value_heads=1,
        head_dim=32, intermediate_size=608, vocab_size=8192, max_position_embeddings=1024,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def arch_name(config):
    """The preset a config is, else "<family> (custom)"."""
    return next((name for name, c in PRESETS.items() if c == config), f"{config.family} (custom)")


def preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def tensor_table(cfg):
    """Every stored tensor, in Hugging Face order: name -> shape. A tied head is not listed
    (it is the embedding)."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    table = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        table[p + "input_layernorm.weight"] = (H,)
        table[p + "self_attn.q_proj.weight"] = (q_out, H)
        table[p + "self_attn.k_proj.weight"] = (kv_out, H)
        table[p + "self_attn.v_proj.weight"] = (kv_out, H)
        if cfg.qkv_bias:
            table[p + "self_attn.q_proj.bias"] = (q_out,)
            table[p + "self_attn.k_proj.bias"] = (kv_out,)
            table[p + "self_attn.v_proj.bias"] = (kv_out,)
        table[p + "self_attn.o_proj.weight"] = (H, q_out)
        table[p + "post_attention_layernorm.weight"] = (H,)
        table[p + "mlp.gate_proj.weight"] = (I, H)
        table[p + "mlp.up_proj.weight"] = (I, H)
        table[p + "mlp.down_proj.weight"] = (H, I)
    table["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (V, H)
    return table


def parameter_count(cfg):
    """Stored parameters (a tied head counted once)."""
    return sum(math.prod(shape) for shape in tensor_table(cfg).values())

"""Architectures as data: the config fields, the presets, and the expected tensor table.

Facts from ../shared/docs/reference.md section 1. The tensor table (Hugging Face name -> shape,
row-major [out, in]) is what the model builder creates and what every loader checks a
checkpoint against, tensor by tensor.
"""

import math
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x's RoPE frequency scaling (Hugging Face rope_type "llama3"; ops/rope.py derives it):
    wavelengths longer than original_max_position_embeddings / low_freq_factor are stretched by
    `factor`, those shorter than original_max_position_embeddings / high_freq_factor are kept, and
    the band between is interpolated."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.type is int else (int, float)
            if not isinstance(value, kind) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"rope_scaling {f.name} must be a positive {f.type.__name__}, got {value!r}")
        if self.factor < 1 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling needs factor >= 1 and high_freq_factor > low_freq_factor, got factor "
                             f"{self.factor}, low_freq_factor {self.low_freq_factor}, high_freq_factor "
                             f"{self.high_freq_factor}")

    def as_hf(self):
        """Hugging Face's object for it (config.json's rope_scaling; APR's custom key of that name)."""
        return {"rope_type": "llama3", **asdict(self)}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama", "qwen2" or "qwen3" (the Hugging Face model_type)
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
    rope_scaling: RopeScaling = None  # Llama 3.x; None: plain RoPE (and absent from as_dict)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from JSON (run.json, a trace's manifest)
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError:
                raise ValueError(f"rope_scaling must have the fields {', '.join(f.name for f in fields(RopeScaling))}, "
                                 f"got {', '.join(self.rope_scaling) or 'none'}") from None
        if not (self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling)):
            raise ValueError(f"rope_scaling must be an object of Llama 3's four fields or null, got {self.rope_scaling!r}")
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
    def qk_norm(self):
        """Qwen3 normalizes each head of q and of k (RMSNorm over head_dim, its own weight) before RoPE."""
        return self.family == "qwen3"

    @property
    def hf_class(self):
        return FAMILIES[self.family]

    def as_dict(self):
        """The fields as JSON-ready values; rope_scaling only where there is one, so that the configs
        of plain-RoPE models (and the run.json and state.json bytes of their runs) are unchanged."""
        d = asdict(self)
        if self.rope_scaling is None:
            del d["rope_scaling"]
        return d


LLAMA_3_2_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

PRESETS = {
    "llama-370m": ModelConfig(
        family="llama", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, intermediate_size=2816, vocab_size=50257, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        head_dim=64, intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3.2-1b": ModelConfig(
        family="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_scaling=LLAMA_3_2_SCALING),
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
    # ... and of the two newer ones: Qwen3's q/k norms with head_dim apart from hidden/heads (q is
    # 512 wide on a hidden size of 256, as Qwen3-0.6B's is 2048 on 1024); Llama 3.2's RoPE scaling (below)
    "tiny-qwen3": ModelConfig(
        family="qwen3", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=768, vocab_size=8192, max_position_embeddings=1024,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}
PRESETS["tiny-llama3"] = replace(PRESETS["tiny-llama"], max_position_embeddings=131072, rope_theta=500000.0,
                                 rope_scaling=LLAMA_3_2_SCALING)  # tiny-llama with Llama 3.2's RoPE


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
        if cfg.qk_norm:
            table[p + "self_attn.q_norm.weight"] = (hd,)
            table[p + "self_attn.k_norm.weight"] = (hd,)
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

"""The architecture tables (presets, tensor table, parameter counts, config validation) and the
model: initialization, the constructor's tensor check, forward, loss at init, backward,
causality, and `minitrain shapes`."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from minitrain.config import ModelConfig, parameter_count, preset, tensor_table
from minitrain.errors import InputError
from minitrain.model import Model

# The reference table (../shared/docs/reference.md section 1), field by field.
FULL_PRESETS = {
    "llama-370m": dict(family="llama", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=64, intermediate_size=2816, vocab_size=50257,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, head_dim=64, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
}
SMALL = ModelConfig(family="qwen2", hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=4, intermediate_size=12, vocab_size=23, max_position_embeddings=64, rope_theta=1e6,
                    rms_norm_eps=1e-6, tie_word_embeddings=False)


def minitrain(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)


# Tables

@pytest.mark.parametrize("name, count", [("llama-370m", 322_045_952), ("qwen2.5-0.5b", 494_032_768)])
def test_preset_parameter_counts(name, count):
    assert parameter_count(preset(name)) == count


@pytest.mark.parametrize("name", list(FULL_PRESETS))
def test_full_presets_match_the_reference_table(name):
    cfg = preset(name)
    assert cfg.as_dict() == FULL_PRESETS[name]
    biases = {n.split(".")[-2] for n in tensor_table(cfg) if n.endswith(".bias")}
    assert biases == ({"q_proj", "k_proj", "v_proj"} if cfg.family == "qwen2" else set())
    assert cfg.qkv_bias == (cfg.family == "qwen2")


def test_qwen2_tensor_table_spot_checks():
    table = tensor_table(preset("qwen2.5-0.5b"))
    assert table["model.layers.0.self_attn.k_proj.weight"] == (128, 896)
    assert table["model.layers.0.self_attn.k_proj.bias"] == (128,)
    assert table["model.layers.23.self_attn.q_proj.bias"] == (896,)
    assert "model.layers.0.self_attn.o_proj.bias" not in table
    assert not [n for n in table if ".mlp." in n and n.endswith(".bias")]
    assert "lm_head.weight" not in table  # tied
    assert len(table) == 1 + 24 * 12 + 1


def test_an_untied_config_lists_lm_head_last():
    cfg = dataclasses.replace(preset("tiny-llama"), tie_word_embeddings=False)
    assert list(tensor_table(cfg).items())[-1] == ("lm_head.weight", (8192, 256))
    assert parameter_count(cfg) == parameter_count(preset("tiny-llama")) + 8192 * 256


@pytest.mark.parametrize("name, ratio", [("tiny-llama", 4), ("tiny-qwen2", 7)])
def test_tiny_presets_keep_the_gqa_ratio_of_their_family(name, ratio):
    cfg = preset(name)
    table = tensor_table(cfg)
    assert cfg.num_attention_heads == ratio * cfg.num_key_value_heads
    assert table["model.layers.0.self_attn.q_proj.weight"][0] == ratio * table["model.layers.0.self_attn.k_proj.weight"][0]


@pytest.mark.parametrize("changes, words", [
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(head_dim=33), "head_dim 33 must be even"),
    (dict(hidden_size=0), "hidden_size must be positive"),
    (dict(vocab_size=-5), "vocab_size must be positive"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be positive"),
    (dict(family="gpt2"), "unknown family 'gpt2'"),
], ids=["heads-not-multiple-of-kv", "odd-head-dim", "zero-hidden", "negative-vocab", "zero-eps", "unknown-family"])
def test_model_config_rejects_an_impossible_architecture(changes, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(preset("tiny-llama"), **changes)


# Initialization

@pytest.mark.numerics
def test_from_scratch_is_deterministic_per_seed():
    a, b, c = (Model.from_scratch(SMALL, seed).params for seed in (3, 3, 4))
    for name in a:
        np.testing.assert_array_equal(a[name].data, b[name].data, err_msg=name)
        random = not name.endswith(("norm.weight", ".bias"))
        assert random == (not np.array_equal(a[name].data, c[name].data)), name


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_from_scratch_init_statistics(name):
    params = Model.from_scratch(preset(name), seed=0).params
    assert params.keys() == tensor_table(preset(name)).keys()
    for n, t in params.items():
        assert t.dtype == np.float32, n
        if n.endswith("norm.weight"):
            assert (t.data == 1).all(), n
        elif n.endswith(".bias"):
            assert (t.data == 0).all(), n
        else:
            assert abs(t.data.std() / 0.02 - 1) < 0.1, n
    assert any(n.endswith(".bias") for n in params) == (name == "tiny-qwen2")


def test_a_tied_model_has_no_lm_head_and_counts_every_parameter_once():
    model = Model.from_scratch(preset("tiny-llama"))
    names = [t.name for t in model.parameters()]
    assert "lm_head.weight" not in names and len(set(map(id, model.parameters()))) == len(names)
    assert model.head is model.params["model.embed_tokens.weight"]
    assert sum(t.data.size for t in model.parameters()) == parameter_count(model.config) == model.num_parameters()


ARRAYS = {n: t.data for n, t in Model.from_scratch(SMALL).params.items()}


@pytest.mark.numerics
def test_parameters_come_in_table_order_whatever_the_order_of_the_source():
    """A checkpoint's safetensors file lists its tensors sorted by name; a resumed model must still
    give parameters() in the table's order, or sums over them (the global gradient norm) change
    their rounding after --resume."""
    shuffled = dict(sorted(ARRAYS.items(), reverse=True))
    assert list(shuffled) != list(tensor_table(SMALL))
    model = Model.from_arrays(SMALL, shuffled)
    assert [t.name for t in model.parameters()] == list(model.params) == list(tensor_table(SMALL))


@pytest.mark.parametrize("arrays, words", [
    ({n: a for n, a in ARRAYS.items() if n != "model.layers.1.self_attn.v_proj.bias"},
     "missing tensor model.layers.1.self_attn.v_proj.bias"),
    (dict(ARRAYS, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(16)}),
     "unexpected tensor model.layers.0.self_attn.o_proj.bias"),
    (dict(ARRAYS, **{"model.layers.0.mlp.down_proj.weight": np.zeros((12, 16))}),
     r"model.layers.0.mlp.down_proj.weight expected \[16, 12\] found \[12, 16\]"),
], ids=["missing", "extra", "wrong-shape"])
def test_the_constructor_rejects_params_that_do_not_match_the_table(arrays, words):
    with pytest.raises(InputError, match=words):
        Model.from_arrays(SMALL, arrays)


# Forward and backward

def random_ids(cfg, B=2, T=8, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_from_scratch_loss_is_about_ln_vocab(name):
    cfg = preset(name)
    model = Model.from_scratch(cfg, seed=0)
    ids = random_ids(cfg, T=9)
    assert model.forward(ids[:, :-1]).shape == (2, 8, cfg.vocab_size)
    loss = float(model.loss(ids[:, :-1], ids[:, 1:]).data)
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1


def test_backward_fills_every_gradient_with_finite_values():
    model = Model.from_scratch(preset("tiny-qwen2"), seed=0)
    ids = random_ids(model.config, T=9)
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    for name, t in model.params.items():
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert np.isfinite(t.grad).all() and (t.grad != 0).any(), name


@pytest.mark.numerics
def test_changing_a_token_leaves_the_logits_before_it_bit_identical():
    model = Model.from_scratch(preset("tiny-llama"), seed=0)
    ids = random_ids(model.config, B=1, T=8)
    changed = ids.copy()
    changed[0, 5] = (ids[0, 5] + 1) % model.config.vocab_size
    a, b = model.forward(ids).data, model.forward(changed).data
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not (a[:, 5:] == b[:, 5:]).all(axis=-1).any()  # every later position sees the change


# `minitrain shapes`

def test_shapes_prints_the_qwen2_table_and_count():
    out = minitrain("shapes", "--arch", "qwen2.5-0.5b")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert ["model.layers.0.self_attn.q_proj.bias", "[896]", "896"] in [line.split() for line in lines]
    assert "494,032,768" in lines[-1]


def test_shapes_with_an_unknown_arch_is_one_error_line_and_exit_2():
    out = minitrain("shapes", "--arch", "nope")
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "'nope'" in out.stderr and "Traceback" not in out.stderr

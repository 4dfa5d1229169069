"""Strict loading of Hugging Face checkpoint directories: the round trip, shards, config keys,
F32/F16/BF16 weights, the tensor table, tying, corrupt files, and `minitrain eval`'s errors.
Every rejection is an InputError whose message names what is wrong and where."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from minitrain.config import ModelConfig
from minitrain.errors import InputError
from minitrain.formats import hf
from minitrain.model import Model

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
             intermediate_size=12, vocab_size=23, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA = ModelConfig(family="llama", rope_theta=10000.0, tie_word_embeddings=True, **SMALL)
QWEN2 = ModelConfig(family="qwen2", rope_theta=1000000.0, tie_word_embeddings=False, **SMALL)  # q/k/v biases
WEIGHTS = {cfg: {n: t.data for n, t in Model.from_scratch(cfg, seed=1).params.items()} for cfg in (LLAMA, QWEN2)}


def write(directory, cfg=LLAMA, arrays=None, shards=None, **config_changes):
    """A checkpoint directory from hf.save_dir, then config.json fields changed (None deletes the
    field) and, with `shards` (a list of name lists), model.safetensors replaced by
    model-0000i-of-0000n.safetensors files and the index."""
    arrays = WEIGHTS[cfg] if arrays is None else arrays
    hf.save_dir(directory, cfg, arrays)
    config = json.loads((directory / "config.json").read_text())
    config.update(config_changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if shards:
        (directory / "model.safetensors").unlink()
        weight_map = {}
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file({n: arrays[n] for n in names}, str(directory / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        (directory / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


def load_error(directory):
    with pytest.raises(InputError) as e:
        hf.load_dir(directory)
    return str(e.value)


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2], ids=["llama-tied", "qwen2-untied"])
def test_save_then_load_is_bit_exact(tmp_path, cfg):
    loaded_cfg, arrays = hf.load_dir(write(tmp_path, cfg))
    assert loaded_cfg == cfg
    assert arrays.keys() == WEIGHTS[cfg].keys()
    for name, a in arrays.items():
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, WEIGHTS[cfg][name], err_msg=name)


# Shards

NAMES = list(WEIGHTS[QWEN2])


def test_a_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    directory = write(tmp_path, QWEN2, shards=[NAMES[:9], NAMES[9:]])
    assert not (directory / "model.safetensors").exists()
    cfg, arrays = hf.load_dir(directory)
    assert cfg == QWEN2 and arrays.keys() == WEIGHTS[QWEN2].keys()
    for name, a in arrays.items():
        np.testing.assert_array_equal(a, WEIGHTS[QWEN2][name], err_msg=name)


def test_an_index_naming_a_missing_shard_is_an_error(tmp_path):
    directory = write(tmp_path, QWEN2, shards=[NAMES[:9], NAMES[9:]])
    (directory / "model-00002-of-00002.safetensors").unlink()
    message = load_error(directory)
    assert "model-00002-of-00002.safetensors" in message and "does not exist" in message


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    message = load_error(write(tmp_path, QWEN2, shards=[NAMES[:10], NAMES[9:]]))
    assert NAMES[9] in message
    assert "model-00001-of-00002.safetensors" in message and "model-00002-of-00002.safetensors" in message


# config.json keys

def test_nested_rope_parameters_equal_the_classic_rope_theta(tmp_path):
    classic = hf.load_dir(write(tmp_path / "classic", QWEN2))[0]
    nested = hf.load_dir(write(tmp_path / "nested", QWEN2, rope_theta=None,
                               rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}))[0]
    assert nested == classic == QWEN2


def test_missing_num_key_value_heads_means_multi_head_attention():
    config = {k: v for k, v in hf.config_to_hf(LLAMA).items() if k != "num_key_value_heads"}
    cfg = hf.config_from_hf(config, "config.json")
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 4


@pytest.mark.parametrize("changes, words", [
    ({"rope_theta": None}, ["rope_theta is missing"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     ["llama3 rope scaling without low_freq_factor, high_freq_factor, original_max_position_embeddings"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192}}, ["high_freq_factor > low_freq_factor"]),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     ["'yarn'", "not supported"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_scaling": {"type": "yarn"}},
     ["rope_scaling", "'yarn'", "not supported"]),
    ({"hidden_size": None}, ["hidden_size is missing"]),
    ({"model_type": "bert"}, ["'bert'", "encoder"]),
    ({"model_type": "qwen3", "attention_bias": True}, ["attention_bias", "qwen3", "not supported"]),
    ({"model_type": "mistral"}, ["'mistral'", "not supported"]),
    ({"use_sliding_window": True}, ["use_sliding_window"]),
    ({"hidden_act": "gelu"}, ["'gelu'", "not supported"]),
], ids=["no-rope-theta", "llama3-incomplete", "llama3-bands-reversed", "rope-yarn", "scaling-beside-default-parameters", "no-hidden-size", "bert", "qwen3-bias", "mistral",
        "sliding-window", "gelu"])
def test_a_config_we_cannot_honour_exactly_is_an_error_naming_the_field(tmp_path, changes, words):
    message = load_error(write(tmp_path, QWEN2, **changes))
    assert str(tmp_path / "config.json") in message
    for word in words:
        assert word in message


# Dtypes

def test_bf16_weights_load_as_their_exact_float32_values(tmp_path):
    directory = write(tmp_path)
    safetensors.torch.save_file({n: torch.from_numpy(a).to(torch.bfloat16) for n, a in WEIGHTS[LLAMA].items()},
                                str(directory / "model.safetensors"), metadata={"format": "pt"})
    arrays = hf.load_dir(directory)[1]
    for name, a in WEIGHTS[LLAMA].items():
        expected = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], expected, err_msg=name)
    assert not np.array_equal(arrays["model.embed_tokens.weight"], WEIGHTS[LLAMA]["model.embed_tokens.weight"])


def test_f16_weights_load_as_their_exact_float32_values(tmp_path):
    directory = write(tmp_path)
    safetensors.numpy.save_file({n: a.astype(np.float16) for n, a in WEIGHTS[LLAMA].items()},
                                str(directory / "model.safetensors"), metadata={"format": "pt"})
    arrays = hf.load_dir(directory)[1]
    for name, a in WEIGHTS[LLAMA].items():
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], a.astype(np.float16).astype(np.float32), err_msg=name)


def test_an_unsupported_dtype_is_an_error_naming_the_tensor(tmp_path):
    arrays = dict(WEIGHTS[LLAMA], **{"model.norm.weight": np.ones(16, dtype=np.int32)})
    safetensors.numpy.save_file(arrays, str(write(tmp_path) / "model.safetensors"), metadata={"format": "pt"})
    message = load_error(tmp_path)
    assert "model.norm.weight" in message and "I32" in message


# The tensor table, strictly

def test_a_missing_tensor_is_an_error_naming_it(tmp_path):
    arrays = {n: a for n, a in WEIGHTS[LLAMA].items() if n != "model.layers.1.mlp.up_proj.weight"}
    message = load_error(write(tmp_path, arrays=arrays))
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in message


def test_an_unexpected_tensor_is_an_error_naming_it(tmp_path):
    arrays = dict(WEIGHTS[LLAMA], **{"model.layers.2.input_layernorm.weight": np.ones(16, np.float32)})
    message = load_error(write(tmp_path, arrays=arrays))
    assert "unexpected tensor model.layers.2.input_layernorm.weight" in message


def test_a_wrong_shape_is_an_error_with_both_shapes(tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    arrays = dict(WEIGHTS[LLAMA], **{name: WEIGHTS[LLAMA][name].T.copy()})
    message = load_error(write(tmp_path, arrays=arrays))
    assert f"{name} expected [8, 16] found [16, 8]" in message


# Tied heads

def test_a_tied_config_accepts_an_lm_head_identical_to_the_embedding(tmp_path):
    embed = WEIGHTS[LLAMA]["model.embed_tokens.weight"]
    cfg, arrays = hf.load_dir(write(tmp_path, arrays=dict(WEIGHTS[LLAMA], **{"lm_head.weight": embed.copy()})))
    assert cfg.tie_word_embeddings and "lm_head.weight" not in arrays
    assert arrays.keys() == WEIGHTS[LLAMA].keys()


def test_a_tied_config_rejects_a_different_lm_head(tmp_path):
    head = WEIGHTS[LLAMA]["model.embed_tokens.weight"].copy()
    head[5, 3] += 1e-3
    message = load_error(write(tmp_path, arrays=dict(WEIGHTS[LLAMA], **{"lm_head.weight": head})))
    assert "tie_word_embeddings" in message and "lm_head.weight" in message


def test_an_untied_config_needs_lm_head(tmp_path):
    arrays = {n: a for n, a in WEIGHTS[QWEN2].items() if n != "lm_head.weight"}
    assert "missing tensor lm_head.weight" in load_error(write(tmp_path, QWEN2, arrays=arrays))


# Corrupt and missing files

@pytest.mark.parametrize("file, corrupt, words", [
    ("model.safetensors", lambda b: b[:-10], ["truncated"]),
    ("model.safetensors", lambda b: b[:5], ["not a safetensors file", "5 bytes"]),
    ("model.safetensors", lambda b: len(b).to_bytes(8, "little") + b[8:], ["truncated safetensors header"]),
    ("config.json", lambda b: b[:-5], ["not valid JSON"]),
], ids=["data-cut-off", "shorter-than-8-bytes", "header-past-end", "config-not-json"])
def test_a_corrupt_file_is_an_error_naming_it(tmp_path, file, corrupt, words):
    path = write(tmp_path) / file
    path.write_bytes(corrupt(path.read_bytes()))
    message = load_error(tmp_path)
    assert str(path) in message
    for word in words:
        assert word in message


def test_a_directory_without_config_json_is_an_error(tmp_path):
    (write(tmp_path) / "config.json").unlink()
    message = load_error(tmp_path)
    assert str(tmp_path / "config.json") in message and "no such file" in message


def test_a_file_instead_of_a_directory_is_an_error(tmp_path):
    path = write(tmp_path) / "model.safetensors"
    message = load_error(path)
    assert str(path) in message and "not a directory" in message


# `minitrain eval`

V = SMALL["vocab_size"]


def tokens(n=20, bad_at=None):
    """n u32 token ids (20: four windows of seq-len 4 + 1, two batches of 2), one of them = V."""
    t = np.random.default_rng(0).integers(0, V, n).astype("<u4")
    if bad_at is not None:
        t[bad_at] = V
    return t.tobytes()


def eval_cli(init, data, *args):
    return subprocess.run([sys.executable, "-m", "minitrain", "eval", "--init", str(init), "--data", str(data),
                           "--seq-len", "4", "--batch-size", "2", *args], capture_output=True, text=True)


@pytest.mark.parametrize("data, words", [
    (tokens(bad_at=3), ["token id 23 at position 3", "vocab_size 23"]),
    (tokens(bad_at=13), ["token id 23 at position 13", "vocab_size 23"]),
    (tokens()[:-1], ["79 bytes", "not a multiple of 4"]),
    (tokens(9), ["1 windows", "need 2"]),
], ids=["token-too-big-in-batch-1", "token-too-big-in-batch-2", "size-not-multiple-of-4", "too-few-windows"])
def test_eval_bad_data_is_one_error_line_naming_the_file_and_exit_2(tmp_path, data, words):
    (tmp_path / "tokens.bin").write_bytes(data)
    out = eval_cli(write(tmp_path / "ckpt"), tmp_path / "tokens.bin")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minitrain: error: "), repr(out.stderr)
    assert str(tmp_path / "tokens.bin") in lines[0] and "Traceback" not in out.stderr
    for word in words:
        assert word in lines[0]


def test_eval_without_the_init_directory_exits_2(tmp_path):
    (tmp_path / "tokens.bin").write_bytes(tokens())
    out = eval_cli(tmp_path / "nope", tmp_path / "tokens.bin")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"minitrain: error: {tmp_path / 'nope'}: no such file or directory"]


def test_eval_prints_loss_ppl_and_tokens(tmp_path):
    (tmp_path / "tokens.bin").write_bytes(tokens())
    out = eval_cli(write(tmp_path / "ckpt"), tmp_path / "tokens.bin")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0::2] == ["loss", "ppl", "tokens"] and words[5] == "16"  # 2 batches x 2 windows x 4


def test_eval_json_with_one_batch_evaluates_exactly_the_first_batch(tmp_path):
    (tmp_path / "tokens.bin").write_bytes(tokens())
    out = eval_cli(write(tmp_path / "ckpt"), tmp_path / "tokens.bin", "--json", "--batches", "1")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"loss", "ppl", "tokens"} and result["tokens"] == 1 * 2 * 4
    windows = np.frombuffer(tokens(), "<u4")[:10].reshape(2, 5).astype(np.int64)
    expected = float(Model.from_arrays(LLAMA, WEIGHTS[LLAMA]).loss(windows[:, :-1], windows[:, 1:]).data)
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)

"""`pretrain --init` and `eval --init` refusals (../shared/docs/reference.md section 2), driven
through the real command line: every bad model file, option or input exits 2 before any step
with one stderr line naming the file and the problem, and trains nothing. Also the tie rule of
`load_model` and its determinism.

Every broken file is derived from one small Qwen2 file (q/k/v biases, GQA 2:1, tied) that is
first shown to train, so each refusal is caused by the one thing changed.
"""

import json
import re
import struct
import subprocess
import sys
from dataclasses import fields
from types import SimpleNamespace

import numpy
import pytest

from minitrain.config import PRESETS, ModelConfig, parameter_count
from minitrain.formats.apr import apr_tensors
from minitrain.formats.apr import write_apr
from minitrain.formats.apr_meta import model_metadata
from minitrain.formats.sources import load_model
from minitrain.model import Model
from minitrain.demo import train_bpe

SMALL = ModelConfig(family="qwen2", hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=4, intermediate_size=12, vocab_size=64,
                    max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
WINDOWS = 64  # of seq_len 8 + 1 tokens: 16 held out for validation, 48 to train on
BAD_TOKEN_AT = 100  # position of the out-of-vocabulary token in the bad data file


def minitrain(command, init, data, out=None, *extra):
    """`minitrain COMMAND --init INIT --data DATA` with small shapes, in a subprocess."""
    args = ["--init", str(init), "--data", str(data), "--seq-len", "8", "--batch-size", "2"]
    args += ["--steps", "2", "--out", str(out)] if command == "pretrain" else ["--batches", "2"]
    return subprocess.run([sys.executable, "-m", "minitrain", command, *args, *extra],
                          capture_output=True, text=True, timeout=300)


def refusal(result, out=None):
    """The error line of a run that must have been refused: exit 2, exactly one stderr line
    'minitrain: error: ...', no traceback, and no metrics.jsonl under OUT (nothing trained)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr == lines[0] + "\n", result.stderr
    assert lines[0].startswith("minitrain: error: ")
    if out is not None:
        assert not (out / "metrics.jsonl").exists()
    return lines[0]


def variant(small, path, drop=(), add=None, meta=None):
    """The small model's file with tensors dropped or added/replaced, and metadata keys changed
    (a None value removes the key), written to `path`."""
    tensors = {n: t for n, t in small.tensors.items() if n not in drop} | (add or {})
    metadata = {k: v for k, v in (small.meta | (meta or {})).items() if v is not None}
    write_apr(path, tensors, metadata)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The valid small file (model.apr: lm_head stored as a copy of the embedding, as `convert`
    writes it), valid token data and its bytes, shown to train and evaluate."""
    d = tmp_path_factory.mktemp("small")
    arrays = {n: t.data for n, t in Model.from_scratch(SMALL, seed=1).params.items()}
    tensors = dict(apr_tensors(SMALL, arrays))
    meta = model_metadata(SMALL, parameter_count(SMALL))
    write_apr(d / "model.apr", tensors, meta)
    tokens = numpy.random.default_rng(0).integers(0, SMALL.vocab_size, WINDOWS * 9).astype("<u4")
    (d / "tokens.bin").write_bytes(tokens.tobytes())
    s = SimpleNamespace(dir=d, arrays=arrays, tensors=tensors, meta=meta, path=d / "model.apr",
                        blob=(d / "model.apr").read_bytes(), data=d / "tokens.bin", tokens=tokens)
    trained = minitrain("pretrain", s.path, s.data, d / "out", "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.splitlines()[-1])["status"] == "ok"
    assert len((d / "out" / "metrics.jsonl").read_text().splitlines()) >= 2
    evaluated = minitrain("eval", s.path, s.data, None, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["tokens"] == 2 * 2 * 8
    return s


def header_field(blob, offset, fmt):
    return struct.unpack_from(fmt, blob, offset)[0]


# ------------------------------------------------------------------- pretrain --init: the bytes


def test_missing_file(small, tmp_path):
    path = tmp_path / "absent.apr"
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "no such file" in line


def test_empty_file(small, tmp_path):
    path = tmp_path / "empty.apr"
    path.write_bytes(b"")
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "empty file" in line and "0 bytes" in line


def test_short_file(small, tmp_path):
    path = tmp_path / "short.apr"
    path.write_bytes(small.blob[:10])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "too small" in line and "10 bytes" in line and "64" in line


def test_bad_magic(small, tmp_path):
    path = tmp_path / "bad.apr"
    path.write_bytes(b"GGML" + small.blob[4:])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "not an APR file" in line and b"GGML".hex() in line


def test_gguf_magic_is_read_as_gguf_whatever_the_name(small, tmp_path):
    """The magic, not the extension, picks the reader: APR bytes behind a GGUF magic are a GGUF
    file of an unknown version."""
    path = tmp_path / "gguf.apr"
    path.write_bytes(b"GGUF" + small.blob[4:])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "GGUF version 67108866" in line


def test_v1_file(small, tmp_path):
    path = tmp_path / "v1.apr"
    path.write_bytes(b"APRN" + small.blob[4:])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "v1" in line and "APRN" in line


def test_header_crc_mismatch(small, tmp_path):
    path = tmp_path / "crc.apr"
    blob = bytearray(small.blob)
    blob[8] ^= 0x01  # tensor_count's low byte: inside the CRC'd header, the CRC left as it was
    path.write_bytes(blob)
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "checksum mismatch" in line and "header" in line


def test_truncated_data(small, tmp_path):
    path = tmp_path / "cut.apr"
    data_offset = header_field(small.blob, 32, "<Q")
    cut = (data_offset + len(small.blob)) // 2
    assert data_offset < cut < len(small.blob) - 64  # in the middle of the tensor data
    path.write_bytes(small.blob[:cut])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "truncated" in line and f"{cut} bytes" in line and "runs past the end" in line


def test_unsupported_dtype(small, tmp_path):
    """dtype code 2 patched into model.norm.weight's index entry (write_apr refuses to write
    it). The index is not covered by the header CRC and is read before the footer CRC, so the
    dtype is what gets reported."""
    path = tmp_path / "dtype.apr"
    name = b"model.norm.weight"
    at = small.blob.index(name, header_field(small.blob, 24, "<Q")) + len(name)  # the entry's dtype byte
    assert small.blob[at] == 0  # F32
    path.write_bytes(small.blob[:at] + b"\x02" + small.blob[at + 1:])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "model.norm.weight" in line and "unsupported dtype code 2" in line


# --------------------------------------------------------------- pretrain --init: the contents


def test_missing_tensor(small, tmp_path):
    path = variant(small, tmp_path / "m.apr", drop=["model.layers.1.mlp.up_proj.weight"])
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "missing tensor model.layers.1.mlp.up_proj.weight" in line


def test_unexpected_tensor(small, tmp_path):
    path = variant(small, tmp_path / "m.apr", add={"model.layers.0.extra.weight": numpy.ones(16, numpy.float32)})
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "unexpected tensor model.layers.0.extra.weight" in line


def test_wrong_shape(small, tmp_path):
    """A transposed k_proj of layer 1 ([8, 16] stored as [16, 8]). (q_proj is square here, and
    layer 0's k_proj would first contradict num_kv_heads.)"""
    name = "model.layers.1.self_attn.k_proj.weight"
    path = variant(small, tmp_path / "m.apr", add={name: numpy.ascontiguousarray(small.arrays[name].T)})
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "wrong shape" in line and name in line
    assert "[8, 16]" in line and "[16, 8]" in line


def test_missing_rope_theta(small, tmp_path):
    path = variant(small, tmp_path / "m.apr", meta={"rope_theta": None})
    assert b"rope_theta" not in path.read_bytes()
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "rope_theta" in line and "missing" in line and "no default is safe" in line


def test_arch_mismatch_lists_every_differing_field(small, tmp_path):
    line = refusal(minitrain("pretrain", small.path, small.data, tmp_path / "out", "--arch", "tiny-qwen2"),
                   tmp_path / "out")
    assert str(small.path) in line and "tiny-qwen2" in line
    expected = PRESETS["tiny-qwen2"]
    differing = {f.name for f in fields(ModelConfig) if getattr(expected, f.name) != getattr(SMALL, f.name)}
    assert {"hidden_size", "num_hidden_layers", "vocab_size"} <= differing
    listed = line.split("tiny-qwen2", 1)[1].split(";")
    for name in differing:  # the field and both values, in one item of the list
        words = (name, getattr(expected, name), getattr(SMALL, name))
        assert any(all(re.search(rf"\b{w}\b", item) for w in words) for item in listed), \
            f"{name} ({words[1]} vs {words[2]}) not listed in: {line}"
    for name in {f.name for f in fields(ModelConfig)} - differing:
        assert not re.search(rf"\b{name}\b", line), f"{name} is equal but listed: {line}"


@pytest.mark.parametrize("keys", [("model_type",), ("model_type", "architecture", "hf_model_type")],
                         ids=["model_type", "every_type_key"])
def test_encoder_model(small, tmp_path, keys):
    path = variant(small, tmp_path / "m.apr", meta=dict.fromkeys(keys, "bert"))
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line and "encoder" in line and "bert" in line


# ----------------------------------------------------------------- pretrain: data and tokenizer


def test_data_token_id_not_below_vocab(small, tmp_path):
    data = tmp_path / "bad.bin"
    tokens = small.tokens.copy()
    tokens[BAD_TOKEN_AT] = SMALL.vocab_size
    data.write_bytes(tokens.tobytes())
    line = refusal(minitrain("pretrain", small.path, data, tmp_path / "out"), tmp_path / "out")
    assert str(data) in line and f"token id {SMALL.vocab_size}" in line and f"position {BAD_TOKEN_AT}" in line
    assert f"vocab_size {SMALL.vocab_size}" in line


def test_tokenizer_larger_than_model_vocab(small, tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    tokenizer = train_bpe([tmp_path / "corpus.txt"], 300, tmp_path / "tokenizer.json")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    assert size > SMALL.vocab_size
    line = refusal(minitrain("pretrain", small.path, small.data, tmp_path / "out",
                             "--tokenizer", str(tmp_path / "tokenizer.json")), tmp_path / "out")
    assert str(tmp_path / "tokenizer.json") in line and "tokenizer" in line
    assert re.search(rf"\b{size}\b", line) and re.search(rf"\b{SMALL.vocab_size}\b", line)


# ------------------------------------------------------------------------------- eval --init


def test_eval_missing_file(small, tmp_path):
    path = tmp_path / "absent.apr"
    line = refusal(minitrain("eval", path, small.data))
    assert str(path) in line and "no such file" in line


def test_eval_v1_file(small, tmp_path):
    path = tmp_path / "v1.apr"
    path.write_bytes(b"APR1" + small.blob[4:])
    line = refusal(minitrain("eval", path, small.data))
    assert str(path) in line and "v1" in line and "APR1" in line


def test_eval_missing_tensor(small, tmp_path):
    path = variant(small, tmp_path / "m.apr", drop=["model.layers.0.self_attn.v_proj.bias"])
    line = refusal(minitrain("eval", path, small.data))
    assert str(path) in line and "missing tensor model.layers.0.self_attn.v_proj.bias" in line


# ------------------------------------------------------------------- load_model: tie, determinism


def test_lm_head_absent_means_tied(small, tmp_path):
    model = load_model(variant(small, tmp_path / "m.apr", drop=["lm_head.weight"]))
    assert model.config.tie_word_embeddings and "lm_head.weight" not in model.params
    assert model.head is model.params["model.embed_tokens.weight"]


def test_lm_head_identical_means_tied(small):
    assert numpy.array_equal(small.tensors["lm_head.weight"], small.arrays["model.embed_tokens.weight"])
    model = load_model(small.path)
    assert model.config == SMALL and "lm_head.weight" not in model.params
    assert len(model.parameters()) == len(small.arrays)


def test_lm_head_different_means_untied(small, tmp_path):
    head = small.arrays["model.embed_tokens.weight"].copy()
    head[3, 5] = numpy.nextafter(head[3, 5], numpy.float32(1))  # one ulp apart
    model = load_model(variant(small, tmp_path / "m.apr", add={"lm_head.weight": head}))
    assert not model.config.tie_word_embeddings
    assert model.head is model.params["lm_head.weight"] and model.head is not model.params["model.embed_tokens.weight"]
    assert numpy.array_equal(model.params["lm_head.weight"].data, head)
    assert numpy.array_equal(model.params["model.embed_tokens.weight"].data, small.arrays["model.embed_tokens.weight"])


def test_loading_twice_gives_byte_identical_weights(small):
    first, second = load_model(small.path), load_model(small.path)
    assert first.params.keys() == second.params.keys() == small.arrays.keys()
    for name, t in first.params.items():
        assert t.data.tobytes() == second.params[name].data.tobytes() == small.arrays[name].tobytes(), name


@pytest.mark.parametrize("change, words", [
    ({"meta": {"model_type": "llama"}}, ["metadata says llama, qwen2", "tensors are 'qwen2'"]),
    ({"meta": {"hidden_size": 32}}, ["metadata hidden_size 32 but the tensors say 16"]),
    ({"meta": {"num_heads": None, "head_dim": None}}, ["neither num_heads nor head_dim"]),
    ({"meta": {"rope_type": 0}}, ["rope_type 0 is ambiguous", "--rope-layout hf", "--rope-layout interleaved"]),
    ({"meta": {"rms_norm_eps": None}}, ["rms_norm_eps is missing"]),
    ({"meta": {"model_type": "gpt2", "architecture": None, "hf_model_type": None}}, ["model type gpt2 is not supported"]),
    ({"add": {"model.layers.0.self_attn.q_norm.weight": numpy.ones(4, numpy.float32)}}, ["metadata says qwen2", "the tensors are 'qwen3' (with q/k norms)"]),
], ids=["family-disagrees", "hidden-disagrees", "no-head-count", "adjacent-rope", "no-eps", "gpt2", "q-norm-in-a-qwen2"])
def test_metadata_that_contradicts_or_underdetermines_the_tensors(small, tmp_path, change, words):
    path = variant(small, tmp_path / "m.apr", add=change.get("add"), meta=change.get("meta"))
    line = refusal(minitrain("pretrain", path, small.data, tmp_path / "out"), tmp_path / "out")
    assert str(path) in line
    for word in words:
        assert word in line

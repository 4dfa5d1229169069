"""GGUF in and out on small random models of both families: what minitrain writes, transformers'
GGUF loader (code nobody here wrote) reads to the same logits; every tensor type minitrain reads
lands where transformers puts it; conversions are exact where they should be; the tokenizer keys
round-trip; and bad files are refused in one line."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf as gguf_py
import numpy
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minitrain import backend
from minitrain.autograd import no_grad
from minitrain.config import preset
from minitrain.errors import InputError
from minitrain.formats import gguf
from minitrain.formats.gguf_vocab import PRE_TOKENIZERS, gguf_fields, pre_tokenizer_name, tokenizer_from_fields
from minitrain.formats.sources import load_model
from minitrain.model import Model
from minitrain.ops.rope import inv_freq
from minitrain.demo import train_bpe
from minitrain.formats.sources import load_tokenizer

Q = gguf_py.GGMLQuantizationType
TEXT = "def f(x):\n    return x + 12345  # café — 日本語\n\n\tclass It's: pass\r\n   "


def run(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)


def refused(out, *words):
    """Exit 2, one line on stderr, naming every word."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("minitrain: error:"), out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "text.py").write_text(Path(json.__file__).read_text() * 2)
    train_bpe([d / "text.py"], 400, d / "tokenizer.json")
    return d / "tokenizer.json"


def random_model(name, seed=0):
    """A from-scratch model whose norms and biases are not all 1 and 0 (so a mixed-up tensor shows)."""
    return preset(name), random_arrays(preset(name), seed)


def random_arrays(cfg, seed=0):
    model = Model.from_scratch(cfg, seed=seed)
    rng = numpy.random.default_rng(seed)
    arrays = {n: backend.to_numpy(t.data).astype(numpy.float32) for n, t in model.params.items()}
    for n, a in arrays.items():
        if a.ndim == 1:
            arrays[n] = (a + rng.normal(0, 0.1, a.shape)).astype(numpy.float32)
    return arrays


def float64_transformers_logits(path, ids):
    """transformers' logits of a GGUF file in float64, but for one convention: the file's f32
    rms_norm_eps is taken as its shortest decimal (1e-05), as minitrain reads it (formats/gguf.py),
    not as 9.99999974e-06; with the small activations of a random model that moves logits by 1e-10."""
    from hf_oracle import float64_model

    model = float64_model(path.parent, gguf_file=path.name)
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = float(str(numpy.float32(m.variance_epsilon)))
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def minitrain_logits(path, ids, dtype="fp64"):
    with backend.precision(dtype), no_grad():
        return backend.to_numpy(load_model(path).forward(ids).data).astype(numpy.float64)


IDS = numpy.random.default_rng(7).integers(0, 400, size=(2, 24))


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_reads_what_minitrain_writes_to_the_same_logits(family, dtype, tokenizer, tmp_path):
    cfg, arrays = random_model(family)
    path = tmp_path / "m.gguf"
    fallback = gguf.write_gguf(path, cfg, arrays, Tokenizer.from_file(str(tokenizer)), dtype)
    # q8_0 needs rows of whole 32-value blocks: tiny-llama's down_proj has 688 columns
    assert fallback == ([f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
                        if dtype == "q8_0" and family == "tiny-llama" else [])
    ours, theirs = minitrain_logits(path, IDS), float64_transformers_logits(path, IDS)
    assert numpy.abs(ours - theirs).max() <= 1e-12 * numpy.abs(theirs).max()
    if dtype == "f32":  # and F32 is lossless: the file's model is the model written
        cfg2, arrays2 = gguf.load_gguf(path)
        assert cfg2 == cfg and all(numpy.array_equal(arrays2[n], a) for n, a in arrays.items())


def _blocks(qtype, rows, cols, rng):
    """Random blocks of a type gguf-py cannot quantize to, with finite, small f16 scales."""
    size, nbytes = gguf_py.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // size, nbytes), dtype=numpy.uint8)
    scales = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [nbytes - 2]}[qtype]  # byte offsets of f16 d (and dmin)
    for at in scales:
        raw[..., at:at + 2] = rng.uniform(0.001, 0.01, size=raw.shape[:2]).astype(numpy.float16)[..., None].view(numpy.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.numerics
def test_every_tensor_type_minitrain_reads_lands_where_transformers_puts_it(tokenizer, tmp_path):
    """Each matrix of a tiny llama in another type; K-quants from random blocks (gguf-py only
    decodes them). Orientation, un-permutation and decoding are all checked by the logits."""
    cfg, arrays = random_model("tiny-llama", seed=3)
    path, rng = tmp_path / "mixed.gguf", numpy.random.default_rng(0)
    gguf.write_gguf(path, cfg, arrays, Tokenizer.from_file(str(tokenizer)), "f32")
    reader = gguf.open_gguf(path)
    kinds = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    writer = gguf_py.GGUFWriter(tmp_path / "typed.gguf", "llama")
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            value = field.contents()
            kind = field.types[0]
            writer.add_key_value(key, value, kind, field.types[-1] if kind == gguf_py.GGUFValueType.ARRAY else None)
    used = set()
    for i, t in enumerate(reader.tensors):
        a = gguf_py.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        kind = kinds[i % len(kinds)] if a.ndim == 2 and a.shape[1] % 256 == 0 else Q.F32
        data = _blocks(kind, *a.shape, rng) if kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else gguf_py.quants.quantize(a, kind)
        writer.add_tensor(t.name, data, raw_dtype=kind)
        used.add(kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert {q.name for q in used} == set(gguf.READABLE)
    typed = tmp_path / "typed.gguf"
    ours, theirs = minitrain_logits(typed, IDS), float64_transformers_logits(typed, IDS)
    assert numpy.abs(ours - theirs).max() <= 1e-12 * numpy.abs(theirs).max()


@pytest.mark.numerics
def test_transformers_reads_a_qwen3_minitrain_writes_to_the_same_logits(tokenizer, tmp_path):
    """llama.cpp's qwen3: attn_q_norm / attn_k_norm, q/k rows in Hugging Face order. At head_dim
    128: transformers' GGUF loader takes Qwen3's head_dim from its config default (128), not from
    qwen3.attention.key_length, so at tiny-qwen3's 64 it builds the wrong shapes."""
    cfg = replace(preset("tiny-qwen3"), head_dim=128)
    arrays = random_arrays(cfg)
    path = tmp_path / "m.gguf"
    gguf.write_gguf(path, cfg, arrays, Tokenizer.from_file(str(tokenizer)), "f32")
    ours, theirs = minitrain_logits(path, IDS), float64_transformers_logits(path, IDS)
    assert numpy.abs(ours - theirs).max() <= 1e-12 * numpy.abs(theirs).max()


def test_llama3_scaling_is_llama_cpps_rope_freqs_tensor(tokenizer, tmp_path, monkeypatch):
    """The divisors f_i / f'_i in rope_freqs.weight, as llama.cpp's converter writes them: our
    scaled frequencies times them give back the plain ones (to float32 rounding); a file without
    minitrain's keys (as llama.cpp's converter writes it) reads as Meta's bands; a rope_freqs that
    is not those bands' is refused."""
    cfg, arrays = random_model("tiny-llama3")
    path = tmp_path / "m.gguf"
    gguf.write_gguf(path, cfg, arrays, Tokenizer.from_file(str(tokenizer)), "f32")
    divisors = next(t for t in gguf.open_gguf(path).tensors if t.name == "rope_freqs.weight").data
    f = inv_freq(numpy, cfg.head_dim, cfg.rope_theta, None, numpy.dtype(numpy.float64))
    scaled = inv_freq(numpy, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, numpy.dtype(numpy.float64))
    numpy.testing.assert_allclose(f / divisors, scaled, rtol=4 * 2.0 ** -24)  # fp32 frequencies, fp32 divisors
    assert set(divisors.tolist()) > {1.0, 32.0}  # every band is there: kept, stretched, interpolated
    monkeypatch.setattr(gguf, "SCALING_KEYS", "elsewhere.")  # written where the reader does not look
    gguf.write_gguf(tmp_path / "bare.gguf", cfg, arrays, Tokenizer.from_file(str(tokenizer)), "f32")
    other = replace(cfg, rope_scaling=replace(cfg.rope_scaling, high_freq_factor=8.0))
    gguf.write_gguf(tmp_path / "other.gguf", other, arrays, Tokenizer.from_file(str(tokenizer)), "f32")
    monkeypatch.undo()
    assert gguf.load_gguf(tmp_path / "bare.gguf")[0] == cfg
    refused(run("convert", str(tmp_path / "other.gguf"), str(tmp_path / "other.apr")), "rope_freqs.weight is not the llama3 scaling",
            "Meta's Llama 3 bands", "element")


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-qwen3", "tiny-llama3"])
def test_hf_to_gguf_to_hf_and_apr_to_gguf_to_apr_are_exact(tokenizer, tmp_path, family):
    from minitrain.formats import hf

    cfg, arrays = random_model(family, seed=5)
    hf.save_dir(tmp_path / "hf", cfg, arrays)
    Tokenizer.from_file(str(tokenizer)).save(str(tmp_path / "hf" / "tokenizer.json"))
    assert run("convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")).returncode == 0
    assert run("convert", str(tmp_path / "m.gguf"), str(tmp_path / "m.apr")).returncode == 0
    assert run("convert", str(tmp_path / "m.apr"), str(tmp_path / "back.gguf"), "--tokenizer", str(tmp_path / "m.gguf")).returncode == 0
    assert run("convert", str(tmp_path / "back.gguf"), str(tmp_path / "back")).returncode == 0
    cfg2, arrays2 = hf.load_dir(tmp_path / "back")
    assert cfg2 == cfg and arrays2.keys() == arrays.keys()
    assert all(numpy.array_equal(arrays2[n], a) for n, a in arrays.items())
    original, back = Tokenizer.from_file(str(tokenizer)), Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    assert back.encode(TEXT).ids == original.encode(TEXT).ids


def _tokenizer_with(pre, ignore_merges):
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({"<|endoftext|>": len(vocab), "Ġt": len(vocab) + 1, "Ġth": len(vocab) + 2})
    tokenizer = Tokenizer(models.BPE(vocab, [("Ġ", "t"), ("Ġt", "h")], ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre, decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_each_pre_tokenizer_round_trips_by_its_llama_cpp_name(name):
    make, ignore_merges = PRE_TOKENIZERS[name]
    tokenizer = _tokenizer_with(make(), ignore_merges)
    assert pre_tokenizer_name(tokenizer, "t") == name
    values = dict(gguf_fields(tokenizer, 300, "t"))
    assert values["tokenizer.ggml.pre"] == name and values["tokenizer.ggml.token_type"][-1] == 5  # [PAD299], unused
    back = tokenizer_from_fields(values, "t")
    assert back.encode(TEXT + " the <|endoftext|>").ids == tokenizer.encode(TEXT + " the <|endoftext|>").ids


def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_refused():
    tokenizer = _tokenizer_with(pre_tokenizers.Whitespace(), False)
    with pytest.raises(InputError, match="pre-tokenizer is none of .*gpt-2, smollm, qwen2, llama-bpe"):
        pre_tokenizer_name(tokenizer, "t")


@pytest.fixture(scope="module")
def small_gguf(tokenizer, tmp_path_factory):
    cfg, arrays = random_model("tiny-llama", seed=1)
    path = tmp_path_factory.mktemp("small") / "m.gguf"
    gguf.write_gguf(path, cfg, arrays, Tokenizer.from_file(str(tokenizer)))
    return path


def test_inspect_shows_the_file_as_it_is(small_gguf):
    out = run("inspect", str(small_gguf), "--json")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["format"] == "gguf" and info["version"] == "3" and info["architecture"]["ok"]
    assert info["metadata"]["llama.rope.freq_base"] == 10000.0 and info["metadata"]["tokenizer.ggml.pre"] == "gpt-2"
    q = next(t for t in info["tensors"] if t["name"] == "blk.0.attn_q.weight")
    assert q == {"name": "blk.0.attn_q.weight", "dtype": "F32", "shape": [256, 256], "nbytes": 256 * 256 * 4}


def test_truncated_file(small_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small_gguf.read_bytes()[:-1000])
    refused(run("eval", "--init", str(cut), "--data", str(cut), "--seq-len", "4", "--batch-size", "1"), "truncated")


@pytest.mark.parametrize("content, words", [(b"", ["not a GGUF file", "empty"]), (b"APR\0" + bytes(60), ["not a GGUF"])])
def test_not_a_gguf(tmp_path, content, words):
    (tmp_path / "x.gguf").write_bytes(content)
    refused(run("inspect", str(tmp_path / "x.gguf")), *words)


def _rewrite(src, dst, drop_key=None, retype=None, arch=None):
    """A copy of a GGUF file with one key dropped, one tensor's type changed, or another arch."""
    reader = gguf.open_gguf(src)
    writer = gguf_py.GGUFWriter(dst, arch or "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", drop_key):
            continue
        kind = field.types[0]
        writer.add_key_value(key, field.contents(), kind, field.types[-1] if kind == gguf_py.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name == (retype or (None,))[0]:
            size, nbytes = gguf_py.GGML_QUANT_SIZES[retype[1]]
            writer.add_tensor(t.name, numpy.zeros((int(t.shape[1]), int(t.shape[0]) // size * nbytes), numpy.uint8),
                              raw_dtype=retype[1])
        else:
            writer.add_tensor(t.name, numpy.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("change, words", [
    ({"drop_key": "llama.rope.freq_base"}, ["llama.rope.freq_base is missing", "rope_theta"]),
    ({"drop_key": "llama.attention.head_count_kv"}, ["head_count_kv is missing"]),
    ({"retype": ("blk.1.ffn_up.weight", Q.Q2_K)}, ["blk.1.ffn_up.weight is Q2_K", "Q6_K"]),
    ({"retype": ("blk.0.attn_k.weight", Q.IQ4_NL)}, ["IQ4_NL"]),
    ({"arch": "gemma"}, ["architecture 'gemma' is not supported", "llama, qwen2"]),
], ids=["no-rope-theta", "no-kv-heads", "q2_k", "iq4_nl", "gemma"])
def test_bad_keys_types_and_architectures_are_refused_in_one_line(small_gguf, tmp_path, change, words):
    bad = _rewrite(small_gguf, tmp_path / "bad.gguf", **change)
    refused(run("eval", "--init", str(bad), "--data", str(bad), "--seq-len", "4", "--batch-size", "1"), *words)
    info = json.loads(run("inspect", str(bad), "--json").stdout.strip().splitlines()[-1])
    assert not info["architecture"]["ok"] and all(w in info["architecture"]["error"] for w in words)


@pytest.mark.parametrize("args, words", [
    (["out.safetensors"], ["'.safetensors' names no format"]),
    (["out.apr", "--dtype", "q8_0"], ["--dtype q8_0", "f32, f16, bf16"]),
    (["outdir", "--dtype", "f16"], ["--dtype f16", "Hugging Face"]),
    (["out.gguf", "--rope-layout", "hf"], ["--rope-layout is for .apr files"]),
], ids=["extension", "apr-q8", "hf-f16", "rope-layout"])
def test_convert_refuses_what_it_cannot_write(small_gguf, tmp_path, args, words):
    refused(run("convert", str(small_gguf), str(tmp_path / args[0]), *args[1:]), *words)


def test_a_gguf_needs_a_tokenizer(small_gguf, tmp_path):
    assert run("convert", str(small_gguf), str(tmp_path / "hf")).returncode == 0
    (tmp_path / "hf" / "tokenizer.json").unlink()
    refused(run("convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")), "needs the tokenizer", "--tokenizer")


def test_an_apr_converted_from_a_gguf_carries_its_tokenizer_back(small_gguf, tmp_path):
    """... into a directory convert makes (a file where it would go is refused in one line)."""
    assert run("convert", str(small_gguf), str(tmp_path / "m.apr")).returncode == 0
    assert run("convert", str(tmp_path / "m.apr"), str(tmp_path / "new" / "m.gguf")).returncode == 0
    text = "def f(x):\n    return x + 1  # café"
    ids = [load_tokenizer(p).encode(text).ids for p in (small_gguf, tmp_path / "m.apr", tmp_path / "new" / "m.gguf")]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) > 3
    refused(run("convert", str(tmp_path / "m.apr"), str(tmp_path / "m.apr" / "m.gguf")), "cannot create its directory")

"""The KV-cache decoder (kv_cache.py, generate.py) against the full forward it replaces.

The models are random tiny presets with q/k scaled up (attention far from uniform) and the
embedding scaled up (logits of O(1)), so a token at a wrong position, a key read across rows or
from padding, or a lost slot moves the logits far beyond the tolerances. Tolerances:
- fp64: the cache changes only the order of the sums (one row of scores instead of a T x T
  block), so the logits agree to a few units of 2^-53 times their size; 1e-12 leaves 1000x room.
- fp32: the same reordering at u = 2^-24 = 6e-8; measured 1e-6 of max |logit| here; 1e-5 is the
  issue's bound, 170 u.
"""

import json

import numpy
import pytest

from minitrain import backend
from minitrain.autograd import no_grad
from minitrain.config import preset
from minitrain.errors import InputError
from minitrain.generate import Sampling, generate, next_token, prefill
from minitrain.kv_cache import KVCache
from minitrain.model import Model

LENGTHS = [13, 6, 1]  # a batch of prompts of different, odd lengths (one of a single token)
CHUNK = 5  # prefill chunk in these tests: the longest prompt spans three chunks
NEW = 7  # single-token steps after the prefill
TOLERANCE = {"fp64": 1e-12, "fp32": 1e-5}


def sharp_model(name, embed_scale=20.0):
    """A random model whose attention and logits are far from uniform. (Its greedy text repeats
    the last token: the tied head favours the input's own embedding. embed_scale 1 gives varied
    text, for the tests of when generation ends.)"""
    model = Model.from_scratch(preset(name), seed=3)
    for n, t in model.params.items():
        if ".q_proj." in n or ".k_proj." in n:
            t.data *= 8
        elif n == "model.embed_tokens.weight":
            t.data *= embed_scale
    return model


def rows_of(cfg, lengths, seed=0):
    rng = numpy.random.default_rng(seed)
    return [list(rng.integers(0, cfg.vocab_size, n)) for n in lengths]


def cached_logits(model, rows, new):
    """Every position's logits, run through the cache: the left-padded prompts prefilled CHUNK
    tokens at a time, then `new` (B, NEW) fed one token per step. -> (B, P + NEW, V)."""
    P = max(map(len, rows))
    cache = KVCache(model.config, [P - len(r) for r in rows], P + new.shape[1])
    ids = numpy.array([[0] * (P - len(r)) + r for r in rows])
    parts = [model.forward(ids[:, s:s + CHUNK], cache).data for s in range(0, P, CHUNK)]
    parts += [model.forward(new[:, j:j + 1], cache).data for j in range(new.shape[1])]
    return numpy.concatenate(parts, axis=1)


def worst_error(model, rows, new):
    """max over rows and real positions of |cached - full| / max |full|, the full forward run
    on each row alone (prompt + its new tokens, no padding)."""
    got, P, worst = cached_logits(model, rows, new), max(map(len, rows)), 0.0
    for b, r in enumerate(rows):
        full = model.forward(numpy.array([r + list(new[b])])).data[0]  # (len + NEW, V)
        worst = max(worst, float(abs(got[b, P - len(r):] - full).max() / abs(full).max()))
    return worst


@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-llama3"])
def test_cached_logits_at_every_position_equal_the_full_forward(name, precision):
    with backend.precision(precision), no_grad():
        model = sharp_model(name)
        rows = rows_of(model.config, LENGTHS)
        new = numpy.random.default_rng(1).integers(0, model.config.vocab_size, (len(rows), NEW))
        assert worst_error(model, rows, new) <= TOLERANCE[precision]


@pytest.mark.parametrize("plant", ["single steps one position late", "keys from the padding"])
def test_a_planted_cache_bug_fails_the_equality(plant, monkeypatch):
    """The test above can fail: new tokens rotated one position off from the cached ones, or a
    mask that lets a row read its padding, each break it by orders of magnitude. (A shift of ALL
    of a row's positions would not: RoPE scores depend only on position differences.)"""
    if plant == "single steps one position late":
        real = KVCache.positions
        monkeypatch.setattr(KVCache, "positions", lambda self, t: real(self, t) + (t == 1))
    else:
        real = KVCache._mask
        monkeypatch.setattr(KVCache, "_mask", lambda self, n, t: numpy.where(
            real(self, n, t) == 0, 0.0, numpy.where(numpy.arange(n + t) <= numpy.arange(n, n + t)[:, None], 0.0,
                                                    -numpy.inf)))
    with backend.precision("fp64"), no_grad():
        model = sharp_model("tiny-llama")
        rows = rows_of(model.config, LENGTHS)
        new = numpy.random.default_rng(1).integers(0, model.config.vocab_size, (len(rows), NEW))
        assert worst_error(model, rows, new) > 1e-3


def test_prefill_returns_the_last_positions_logits():
    with backend.precision("fp64"), no_grad():
        model = sharp_model("tiny-qwen2")
        rows = rows_of(model.config, LENGTHS)
        P = max(LENGTHS)
        cache = KVCache(model.config, [P - n for n in LENGTHS], P)
        last = prefill(model, cache, numpy.array([[0] * (P - len(r)) + r for r in rows]), chunk=CHUNK)
        for b, r in enumerate(rows):
            full = model.forward(numpy.array([r])).data[0, -1]
            assert abs(last[b] - full).max() <= 1e-12 * abs(full).max()


def greedy_by_full_forward(model, row, n):
    """The reference greedy decoder: the whole context through the model for every token."""
    ids = list(row)
    for _ in range(n):
        ids.append(int(model.forward(numpy.array([ids])).data[0, -1].argmax()))
    return ids[len(row):]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-llama3"])
def test_greedy_batch_equals_each_prompt_decoded_alone_by_the_full_forward(name):
    with backend.precision("fp64"), no_grad():
        model = sharp_model(name, embed_scale=1.0)
        rows = rows_of(model.config, LENGTHS)
        completions, timing = generate(model, rows, 9, Sampling(temperature=0))
    for row, c in zip(rows, completions):
        assert c.ids == greedy_by_full_forward(model, row, 9) and c.finish == "length"
    assert timing.prefill_tokens == sum(LENGTHS) and timing.decode_tokens == 8 * len(rows)


def text_of(ids):
    """A decoder for the tests: every id as <id>."""
    return "".join(f"<{i}>" for i in ids)


def first_new(ids):
    """The first index k >= 1 whose id did not occur before it."""
    return next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])


def test_rows_end_at_eos_at_a_stop_string_or_at_the_length_and_leave_the_batch():
    with backend.precision("fp64"), no_grad():
        model = sharp_model("tiny-llama", embed_scale=1.0)
        rows = rows_of(model.config, LENGTHS)
        free = [greedy_by_full_forward(model, r, 10) for r in rows]
        e, s = first_new(free[0]), first_new(free[1])
        eos, stop = free[0][e], f">{text_of(free[1][s:s + 1])}"  # row 0 ends at eos; row 1 mid-way through a token
        others = [free[1][:s], free[2]]
        assert not any(eos in f for f in others), "the test needs an eos id only row 0 produces"
        assert not any(stop in text_of(f) for f in [free[0][:e + 1]] + others), "and a stop text only row 1 does"
        completions, timing = generate(model, rows, 10, Sampling(temperature=0), stop_ids=(eos,), stop_strings=[stop],
                                       decode=text_of)
    assert completions[0].ids == free[0][:e + 1] and completions[0].finish == "eos"
    assert completions[0].text == text_of(free[0][:e])
    assert completions[1].ids == free[1][:s + 1] and completions[1].finish == "stop"
    assert completions[1].text == text_of(free[1][:s])[:-1]  # cut before the stop text: its '>' too
    assert completions[2].ids == free[2] and completions[2].finish == "length"
    assert completions[2].text == text_of(free[2])
    assert timing.decode_tokens == e + s + 9  # single-token steps: the first token of each row is prefill's


def test_the_context_limits_the_new_tokens_and_a_full_prompt_is_refused():
    with no_grad():
        model = sharp_model("tiny-llama")
        window = model.config.max_position_embeddings
        row = rows_of(model.config, [window - 3])[0]
        completions, _ = generate(model, [row], 50, Sampling(temperature=0))
        assert len(completions[0].ids) == 3 and completions[0].finish == "length"
        with pytest.raises(InputError, match=f"{window} tokens leaves no room"):
            generate(model, [row + [1, 2, 3]], 5)


def test_sampling_is_seeded_and_differs_from_greedy():
    with no_grad():
        model = sharp_model("tiny-qwen2", embed_scale=1.0)
        rows = rows_of(model.config, [4, 4])
        a = generate(model, rows, 12, Sampling(temperature=1.5, top_k=0, seed=7))[0]
        b = generate(model, rows, 12, Sampling(temperature=1.5, top_k=0, seed=7))[0]
        g = generate(model, rows, 12, Sampling(temperature=0))[0]
    assert [c.ids for c in a] == [c.ids for c in b] and [c.ids for c in a] != [c.ids for c in g]


LOGITS = numpy.log(numpy.array([0.05, 0.4, 0.1, 0.3, 0.15]))  # probabilities at temperature 1


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (0, 1.0, {0, 1, 2, 3, 4}),
    (2, 1.0, {1, 3}),
    (0, 0.4, {1}),  # 0.4 alone reaches 0.4
    (0, 0.41, {1, 3}),  # 0.4 does not reach 0.41: the next most likely joins
    (0, 0.8, {1, 3, 4}),  # 0.4 + 0.3 = 0.7 < 0.8 <= 0.85
    (0, 0.86, {1, 3, 4, 2}),
    (2, 0.86, {1, 3}),  # top-k first, then top-p of what is left
])
def test_top_k_and_top_p_sample_exactly_the_tokens_they_keep(top_k, top_p, allowed):
    rng = numpy.random.default_rng(0)
    picks = [next_token(LOGITS, Sampling(1.0, top_k, top_p), rng) for _ in range(3000)]
    assert set(picks) == allowed
    if allowed == {1, 3}:  # renormalized: 0.4 / 0.7 of the draws are token 1
        assert abs(picks.count(1) / len(picks) - 0.4 / 0.7) < 0.03


def test_generate_json_from_the_command_line(tmp_path):
    """Two prompts through `minitrain generate --json`: the contract's keys, each completion,
    and greedy text equal to the Python API's."""
    from click.testing import CliRunner

    from minitrain.cli import cli
    from minitrain.demo import train_bpe
    from minitrain.formats import hf
    from minitrain.formats.sources import load_tokenizer

    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    train_bpe([tmp_path / "text.txt"], 300, tmp_path / "tokenizer.json")
    model = sharp_model("tiny-llama")
    hf.save_dir(tmp_path / "m", model.config, {n: backend.to_numpy(t.data) for n, t in model.params.items()})
    (tmp_path / "m" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    result = CliRunner().invoke(cli, ["generate", "--init", str(tmp_path / "m"), "--prompt", "def f(x):",
                                      "--prompt", "return", "--max-new-tokens", "6", "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"text", "ids", "finish", "completions", "prefill_tokens_per_sec", "decode_tokens_per_sec"} <= set(report)
    assert report["prefill_tokens_per_sec"] > 0 and report["decode_tokens_per_sec"] > 0
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    with no_grad():
        ours, _ = generate(model, [tokenizer.encode(p).ids for p in ("def f(x):", "return")], 6,
                           Sampling(temperature=0), decode=tokenizer.decode)
    assert [c["ids"] for c in report["completions"]] == [c.ids for c in ours]
    assert [c["text"] for c in report["completions"]] == [c.text for c in ours]
    assert report["ids"] == ours[0].ids and report["completions"][1]["prompt"] == "return"

"""Parity with Hugging Face transformers on the same random weights: logits, loss, every parameter
gradient, SGD and AdamW steps, the round trip through our checkpoint writer, and `minitrain eval`.
Planted bugs (RoPE layout, causal mask, q/k/v bias, tie) must break the parity.

minitrain is compared with the float64 truth (tests/hf_oracle.py: transformers in float64
throughout), in float64 -- where agreement to ~1e-13 tests the math itself -- and in fp32, each
against the rounding-error bound that hf_oracle derives from the unit roundoff and the depth of
the computation. No bound is a property of the machine the tests happen to run on."""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import hf_oracle
from hf_oracle import UNIT_ROUNDOFF, depth, rel_to_bound
from minitrain import backend, ops
from minitrain.autograd import Tensor
from minitrain.formats import hf
from minitrain.model import Model
from minitrain.ops.linear import Linear
from minitrain.ops.rope import RoPEBlocked
from minitrain.optim import SGD, AdamW

rope_module = importlib.import_module("minitrain.ops.rope")  # ops.rope is the function

pytestmark = pytest.mark.numerics  # tools/avx2_leg.py runs this file again on the AVX2 code paths

torch.manual_seed(0)

# Tiny members of each family with real GQA ratios, tied and untied.
CONFIGS = {
    "qwen2-gqa7:1-bias-tied": dict(family="qwen2", hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
                                   intermediate_size=40, vocab_size=50, rope_theta=1e6, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True),
    "llama-gqa4:1-tied": dict(family="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                              intermediate_size=48, vocab_size=61, rope_theta=1e4, rms_norm_eps=1e-5,
                              tie_word_embeddings=True),
    "llama-mha-untied": dict(family="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=40, vocab_size=37, rope_theta=1e4, rms_norm_eps=1e-5,
                             tie_word_embeddings=False),
    "qwen2-mha-untied": dict(family="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=24, vocab_size=43, rope_theta=1e6, rms_norm_eps=1e-6,
                             tie_word_embeddings=False),
    # Qwen3: q/k norms, head_dim its own (4 heads of 16 on a hidden size of 32: q is 64 wide)
    "qwen3-gqa2:1-hd16-tied": dict(family="qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=40, vocab_size=47, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Llama 3 RoPE scaling with every band populated: wavelengths 6.3 and 20 kept (< 256/8), 63 and
    # 199 interpolated, 628 and longer stretched 4x (> 256/1)
    "llama3-scaled-gqa4:1-untied": dict(family="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=16, intermediate_size=48, vocab_size=53, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False, max_position_embeddings=1024,
                                        rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=4.0,
                                                             low_freq_factor=1.0, high_freq_factor=8.0,
                                                             original_max_position_embeddings=256)),
}
B, T = 2, 12
U64 = UNIT_ROUNDOFF["fp64"]

OPTIMIZERS = {  # our default weight decay: matrices only (two parameter groups in torch)
    "sgd": dict(lr=0.05),
    "adamw": dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
}


def roundoff(precision):
    """u of ours in `precision` plus u of the float64 truth: two computations compared add their bounds."""
    return UNIT_ROUNDOFF[precision] + U64


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers fp32 model, its checkpoint directory, the float64 truth of that checkpoint)."""
    hf_model = hf_oracle.build_hf(CONFIGS[request.param], seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param.replace(":", "-"))
    hf_model.save_pretrained(directory)
    assert hf.load_dir(directory)[0].rope_theta == hf_model.config.rope_parameters["rope_theta"]
    return hf_model, directory, hf_oracle.float64_model(directory)


def ours(directory, precision):
    """Our model of the checkpoint, its parameters in `precision`."""
    cfg, arrays = hf.load_dir(directory)
    with backend.precision(precision):
        return Model.from_arrays(cfg, arrays)


def batches(vocab, n, seed=0, masked=False):
    """n batches (inputs, targets); `masked`: targets -100 (torch's ignore_index) where a loss mask
    would leave them out: at random, and one whole row of the first batch."""
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, vocab, (n, B, T + 1))
    data = [(w[:, :-1], w[:, 1:].copy()) for w in windows]
    if masked:
        for k, (_, targets) in enumerate(data):
            targets[rng.random(targets.shape) < 0.4] = -100
            if k == 0:
                targets[1] = -100
    return data


def bounds(cfg, precision):
    """(forward, gradient) relative bounds for `precision` against the float64 truth (hf_oracle's
    docstring derives them)."""
    d_fwd, d_grad = depth(cfg, B, T)
    return d_fwd * roundoff(precision), d_grad * roundoff(precision)


def compare_forward_backward(truth, model, precision):
    """{quantity: error / its bound}, the worst element of each: logits, loss and every gradient."""
    (inputs, targets), = batches(model.config.vocab_size, 1, seed=7)
    logits_t, loss_t, grads_t, scales = hf_oracle.forward_backward(truth, inputs, targets)
    fwd, grad = bounds(model.config, precision)
    with backend.precision(precision):
        for p in model.parameters():
            p.zero_grad()
        logits = model.forward(inputs)
        loss = ops.cross_entropy(logits, targets)
        loss.backward()
    ratios = {"logits": rel_to_bound(np.abs(logits.data - logits_t), fwd * np.abs(logits_t).max()),
              "loss": rel_to_bound(abs(float(loss.data) - loss_t), fwd * abs(loss_t))}
    for name, t in model.params.items():
        ratios[name] = rel_to_bound(np.abs((0 if t.grad is None else t.grad) - grads_t[name]), grad * scales[name])
    assert set(model.params) == set(grads_t), "every HF parameter has a gradient here, and nothing more"
    return ratios


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_logits_loss_and_every_gradient_match(pair, precision):
    _, directory, truth = pair
    ratios = compare_forward_backward(truth, ours(directory, precision), precision)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1, f"{worst}: {ratios[worst]:.2f} x the {precision} bound"


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("optimizer, masked", [("sgd", False), ("adamw", False), ("adamw", True)],
                         ids=["sgd", "adamw", "adamw-masked"])
def test_three_optimizer_steps_end_at_the_same_weights(pair, optimizer, masked, precision):
    """Three steps against torch's; `masked`: on batches with targets left out by loss masks
    (-100, torch's ignore_index), one row with none: the loss is the mean over the others."""
    _, directory, _ = pair
    truth = hf_oracle.float64_model(directory)  # a fresh copy: the steps change its weights
    model = ours(directory, precision)
    data = batches(model.config.vocab_size, 3, seed=11, masked=masked)
    expected, history = hf_oracle.reference_steps(truth, optimizer, OPTIMIZERS[optimizer], data)
    with backend.precision(precision):
        opt = (SGD if optimizer == "sgd" else AdamW)(model.parameters(), **OPTIMIZERS[optimizer])
        for inputs, targets in data:
            for p in model.parameters():
                p.zero_grad()
            model.loss(inputs, targets).backward()
            opt.step()
    start = hf.load_dir(directory)[1]
    assert max(np.abs(t.data - start[n]).max() for n, t in model.params.items()) > 1e-3, "the weights did not move"
    grad_bound = bounds(model.config, precision)[1]
    ratios = {name: rel_to_bound(np.abs(t.data - expected[name]),
                                 hf_oracle.weight_bound(name, expected[name], history, optimizer, OPTIMIZERS[optimizer],
                                                        roundoff(precision), grad_bound))
              for name, t in model.params.items()}
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1, f"{worst}: {ratios[worst]:.2f} x the {precision} bound"


def test_our_checkpoint_loads_in_transformers_with_identical_logits(pair, tmp_path):
    hf_model, directory, _ = pair
    model = ours(directory, "fp32")
    hf.save_dir(tmp_path, model.config, {n: t.data for n, t in model.params.items()})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    (inputs, _), = batches(model.config.vocab_size, 1)
    with torch.no_grad():
        a = hf_model(torch.tensor(inputs)).logits.numpy()
        b = reloaded(torch.tensor(inputs)).logits.numpy()
    np.testing.assert_array_equal(a, b)
    assert hf.load_dir(tmp_path)[0] == model.config


def test_eval_command_matches_transformers_loss(pair, tmp_path):
    _, directory, truth = pair
    cfg = hf.load_dir(directory)[0]
    stream = np.random.default_rng(3).integers(0, cfg.vocab_size, 3 * 2 * (T + 1) + 5).astype("<u4")
    stream.tofile(tmp_path / "tokens.bin")
    out = subprocess.run([sys.executable, "-m", "minitrain", "eval", "--init", str(directory), "--data",
                          str(tmp_path / "tokens.bin"), "--seq-len", str(T), "--batch-size", "2", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    windows = stream[: 6 * (T + 1)].reshape(6, T + 1).astype(np.int64)  # the 5-token tail is dropped
    with torch.no_grad():
        expected = float(hf_oracle.logits_and_loss(truth, windows[:, :-1], windows[:, 1:])[1])
    fwd = bounds(cfg, "fp32")[0]  # eval runs in fp32; its float64 mean over the batches adds ~u64
    assert result["tokens"] == 6 * T
    assert abs(result["loss"] - expected) <= fwd * expected
    assert abs(result["ppl"] - np.exp(expected)) <= (fwd * expected + 2 * U64) * np.exp(expected)  # d e^L = e^L dL


# Planted bugs: each must break the comparison above.

def _adjacent_pairs_rotate(x, cos, sin):
    y = np.empty_like(x)
    y[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    y[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
    return y


def _linear_without_bias(x, W, b=None):
    return Linear.apply(x, W, None)


def _untied_copy_of_embedding(self):
    if self.config.tie_word_embeddings:
        return Tensor(self.params["model.embed_tokens.weight"].data.copy())  # gets no gradient
    return self.params["lm_head.weight"]


PLANTED = {
    "rope adjacent pairs": (RoPEBlocked, "rotate", staticmethod(_adjacent_pairs_rotate)),  # the CPU's rotation
    "no causal mask": (importlib.import_module("minitrain.ops.attention"), "_causal",
                       lambda s, a, e, c, starts=None: s.__imul__(c)),  # every key column seen, none masked
    "q/k/v bias dropped": (ops, "linear", _linear_without_bias),
    "head not tied": (Model, "head", property(_untied_copy_of_embedding)),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_breaks_parity(pair, bug, monkeypatch):
    """Each bug breaks even the looser fp32 bound."""
    _, directory, truth = pair
    model = ours(directory, "fp32")
    owner, attr, replacement = PLANTED[bug]
    if bug == "q/k/v bias dropped" and not model.config.qkv_bias:
        pytest.skip("llama has no q/k/v bias")
    if bug == "head not tied" and not model.config.tie_word_embeddings:
        pytest.skip("untied model")
    monkeypatch.setattr(owner, attr, replacement)
    ratios = compare_forward_backward(truth, model, "fp32")
    assert max(ratios.values()) > 1


def test_a_subtle_bug_shows_in_float64(pair, monkeypatch):
    """RMSNorm's eps 10% too large moves the outputs by 1e-7 to 1e-5 (relative), about the size of
    the fp32 bound (~5e-5), which misses it on three of the four models; the float64 bound
    (~2e-13) is exceeded 1e7 times over. This is what the float64 comparison is for."""
    _, directory, truth = pair
    rmsnorm = ops.rmsnorm
    monkeypatch.setattr(ops, "rmsnorm", lambda x, w, eps: rmsnorm(x, w, eps * 1.1))
    assert max(compare_forward_backward(truth, ours(directory, "fp64"), "fp64").values()) > 1


def _qk_norm_after_rope(monkeypatch):
    """Qwen3's q/k norms applied after RoPE instead of before: each 4-d (per-head) RMSNorm passes its
    input on and leaves its weight to the next rotation, which normalizes what it rotated."""
    rmsnorm, rope, pending = ops.rmsnorm, ops.rope, []

    def deferred(x, w, eps):
        if x.ndim == 4:
            pending.append((w, eps))
            return x
        return rmsnorm(x, w, eps)

    monkeypatch.setattr(ops, "rmsnorm", deferred)
    monkeypatch.setattr(ops, "rope", lambda x, *a: rmsnorm(rope(x, *a), *pending.pop(0)) if pending else rope(x, *a))


def _llama3_band(monkeypatch, wrong):
    """Llama 3's frequencies with one band wrong; RoPE's cached tables dropped before and after."""
    monkeypatch.setattr(rope_module, "llama3_inv_freq", wrong)
    rope_module._tables.cache_clear()


def _interpolated_band_stretched(xp, f, scaling):
    w, L = 2 * np.pi / f, scaling.original_max_position_embeddings
    return xp.where(w < L / scaling.high_freq_factor, f, f / scaling.factor)


def _low_band_kept(xp, f, scaling):
    w, L = 2 * np.pi / f, scaling.original_max_position_embeddings
    scaled = LLAMA3_INV_FREQ(xp, f, scaling)
    return xp.where(w > L / scaling.low_freq_factor, f, scaled)


LLAMA3_INV_FREQ = rope_module.llama3_inv_freq
NEW_OP_PLANTS = {  # bug -> (the config property it needs, the precision it must show in, plant)
    "q/k norm after RoPE": ("qk_norm", "fp32", _qk_norm_after_rope),
    "q/k norm eps 10x": ("qk_norm", "fp64", lambda mp: mp.setattr(
        ops, "rmsnorm", lambda x, w, eps, f=ops.rmsnorm: f(x, w, eps * 10 if x.ndim == 4 else eps))),
    "llama3 interpolated band stretched": ("rope_scaling", "fp32",
                                           lambda mp: _llama3_band(mp, _interpolated_band_stretched)),
    "llama3 low band not stretched": ("rope_scaling", "fp32", lambda mp: _llama3_band(mp, _low_band_kept)),
}


@pytest.mark.parametrize("bug", list(NEW_OP_PLANTS))
def test_planted_bug_in_qwen3_or_llama3_breaks_parity(pair, bug, monkeypatch):
    _, directory, truth = pair
    needs, precision, plant = NEW_OP_PLANTS[bug]
    model = ours(directory, precision)
    if not getattr(model.config, needs):
        pytest.skip(f"the model has no {needs}")
    assert max(compare_forward_backward(truth, model, precision).values()) <= 1
    plant(monkeypatch)
    try:
        assert max(compare_forward_backward(truth, model, precision).values()) > 1
    finally:
        rope_module._tables.cache_clear()


def test_the_frequencies_are_transformers_own(pair):
    """Our fp32 frequencies are transformers' inv_freq buffer bit for bit (the same formula in the
    same order, computed in fp32 as it does), and the float64 truth's to float64 rounding."""
    hf_model, directory, truth = pair
    cfg = hf.load_dir(directory)[0]
    ours32 = rope_module.inv_freq(np, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, np.dtype(np.float32))
    np.testing.assert_array_equal(ours32, hf_model.model.rotary_emb.inv_freq.numpy())
    ours64 = rope_module.inv_freq(np, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, np.dtype(np.float64))
    np.testing.assert_allclose(ours64, hf_oracle.float64_inv_freq(truth.config).numpy(), rtol=8 * U64, atol=0)


def test_packed_masked_batches_match_each_conversation_alone_in_torch(pair):
    """Packed batches (several conversations per row, positions restarting at each, some targets
    masked to -100, a conversation's first token never a target): our loss and three AdamW steps
    in float64 against the float64 truth computing every conversation by itself (its own forward,
    positions from 0) with torch's ignore_index=-100, the loss the sum over every counted target
    divided by their number. Agreement to float64 rounding (a tight check, no bound needed)."""
    _, directory, _ = pair
    truth = hf_oracle.float64_model(directory)
    model = ours(directory, "fp64")
    V, rng = model.config.vocab_size, np.random.default_rng(5)
    lengths = [[5, 4, 4], [7, 6]]  # conversations of each row's window of T + 1 = 13 tokens
    positions = np.array([np.concatenate([np.arange(n) for n in row]) for row in lengths])  # (B, T + 1)
    data = []
    for _ in range(3):
        w = rng.integers(0, V, (B, T + 1))
        targets = np.where((rng.random((B, T)) < 0.3) | (positions[:, 1:] == 0), -100, w[:, 1:])
        data.append((w[:, :-1], targets))
    settings = dict(OPTIMIZERS["adamw"])
    wd = settings.pop("weight_decay")
    named = dict(truth.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for p in named.values() if p.ndim >= 2], "weight_decay": wd},
                             {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}], **settings)
    theirs = []
    for inputs, targets in data:
        opt.zero_grad()
        total = 0.0
        for b, row in enumerate(lengths):
            starts = np.cumsum([0, *row])[:-1]
            for s, n in zip(starts, row):
                e = min(s + n, T)  # the inputs' part of this conversation
                logits = truth(torch.tensor(inputs[b:b + 1, s:e])).logits[0]
                total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(targets[b, s:e]),
                                                                  ignore_index=-100, reduction="sum")
        loss = total / int((targets != -100).sum())
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    with backend.precision("fp64"):
        ours_opt = AdamW(model.parameters(), **OPTIMIZERS["adamw"])
        mine = []
        for inputs, targets in data:
            for p in model.parameters():
                p.zero_grad()
            loss = model.loss(inputs, targets, positions[:, :-1])
            loss.backward()
            ours_opt.step()
            mine.append(float(loss.data))
    np.testing.assert_allclose(mine, theirs, rtol=1e-12)
    for name, t in model.params.items():
        want = named[name].detach().numpy()
        np.testing.assert_allclose(t.data, want, rtol=1e-9, atol=1e-12, err_msg=name)

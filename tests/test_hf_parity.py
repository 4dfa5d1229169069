"""Parity with Hugging Face transformers on the same random weights: logits, loss, every parameter
gradient, SGD and AdamW steps, the round trip through our checkpoint writer, and `minitrain eval`.
Planted bugs (RoPE layout, causal mask, q/k/v bias, tie) must break the parity."""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from minitrain import hf, ops
from minitrain.autograd import Tensor
from minitrain.model import Model
from minitrain.ops.linear import Linear
from minitrain.optim import SGD, AdamW

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
}
B, T = 2, 12
LOGITS_RTOL = 1e-5  # the bound for fp32 logits
GRAD_RTOL = 1e-4
WEIGHT_RTOL = 1e-5


def build_hf(spec, seed):
    """A transformers model with non-trivial weights: std 0.25 matrices, biases and norm weights
    moved away from 0 and 1, so that a skipped term shows."""
    spec = dict(spec)
    family = spec.pop("family")
    config_cls, model_cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if family == "llama"
                             else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    config = config_cls(num_hidden_layers=2, max_position_embeddings=64, head_dim=8, **spec)
    model = model_cls(config).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else (0.3 if name.endswith("bias") else 0.25) * noise)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, its checkpoint directory, our Model loaded from that directory)."""
    hf_model = build_hf(CONFIGS[request.param], seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param.replace(":", "-"))
    hf_model.save_pretrained(directory)
    cfg, arrays = hf.load_dir(directory)
    assert cfg.rope_theta == CONFIGS[request.param]["rope_theta"]
    return hf_model, directory, Model.from_arrays(cfg, arrays)


def batches(vocab, n, seed=0):
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, vocab, (n, B, T + 1))
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def rel_err(ours, theirs):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def torch_loss(model, inputs, targets):
    logits = model(torch.tensor(inputs)).logits
    return logits, torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.tensor(targets).reshape(-1))


def compare_forward_backward(hf_model, model):
    """Worst relative errors of logits, loss and each parameter gradient (one batch)."""
    (inputs, targets), = batches(model.config.vocab_size, 1, seed=7)
    hf_model.zero_grad()
    logits_t, loss_t = torch_loss(hf_model, inputs, targets)
    loss_t.backward()
    for p in model.parameters():
        p.zero_grad()
    logits = model.forward(inputs)
    loss = ops.cross_entropy(logits, targets)
    loss.backward()
    grads_t = dict(hf_model.named_parameters())
    grad_errs = {name: rel_err(np.zeros(t.shape) if t.grad is None else t.grad, grads_t[name].grad)
                 for name, t in model.params.items()}
    return rel_err(logits.data, logits_t), rel_err(np.asarray(loss.data), loss_t), grad_errs


def test_logits_loss_and_every_gradient_match(pair):
    hf_model, _, model = pair
    logits_err, loss_err, grad_errs = compare_forward_backward(hf_model, model)
    assert logits_err <= LOGITS_RTOL
    assert loss_err <= 1e-6
    expected = {n for n, _ in hf_model.named_parameters()}
    assert set(grad_errs) == expected, "every HF parameter has a gradient here, and nothing more"
    worst = max(grad_errs, key=grad_errs.get)
    assert grad_errs[worst] <= GRAD_RTOL, f"{worst}: {grad_errs[worst]:.2e}"


def _fresh(directory):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    cfg, arrays = hf.load_dir(directory)
    return hf_model, Model.from_arrays(cfg, arrays)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_three_optimizer_steps_end_at_the_same_weights(pair, optimizer):
    _, directory, _ = pair
    hf_model, model = _fresh(directory)
    named = dict(hf_model.named_parameters())
    if optimizer == "sgd":
        opt_t = torch.optim.SGD(named.values(), lr=0.05)
        opt = SGD(model.parameters(), lr=0.05)
    else:  # decoupled weight decay on matrices only: our default, two param groups in torch
        groups = [{"params": [p for p in named.values() if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}]
        opt_t = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
        opt = AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for inputs, targets in batches(model.config.vocab_size, 3, seed=11):
        opt_t.zero_grad()
        torch_loss(hf_model, inputs, targets)[1].backward()
        opt_t.step()
        for p in model.parameters():
            p.zero_grad()
        model.loss(inputs, targets).backward()
        opt.step()
    start = hf.load_dir(directory)[1]
    assert max(rel_err(t.data, start[n]) for n, t in model.params.items()) > 1e-3, "the weights did not move"
    for name, t in model.params.items():
        if optimizer == "adamw" and name.endswith("k_proj.bias"):
            # Softmax ignores what a key bias adds equally to every score of a row; after RoPE only
            # the slowest-rotating pairs' tiny position dependence remains, so these gradient
            # elements are ~1e-4 of the others and fp32 rounding is a percent of them. AdamW
            # divides each element by its own RMS and turns that into a percent of lr.
            assert np.abs(t.data - named[name].detach().numpy()).max() <= 0.05 * 3e-3, name
        else:
            assert rel_err(t.data, named[name]) <= WEIGHT_RTOL, f"{name}: {rel_err(t.data, named[name]):.2e}"


def test_our_checkpoint_loads_in_transformers_with_identical_logits(pair, tmp_path):
    hf_model, _, model = pair
    hf.save_dir(tmp_path, model.config, {n: t.data for n, t in model.params.items()})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    (inputs, _), = batches(model.config.vocab_size, 1)
    with torch.no_grad():
        a = hf_model(torch.tensor(inputs)).logits.numpy()
        b = reloaded(torch.tensor(inputs)).logits.numpy()
    np.testing.assert_array_equal(a, b)
    assert hf.load_dir(tmp_path)[0] == model.config


def test_eval_command_matches_transformers_loss(pair, tmp_path):
    hf_model, directory, model = pair
    stream = np.random.default_rng(3).integers(0, model.config.vocab_size, 3 * 2 * (T + 1) + 5).astype("<u4")
    stream.tofile(tmp_path / "tokens.bin")
    out = subprocess.run([sys.executable, "-m", "minitrain", "eval", "--init", str(directory), "--data",
                          str(tmp_path / "tokens.bin"), "--seq-len", str(T), "--batch-size", "2", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    windows = stream[: 6 * (T + 1)].reshape(6, T + 1).astype(np.int64)  # the 5-token tail is dropped
    with torch.no_grad():
        expected = float(torch_loss(hf_model, windows[:, :-1], windows[:, 1:])[1])
    assert result["tokens"] == 6 * T
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(np.exp(expected), rel=1e-5)


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
    "rope adjacent pairs": (importlib.import_module("minitrain.ops.rope"), "_rotate", _adjacent_pairs_rotate),
    "no causal mask": (importlib.import_module("minitrain.ops.attention"), "_causal_scores",
                       lambda q, k, c: (q @ k.swapaxes(-1, -2)) * c),
    "q/k/v bias dropped": (ops, "linear", _linear_without_bias),
    "head not tied": (Model, "head", property(_untied_copy_of_embedding)),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_breaks_parity(pair, bug, monkeypatch):
    hf_model, _, model = pair
    owner, attr, replacement = PLANTED[bug]
    if bug == "q/k/v bias dropped" and not model.config.qkv_bias:
        pytest.skip("llama has no q/k/v bias")
    if bug == "head not tied" and not model.config.tie_word_embeddings:
        pytest.skip("untied model")
    monkeypatch.setattr(owner, attr, replacement)
    logits_err, _, grad_errs = compare_forward_backward(hf_model, model)
    assert logits_err > LOGITS_RTOL or max(grad_errs.values()) > GRAD_RTOL

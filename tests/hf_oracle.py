"""The float64 truth for the parity tests, and the rounding-error bounds they check against.

The truth: transformers' model in float64 -- with its RoPE tables and RMSNorm computed in
float64 too. transformers casts both to float32 even in a float64 model (the rotary embedding
takes `.float()` of the positions and inverse frequencies; RMSNorm does `.to(torch.float32)`),
which caps a "float64" comparison at ~1e-7. `float64_model` (tools/hf_trace.py, which traces the
same truth for `minitrain diff`) replaces those two forwards on the instance with the same
formulas in the model's own dtype.

Error model (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 2.2 and 3.1). In
a precision with unit roundoff u (2^-24 for fp32, 2^-53 for fp64) every operation is exact up to
a factor 1 + d, |d| <= u, and a sum of n terms is exact up to gamma_n * sum |terms|, gamma_n ~ n u.
Errors made along a chain of dependent steps add (to first order), so a result at the end of a
chain whose sums have n_1, n_2, ... terms is within (n_1 + n_2 + ...) u of the exact value,
relative to the magnitude of the terms it is summed from. `depth` adds those lengths up along
the model: D_fwd for the logits, D_grad for a gradient (the backward retraces the forward chain,
then sums over the B*T rows: 2 D_fwd + B T). This is the worst case; rounding errors of random
sign grow like sqrt(n), not n, which leaves room for the network's own amplification. The bound
holds on any IEEE machine, whatever its SIMD width or summation order: nothing in it is a
measured property of one CPU.

    logits, loss        |ours - exact| <= D_fwd u max|exact|
    gradient of W       |ours - exact| <= D_grad u S_W, S_W the largest sum of term magnitudes
                        over W's elements: |dY|^T |X| for a linear weight, sum |dY| for a bias,
                        sum |dY * xhat| for an RMSNorm weight, sum |dX| over a token's positions
                        for an embedding row (a tied one adds its head's |dZ|^T |h|). A gradient
                        that nearly cancels (a key bias: softmax ignores what adds equally to a
                        row's scores) is judged against its terms, not its small sum.
    SGD, k steps        |w - exact| <= lr sum_t D_grad u S_W,t  +  k u max|w|
    AdamW, k steps      element by element: an update m^/(sqrt(v^) + eps) divides the gradient's
                        error by sqrt(v^_i), and is at most R_t in size (`adam_ratio_bound`), so
                        |w_i - exact| <= lr sum_t min(2 R_t, D_grad u S_W,t / (sqrt(v^_t,i) + eps))
                                         + k u |w_i|.
Earlier steps' errors reach later gradients through the Hessian; over three steps at these
learning rates that is a fraction of the per-step terms above, which the sum over steps covers.
Two computations are compared by the sum of their bounds (the float64 truth has its own, tiny).
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from hf_trace import float64_inv_freq, float64_model, rms_normalized  # noqa: E402,F401  (the float64 truth, shared with the tool)

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp64": 2.0 ** -53}


def depth(cfg, batch, seq, rank=0):
    """(D_fwd, D_grad): the summed lengths of the sums along the model's longest chain, for a
    ModelConfig and a (batch, seq) input. LoRA adapters of rank R (`rank`) lengthen each of the
    four linears on a layer's chain (q|k|v, o, gate|up, down) by x Aᵀ's R-term sum of the low-rank
    path and the addition of the two paths."""
    H, I, V, hd, nH = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim, cfg.num_attention_heads
    layer = (H  # RMSNorm mean square
             + H  # q/k/v projections
             + hd  # scores q.k
             + 2 * seq  # softmax sum, P V
             + (hd if cfg.qk_norm else 0)  # Qwen3's RMSNorm of each q and k head
             + nH * hd  # o_proj
             + H  # RMSNorm
             + H  # gate/up projections
             + I  # down_proj
             + (4 * (rank + 1) if rank else 0))  # the LoRA paths
    forward = cfg.num_hidden_layers * layer + H + H + V  # final norm, lm_head, the loss's softmax
    return forward, 2 * forward + batch * seq


def adam_ratio_bound(t, beta1, beta2):
    """R_t, the largest |m^ / sqrt(v^)| after t steps of bias-corrected Adam, over all gradient
    sequences: m^ = sum_s c_s g_s, v^ = sum_s d_s g_s^2, and Cauchy-Schwarz gives
    |m^| <= sqrt(sum_s c_s^2 / d_s) sqrt(v^)."""
    c = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1 ** t) for s in range(1, t + 1)]
    d = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2 ** t) for s in range(1, t + 1)]
    return math.sqrt(sum(ci * ci / di for ci, di in zip(c, d)))


FAMILY_CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                  "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}


def build_hf(spec, seed):
    """A transformers model of a tiny spec (family plus config fields; by default 2 layers, head_dim
    8) with non-trivial weights: std 0.25 matrices, biases and norm weights moved away from 0 and 1,
    so that a skipped term shows."""
    spec = dict(spec)
    config_cls, model_cls = FAMILY_CLASSES[spec.pop("family")]
    config = config_cls(**{"num_hidden_layers": 2, "max_position_embeddings": 64, "head_dim": 8, **spec})
    model = model_cls(config).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else (0.3 if name.endswith("bias") else 0.25) * noise)
    return model


def logits_and_loss(model, inputs, targets):
    logits = model(torch.tensor(inputs)).logits
    return logits, torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.tensor(targets).reshape(-1))


def forward_backward(model, inputs, targets):
    """(logits, loss, {name: gradient}, {name: S}) of one batch: the exact values and, per
    trained parameter, the largest sum of term magnitudes behind an element of its gradient (a
    peft model's lora_A and lora_B are Linears too)."""
    inputs_of, grads_of, hooks = {}, {}, []
    for name, m in model.named_modules():
        if (isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) or type(m).__name__.endswith("RMSNorm")) \
                and m.weight.requires_grad:  # a trained parameter
            def keep(m, args, out, name=name):
                inputs_of[name] = args[0].detach()
                out.register_hook(lambda g: grads_of.__setitem__(name, g.detach()))
            hooks.append(m.register_forward_hook(keep))
    model.zero_grad()
    logits, loss = logits_and_loss(model, inputs, targets)
    loss.backward()
    for h in hooks:
        h.remove()
    modules, scales = dict(model.named_modules()), {}
    for name, x in inputs_of.items():
        m, dy = modules[name], grads_of[name].abs()
        if isinstance(m, torch.nn.Embedding):
            terms = torch.zeros_like(m.weight).index_add_(0, x.reshape(-1), dy.reshape(-1, dy.shape[-1]))
            key = name + ".weight"
        elif isinstance(m, torch.nn.Linear):
            rows_dy, rows_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]).abs()
            terms = rows_dy.T @ rows_x
            key = "model.embed_tokens.weight" if m.weight is model.get_input_embeddings().weight else name + ".weight"
            if m.bias is not None:
                scales[name + ".bias"] = float(rows_dy.sum(0).max())
        else:  # RMSNorm: y = w * xhat
            terms = (dy * rms_normalized(x, m.variance_epsilon).abs()).reshape(-1, x.shape[-1]).sum(0)
            key = name + ".weight"
        scales[key] = scales.get(key, 0.0) + float(terms.max())  # a tied embedding: its rows and the head
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().numpy(), float(loss.detach()), grads, scales


def rel_to_bound(err, bound):
    """The largest err / bound over the elements (0 where both are 0)."""
    err, bound = np.broadcast_arrays(np.asarray(err, dtype=np.float64), np.asarray(bound, dtype=np.float64))
    return float(np.max(np.where(err == 0, 0.0, err / np.maximum(bound, 1e-300)), initial=0.0))


def reference_steps(model, optimizer, settings, data):
    """Train the float64 truth's trained parameters with torch's `optimizer` ("sgd" or "adamw",
    weight decay on matrices only) on `data`, recording per step what `weight_bound` needs: the
    gradient scales S_W,t and (AdamW) the bias-corrected second moments. Returns (the weights
    after the steps, that history)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    settings = dict(settings)
    if optimizer == "sgd":
        opt = torch.optim.SGD(named.values(), **settings)
    else:
        wd = settings.pop("weight_decay")
        groups = [{"params": [p for p in named.values() if p.ndim >= 2], "weight_decay": wd},
                  {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], **settings)
    history = []
    for t, (inputs, targets) in enumerate(data, start=1):
        scales = forward_backward(model, inputs, targets)[3]
        opt.step()
        vhat = ({n: opt.state[p]["exp_avg_sq"].numpy() / (1 - settings["betas"][1] ** t) for n, p in named.items()}
                if optimizer == "adamw" else None)
        history.append((scales, vhat))
    return {n: p.detach().numpy().copy() for n, p in named.items()}, history


def weight_bound(name, w, history, optimizer, settings, u, grad_bound):
    """The bound of the docstring on |w - exact| after len(history) steps of `optimizer` with
    `settings`, for unit roundoff u (both computations' added) and the relative gradient bound
    grad_bound (D_grad u)."""
    bound = len(history) * u * (np.abs(w) if optimizer == "adamw" else np.abs(w).max())
    for t, (scales, vhat) in enumerate(history, start=1):
        if optimizer == "sgd":
            bound = bound + settings["lr"] * grad_bound * scales[name]
        else:
            amplified = grad_bound * scales[name] / (np.sqrt(vhat[name]) + settings["eps"])
            bound = bound + settings["lr"] * np.minimum(2 * adam_ratio_bound(t, *settings["betas"]), amplified)
    return bound

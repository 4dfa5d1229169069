"""The trace of one training step by transformers, in minitrain's names: what `minitrain diff`
compares a `minitrain trace` with (docs/auditing.md).

    python tools/hf_trace.py --init HF_DIR --data TOKENS --seq-len T --batch-size B --out hf.safetensors
        [--dtype fp64|fp32] [--optimizer adamw|sgd] [--lr F] [--layers LIST] [--plant DEFECT]

The same step as `minitrain trace`: the first B windows of the data, the model's forward with
forward hooks on its modules (and RoPE's function wrapped, which is no module), the gradients
by tensor hooks and parameters' post-accumulate hooks in the order torch's backward completes
them, then one step of torch's own AdamW (or SGD) with minitrain's defaults, no clipping.
fp64 is transformers in float64 throughout: its RoPE tables and RMSNorm, which it computes in
float32 even in a float64 model, replaced by the same formulas in float64 (`float64_model`).

--plant puts one defect into transformers' step, to see `minitrain diff` name where it shows:
    rope-offset     positions start at 1, not 0
    norm-eps        every RMSNorm's epsilon 10x
    no-scale        attention scores without 1/sqrt(head_dim)
    no-bias         q_proj's bias left out (Qwen2)
    adamw-no-bias-correction   AdamW without (1 - beta^t) on m and v (written out here)
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minitrain.data import TokenWindows, target_count  # noqa: E402
from minitrain.errors import InputError  # noqa: E402
from minitrain.formats.hf import load_dir  # noqa: E402
from minitrain.formats.trace_file import TraceWriter  # noqa: E402
from minitrain.trace import ADAMW, DEFAULT_LR, parse_layers, wanted  # noqa: E402

PLANTS = ("rope-offset", "norm-eps", "no-scale", "no-bias", "adamw-no-bias-correction")
_LINEARS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o_proj",
            "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def rms_normalized(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last axis, in x's dtype: RMSNorm without its weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def float64_model(directory, gguf_file=None):
    """transformers' model of an HF checkpoint directory (or of the GGUF file `gguf_file` in it,
    through transformers' own GGUF loader), in float64 throughout: its rotary embedding and
    RMSNorm forwards, which cast to float32, replaced on the instance by the same formulas in
    float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float64)
    inv_freq = float64_inv_freq(model.config)

    def rotary(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    model.model.rotary_emb.forward = rotary
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = lambda x, m=m: m.weight * rms_normalized(x, m.variance_epsilon)
    return model


def float64_inv_freq(cfg):
    """transformers' RoPE frequencies for a model config, in float64: theta^(-2i/hd), and where the
    config says rope_type llama3, scaled by the formula of transformers'
    modeling_rope_utils._compute_llama3_parameters (which computes it in float32)."""
    rope = cfg.rope_parameters
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope.get("rope_type", "default") == "default":
        return inv_freq
    if rope["rope_type"] != "llama3":
        raise InputError(f"rope_type {rope['rope_type']!r}: no float64 truth for it here")
    factor, low, high, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


class Recorder:
    """Tensors to the trace writer as they come, in minitrain's names and layouts."""

    def __init__(self, writer, layers):
        self.writer, self.layers = writer, layers

    def wanted(self, name):
        return wanted(name, self.layers)

    def record(self, name, x):
        if self.wanted(name):
            self.writer.add(name, x.detach().cpu().numpy())

    def activation(self, name, x, layout=lambda t: t):
        """x's value now and its gradient when the backward reaches it (`layout`: to minitrain's shape)."""
        if self.wanted(name):
            self.record(name, layout(x))
            if x.requires_grad:
                x.register_hook(lambda g: self.record("grad." + name, layout(g)))


def _hooks(model, rec):
    """Forward hooks on every module a trace name comes from; RoPE's function wrapped."""
    core, layer_now = model.model, [0]
    core.embed_tokens.register_forward_hook(lambda m, a, out: rec.activation("embed", out))
    core.norm.register_forward_hook(lambda m, a, out: rec.activation("norm", out))
    heads = lambda t: t.transpose(1, 2)  # noqa: E731  (B, nH, T, hd) -> (B, T, nH, hd)
    for i, layer in enumerate(core.layers):
        n = f"layers.{i}."
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: layer_now.__setitem__(0, i))
        layer.input_layernorm.register_forward_hook(lambda m, a, out, n=n: rec.activation(n + "attn_norm", out))
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, n=n: rec.activation(n + "attn_residual", a[0]))
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, n=n: rec.activation(n + "mlp_norm", out))
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, n=n, hd=layer.self_attn.head_dim: rec.activation(
                n + "attn", a[0], lambda t: t.reshape(*t.shape[:-1], -1, hd)))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, n=n: rec.activation(n + "act", a[0]))
        for path, short in _LINEARS.items():
            module = layer.get_submodule(path)
            module.register_forward_hook(lambda m, a, out, n=n, short=short: rec.activation(n + short, out))
        for short in ("q_norm", "k_norm"):  # Qwen3: on (B, T, n, hd), minitrain's layout already
            if hasattr(layer.self_attn, short):
                getattr(layer.self_attn, short).register_forward_hook(
                    lambda m, a, out, n=n, short=short: rec.activation(n + short, out))
        layer.register_forward_hook(
            lambda m, a, out, n=n: rec.activation(n + "mlp_residual", out[0] if isinstance(out, tuple) else out))
    modeling = sys.modules[type(core.layers[0].self_attn).__module__]
    rope = modeling.apply_rotary_pos_emb

    def traced_rope(q, k, cos, sin, *args, **kwargs):
        q, k = rope(q, k, cos, sin, *args, **kwargs)
        rec.activation(f"layers.{layer_now[0]}.q_rope", q, heads)
        rec.activation(f"layers.{layer_now[0]}.k_rope", k, heads)
        return q, k

    modeling.apply_rotary_pos_emb = traced_rope
    return lambda: setattr(modeling, "apply_rotary_pos_emb", rope)


def _plant(model, plant):
    if plant == "norm-eps":
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.variance_epsilon *= 10
    elif plant == "no-scale":
        for layer in model.model.layers:
            layer.self_attn.scaling = 1.0
    elif plant == "no-bias":
        if model.model.layers[0].self_attn.q_proj.bias is None:
            raise InputError("--plant no-bias: this model's q_proj has no bias (a Llama); plant it in a Qwen2")
        for layer in model.model.layers:
            q = layer.self_attn.q_proj
            q.forward = lambda x, q=q: torch.nn.functional.linear(x, q.weight)


def _optimizer(named, optimizer, lr):
    if optimizer == "sgd":
        return torch.optim.SGD(named.values(), lr=lr)
    decay = [p for p in named.values() if p.ndim >= 2 or ADAMW["decay_1d"]]
    rest = [p for p in named.values() if not (p.ndim >= 2 or ADAMW["decay_1d"])]
    return torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}], lr=lr,
                             betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"])


def _adamw_without_bias_correction(named, lr):
    """The planted defect: AdamW's first step with m and v used as they are. -> {name: (m, v)}."""
    b1, b2, eps, wd = ADAMW["beta1"], ADAMW["beta2"], ADAMW["eps"], ADAMW["weight_decay"]
    moments = {}
    with torch.no_grad():
        for name, p in named.items():
            if p.grad is None:
                continue
            m, v = (1 - b1) * p.grad, (1 - b2) * p.grad * p.grad
            if p.ndim >= 2 or ADAMW["decay_1d"]:
                p.mul_(1 - lr * wd)
            p.sub_(lr * m / (v.sqrt() + eps))
            moments[name] = (m, v)
    return moments


def hf_trace(init, data, seq_len, batch_size, out, dtype="fp64", optimizer="adamw", lr=None, layers=None, plant=None):
    """Write transformers' trace of one step to `out`; -> (the loss, the number of tensors)."""
    config, _ = load_dir(init)
    model = float64_model(init) if dtype == "fp64" else \
        transformers.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    chosen = parse_layers(layers, config.num_hidden_layers)
    windows = TokenWindows(data, seq_len, config.vocab_size)
    if windows.pos is not None:
        raise InputError(f"{data}: packed windows; this tool runs transformers without per-conversation masks")
    inputs, targets = windows.batch(range(batch_size))
    lr = DEFAULT_LR if lr is None else lr
    _plant(model, plant)
    writer = TraceWriter(out)
    rec = Recorder(writer, chosen)
    unhook = _hooks(model, rec)
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.register_post_accumulate_grad_hook(lambda p, name=name: rec.record("grad." + name, p.grad))
    try:
        rec.record("input_ids", torch.tensor(numpy.asarray(inputs, dtype=numpy.int64)))
        rec.record("targets", torch.tensor(numpy.asarray(targets, dtype=numpy.int64)))
        positions = torch.arange(seq_len)[None].expand(batch_size, -1) + (plant == "rope-offset")
        logits = model(torch.tensor(numpy.asarray(inputs, dtype=numpy.int64)), position_ids=positions).logits
        rec.activation("logits", logits)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(numpy.asarray(targets, dtype=numpy.int64)).reshape(-1))
        rec.record("loss", loss)
        loss.backward()
        before = {n: p.detach().clone() for n, p in named.items()}
        if plant == "adamw-no-bias-correction":
            moments = _adamw_without_bias_correction(named, lr)
        else:
            opt = _optimizer(named, optimizer, lr)
            opt.step()
            moments = {n: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for n, p in named.items()
                       if "exp_avg" in opt.state[p]}  # AdamW's, for the parameters that had a gradient
        for name, p in named.items():
            if name in moments:
                rec.record("step.m." + name, moments[name][0])
                rec.record("step.v." + name, moments[name][1])
            rec.record("step.update." + name, p.detach() - before[name])
            rec.record("step.param." + name, p)
        settings = {"name": optimizer, "lr": lr, **(ADAMW if optimizer == "adamw" else {})}
        writer.close({"source": f"transformers {transformers.__version__} (torch {torch.__version__})",
                      "dtype": dtype, "arch": config.family, "model": config.as_dict(), "init": str(init),
                      "data": str(data), "batch_size": batch_size, "seq_len": seq_len, "packed": False,
                      "targets": target_count(targets), "layers": chosen, "optimizer": settings,
                      "loss": loss.item(), "plant": plant})
    except BaseException:
        writer.discard()
        raise
    finally:
        unhook()
    return loss.item(), len(writer.entries)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="A Hugging Face checkpoint directory (Llama or Qwen2).")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=("fp64", "fp32"), default="fp64")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--layers")
    ap.add_argument("--plant", choices=PLANTS)
    args = ap.parse_args()
    try:
        loss, count = hf_trace(args.init, args.data, args.seq_len, args.batch_size, args.out, args.dtype,
                               args.optimizer, args.lr, args.layers, args.plant)
    except InputError as e:
        sys.exit(f"hf_trace: error: {e}")
    print(json.dumps({"tensors": count, "loss": loss, "out": args.out}))


if __name__ == "__main__":
    main()

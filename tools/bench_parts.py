"""The two parts of a LoRA step where PyTorch leads, timed alone: the frozen base's matmuls and
causal attention, minitrain (NumPy + its OpenBLAS) against torch (MKL, its CPU flash kernel).

    python tools/bench_parts.py --preset smollm2-135m --seq-len 256 --batch-size 1

Both sides do the same work on the same shapes, in the same order, for one training step of the
preset under LoRA:
- base matmuls: for every layer, each of the seven linears' forward y = x Wᵀ, then, layers in
  reverse, each one's dX = dY W (a frozen W gets no dW). The weights are distinct per layer, as in
  the model; the activations are one random array per width (their values do not change speed).
  minitrain calls NumPy's matmul; torch calls torch.mm on the same arrays, shared through
  torch.from_numpy.
- attention: causal grouped-query attention, forward and backward, once per layer. minitrain runs
  ops.attention's Function; torch runs F.scaled_dot_product_attention(is_causal=True) on the kv
  heads repeated to the query heads, as transformers' Llama does, with autograd's backward.

Each framework runs in its own fresh process (so neither one's idle BLAS threads spin beside the
other's work), the two alternating for --rounds rounds; each process warms up, times each part
--steps times, and reports its best. The ratio is minitrain's time over torch's.
"""

import argparse
import json
import os

from bench_cpu import PRESETS, config_of
from bench_generate import best_of
from workload import child


def linear_shapes(cfg):
    """(out, in) of every layer's seven LoRA targets (q, k, v, o, gate, up, down), read from the
    architecture's tensor table."""
    from minitrain.config import tensor_table
    from minitrain.lora import TARGETS

    table = tensor_table(cfg)
    return [[table[f"model.layers.{i}.{module}.weight"] for module in TARGETS.values()]
            for i in range(cfg.num_hidden_layers)]


def _best(fn, steps):
    fn()  # warm-up
    return best_of(steps, fn)


def run(framework, cfg, seq_len, batch, steps):
    """{"matmuls": s, "attention": s}, each the best of `steps` timings of one step's worth."""
    import numpy

    rng = numpy.random.default_rng(0)
    N, L, shapes = batch * seq_len, cfg.num_hidden_layers, linear_shapes(cfg)
    weights = [[(0.02 * rng.standard_normal(shape)).astype(numpy.float32) for shape in layer] for layer in shapes]
    widths = {w for layer in shapes for shape in layer for w in shape}
    acts = {w: rng.standard_normal((N, w)).astype(numpy.float32) for w in widths}  # x (N, in) and dY (N, out)
    B, T, nH, nKV, hd = batch, seq_len, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, do = (rng.standard_normal((B, T, nH, hd)).astype(numpy.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, T, nKV, hd)).astype(numpy.float32) for _ in range(2))
    if framework == "minitrain":
        from minitrain.ops.attention import Attention

        mm = numpy.matmul

        def attention():
            f = Attention()
            f.needs_grad = (True, True, True)
            f.forward(q, k, v)
            f.backward(do)
    else:
        import torch

        weights = [[torch.from_numpy(W) for W in layer] for layer in weights]
        acts = {w: torch.from_numpy(a) for w, a in acts.items()}
        mm = torch.mm
        tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).requires_grad_() for a in (q, k, v))  # (B, heads, T, hd)
        tdo = torch.from_numpy(do).transpose(1, 2)

        def attention():
            rep = lambda t: t[:, :, None].expand(B, nKV, nH // nKV, T, hd).reshape(B, nH, T, hd)  # repeat_kv
            o = torch.nn.functional.scaled_dot_product_attention(tq, rep(tk), rep(tv), is_causal=True)
            o.backward(tdo)
            for t in (tq, tk, tv):
                t.grad = None

    def matmuls():
        for layer in weights:
            for W in layer:
                mm(acts[W.shape[1]], W.T)  # y = x W^T
        for layer in reversed(weights):
            for W in reversed(layer):
                mm(acts[W.shape[0]], W)  # dX = dY W

    def attention_step():
        for _ in range(L):
            attention()

    if framework == "minitrain":
        return {"matmuls": _best(matmuls, steps), "attention": _best(attention_step, steps)}
    with torch.no_grad():
        mat = _best(matmuls, steps)
    return {"matmuls": mat, "attention": _best(attention_step, steps), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=PRESETS)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["minitrain", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # a child's ModelConfig, as JSON
    args = parser.parse_args()
    if args.child:
        from minitrain.config import ModelConfig

        print(json.dumps(run(args.child, ModelConfig(**json.loads(args.config)), args.seq_len, args.batch_size,
                             args.steps)))
        return
    cfg = config_of(args.preset)
    best = {}
    for _ in range(args.rounds):
        for framework in ("minitrain", "torch"):
            r = child(__file__, framework, "--config", json.dumps(cfg.as_dict()), "--seq-len", args.seq_len,
                      "--batch-size", args.batch_size, "--steps", args.steps)
            best[framework] = {part: min(t, best.get(framework, r)[part]) if part != "threads" else t
                               for part, t in r.items()}
    print(f"{args.preset}: seq {args.seq_len}, batch {args.batch_size}; {os.cpu_count()} CPUs, torch threads "
          f"{best['torch']['threads']}; best of {args.steps} per process, {args.rounds} alternating rounds")
    print(f"{'part':<42} {'minitrain s':>11} {'torch s':>8}  minitrain / torch")
    labels = {"matmuls": f"base matmuls ({cfg.num_hidden_layers} x 7 linears, y and dX)",
              "attention": f"attention ({cfg.num_hidden_layers} layers, fwd + bwd)"}
    for part, label in labels.items():
        ours, theirs = best["minitrain"][part], best["torch"][part]
        print(f"{label:<42} {ours:11.3f} {theirs:8.3f}  {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()

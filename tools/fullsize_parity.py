"""A preset at full size against the float64 truth: random weights, every width, head count and
the whole vocabulary as published (the layer count too, or the first N layers where both models
in float64 would not fit in memory), the loss, the logits and every parameter gradient of one
batch compared with transformers in float64 (tests/hf_oracle.py) to its derived bounds.

    python tools/fullsize_parity.py --arch qwen3-0.6b
    python tools/fullsize_parity.py --arch llama-3.2-1b --layers 4

The weights: the from-scratch draw (std 0.02 matrices), every RMSNorm weight moved off 1 by
N(0, 0.1) so that a norm applied twice or left out shows. The model is written as a Hugging Face
directory (float32), read by transformers in float64 and by minitrain in --precision; the truth's
gradients are kept, its model freed, before minitrain builds its own (peak: about three copies of
the parameters in float64). Prints each quantity's worst error as a multiple of its bound
(hf_oracle's error model: D u max|exact| for the logits and loss, D_grad u S_W for a gradient);
exit 1 if any is beyond.
"""

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="a preset (qwen3-0.6b, llama-3.2-1b, ...)")
    parser.add_argument("--layers", type=int, help="the first N layers (default: all)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--precision", choices=["fp64", "fp32"], default="fp64", help="minitrain's side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import hf_oracle
    from minitrain import backend, ops
    from minitrain.config import parameter_count, preset
    from minitrain.formats import hf
    from minitrain.model import Model

    full = preset(args.arch)
    cfg = replace(full, num_hidden_layers=args.layers or full.num_hidden_layers)
    B, T = args.batch_size, args.seq_len
    rng = numpy.random.default_rng(args.seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {n: t.data for n, t in Model.from_scratch(cfg, seed=args.seed).params.items()}
        for name, a in arrays.items():
            if name.endswith("norm.weight"):
                arrays[name] = (a + rng.normal(0, 0.1, a.shape)).astype(numpy.float32)
        hf.save_dir(tmp, cfg, arrays)
        del arrays
        truth = hf_oracle.float64_model(tmp)
        logits_t, loss_t, grads_t, scales = hf_oracle.forward_backward(truth, inputs, targets)
        del truth
        gc.collect()
        loaded = hf.load_dir(tmp)
        with backend.precision(args.precision):
            model = Model.from_arrays(*loaded)
            del loaded
            logits = model.forward(inputs)
            loss = ops.cross_entropy(logits, targets)
            loss.backward()
    d_fwd, d_grad = hf_oracle.depth(cfg, B, T)
    u = hf_oracle.UNIT_ROUNDOFF[args.precision] + hf_oracle.UNIT_ROUNDOFF["fp64"]
    ratios = {"logits": hf_oracle.rel_to_bound(abs(logits.data - logits_t), d_fwd * u * abs(logits_t).max()),
              "loss": hf_oracle.rel_to_bound(abs(float(loss.data) - loss_t), d_fwd * u * abs(loss_t))}
    worst_rel = {}
    for name, t in model.params.items():
        err = abs(t.grad - grads_t[name])
        ratios[name] = hf_oracle.rel_to_bound(err, d_grad * u * scales[name])
        worst_rel[name] = float(err.max() / abs(grads_t[name]).max())
    if set(grads_t) != set(model.params):
        sys.exit(f"fullsize_parity: parameters differ: {sorted(set(grads_t) ^ set(model.params))[:4]}")
    worst = max(ratios, key=ratios.get)
    report = {"arch": args.arch, "layers": f"{cfg.num_hidden_layers} of {full.num_hidden_layers}",
              "params": parameter_count(cfg), "batch": [B, T], "precision": args.precision,
              "loss": float(loss.data), "loss_truth": loss_t, "logits_max_rel": float(abs(logits.data - logits_t).max()
                                                                                      / abs(logits_t).max()),
              "gradients": len(grads_t), "grad_max_rel": max(worst_rel.values()),
              "worst": worst, "worst_ratio_to_bound": ratios[worst], "within": ratios[worst] <= 1,
              "seconds": round(time.perf_counter() - started, 1),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}
    print(f"{args.arch} at full width and vocabulary, {report['layers']} layers ({report['params']:,} parameters), "
          f"batch {B} x {T}, minitrain in {args.precision} against transformers in float64:")
    print(f"  loss {report['loss']:.15f} vs {loss_t:.15f}; logits max rel {report['logits_max_rel']:.2e}; "
          f"{report['gradients']} gradients, max rel {report['grad_max_rel']:.2e}")
    print(f"  worst against its bound: {worst} at {ratios[worst]:.2e} x the bound "
          f"({'within' if report['within'] else 'BEYOND'}); {report['seconds']} s, peak RSS "
          f"{report['peak_rss_gib']} GiB")
    print(json.dumps(report))
    sys.exit(0 if report["within"] else 1)


if __name__ == "__main__":
    main()

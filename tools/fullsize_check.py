"""Build a full-size preset from scratch and run one forward + backward on the CPU.

    python tools/fullsize_check.py [--arch llama-370m] [--arch qwen2.5-0.5b] [--seq-len 128]

Each preset runs in its own process, so the peak resident memory printed is that model's alone.
Prints build time, forward+backward time, peak RSS, the loss and ln(V) (a from-scratch model
predicts nearly uniformly, so its loss starts close to ln V).
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def measure(arch, seq_len, seed=0):
    import numpy

    from minitrain.config import preset
    from minitrain.model import Model

    cfg = preset(arch)
    t0 = time.perf_counter()
    model = Model.from_scratch(cfg, seed=seed)
    t1 = time.perf_counter()
    ids = numpy.random.default_rng(seed).integers(0, cfg.vocab_size, (1, seq_len + 1))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    t2 = time.perf_counter()
    finite = all(bool(numpy.isfinite(p.grad).all()) for p in model.parameters())
    return {"arch": arch, "params": model.num_parameters(), "seq_len": seq_len, "build_s": round(t1 - t0, 2),
            "fwd_bwd_s": round(t2 - t1, 2), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "loss": float(loss.data), "ln_V": math.log(cfg.vocab_size), "grads_finite": finite}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="preset (repeatable); default: both full presets")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode: print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.arch[0], args.seq_len)))
        return
    for arch in args.arch or ["llama-370m", "qwen2.5-0.5b"]:
        out = subprocess.run([sys.executable, __file__, "--one", "--arch", arch, "--seq-len", str(args.seq_len)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['arch']:<14} params {r['params']:>12,}  build {r['build_s']:6.2f} s  fwd+bwd (1 x {r['seq_len']}) "
              f"{r['fwd_bwd_s']:6.2f} s  peak RSS {r['peak_rss_gib']:5.2f} GiB  loss {r['loss']:.4f}  "
              f"ln V {r['ln_V']:.4f}  grads finite {r['grads_finite']}")


if __name__ == "__main__":
    main()

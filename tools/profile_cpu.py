"""Where one minitrain training step spends its time, op by op.

    python tools/profile_cpu.py --preset llama-370m --seq-len 256 --steps 3
    python tools/profile_cpu.py --preset smollm2-135m --lora 16

Runs the step that tools/bench_cpu.py times (tools/workload.py: forward + backward + AdamW on
random tokens) with a wall-clock timer around every Function's forward and backward and around
the optimizer, and prints each op's time per step (the mean over --steps steps after one warm-up
step), its share of the step, and for the matmul-bound ops the GFLOP/s they reach. What is left
after the ops and the optimizer is the engine itself (graph walk, gradient bookkeeping). With
--lora R the step trains rank-R adapters on the frozen base (workload.py): the base's weight
gradients are not formed, so its matmuls count forward + dX only (the rank-R products not at all).
"""

import argparse
import collections
import importlib
import time


def all_functions(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_functions(sub)


def timed(table, key, method):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            table[key] += time.perf_counter() - t0
    return wrapper


def matmul_flops(cfg, seq_len, batch, lora):
    """FLOPs of one step's matmuls, split as the profile reports them (forward + backward = 3x
    forward; 2x for a frozen weight's products, under LoRA)."""
    N, H, L = seq_len * batch, cfg.hidden_size, cfg.num_hidden_layers
    nH, nKV, hd, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = H * (nH * hd + 2 * nKV * hd) + nH * hd * H + 3 * H * inter
    attention = 2 * 2 * batch * seq_len * seq_len * nH * hd  # QK^T and PV over the full T x T, as 12 L H T counts it
    weights = 2 if lora else 3
    return {"LoRALinear" if lora else "Linear": weights * 2 * N * L * per_layer,
            "LinearCrossEntropy": weights * 2 * N * H * cfg.vocab_size, "Attention": 3 * L * attention}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-370m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora", type=int, metavar="R", help="train rank-R LoRA adapters on the frozen base")
    args = parser.parse_args()

    from bench_cpu import config_of
    from minitrain.autograd import Function
    from workload import minitrain_step

    table = collections.defaultdict(float)
    importlib.import_module("minitrain.ops")  # defines every op's Function subclass, all timed below
    for cls in all_functions(Function):
        for phase in ("forward", "backward"):
            if phase in cls.__dict__:
                setattr(cls, phase, timed(table, (cls.__name__, phase), cls.__dict__[phase]))
    cfg = config_of(args.preset)
    step, opt = minitrain_step(cfg, args.batch_size, args.seq_len, args.lora)
    opt.step = timed(table, ("AdamW", "step"), opt.step)  # step() looks it up at each call

    step()
    table.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - t0) / args.steps
    flops = matmul_flops(cfg, args.seq_len, args.batch_size, args.lora)

    rows = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0, "step": 0.0})
    for (name, phase), seconds in table.items():
        rows[name][phase] = seconds / args.steps
    print(f"{args.preset}{f', LoRA rank {args.lora}' if args.lora else ''}, seq {args.seq_len}, batch {args.batch_size}: step {total:.3f} s "
          f"(mean of {args.steps} after 1 warm-up)")
    print(f"{'op':<20} {'forward s':>10} {'backward s':>11} {'total s':>8} {'share':>6} {'GFLOP/s':>8}")
    accounted = 0.0
    for name, r in sorted(rows.items(), key=lambda kv: -sum(kv[1].values())):
        t = sum(r.values())
        accounted += t
        rate = f"{flops[name] / t / 1e9:8.1f}" if name in flops else ""
        split = f"{r['forward']:10.3f} {r['backward']:11.3f}" if not r["step"] else f"{'':>10} {'':>11}"
        print(f"{name:<20} {split} {t:8.3f} {100 * t / total:5.1f}% {rate}")
    print(f"{'engine + rest':<20} {'':>10} {'':>11} {total - accounted:8.3f} {100 * (total - accounted) / total:5.1f}%")


if __name__ == "__main__":
    main()

"""minitrain vs PyTorch eager: one AdamW training step of the same model on this CPU, side by side.

    python tools/bench_cpu.py --preset qwen2.5-0.5b --seq-len 256 --batch-size 1 --steps 3
    python tools/bench_cpu.py --lora 16 --preset smollm2-135m --preset qwen2.5-0.5b

Beside the presets, `smollm2-135m` is the real SmolLM2-135M's architecture, read from its GGUF
file (tools/fetch_smollm2.py): a small model with a large vocabulary, where Python's per-op
overhead shows most.

For each preset, each framework runs in its own fresh process (so peak memory is its own), and
the two alternate for --rounds rounds so that machine noise hits both alike. A process builds
the model from scratch (minitrain's preset; the transformers class with the same config), runs
--warmup steps, then times --steps steps of forward + backward + AdamW on random tokens, and
reports its best step time and its peak resident memory. The parent also measures this machine's
fp32 matmul peak (a large NumPy sgemm) in the same run. The step and the FLOPs per token are
tools/workload.py's.

With --lora R, three runs alternate instead: minitrain's full fine-tune, minitrain's LoRA of rank
R on all seven linears (the base frozen, AdamW over the adapters), and peft + PyTorch eager with
the same adapters; the LoRA row reports its peak RSS against the full fine-tune's and its speed
against peft's. FLOPs per token are left out there (a frozen base skips its weight gradients).

With --recompute MODE, four runs alternate: minitrain keeping every activation and with
`--recompute MODE`, PyTorch without and with transformers' gradient checkpointing
(`gradient_checkpointing_enable()`: each decoder layer recomputed, what MODE layer does). Each
pair's peak RSS above the weights, gradients and AdamW state (16 bytes per parameter) is its
step's memory, activations above all; the table gives each with-recomputation run's share of it
and of its tokens/s.
"""

import argparse
import json
import os
import resource
import sys
import time

from minitrain.config import parameter_count
from workload import child, flops_per_token, hf_model, minitrain_step, peft_model, torch_step

PRESETS = ["tiny-llama", "smollm2-135m", "llama-370m", "qwen2.5-0.5b"]
NEWER = ["qwen3-0.6b", "llama-3.2-1b"]  # by name only (llama-3.2-1b's full fine-tune needs ~24 GB: --lora)


def config_of(name):
    """A preset's ModelConfig, or the real SmolLM2-135M's (from its GGUF file)."""
    if name != "smollm2-135m":
        from minitrain.config import preset

        return preset(name)
    from fetch_smollm2 import fetch

    from minitrain.formats.gguf import load_gguf

    return load_gguf(fetch())[0]


def sgemm_peak(size=2048, repeats=5):
    """Best GFLOP/s of a size x size x size float32 matmul (NumPy's BLAS, default threads)."""
    import numpy

    a = numpy.random.default_rng(0).standard_normal((size, size), dtype=numpy.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_minitrain(cfg, seq_len, batch, warmup, steps, lora_rank=None, recompute="none"):
    step, _ = minitrain_step(cfg, batch, seq_len, lora_rank, recompute)
    return _steps(step, warmup, steps)


def run_torch(cfg, seq_len, batch, warmup, steps, lora_rank=None, recompute="none"):
    import torch
    import transformers

    model = peft_model(transformers, cfg, lora_rank) if lora_rank else hf_model(transformers, cfg)
    if recompute != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step = torch_step(torch, model, cfg, batch, seq_len)
    return {**_steps(step, warmup, steps), "threads": torch.get_num_threads(),
            "attn": model.config._attn_implementation}


# --lora R: framework name -> (child, LoRA or not)
LORA_RUNS = {"minitrain lora": ("minitrain", True), "minitrain full": ("minitrain", False),
             "peft + torch": ("torch", True)}


def _steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = [_timed(step) for _ in range(steps)]
    return {"best_s": min(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", choices=PRESETS + NEWER, help="repeatable; default: the first four")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lora", type=int, metavar="R", help="LoRA of rank R vs the full fine-tune vs peft + torch")
    parser.add_argument("--recompute", choices=["attention", "mlp", "layer"],
                        help="with and without recomputation, against PyTorch with and without gradient checkpointing")
    parser.add_argument("--child", choices=["minitrain", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # a child's ModelConfig, as JSON
    args = parser.parse_args()
    if args.child:
        from minitrain.config import ModelConfig

        run = run_minitrain if args.child == "minitrain" else run_torch
        print(json.dumps(run(ModelConfig(**json.loads(args.config)), args.seq_len, args.batch_size, args.warmup,
                             args.steps, args.lora, args.recompute or "none")))
        return
    if args.lora:
        return lora_table(args)
    if args.recompute:
        return recompute_table(args)
    peak = sgemm_peak()
    print(f"machine: {os.cpu_count()} CPUs, NumPy sgemm peak {peak:.1f} GFLOP/s (2048^3, best of 5); "
          f"seq {args.seq_len}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.rounds} alternating rounds, best step reported")
    print(f"{'preset':<14} {'framework':<10} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'peak RSS MiB':>13}  ratio minitrain/torch")
    for preset in args.preset or PRESETS:
        args.config = config_of(preset)
        best = best_of_rounds(args, {framework: (framework,) for framework in ("minitrain", "torch")})
        tokens = args.seq_len * args.batch_size
        work = flops_per_token(args.config, args.seq_len) * tokens / 1e9
        for framework in ("minitrain", "torch"):
            r = best[framework]
            ratio = best["torch"]["best_s"] / best["minitrain"]["best_s"] if framework == "minitrain" else ""
            print(f"{preset:<14} {framework:<10} {r['best_s']:8.3f} {tokens / r['best_s']:9.1f} "
                  f"{work / r['best_s']:8.1f} {100 * work / r['best_s'] / peak:6.1f}% {r['peak_rss_mib']:13.0f}  "
                  + (f"{ratio:.2f}x" if ratio else f"(torch threads {r['threads']}, attention {r['attn']})"))
        sys.stdout.flush()


def best_of_rounds(args, runs):
    """name -> the best step (and the largest peak RSS) over the alternating rounds; runs: name ->
    the child's arguments."""
    best = {}
    for _ in range(args.rounds):
        for name, child_args in runs.items():
            r = child(__file__, *child_args, "--config", json.dumps(args.config.as_dict()), "--seq-len", args.seq_len,
                      "--batch-size", args.batch_size, "--warmup", args.warmup, "--steps", args.steps)
            if name not in best or r["best_s"] < best[name]["best_s"]:
                best[name] = {**r, "peak_rss_mib": max(r["peak_rss_mib"], best.get(name, r)["peak_rss_mib"])}
    return best


def lora_table(args):
    print(f"machine: {os.cpu_count()} CPUs; LoRA rank {args.lora} (alpha {args.lora}) on q,k,v,o,gate,up,down; "
          f"seq {args.seq_len}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.rounds} alternating rounds, best step reported")
    print(f"{'preset':<14} {'run':<15} {'step s':>8} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for preset in args.preset or ["smollm2-135m", "qwen2.5-0.5b"]:
        args.config = config_of(preset)
        best = best_of_rounds(args, {name: (framework, *(["--lora", args.lora] if lora else []))
                                     for name, (framework, lora) in LORA_RUNS.items()})
        tokens = args.seq_len * args.batch_size
        ours, full, theirs = (best[name] for name in LORA_RUNS)
        for name, r in best.items():
            versus = (f"peak RSS {ours['peak_rss_mib'] / full['peak_rss_mib']:.2f}x the full fine-tune's, "
                      f"{theirs['best_s'] / ours['best_s']:.2f}x peft's tokens/s" if r is ours else
                      f"(torch threads {r['threads']})" if r is theirs else "")
            print(f"{preset:<14} {name:<15} {r['best_s']:8.3f} {tokens / r['best_s']:9.1f} {r['peak_rss_mib']:13.0f}  {versus}")
        sys.stdout.flush()


def recompute_table(args):
    mode = args.recompute
    runs = {"minitrain": ("minitrain",), f"minitrain {mode}": ("minitrain", "--recompute", mode), "torch": ("torch",),
            "torch checkpointed": ("torch", "--recompute", mode)}
    print(f"machine: {os.cpu_count()} CPUs; seq {args.seq_len}, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, one round, a failed run (the OOM killer) shown as such")
    print(f"{'preset':<14} {'run':<20} {'step s':>8} {'tokens/s':>9} {'peak RSS MiB':>13} {'step MiB':>9}")
    for preset in args.preset or ["smollm2-135m", "qwen2.5-0.5b"]:
        args.config = config_of(preset)
        tokens, fixed = args.seq_len * args.batch_size, 16 * parameter_count(args.config) / 2**20
        done = {}
        for name, child_args in runs.items():
            try:
                done[name] = r = child(__file__, *child_args, "--config", json.dumps(args.config.as_dict()),
                                       "--seq-len", args.seq_len, "--batch-size", args.batch_size,
                                       "--warmup", args.warmup, "--steps", args.steps)
            except SystemExit as e:
                print(f"{preset:<14} {name:<20} failed: {str(e).splitlines()[0]}")
                continue
            line = (f"{preset:<14} {name:<20} {r['best_s']:8.3f} {tokens / r['best_s']:9.1f} {r['peak_rss_mib']:13.0f} "
                    f"{r['peak_rss_mib'] - fixed:9.0f}")
            plain = done.get(name.split()[0])
            if plain is not r and plain is not None:
                line += (f"  step memory {(r['peak_rss_mib'] - fixed) / (plain['peak_rss_mib'] - fixed):.2f}x, "
                         f"tokens/s {plain['best_s'] / r['best_s']:.2f}x of {name.split()[0]}'s without")
            print(line, flush=True)


if __name__ == "__main__":
    main()

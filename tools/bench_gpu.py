"""GPU benchmark, one part per process (tools/gpu_check.sh runs each part under its own time cap):

  peak                 torch matmuls 8192^3: dense bf16 and plain fp32 (TF32 off), the MFU denominators
  step IMPL DTYPE      one training step of Qwen2.5-0.5B at --batch-size x --seq-len (default 8 x 1024):
                       IMPL minitrain: `minitrain pretrain`'s own Run.train_step (forward, backward,
                       gradient norm and clipping, AdamW), --route cublas|kernels for the linear
                       layers' backward, and the time per phase; IMPL hf: transformers eager with
                       SDPA attention (bf16: autocast over fp32 weights, minitrain's mixed precision)
                       + torch AdamW + clip_grad_norm_; DTYPE bf16 or fp32
  attention            minitrain's attention kernels (attention.cu in fp32 and bf16, attention_mma.cu's
                       tensor cores in bf16) and torch SDPA, causal, GQA 7:1, head_dim 64 and 128,
                       forward and backward TFLOP/s
  table                the table of every row measured so far

Every time is measured with CUDA events around back-to-back calls, after warm-up: the median over
--repeats calls (default 20; 10 for whole steps). Every row is printed as soon as it is measured
and appended to the JSON list in $BENCH_JSON (default build/bench_gpu.json), so a part that fails
or runs out of time loses only itself. FLOPs per token = 6 N + 12 L H T (tools/workload.py);
attention FLOPs = 4 B T^2 nH hd / 2 forward (the causal half), 2.5x that backward.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from workload import ADAMW, flops_per_token, hf_model, torch_step  # noqa: E402

NOMINAL_BF16 = 989.4  # TFLOP/s, H100/H200 SXM dense bf16 (datasheet)
JSON = Path(os.environ.get("BENCH_JSON", ROOT / "build" / "bench_gpu.json"))


def record(row):
    """Print one measured row now and append it to the JSON list."""
    rows = json.loads(JSON.read_text()) if JSON.exists() else []
    rows.append(row)
    JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = JSON.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(JSON)
    print("ROW " + json.dumps(row), flush=True)


def event_times(fn, event, elapsed_ms, repeats, warmup=3):
    """Milliseconds of each of `repeats` back-to-back calls of fn, by events recorded between them."""
    for _ in range(warmup):
        fn()
    marks = [event()]
    for _ in range(repeats):
        fn()
        marks.append(event())
    marks[-1].synchronize()
    return [elapsed_ms(a, b) for a, b in zip(marks, marks[1:])]


def cupy_timer():
    import cupy

    def event():
        e = cupy.cuda.Event()
        e.record()
        return e
    return event, cupy.cuda.get_elapsed_time


def torch_timer(torch):
    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return event, lambda a, b: a.elapsed_time(b)


def summary(ms):
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "calls": len(ms)}


def part_peak(args):
    import torch

    event, elapsed = torch_timer(torch)
    n = 8192
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        ms = event_times(lambda: a @ b, event, elapsed, args.repeats)
        s = summary(ms)
        record({"part": "peak", "dtype": name, "tf32": torch.backends.cuda.matmul.allow_tf32, **s,
                "tflops": 2 * n**3 / s["median_ms"] / 1e9, "device": torch.cuda.get_device_name(),
                "torch": torch.__version__})


def token_file(directory, vocab, windows, seq_len):
    import numpy

    path = Path(directory) / "tokens.bin"
    numpy.random.default_rng(0).integers(0, vocab, windows * (seq_len + 1), dtype="<u4").tofile(path)
    return path


class Phases:
    """CUDA events around named calls (wrapped in place): the device time each phase spans."""

    def __init__(self, event, elapsed):
        self.event, self.elapsed, self.marks = event, elapsed, []

    def wrap(self, name, fn):
        def timed(*a, **k):
            start = self.event()
            out = fn(*a, **k)
            self.marks.append((name, start, self.event()))
            return out
        return timed

    def totals(self):
        self.marks[-1][2].synchronize()
        out = {}
        for name, a, b in self.marks:
            out[name] = out.get(name, 0.0) + self.elapsed(a, b)
        self.marks = []
        return out


def minitrain_step(args, cfg, B, T):
    """(step, run): step() runs the next step of a `minitrain pretrain` Run on the GPU (its own
    train_step: forward, backward, norm and clipping, AdamW) over random tokens."""
    from minitrain import backend
    from minitrain.options import TrainConfig
    from minitrain.setup_run import build

    work = tempfile.mkdtemp()
    tc = TrainConfig(data=str(token_file(work, cfg.vocab_size, 4 * B, T)), out=f"{work}/run", arch=args.arch,
                     seq_len=T, batch_size=B, steps=10**6, val_windows=0, device="cuda", dtype=args.dtype,
                     lr=ADAMW["lr"], beta2=ADAMW["betas"][1], warmup_steps=1).resolved()
    run = build(tc)
    backend.matmul_backward = args.route
    steps = iter(range(10**6))
    return lambda: run.train_step(next(steps)), run


def hf_step(args, cfg, B, T):
    """(step, model): step() runs one transformers training step on the GPU (workload.torch_step):
    eager with SDPA attention (bf16: autocast over fp32 weights, minitrain's mixed precision), the
    loss in fp32, clip_grad_norm_ 1.0 and torch AdamW, as minitrain's step does."""
    import torch
    import transformers

    model = hf_model(transformers, cfg, attn_implementation="sdpa").cuda()
    return torch_step(torch, model, cfg, B, T, bf16=args.dtype == "bf16", clip=1.0), model


def part_step_minitrain(args, cfg, B, T):
    import cupy

    from minitrain import autograd, train

    t0 = time.perf_counter()
    step, run = minitrain_step(args, cfg, B, T)
    built = time.perf_counter() - t0
    event, elapsed = cupy_timer()
    ms = event_times(step, event, elapsed, args.repeats)
    phases = Phases(event, elapsed)
    run.model.loss = phases.wrap("forward", run.model.loss)
    autograd.Tensor.backward = phases.wrap("backward", autograd.Tensor.backward)
    train.global_grad_norm = phases.wrap("grad_norm", train.global_grad_norm)
    train.clip_grads = phases.wrap("clip", train.clip_grads)
    run.optimizer.step = phases.wrap("adamw", run.optimizer.step)
    parts = []
    for _ in range(3):
        a = event()
        step()
        b = event()
        phase = phases.totals()
        phase["rest"] = elapsed(a, b) - sum(phase.values())
        parts.append(phase)
    pool = cupy.get_default_memory_pool()
    return {"route": args.route, "build_s": built,
            "phases_ms": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
            "peak_gib": pool.total_bytes() / 2**30, "memory": "CuPy pool bytes held (its high-water mark)",
            "cupy": cupy.__version__}, ms


def part_step_hf(args, cfg, B, T):
    import torch
    import transformers

    step, model = hf_step(args, cfg, B, T)
    event, elapsed = torch_timer(torch)
    ms = event_times(step, event, elapsed, args.repeats)
    return {"attention": model.config._attn_implementation, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory": "torch max_memory_allocated", "torch": torch.__version__,
            "transformers": transformers.__version__}, ms


def part_step(args):
    from minitrain.config import preset

    cfg, B, T = preset(args.arch), args.batch_size, args.seq_len
    extra, ms = (part_step_minitrain if args.impl == "minitrain" else part_step_hf)(args, cfg, B, T)
    s = summary(ms)
    tokens_s = B * T / (s["median_ms"] / 1e3)
    tflops = flops_per_token(cfg, T) * tokens_s / 1e12
    record({"part": "step", "impl": args.impl, "dtype": args.dtype, "arch": args.arch, "batch": B, "seq": T, **s,
            "tokens_per_s": tokens_s, "tflops": tflops, "mfu_nominal": tflops / NOMINAL_BF16, **extra})


def part_attention(args):
    import cupy
    import torch

    from minitrain import backend
    from minitrain.gpu import attention
    from minitrain.gpu.runtime import launch

    backend.use("cuda")
    tensor_cores = attention._tensor_cores
    for hd, nH, nKV in ((64, 14, 2), (128, 7, 1)):  # Qwen2.5-0.5B's heads, and hd 128 at the same width
        B, T = args.batch_size, args.seq_len
        fwd_flops = 4 * B * T * T * nH * hd / 2
        shape = {"B": B, "T": T, "nH": nH, "nKV": nKV, "hd": hd}

        def rates(name, fwd, bwd, event, elapsed):
            f, b = (summary(event_times(fn, event, elapsed, args.repeats)) for fn in (fwd, bwd))
            record({"part": "attention", "impl": name, **shape, "fwd_ms": f["median_ms"], "bwd_ms": b["median_ms"],
                    "fwd_tflops": fwd_flops / f["median_ms"] / 1e9,
                    "bwd_tflops": 2.5 * fwd_flops / b["median_ms"] / 1e9})

        event, elapsed = cupy_timer()
        for name, dtype, mma in (("attention.cu fp32", "fp32", False), ("attention.cu bf16", "bf16", False),
                                 ("attention_mma.cu bf16", "bf16", True)):
            attention._tensor_cores = tensor_cores if mma else (lambda *arrays: False)  # the route timed
            cast = backend.to_bf16 if dtype == "bf16" else (lambda a: a)
            q, do = (cast(cupy.random.standard_normal((B, T, nH, hd), dtype=cupy.float32)) for _ in range(2))
            k, v = (cast(cupy.random.standard_normal((B, T, nKV, hd), dtype=cupy.float32)) for _ in range(2))
            o, dq, dk, dv = cupy.empty_like(q), cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v)
            lse, D = (cupy.empty((B, nH, T), dtype=cupy.float32) for _ in range(2))
            rates(f"minitrain {name}", lambda: attention.forward(launch, q, k, v, o, lse),
                  lambda: attention.backward(launch, q, k, v, o, do, lse, dq, dk, dv, D), event, elapsed)
        attention._tensor_cores = tensor_cores
        del q, k, v, o, do, dq, dk, dv, lse, D
        cupy.get_default_memory_pool().free_all_blocks()
        event, elapsed = torch_timer(torch)
        for dtype in (torch.float32, torch.bfloat16):
            tq = torch.randn(B, nH, T, hd, device="cuda", dtype=dtype, requires_grad=True)
            tk, tv = (torch.randn(B, nKV, T, hd, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))

            def fwd():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

            out = fwd()
            grad = torch.randn_like(out)
            rates(f"torch SDPA {str(dtype).split('.')[-1]}", fwd,
                  lambda: torch.autograd.grad(out, (tq, tk, tv), grad, retain_graph=True), event, elapsed)
        del tq, tk, tv, out, grad
        torch.cuda.empty_cache()


def part_table(args):
    rows = json.loads(JSON.read_text()) if JSON.exists() else []
    peak = next((r["tflops"] for r in rows if r["part"] == "peak" and r["dtype"] == "bf16"), None)
    for r in rows:
        if r["part"] == "peak":
            print(f"{r['device']}: {r['dtype']} matmul 8192^3 {r['tflops']:.0f} TFLOP/s (TF32 {r['tf32']})")
    print(f"{'step':<34} {'ms':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU nom.':>8} {'MFU meas.':>9} {'GiB':>6}")
    for r in (r for r in rows if r["part"] == "step"):
        name = f"{r['impl']} {r['dtype']}" + (f" ({r['route']})" if "route" in r else "")
        meas = f"{100 * r['tflops'] / peak:8.1f}%" if peak else "       -"
        print(f"{name:<34} {r['median_ms']:8.1f} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} "
              f"{100 * r['mfu_nominal']:7.1f}% {meas} {r['peak_gib']:6.1f}")
        if "phases_ms" in r:
            print("    phases ms: " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_ms"].items()))
    for r in (r for r in rows if r["part"] == "attention"):
        print(f"attention hd {r.get('hd', 64):<3} {r['impl']:<32} fwd {r['fwd_tflops']:6.1f} TFLOP/s ({r['fwd_ms']:.2f} ms)  "
              f"bwd {r['bwd_tflops']:6.1f} TFLOP/s ({r['bwd_ms']:.2f} ms)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["peak", "step", "attention", "table"])
    parser.add_argument("impl", nargs="?", choices=["minitrain", "hf"])
    parser.add_argument("dtype", nargs="?", choices=["bf16", "fp32"])
    parser.add_argument("--route", choices=["cublas", "kernels"], default="cublas")
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    if args.part == "step" and not (args.impl and args.dtype):
        parser.error("step needs IMPL (minitrain or hf) and DTYPE (bf16 or fp32)")
    args.repeats = args.repeats or (10 if args.part == "step" else 20)
    globals()[f"part_{args.part}"](args)


if __name__ == "__main__":
    main()

"""Where a training step's GPU time goes, kernel by kernel (tools/gpu_check.sh runs it on a lent GPU).

    python3 tools/gpu_profile.py minitrain|hf [DTYPE] [--steps 2]

The step is tools/bench_gpu.py's (Qwen2.5-0.5B, 8 x 1024 by default): minitrain's Run.train_step,
or transformers eager with SDPA. After three warm-up steps, torch's profiler (Kineto over CUPTI)
records every CUDA kernel and copy the process starts -- CuPy's, cuBLAS's and our RawModule
kernels as well as torch's -- over --steps steps. Printed per step: the kernels launched, the
device-busy time against the step's time (the difference is the GPU waiting for the host), time
by kind of kernel, the copies by direction (a device-to-host copy is a step waiting on the device),
and the kernels that take the most time. The summary is appended to $BENCH_JSON as a row.
"""

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import hf_step, minitrain_step, record  # noqa: E402

OURS = ("attention_", "rmsnorm_", "rope_", "swiglu_", "cross_entropy_", "adamw_", "sum_squares_", "matmul_",
        "bias_grad_", "embedding_", "cast_", "add_bf16", "add_bias_bf16")


def kind(name):
    """The kind of a kernel, from its name."""
    low = name.lower()
    if low.startswith(("memcpy", "memset")):
        return name  # e.g. "Memcpy HtoD (Pinned -> Device)"
    if name.startswith(OURS):
        return "minitrain kernels (kernels/*.cu): " + ("cast" if name == "add_bf16" else name.split("_")[0])
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention")):  # before GEMM: cuDNN's names hold sm90_
        return "attention (torch, cuDNN)"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_")):
        return "GEMM (cuBLAS)"
    if name.startswith("cupy_"):
        return "CuPy generated elementwise/reduction"
    return "other (torch, cub, ...)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("impl", choices=["minitrain", "hf"])
    parser.add_argument("dtype", nargs="?", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--route", choices=["cublas", "kernels"], default="cublas")
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from minitrain.config import preset

    cfg = preset(args.arch)
    step = (minitrain_step if args.impl == "minitrain" else hf_step)(args, cfg, args.batch_size, args.seq_len)[0]
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / args.steps
    by_name, by_kind, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us() / args.steps
        by_name[e.name] += us
        by_kind[kind(e.name)] += us
        counts[kind(e.name)] += 1 / args.steps
        counts["(all)"] += 1 / args.steps
    busy = sum(us for k, us in by_kind.items() if not k.lower().startswith(("memcpy", "memset"))) / 1e3
    label = f"{args.impl} {args.dtype}"
    print(f"{label}: step {step_ms:.1f} ms; kernels and copies per step {counts['(all)']:.0f}; "
          f"device busy {busy:.1f} ms ({100 * busy / step_ms:.0f}% of the step)")
    print(f"{'per step, by kind':<62} {'ms':>8} {'count':>7}")
    for k, us in by_kind.most_common():
        print(f"  {k:<60} {us / 1e3:8.2f} {counts[k]:7.0f}")
    print(f"the {args.top} kernels with the most time per step:")
    for name, us in by_name.most_common(args.top):
        print(f"  {us / 1e3:8.2f} ms  {name[:110]}")
    record({"part": "profile", "impl": args.impl, "dtype": args.dtype, "step_ms": step_ms, "busy_ms": busy,
            "launches_per_step": counts["(all)"],
            "by_kind_ms": {k: us / 1e3 for k, us in by_kind.most_common()},
            "count_by_kind": {k: counts[k] for k in by_kind},
            "top_ms": {name[:160]: us / 1e3 for name, us in by_name.most_common(args.top)}})


if __name__ == "__main__":
    main()

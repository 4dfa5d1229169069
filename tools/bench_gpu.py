"""GPU benchmark, run by tools/gpu_check.sh on a lent GPU machine (CuPy, torch, transformers there).

1. Peak: an 8192^3 bf16 matmul in torch, measured here and now: the denominator of every MFU.
2. A Qwen2.5-0.5B training step (AdamW) at seq 1024: minitrain on the GPU (CuPy + kernels/, fp32,
   and bf16 mixed precision: fp32 master weights, bf16 activations, cuBLAS GemmEx matmuls) vs
   transformers + PyTorch eager, fp32 and bf16 autocast, same config and batch. tokens/s and MFU, with
   FLOPs/token = 6 N + 12 L H T (N: parameters taking part in matmuls, the lm_head included,
   the embedding lookup not; reference.md section 5).
3. The attention kernels vs torch.nn.functional.scaled_dot_product_attention (causal, GQA 7:1,
   hd 64): TFLOP/s forward and backward, FLOPs = 4 B T^2 nH hd / 2 forward, 2.5x that backward.
Prints a table last.
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workload import flops_per_token, hf_model, minitrain_step, torch_step  # noqa: E402


def timed(fn, sync, repeats):
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_bf16(torch):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ a, torch.cuda.synchronize, 5) / 1e12


def minitrain_time(cfg, B, T, repeats, precision):
    import cupy

    from minitrain import backend

    backend.use("cuda")
    backend.set_dtype(precision)
    step, _ = minitrain_step(cfg, B, T)
    t = timed(step, cupy.cuda.Device().synchronize, repeats)
    backend.use("cpu")
    backend.set_dtype("fp32")
    return t


def torch_time(torch, transformers, cfg, B, T, repeats, bf16):
    step = torch_step(torch, hf_model(transformers, cfg).cuda(), cfg, B, T, bf16)
    return timed(step, torch.cuda.synchronize, repeats)


def attention_rates(torch, B, T, nH, nKV, hd):
    import cupy

    from minitrain.gpu import attention
    from minitrain.gpu.runtime import launch

    q = cupy.random.standard_normal((B, T, nH, hd), dtype=cupy.float32)
    k, v = (cupy.random.standard_normal((B, T, nKV, hd), dtype=cupy.float32) for _ in range(2))
    o, do = cupy.empty_like(q), cupy.random.standard_normal(q.shape, dtype=cupy.float32)
    lse, D = (cupy.empty((B, nH, T), dtype=cupy.float32) for _ in range(2))
    dq, dk, dv = cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v)
    sync = cupy.cuda.Device().synchronize
    fwd_flops = 4 * B * T * T * nH * hd / 2
    ours_f = timed(lambda: attention.forward(launch, q, k, v, o, lse), sync, 5)
    ours_b = timed(lambda: attention.backward(launch, q, k, v, o, do, lse, dq, dk, dv, D), sync, 5)
    rows = [("minitrain attention.cu fp32", fwd_flops / ours_f / 1e12, 2.5 * fwd_flops / ours_b / 1e12)]
    for dtype in (torch.float32, torch.bfloat16):
        tq = torch.randn(B, nH, T, hd, device="cuda", dtype=dtype, requires_grad=True)
        tk, tv = (torch.randn(B, nKV, T, hd, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        fn = torch.nn.functional.scaled_dot_product_attention

        def fwd():
            return fn(tq, tk, tv, is_causal=True, enable_gqa=True)

        out = fwd()
        grad = torch.randn_like(out)
        f = timed(fwd, torch.cuda.synchronize, 5)
        b = timed(lambda: torch.autograd.grad(fwd(), (tq, tk, tv), grad), torch.cuda.synchronize, 5) - f
        rows.append((f"torch SDPA {str(dtype).split('.')[-1]}", fwd_flops / f / 1e12, 2.5 * fwd_flops / b / 1e12))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers

    from minitrain.config import preset

    cfg, B, T = preset("qwen2.5-0.5b"), args.batch_size, args.seq_len
    peak = peak_bf16(torch)
    work = flops_per_token(cfg, T) * B * T
    steps = [("minitrain (CuPy + kernels, fp32)", minitrain_time(cfg, B, T, args.repeats, "fp32")),
             ("minitrain (CuPy + kernels, bf16 mixed)", minitrain_time(cfg, B, T, args.repeats, "bf16")),
             ("HF + PyTorch eager, fp32", torch_time(torch, transformers, cfg, B, T, args.repeats, bf16=False)),
             ("HF + PyTorch eager, bf16 autocast", torch_time(torch, transformers, cfg, B, T, args.repeats, bf16=True))]
    attention = attention_rates(torch, B, T, 14, 2, 64)
    print(f"\n{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.0f} TFLOP/s (8192^3, measured now)")
    print(f"Qwen2.5-0.5B training step, batch {B} x seq {T}, AdamW; FLOPs/token = 6N + 12LHT = "
          f"{flops_per_token(cfg, T) / 1e9:.2f} GFLOP")
    print(f"{'':<40} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name, t in steps:
        print(f"{name:<40} {t:8.3f} {B * T / t:10.0f} {work / t / 1e12:8.1f} {100 * work / t / 1e12 / peak:5.1f}%")
    print(f"attention, causal GQA 7:1, B {B}, T {T}, nH 14, hd 64:   fwd TFLOP/s   bwd TFLOP/s")
    for name, f, b in attention:
        print(f"  {name:<34} {f:12.1f} {b:13.1f}")


if __name__ == "__main__":
    main()

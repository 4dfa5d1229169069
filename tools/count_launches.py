"""Count what one training step launches on the GPU, and the bytes each launch must move, on the CPU.

    python tools/count_launches.py                       # Qwen2.5-0.5B, bf16, batch 8 x 1024
    python tools/count_launches.py --dtype fp32 --batch-size 4 --sites 20

The step is `Run.train_step` on the GPU path (backend.xp is not NumPy, every op takes its kernel
route) with CuPy stood in for by tests/cupy_standin.py in its count-only mode: each launch CuPy
would make (elementwise kernels, reductions, copies, fills, gathers, uploads), each kernel of
kernels/ and each cuBLAS call is recorded with its array operands' bytes, and nothing is computed
(so a full-size step is counted in seconds, at full width and batch). Bytes are every operand's
size once: the traffic a launch cannot avoid (a GEMM's tiles read again, or attention's K and V
per query tile, are not counted), a lower bound to set beside the measured time of each part.

FLOPs: 2 M K N for each GEMM (from its shape), and for attention 4 B T^2 nH hd / 2 forward (the
causal half) and 2.5x that backward. The "lower bound" column is each part at the H200's nominal
rates, max(bytes / 4.8 TB/s, FLOPs / 989 TFLOP/s): no part can run faster; how far above it each
part runs is what a GPU run measures (tools/bench_gpu.py, tools/gpu_profile.py).

The model is counted with 1 and with 2 layers; every layer launches the same, so the step of the
preset's depth is the 1-layer step plus (layers - 1) times the difference. The second step is
counted (the first one's one-time work, such as allocating the optimizer's state, excluded).
"""

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import cupy_standin  # noqa: E402

from minitrain import backend, setup_run  # noqa: E402
from minitrain.config import preset  # noqa: E402
from minitrain.gpu import gemm  # noqa: E402
from minitrain.model import Model  # noqa: E402

PARTS = [  # (part, test on (kind, name, where)), the first that holds
    ("attention", lambda k, n, w: n.startswith(("attention.", "attention_mma."))),
    ("GEMMs: layers", lambda k, n, w: k == "gemm" and "cross_entropy" not in w),
    ("GEMMs: head", lambda k, n, w: k == "gemm"),
    ("head: softmax, loss", lambda k, n, w: n.startswith("cross_entropy.") or "cross_entropy" in w),
    ("bf16 casts and adds", lambda k, n, w: n.startswith("cast.")),
    ("rmsnorm, rope, swiglu, embedding", lambda k, n, w: k == "kernel" and n.split(".")[0] in
     ("rmsnorm", "rope", "swiglu", "embedding")),
    ("optimizer, grad norm", lambda k, n, w: n.startswith(("adamw.", "grad_norm.")) or w.startswith("optim")),
    ("other CuPy", lambda k, n, w: True),
]


def part(kind, name, where):
    return next(p for p, test in PARTS if test(kind, name, where))


def count_step(model_config, layers, dtype, batch_size, seq_len):
    """The launches of the second training step of a model (a ModelConfig) cut to `layers` layers:
    [(kind, name, bytes, where)]."""
    config = dataclasses.replace(model_config, num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.bin"
        numpy.random.default_rng(0).integers(0, config.vocab_size, 4 * batch_size * (seq_len + 1),
                                             dtype="<u4").tofile(tokens)
        options = dict(arch="counted", data=str(tokens), out=str(Path(tmp) / "run"), seq_len=seq_len,
                       batch_size=batch_size, steps=4, val_windows=1, eval_every=1000, dtype=dtype, device="cuda")
        xp = cupy_standin.module()

        def gpu(name):
            backend.xp, backend.launch = xp, cupy_standin.counting(None)
            return "cuda"

        saved = setup_run.use_device, setup_run._model, gemm._gemm_ex, backend.xp, backend.launch
        setup_run.use_device, gemm._gemm_ex = gpu, cupy_standin.gemm_ex
        setup_run._model = lambda cfg, state, arrays: Model.from_scratch(config, seed=0)
        cupy_standin.COUNT_ONLY = True
        try:
            run = setup_run.build(*setup_run.configure(options), log=open("/dev/null", "w"))
            run.train_step(0)
            cupy_standin.LAUNCHES.clear()
            run.train_step(1)
            return list(cupy_standin.LAUNCHES)
        finally:
            cupy_standin.COUNT_ONLY = False
            setup_run.use_device, setup_run._model, gemm._gemm_ex, backend.xp, backend.launch = saved
            backend.set_dtype("fp32")


BANDWIDTH, PEAK = 4.8e12, 989.4e12  # H200 SXM nominal: HBM3e bytes/s, dense bf16 FLOP/s


def flops(kind, name):
    """2 M K N for a GEMM named 'gemm MxKxN' (0 for anything else)."""
    if kind != "gemm" or not name.startswith("gemm "):
        return 0
    m, k, n = map(int, name.split()[1].split("x"))
    return 2 * m * k * n


def totals(launches, key):
    out = collections.defaultdict(lambda: [0, 0, 0])
    for kind, name, nbytes, where in launches:
        entry = out[key(kind, name, where)]
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += flops(kind, name)
    return out


def extrapolate(one, two, layers):
    """Per key: the 1-layer count plus (layers - 1) times the per-layer difference."""
    return {k: [one.get(k, [0, 0, 0])[i] + (layers - 1) * (two.get(k, [0, 0, 0])[i] - one.get(k, [0, 0, 0])[i])
                for i in (0, 1, 2)] for k in {*one, *two}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--sites", type=int, default=12, help="the busiest call sites of 'other CuPy' to list")
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args()
    c = preset(args.arch)
    layers = c.num_hidden_layers
    one, two = (count_step(c, n, args.dtype, args.batch_size, args.seq_len) for n in (1, 2))
    by_part = extrapolate(totals(one, part), totals(two, part), layers)
    by_site = extrapolate(totals(one, lambda k, n, w: (part(k, n, w), k, n, w)),
                          totals(two, lambda k, n, w: (part(k, n, w), k, n, w)), layers)
    if "attention" in by_part:  # forward and backward of every layer
        by_part["attention"][2] = layers * 3.5 * 4 * args.batch_size * args.seq_len ** 2 * c.num_attention_heads \
            * c.head_dim / 2
    print(f"{args.arch} ({layers} layers), {args.dtype}, batch {args.batch_size} x {args.seq_len}: one training step")
    print(f"{'part':36} {'launches':>9} {'GB moved':>9} {'TFLOP':>7} {'lower bound ms':>15}")
    for p, _ in PARTS:
        n, b, f = by_part.get(p, [0, 0, 0])
        print(f"{p:36} {n:9d} {b / 1e9:9.2f} {f / 1e12:7.2f} {1e3 * max(b / BANDWIDTH, f / PEAK):15.2f}")
    n_all, b_all, f_all = (sum(v[i] for v in by_part.values()) for i in (0, 1, 2))
    bound = sum(1e3 * max(v[1] / BANDWIDTH, v[2] / PEAK) for v in by_part.values())
    print(f"{'total':36} {n_all:9d} {b_all / 1e9:9.2f} {f_all / 1e12:7.2f} {bound:15.2f}")
    busiest = sorted(((v, k) for k, v in by_site.items() if k[0] == "other CuPy" and v[0]), reverse=True)
    print(f"\nthe busiest call sites of 'other CuPy' (launches, GB, what, where):")
    for (n, b, _), (_, kind, name, where) in busiest[:args.sites]:
        print(f"{n:7d} {b / 1e9:7.2f}  {kind} {name:18} {where}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "arch": args.arch, "dtype": args.dtype, "batch": args.batch_size, "seq_len": args.seq_len,
            "parts": {p: {"launches": v[0], "bytes": v[1], "flops": v[2]} for p, v in by_part.items()},
            "sites": [{"part": k[0], "kind": k[1], "name": k[2], "where": k[3], "launches": v[0], "bytes": v[1]}
                      for k, v in sorted(by_site.items(), key=lambda kv: -kv[1][0]) if v[0]]}, indent=1))


if __name__ == "__main__":
    main()

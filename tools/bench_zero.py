"""Data parallel memory and speed, measured: `mpiexec -n N minitrain pretrain` with and without
ZeRO-1, side by side in one run, on the same windows (N x grad-accum fixed, so every run makes
the same steps and must write the same final.apr: the table says whether it did).

    python tools/bench_zero.py                       # the real SmolLM2-135M (tools/fetch_smollm2.py)
    python tools/bench_zero.py --arch tiny-llama --ranks 1 2

Per run, from its --json report: the optimizer state each rank holds (AdamW's m and v, bytes
counted by the optimizer), the largest peak RSS of its ranks (getrusage: everything the process
ever held, the model load included), and the global tokens/s. On a machine with fewer cores
than ranks the ranks share the cores, so tokens/s is not a scaling figure there.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="a preset trained from scratch instead of fine-tuning SmolLM2-135M")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--micro-batches", type=int, default=4, help="per step, all ranks (default 4)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("bench_zero: no mpiexec: pip install -e '.[dist]'")
    if args.arch:
        from minitrain.config import preset

        model, vocab = ["--arch", args.arch, "--mode", "from-scratch"], preset(args.arch).vocab_size
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from fetch_smollm2 import fetch

        model, vocab = ["--init", str(fetch())], 49152  # SmolLM2's vocabulary
    import numpy

    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.bin"
        windows = args.micro_batches * args.steps + 4
        numpy.random.default_rng(0).integers(0, vocab, windows * (args.seq_len + 1)).astype("<u4").tofile(data)
        for ranks in args.ranks:
            if args.micro_batches % ranks:
                sys.exit(f"bench_zero: --micro-batches {args.micro_batches} is not a multiple of {ranks} ranks")
            for zero in (0, 1):
                out = Path(tmp) / f"n{ranks}-z{zero}"
                launch = [mpiexec, "-n", str(ranks)] if ranks > 1 else []
                run = subprocess.run([*launch, sys.executable, "-m", "minitrain", "pretrain", *model, "--data", str(data),
                                      "--seq-len", str(args.seq_len), "--batch-size", "1",
                                      "--grad-accum", str(args.micro_batches // ranks), "--steps", str(args.steps),
                                      "--val-windows", "2", "--lr", "1e-4", "--warmup-steps", "0", "--zero", str(zero),
                                      "--out", str(out), "--json"], capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"bench_zero: {ranks} rank(s), --zero {zero} failed:\n{run.stderr}")
                report = json.loads(run.stdout.strip().splitlines()[-1])
                digest = hashlib.sha256((out / "final.apr").read_bytes()).hexdigest()
                reference = reference or digest
                memory = report["memory_per_rank"]
                rows.append((f"{ranks} x {args.micro_batches // ranks}", zero,
                             max(m["optimizer_state_bytes"] for m in memory) / 1e6,
                             max(m["peak_rss_bytes"] for m in memory) / 1e6, report["tokens_per_sec"],
                             "same bytes" if digest == reference else "DIFFERENT"))
                print(f"  {rows[-1][0]} --zero {zero}: done", file=sys.stderr, flush=True)
    print(f"{report['arch']}, {report['params']:,} parameters, {args.micro_batches} micro-batches of 1 x "
          f"{args.seq_len} tokens per step, {args.steps} steps\n")
    print("| ranks x grad-accum | --zero | optimizer state per rank (MB) | peak RSS per rank, max (MB) "
          "| tokens/s | final.apr vs the first run |")
    print("|---|---|---|---|---|---|")
    for split, zero, state, rss, rate, same in rows:
        print(f"| {split} | {zero} | {state:,.1f} | {rss:,.0f} | {rate:,.0f} | {same} |")
    if any(row[-1] != "same bytes" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

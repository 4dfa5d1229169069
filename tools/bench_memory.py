"""The preflight's memory estimate against the peak RSS a run really reaches, on the presets and
SmolLM2-135M.

    python tools/bench_memory.py [--only NAME ...]

Each case is `minitrain pretrain --steps 2` in a fresh process (the second step is the first
with AdamW's moments in memory through a whole step), from scratch on a preset or fine-tuning
SmolLM2-135M-Instruct's GGUF (tools/fetch_smollm2.py), on random token ids. The estimate is the
one the run printed before its first step (run.json's memory_estimate.peak); the measured peak
is the kernel's, from wait4's ru_maxrss of that process. Prints a Markdown table; exits 1 if any
estimate is more than 20% off the measured peak.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy

from fetch_smollm2 import fetch

TOLERANCE = 0.20
CASES = {  # name -> the pretrain options that differ from the defaults below
    "tiny-llama 8 x 256": ["--arch", "tiny-llama", "--batch-size", "8", "--seq-len", "256"],
    "tiny-qwen2 8 x 256": ["--arch", "tiny-qwen2", "--batch-size", "8", "--seq-len", "256"],
    "llama-370m 4 x 512": ["--arch", "llama-370m", "--batch-size", "4", "--seq-len", "512"],
    "qwen2.5-0.5b 1 x 1024": ["--arch", "qwen2.5-0.5b", "--batch-size", "1", "--seq-len", "1024"],
    "qwen2.5-0.5b 4 x 1024": ["--arch", "qwen2.5-0.5b", "--batch-size", "4", "--seq-len", "1024"],
    "SmolLM2-135M 4 x 512": ["--init", "SMOLLM2", "--batch-size", "4", "--seq-len", "512"],
    "SmolLM2-135M LoRA 8 x 512": ["--init", "SMOLLM2", "--lora-rank", "16", "--batch-size", "8", "--seq-len", "512"],
    "SmolLM2-135M grad-accum 2 x 512 x 2": ["--init", "SMOLLM2", "--batch-size", "2", "--seq-len", "512",
                                            "--grad-accum", "2"],
}


def run(options, tmp):
    """(estimated peak, measured peak RSS, seconds) of one pretrain process."""
    out = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [sys.executable, "-m", "minitrain", "pretrain", "--data", str(Path(tmp) / "tokens.bin"), "--out", str(out),
           "--steps", "2", "--val-windows", "0", "--eval-every", "0", "--warmup-steps", "1", "--json", *options]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    err = child.stderr.read()
    if status:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    estimate = json.loads((out / "run.json").read_text())["memory_estimate"]
    return estimate, usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="cases whose name starts with one of these")
    args = parser.parse_args()
    smollm2 = str(fetch())
    with tempfile.TemporaryDirectory() as tmp:
        numpy.random.default_rng(0).integers(0, 8192, 200_000).astype("<u4").tofile(Path(tmp) / "tokens.bin")
        print("| run | estimated peak | measured peak RSS | estimate / measured | activations (estimated) |")
        print("|---|---:|---:|---:|---:|")
        worst = 0.0
        for name, options in CASES.items():
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            est, measured = run([smollm2 if o == "SMOLLM2" else o for o in options], tmp)
            ratio = est["peak"] / measured
            worst = max(worst, abs(ratio - 1))
            print(f"| {name} | {est['peak'] / 1e9:.2f} GB | {measured / 1e9:.2f} GB | {ratio:.3f} | "
                  f"{est['activations'] / 1e9:.2f} GB |", flush=True)
    print(f"\nlargest difference: {100 * worst:.1f}% (limit {100 * TOLERANCE:.0f}%)")
    return 1 if worst > TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())

"""The bytes a fixed set of small runs writes, as sha256 digests: the check that a change to the
code's structure changed no result. Run it on the tree before and after, and compare:

    PYTHONPATH=/path/to/old/tree python tools/run_fingerprints.py --work /tmp/fp-old > old.json
    python tools/run_fingerprints.py --work /tmp/fp-new > new.json
    diff old.json new.json

The runs (all on the CPU): the embedded demo (`minitrain pretrain`, about 5 minutes); a
from-scratch run with grad-accum, shuffled windows and checkpoints (--json); LoRA with dropout on
three targets, from that run's final.apr; an SFT run on conversations tokenized with --chat
--pack (masks and positions); distillation from the demo's model; --recompute layer; and a
2-rank run under mpiexec with --zero 1. Every file each run writes is hashed; what measures time
or memory is taken out first: metrics.jsonl's tokens_per_sec and wall_s, run.json's and the
report's measured memory, the manifest's elapsed_seconds, the progress lines' rates and ETA.
The progress and report lines (stderr, stdout) are hashed too.
"""

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|endoftext|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TIMED = ("tokens_per_sec", "wall_s", "elapsed_seconds", "seconds", "peak_rss_bytes", "runtime", "peak")


def untimed(value):
    """A JSON value without the keys that measure time or memory, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def text_digest(text):
    """The lines without what depends on the clock: rates, ETAs and measured memory written as X;
    the progress lines a run prints when 10 s have passed (those without val_loss) and the report's
    timings left out."""
    text = re.sub(r"[\d,.]+ (tok/s|tokens/s)", r"X \1", text)
    text = re.sub(r"ETA \S+", "ETA X", text)
    text = re.sub(r"(?m)^(memory per rank|disk:).*$", r"\1 X", text)
    lines = [line for line in text.splitlines() if not (line.startswith("step ") and "val_loss" not in line)
             and not line.startswith(tuple(f"{key}: " for key in TIMED + ("memory_per_rank",)))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def file_digest(path):
    if path.name.endswith((".jsonl",)):
        body = "\n".join(json.dumps(untimed(json.loads(line))) for line in path.read_text().splitlines())
        return hashlib.sha256(body.encode()).hexdigest()
    if path.suffix == ".json":
        return hashlib.sha256(json.dumps(untimed(json.loads(path.read_text()))).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root):
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def minitrain(cwd, *args, ranks=1):
    launch = [shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec", "-n", str(ranks)] \
        if ranks > 1 else []
    done = subprocess.run([*launch, sys.executable, "-m", "minitrain", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)
    logs = Path(cwd) / "logs"
    logs.mkdir(exist_ok=True)
    name = f"{len(list(logs.glob('*.stderr'))):02d}-{args[0]}"
    (logs / f"{name}.stdout").write_text(done.stdout)
    (logs / f"{name}.stderr").write_text(done.stderr)
    if done.returncode != 0:
        sys.exit(f"minitrain {' '.join(map(str, args))}: exit {done.returncode}\n{done.stderr[-3000:]}")
    report = done.stdout.strip().splitlines()[-1] if "--json" in args else done.stdout
    if "--json" in args:
        report = json.dumps(untimed(json.loads(report)))
    return {"stdout": text_digest(report), "stderr": text_digest(done.stderr)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="An empty directory for the runs (made if needed).")
    parser.add_argument("--skip-demo", action="store_true", help="Leave out the demo (and the runs that need it).")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = {}
    if not args.skip_demo:
        result["demo"] = minitrain(work, "pretrain")
        result["demo"]["files"] = tree_digests(work / "runs" / "demo")
    from minitrain.demo import prepare

    tokenizer, tokens = prepare(open("/dev/null", "w"))
    common = ["--data", tokens, "--seq-len", 32, "--batch-size", 2, "--val-windows", 4, "--eval-every", 2,
              "--warmup-steps", 1, "--json"]
    runs = {
        "scratch": ["pretrain", "--arch", "tiny-llama", *common, "--steps", 4, "--grad-accum", 2, "--data-order",
                    "shuffle", "--seed", 5, "--save-every", 2, "--tokenizer", tokenizer, "--out", "scratch"],
        "recompute": ["pretrain", "--arch", "tiny-qwen2", *common, "--steps", 3, "--recompute", "layer",
                      "--out", "recompute"],
        "lora": ["pretrain", "--init", "scratch/final.apr", *common, "--steps", 4, "--lora-rank", 4, "--lora-alpha",
                 8, "--lora-dropout", 0.1, "--lora-targets", "q,v,down", "--save-every", 2, "--out", "lora"],
    }
    if not args.skip_demo:
        runs["distill"] = ["pretrain", "--init", "scratch/final.apr", *common, "--steps", 3,
                           "--teacher", "runs/demo/final.apr", "--distill-weight", 0.3, "--out", "distill"]
    for name, command in runs.items():
        result[name] = minitrain(work, *command)
        result[name]["files"] = tree_digests(work / name)
    convs = work / "conversations.jsonl"
    convs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i} " * (i % 5 + 1)},
                                                      {"role": "assistant", "content": f"{i} " * (i % 7 + 2)}]}) + "\n"
                             for i in range(40)))
    (work / "chatml.jinja").write_text(CHATML)
    result["sft_tokenize"] = minitrain(work, "tokenize", "--tokenizer", tokenizer, "--chat", "--chat-template",
                                       "chatml.jinja", "--pack", "--seq-len", 31, "--out", "sft-data", convs.name)
    result["sft_tokenize"]["files"] = tree_digests(work / "sft-data")
    result["sft"] = minitrain(work, "pretrain", "--init", "scratch/final.apr", "--data", "sft-data", "--seq-len", 31,
                              "--batch-size", 2, "--val-windows", 2, "--steps", 3, "--chat-template", "chatml.jinja",
                              "--json", "--out", "sft")
    result["sft"]["files"] = tree_digests(work / "sft")
    result["two_ranks"] = minitrain(work, "pretrain", "--arch", "tiny-llama", *common, "--steps", 3, "--zero", 1,
                                    "--out", "two-ranks", ranks=2)
    result["two_ranks"]["files"] = tree_digests(work / "two-ranks")
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

"""`minitrain tokenize` against the usual route -- Hugging Face datasets' load_dataset + batched
`map` with the same `tokenizers` tokenizer -- on the same files, side by side; and minitrain's
peak memory on a corpus 10x larger (it streams: the peak should not grow with the corpus).

    pip install 'minitrain[bench]'      # datasets
    python tools/bench_tokenize.py [--base-mb 8] [--scale 10] [--rounds 2]

The corpus is real code: the Python standard library's .py files (tools/stdlib_corpus.py), up
to --base-mb MB of text; the large one is the same records --scale times over. Each is written as
one gzip-compressed JSON Lines file (.jsonl.gz) and one Parquet file (row groups of 100
records, pyarrow's default compression). The tokenizer is
SmolLM2-135M's (tools/fetch_smollm2.py), saved as a tokenizer.json.

Each run is a fresh process, timed from outside (wall clock, from start to exit) with its peak
RSS from the kernel (wait4's ru_maxrss):
    minitrain   minitrain tokenize --tokenizer T --out DIR FILE   (shards + manifest on disk)
    datasets    load_dataset("json" or "parquet", data_files=FILE, cache_dir=a fresh one), then
                map(encode_batch(add_special_tokens=False), batched=True, batch_size=1000,
                remove_columns=every column): the ids end in datasets' Arrow cache on disk
Both encode with the same Rust tokenizer, which spreads each batch over every core (its
default; the same in both). Rounds alternate the two; the best round of each is kept. Both
routes must count the same documents and tokens (minitrain's stream adds one EOS between
documents), or the benchmark stops.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stdlib_corpus import records, write

DATASETS_CHILD = """
import json, sys
from datasets import load_dataset
from tokenizers import Tokenizer
path, tok, cache = sys.argv[1:4]
tokenizer = Tokenizer.from_file(tok)
data = load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train",
                    cache_dir=cache)
ids = data.map(lambda b: {"input_ids": [e.ids for e in tokenizer.encode_batch(b["content"], add_special_tokens=False)]},
               batched=True, batch_size=1000, remove_columns=data.column_names)
print(json.dumps({"documents": len(ids), "tokens": sum(len(x) for x in ids["input_ids"])}))
"""


def name(path):
    """small.jsonl.gz, large.parquet: which corpus, which container."""
    return f"{path.parent.parent.name}.{path.name.split('.', 1)[1]}"


# Runs argv[1:] and prints its peak RSS (KB). A process's peak RSS includes the memory image it
# started from (Linux keeps the high-water mark across exec), so the command is started from
# this small launcher, not from the benchmark's own large process.
LAUNCHER = "import os, sys; pid = os.fork() or os.execvp(sys.argv[1], sys.argv[1:]); _, status, usage = " \
           "os.wait4(pid, 0); print(usage.ru_maxrss, file=sys.stderr); sys.exit(os.waitstatus_to_exitcode(status))"


def measured(command):
    """(seconds, peak RSS in MB, last stdout line) of a command in a fresh process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", LAUNCHER, *command], stdout=out, stderr=err).returncode
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        errors = err.read()
        if code:
            raise SystemExit(f"{command[:4]} failed:\n{errors}")
        return seconds, int(errors.strip().splitlines()[-1]) / 1024, out.read().strip().splitlines()[-1]


def run(route, path, tokenizer, scratch):
    """One run of a route on one file -> {"seconds", "rss_mb", "documents", "tokens"}."""
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        if route == "minitrain":
            seconds, rss, line = measured([sys.executable, "-m", "minitrain", "tokenize", "--tokenizer", str(tokenizer),
                                           "--out", str(work / "out"), "--json", str(path)])
            counts = json.loads(line)
            counts["tokens"] -= counts["documents"] - 1  # the EOS ids between documents
        else:
            seconds, rss, line = measured([sys.executable, "-c", DATASETS_CHILD, str(path), str(tokenizer),
                                           str(work / "cache")])
            counts = json.loads(line)
        return {"seconds": seconds, "rss_mb": rss, "documents": counts["documents"], "tokens": counts["tokens"]}
    finally:
        shutil.rmtree(work)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mb", type=float, default=8.0, help="MB of code in the small corpus")
    parser.add_argument("--scale", type=int, default=10, help="the large corpus is the small one this many times")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from fetch_smollm2 import fetch

    from minitrain.formats.sources import load_tokenizer

    scratch = Path(tempfile.mkdtemp(prefix="bench_tokenize-"))
    try:
        rows = records(args.base_mb)
        tokenizer = scratch / "tokenizer.json"
        load_tokenizer(fetch()).save(str(tokenizer))
        small = [write(scratch / "small", rows, fmt)[0] for fmt in ("jsonl.gz", "parquet")]
        large = [write(scratch / "large", rows * args.scale, fmt)[0] for fmt in ("jsonl.gz", "parquet")]
        text_mb = sum(len(r["content"].encode()) for r in rows) / 1e6
        print(f"corpus: {len(rows):,} standard-library files, {text_mb:.1f} MB of code (x{args.scale}: "
              f"{text_mb * args.scale:.0f} MB); tokenizer: SmolLM2-135M's; {os.cpu_count()} cores; Python "
              f"{sys.version.split()[0]}")
        results = {}
        for path in small + large:
            for _ in range(args.rounds):
                for route in ("minitrain", "datasets"):
                    r = run(route, path, tokenizer, scratch)
                    best = results.get((name(path), route))
                    if best is None or r["seconds"] < best["seconds"]:
                        results[(name(path), route)] = r
            ours, theirs = results[(name(path), "minitrain")], results[(name(path), "datasets")]
            if (ours["documents"], ours["tokens"]) != (theirs["documents"], theirs["tokens"]):
                raise SystemExit(f"{name(path)}: the routes disagree: minitrain {ours}, datasets {theirs}")
        print("\n| file | MB stored | documents | tokens | minitrain s | datasets s | minitrain tokens/s | "
              "datasets tokens/s | speed ratio | minitrain peak RSS MB | datasets peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for path in small + large:
            ours, theirs = results[(name(path), "minitrain")], results[(name(path), "datasets")]
            print(f"| {name(path)} | {path.stat().st_size / 1e6:.1f} | {ours['documents']:,} | {ours['tokens']:,} | "
                  f"{ours['seconds']:.2f} | {theirs['seconds']:.2f} | {ours['tokens'] / ours['seconds']:,.0f} | "
                  f"{theirs['tokens'] / theirs['seconds']:,.0f} | {theirs['seconds'] / ours['seconds']:.2f}x | "
                  f"{ours['rss_mb']:,.0f} | {theirs['rss_mb']:,.0f} |")
        for fmt in (0, 1):
            a, b = results[(name(small[fmt]), "minitrain")], results[(name(large[fmt]), "minitrain")]
            print(f"\nminitrain's peak RSS, {name(large[fmt])} vs {name(small[fmt])} ({args.scale}x the data): "
                  f"{b['rss_mb']:,.0f} vs {a['rss_mb']:,.0f} MB, {100 * (b['rss_mb'] / a['rss_mb'] - 1):+.1f}%")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()

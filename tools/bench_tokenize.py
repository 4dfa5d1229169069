"""`minitrain tokenize` against the usual route -- Hugging Face datasets' load_dataset + batched
`map` with the same `tokenizers` tokenizer -- on the same files, side by side; and minitrain's
peak memory on a corpus 10x larger (it streams: the peak should not grow with the corpus).

    pip install 'minitrain[bench]'      # datasets
    python tools/bench_tokenize.py [--base-mb 8] [--scale 10] [--rounds 2]

The corpus is real code: the Python standard library's .py files (of the interpreter running
this), as records {"path", "content"}, up to --base-mb MB of text; the large one is the same
records --scale times over. Each is written as gzip-compressed JSON Lines (.jsonl.gz) and as a
Parquet file (row groups of 1 000 records, pyarrow's default compression). The tokenizer is
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
import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

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


def records(base_mb):
    """The standard library's .py files as {"path", "content"}, in path order, up to base_mb MB."""
    root, out, size = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text:
            out.append({"path": str(f.relative_to(root)), "content": text})
            size += len(text.encode())
            if size >= base_mb * 1e6:
                break
    return out


def write_corpus(directory, name, rows):
    """name.jsonl.gz and name.parquet holding rows."""
    import pyarrow
    import pyarrow.parquet as pq

    with gzip.open(directory / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    pq.write_table(pyarrow.Table.from_pylist(rows), directory / f"{name}.parquet", row_group_size=1000)
    return [directory / f"{name}.jsonl.gz", directory / f"{name}.parquet"]


def measured(command):
    """(seconds, peak RSS in MB, last stdout line) of a command in a fresh process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{command[:4]} failed:\n{err.read()}")
        return seconds, usage.ru_maxrss / 1024, out.read().strip().splitlines()[-1]


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
    sys.path.insert(0, str(Path(__file__).parent))
    from fetch_smollm2 import fetch

    from minitrain.tokenize import load_tokenizer

    scratch = Path(tempfile.mkdtemp(prefix="bench_tokenize-"))
    try:
        rows = records(args.base_mb)
        tokenizer = scratch / "tokenizer.json"
        load_tokenizer(fetch()).save(str(tokenizer))
        small = write_corpus(scratch, "small", rows)
        large = write_corpus(scratch, "large", rows * args.scale)
        text_mb = sum(len(r["content"].encode()) for r in rows) / 1e6
        print(f"corpus: {len(rows):,} standard-library files, {text_mb:.1f} MB of code (x{args.scale}: "
              f"{text_mb * args.scale:.0f} MB); tokenizer: SmolLM2-135M's; {os.cpu_count()} cores; Python "
              f"{sys.version.split()[0]}")
        results = {}
        for path in small + large:
            for _ in range(args.rounds):
                for route in ("minitrain", "datasets"):
                    r = run(route, path, tokenizer, scratch)
                    best = results.get((path.name, route))
                    if best is None or r["seconds"] < best["seconds"]:
                        results[(path.name, route)] = r
            ours, theirs = results[(path.name, "minitrain")], results[(path.name, "datasets")]
            if (ours["documents"], ours["tokens"]) != (theirs["documents"], theirs["tokens"]):
                raise SystemExit(f"{path.name}: the routes disagree: minitrain {ours}, datasets {theirs}")
        print(f"\n| file | MB stored | documents | tokens | minitrain s | datasets s | minitrain tokens/s | "
              f"datasets tokens/s | speed ratio | minitrain peak RSS MB | datasets peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for path in small + large:
            ours, theirs = results[(path.name, "minitrain")], results[(path.name, "datasets")]
            print(f"| {path.name} | {path.stat().st_size / 1e6:.1f} | {ours['documents']:,} | {ours['tokens']:,} | "
                  f"{ours['seconds']:.2f} | {theirs['seconds']:.2f} | {ours['tokens'] / ours['seconds']:,.0f} | "
                  f"{theirs['tokens'] / theirs['seconds']:,.0f} | {theirs['seconds'] / ours['seconds']:.2f}x | "
                  f"{ours['rss_mb']:,.0f} | {theirs['rss_mb']:,.0f} |")
        for fmt in (0, 1):
            a, b = results[(small[fmt].name, "minitrain")], results[(large[fmt].name, "minitrain")]
            print(f"\nminitrain's peak RSS, {large[fmt].name} vs {small[fmt].name} ({args.scale}x the data): "
                  f"{b['rss_mb']:,.0f} vs {a['rss_mb']:,.0f} MB, {100 * (b['rss_mb'] / a['rss_mb'] - 1):+.1f}%")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()

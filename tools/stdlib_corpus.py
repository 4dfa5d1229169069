"""A real code corpus in the containers datasets ship in: the Python standard library's .py files.

    python tools/stdlib_corpus.py --out corpora/stdlib --format parquet --shards 4
    python tools/stdlib_corpus.py --out corpora/stdlib --format jsonl.gz

Each file of the running interpreter's standard library (site-packages left out; files that are
not UTF-8 left out) becomes one record {"path", "content"}, in path order. Written as --shards
files named as Hugging Face datasets names them (data/train-00000-of-00004.parquet), each a
--format container: Parquet (row groups of 100 records, pyarrow's default compression), JSON
Lines gzip- or Zstandard-compressed, or plain. Prints what it wrote.
"""

import argparse
import gzip
import json
import sysconfig
from pathlib import Path

FORMATS = ("parquet", "jsonl.gz", "jsonl.zst", "jsonl")


def records(max_mb=None):
    """The standard library's .py files as {"path", "content"}, in path order (up to max_mb MB)."""
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
            if max_mb is not None and size >= max_mb * 1e6:
                break
    return out


def write(directory, rows, fmt, shards=1, split="train"):
    """rows in `shards` files DIRECTORY/data/SPLIT-0000k-of-0000n.FMT -> their paths."""
    paths = []
    for k in range(shards):
        part = rows[k * len(rows) // shards:(k + 1) * len(rows) // shards]
        path = Path(directory) / "data" / f"{split}-{k:05d}-of-{shards:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            import pyarrow
            import pyarrow.parquet as pq

            pq.write_table(pyarrow.Table.from_pylist(part), path, row_group_size=100)
        else:
            data = "".join(json.dumps(r) + "\n" for r in part).encode()
            if fmt == "jsonl.gz":
                data = gzip.compress(data)
            elif fmt == "jsonl.zst":
                import zstandard

                data = zstandard.ZstdCompressor().compress(data)
            path.write_bytes(data)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the dataset's directory (its files go under data/)")
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    rows = records()
    paths = write(args.out, rows, args.format, args.shards)
    stored = sum(p.stat().st_size for p in paths)
    print(f"{len(rows):,} files, {sum(len(r['content'].encode()) for r in rows) / 1e6:.1f} MB of code -> "
          f"{len(paths)} {args.format} file(s) under {Path(args.out) / 'data'} ({stored / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

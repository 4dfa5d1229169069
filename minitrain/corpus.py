"""The containers corpora ship in, read as one stream of records or documents (`minitrain tokenize`).

A file's name tells its container:

    NAME.jsonl, NAME.json     JSON Lines: one JSON object per non-empty line (HF datasets' to_json
                              writes these, .json included)
    NAME.parquet              Apache Parquet, through pyarrow, one row group at a time; a
                              directory of shards (HF datasets' layout) is read in name order
    NAME.gz, NAME.zst         gzip or Zstandard around JSON Lines or a text file: the name without
                              the suffix tells which (c.jsonl.gz, c.json.zst, mod.py.gz)
    anything else             one text document (a .py, .txt or .md file), UTF-8, strictly

A directory stands for every file below it with one of SUFFIXES, recursively, sorted by relative
path (component by component) -- a plain .json file only when given by name: in a directory of
code it is most often a configuration file, not JSON Lines (compressed, .json.gz, it is a dump).
A record is a JSON object (a Parquet row); documents are the strings under one field of the
records (`--content-field`), or whole text files.

Everything streams: memory holds one line, one Parquet row group or one text file at a time,
whatever the corpus's size. What cannot be read is one of two errors, each naming the file (and line or
row) and what is wrong:
    BadRecord   one record cannot be used (not UTF-8, not JSON, not an object, no such field, not
                a string); the rest of the file can be read
    Damaged     the rest of the file cannot be read (a text file that is not UTF-8, a corrupt or
                truncated gzip or Zstandard stream, a file Parquet cannot read)
By default the first of either stops the run; with skip_invalid each is skipped and listed
(`skipped`, for the manifest): a bad record alone, a damaged file from the damage on (what was
read before it is kept, and counted).
"""

import gzip
import io
import json
import sys
import time
import zlib
from pathlib import Path

from minitrain.errors import InputError
from minitrain.progress import duration

RECORDS = (".jsonl", ".json")
TEXT = (".py", ".txt", ".md")
COMPRESSED = (".gz", ".zst")
SUFFIXES = RECORDS + TEXT + (".parquet",)  # directories are walked for these, plain or compressed
PARQUET_ROWS = 1024  # rows per batch turned into records
PROGRESS_EVERY_S = 5.0
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class BadRecord(InputError):
    """One record of a file cannot be used; the rest of the file can be read."""


class Damaged(InputError):
    """The rest of a file cannot be read."""


def inner_suffix(path):
    """The suffix that says what a file holds, under a compression suffix: c.jsonl.gz -> .jsonl."""
    path = Path(path)
    return Path(path.stem).suffix if path.suffix in COMPRESSED else path.suffix


def holds_records(path):
    """Whether a file is a record container (JSON Lines, compressed or not, or Parquet)."""
    return inner_suffix(path) in RECORDS + (".parquet",)


def input_files(paths):
    """Each path as given if it is a file; for a directory, every file below it whose
    inner_suffix is one of SUFFIXES (but plain .json), recursively, sorted by relative path
    (component by component)."""
    files = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = [f for f in p.rglob("*") if inner_suffix(f) in SUFFIXES and f.suffix != ".json" and f.is_file()]
            files += sorted(found, key=lambda f: f.relative_to(p).parts)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    return files


def field_text(where, record, field):
    """The string under `field` of a record; BadRecord naming the fields found, or the type."""
    if field not in record:
        raise BadRecord(f'{where}: no field "{field}" (fields: {", ".join(record) or "none"}); '
                        f"choose one with --content-field")
    text = record[field]
    if not isinstance(text, str):
        raise BadRecord(f'{where}: field "{field}" is {_JSON_TYPES.get(type(text), type(text).__name__)}, '
                        f"expected a string")
    return text


class Corpus:
    """The files of `paths` read in order as records or documents; `files_done`, `bytes_done()`
    and `total_bytes` say how far (bytes as stored: compressed bytes of a compressed file), and
    `skipped` lists what skip_invalid passed over."""

    def __init__(self, paths, skip_invalid=False):
        self.files = input_files(paths)
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        self.skip_invalid, self.skipped = skip_invalid, []
        self.files_done, self._bytes_before, self._position = 0, 0, lambda: 0

    def bytes_done(self):
        return self._bytes_before + self._position()

    def manifest(self):
        """What the manifest records of the inputs: files, their bytes, and what was skipped."""
        return {"input_files": [str(f) for f in self.files], "input_bytes": self.total_bytes,
                "skipped_count": len(self.skipped), "skipped": self.skipped}

    def skipped_note(self):
        return f"; {len(self.skipped)} skipped as unreadable" if self.skipped else ""

    def reject(self, error, read_before=0):
        """Skip `error` (listed in `skipped`) with skip_invalid, else stop with it and the way on.
        read_before: of a damaged file, the items read from it before the damage (they are kept)."""
        if not self.skip_invalid:
            raise InputError(f"{error}; --skip-invalid skips what cannot be read, listing each in manifest.json") \
                from None
        self.skipped.append({"what": "record", "error": str(error)} if isinstance(error, BadRecord) else
                            {"what": "file", "error": str(error), "read_before_the_damage": read_before})

    def records(self, columns=None):
        """Yield (label, record dict) of every record of every file ("path:line N", "path:row N");
        a file that holds no records is Damaged. `columns`: read only these of a Parquet file (all
        when None)."""
        for path in self._each_file():
            if holds_records(path):
                yield from self._guarded(path, self._records_of(path, columns))
            else:
                self.reject(Damaged(f"{path}: holds no records: expected JSON Lines (.jsonl, .json, compressed "
                                    f"or not) or Parquet"))

    def documents(self, content_field):
        """Yield (label, text) of every non-empty document: records' `content_field`, whole text
        files."""
        for path in self._each_file():
            if holds_records(path):
                for where, record in self._guarded(path, self._records_of(path, [content_field])):
                    try:
                        text = field_text(where, record, content_field)
                    except BadRecord as e:
                        self.reject(e)
                        continue
                    if text:
                        yield where, text
            else:
                yield from self._guarded(path, self._text_of(path))

    def _each_file(self):
        for path in self.files:
            yield path
            self.files_done += 1
            self._bytes_before += path.stat().st_size
            self._position = lambda: 0

    def _guarded(self, path, items):
        """`items` of one file, until it is Damaged (then reject, and the file ends there)."""
        read = 0
        try:
            for item in items:
                yield item
                read += 1
        except Damaged as e:
            self.reject(e, read)

    def _stream(self, path):
        """The file's bytes, decompressed; its stored position is what _position reads."""
        try:
            raw = gzip.GzipFile(path) if path.suffix == ".gz" else open(path, "rb")  # GzipFile closes its file
        except OSError as e:
            raise Damaged(f"{path}: cannot read it ({e.strerror})") from None
        self._position = (raw.fileobj if path.suffix == ".gz" else raw).tell
        return io.BufferedReader(_Chunks(_zstd_frames(raw), raw)) if path.suffix == ".zst" else raw

    def _read(self, path, reading):
        """Run `reading` (a generator over the stream), turning what breaks the stream into Damaged."""
        import zstandard

        try:
            yield from reading
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            kind = {".gz": "gzip", ".zst": "Zstandard"}.get(path.suffix, "")
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise Damaged(f"{path}: {'a damaged ' + kind + ' stream' if kind else 'cannot read it'} ({reason})") \
                from None

    def _records_of(self, path, columns):
        if inner_suffix(path) == ".parquet":
            if path.suffix in COMPRESSED:
                raise Damaged(f"{path}: a compressed Parquet file; Parquet compresses itself: decompress it")
            yield from self._parquet(path, columns)
            return
        with self._stream(path) as f:
            yield from self._read(path, self._json_lines(path, f))

    def _json_lines(self, path, f):
        for n, raw in enumerate(f, 1):
            where = f"{path}:line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.reject(BadRecord(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line)"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                self.reject(BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(record, dict):
                self.reject(BadRecord(f"{where}: expected a JSON object, found {_JSON_TYPES[type(record)]}"))
                continue
            yield where, record

    def _text_of(self, path):
        with self._stream(path) as f:
            data = b"".join(self._read(path, iter(lambda: f.read(1 << 20), b"")))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Damaged(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if text:
            yield str(path), text

    def _parquet(self, path, columns):
        """Rows one row group at a time (a row group's column chunks are Parquet's unit of
        compression: the largest one bounds the memory), through the system allocator (pyarrow's
        mimalloc keeps freed pages, and its footprint grew with the row groups read)."""
        import pyarrow
        import pyarrow.parquet as pq

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
        try:
            f = pq.ParquetFile(path, pre_buffer=False)
            names = f.schema_arrow.names
            missing = [c for c in columns or () if c not in names]
            if missing:
                raise BadRecord(f'{path}: no column "{missing[0]}" (columns: {", ".join(names) or "none"}); '
                                f"choose one with --content-field")
            rows, size, done = max(f.metadata.num_rows, 1), path.stat().st_size, 0
            self._position = lambda: size * done // rows
            for group in range(f.num_row_groups):
                for batch in f.read_row_group(group, columns=columns).to_batches(max_chunksize=PARQUET_ROWS):
                    for record in batch.to_pylist():
                        done += 1
                        yield f"{path}:row {done}", record
        except BadRecord as e:  # a column missing: nothing of the file can be used
            raise Damaged(str(e)) from None
        except (pyarrow.ArrowException, OSError) as e:
            raise Damaged(f"{path}: Parquet cannot read it ({e})") from None



def _zstd_frames(raw, chunk=1 << 20):
    """The decompressed bytes of the Zstandard frames in `raw`, one after another; EOFError when
    the data ends inside a frame (zstandard's stream reader returns a truncated frame's bytes
    without a word)."""
    import zstandard

    frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
    while data := raw.read(chunk):
        while data:
            yield frame.decompress(data)
            fed, data = True, b""
            if frame.eof:  # the next frame starts in what this one left
                data, frame, fed = frame.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
    if fed:
        raise EOFError("the data ends inside a frame: the file is truncated")


class _Chunks(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (closing `raw` with it)."""

    def __init__(self, chunks, raw):
        self.chunks, self.raw, self.rest = chunks, raw, b""

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self.rest:
            self.rest = next(self.chunks, None)
            if self.rest is None:
                self.rest = b""
                return 0
        n = min(len(buffer), len(self.rest))
        buffer[:n], self.rest = self.rest[:n], self.rest[n:]
        return n

    def close(self):
        self.raw.close()
        super().close()


class Dedup:
    """Exact deduplication: an item whose key's BLAKE2b-128 digest was seen before is dropped and
    counted (about 100 bytes of memory per distinct item)."""

    def __init__(self):
        self.seen, self.dropped = set(), 0

    def filter(self, items, key):
        """Yield the (label, item) pairs whose key(item), a string, is new."""
        import hashlib

        for label, item in items:
            digest = hashlib.blake2b(key(item).encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in self.seen:
                self.dropped += 1
                continue
            self.seen.add(digest)
            yield label, item

    def manifest(self):
        return {"dedup": {"method": "exact: BLAKE2b-128 of the UTF-8 text", "duplicates_dropped": self.dropped}}


class Progress:
    """A line on stderr every PROGRESS_EVERY_S seconds, and one at the end: files done of all,
    bytes read of all (as stored), tokens, tokens per second, and the time left by bytes."""

    def __init__(self, corpus, log=None):
        self.corpus, self.log = corpus, log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start = self.last = time.perf_counter()
        self.shown = None  # (files done, tokens) of the last line

    def update(self, tokens, final=False):
        now, c = time.perf_counter(), self.corpus
        if (now - self.last < PROGRESS_EVERY_S and not final) or self.shown == (c.files_done, tokens):
            return
        self.last, self.shown = now, (c.files_done, tokens)
        done, elapsed = c.bytes_done(), max(now - self.start, 1e-9)
        left = elapsed * (c.total_bytes - done) / done if done else 0.0
        self.log(f"tokenize: {c.files_done:,}/{len(c.files):,} files | {done / 1e6:,.1f}/{c.total_bytes / 1e6:,.1f} MB"
                 f" | {tokens:,} tokens | {tokens / elapsed:,.0f} tokens/s | ETA {duration(left)}"
                 + (f" | skipped {len(c.skipped):,}" if c.skipped else ""))

    def seconds(self):
        return time.perf_counter() - self.start

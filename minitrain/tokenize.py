"""Text -> token shards: the corpus format that minitrain/data.py reads.

A shard is a flat file of little-endian u32 token ids (`shard-00000.bin`, `shard-00001.bin`, ...
in `out_dir`), no header. The shards, concatenated in name order, are one token stream: every
document's tokens, with the EOS id BETWEEN documents (policy "between": none before the first
document, none after the last). A shard holds at most `shard_tokens` ids; a boundary may fall
inside a document (training reads fixed windows, so documents are not aligned to shards anyway).
`manifest.json` beside the shards records how they were made (aprender's `pretokenize-bin-v1`).

Documents: a `.jsonl` file holds one per non-empty line (the string under `content_field`); any
other file is one document. Files are UTF-8, strictly: a file that is not is an error, never
silently patched with U+FFFD.
"""

import itertools
import json
import time
from pathlib import Path

import numpy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minitrain.errors import InputError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
TEXT_SUFFIXES = (".py", ".txt", ".md", ".jsonl")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def find_eos(tokenizer, source="tokenizer"):
    """The EOS id: the first of EOS_NAMES the vocabulary has. `source` names it in the error."""
    for name in EOS_NAMES:
        eos = tokenizer.token_to_id(name)
        if eos is not None:
            return eos
    raise InputError(f"{source}: no end-of-text token; tried {', '.join(EOS_NAMES)}")


class NoTokenizer(InputError):
    """A model that carries no usable tokenizer (as opposed to a broken one)."""


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file, or the one a GGUF or APR file embeds."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such tokenizer file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from minitrain.formats.gguf import read_tokenizer

        return read_tokenizer(p)
    if magic in (b"APR\0", b"APR2"):
        from minitrain.formats.apr import read_apr
        from minitrain.formats.apr_meta import TOKENIZER_JSON

        meta = read_apr(p).metadata
        if TOKENIZER_JSON not in meta:
            has = "a vocabulary without its pre-tokenizer" if "tokenizer.vocabulary" in meta else "no tokenizer"
            raise NoTokenizer(f"{p}: the file embeds {has}; give --tokenizer tokenizer.json (or the .gguf it "
                             "came from)")
        return _parsed(p, lambda: Tokenizer.from_str(meta[TOKENIZER_JSON]))
    return _parsed(p, lambda: Tokenizer.from_file(str(p)))


def _parsed(path, parse):
    try:
        return parse()
    except Exception as e:  # the library raises a bare Exception with serde's message
        raise InputError(f"{path}: not a valid tokenizer.json ({e})") from None


def model_tokenizer(model_path):
    """The tokenizer file that comes with a model: an HF directory's tokenizer.json, a GGUF or
    APR file itself (load_tokenizer reads what it embeds)."""
    from minitrain.formats.sources import source_kind

    kind, p = source_kind(model_path), Path(model_path)
    if kind in ("gguf", "apr"):
        return p
    if (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    raise NoTokenizer(f"{p}: no tokenizer.json; give --tokenizer tokenizer.json (or the .gguf it came from)")


def input_files(paths):
    """Each path as given if it is a file; for a directory, every TEXT_SUFFIXES file below it,
    recursively, sorted by relative path (component by component)."""
    files = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file()]
            files += sorted(found, key=lambda f: f.relative_to(p).parts)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    return files


def jsonl_records(path):
    """Yield (label, object) for every non-empty line of a JSONL file; label "path:line N"."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, found {_JSON_TYPES[type(record)]}")
            yield where, record


def _jsonl_documents(path, content_field):
    for where, record in jsonl_records(path):
        if content_field not in record:
            raise InputError(f'{where}: no field "{content_field}" (fields: '
                             f'{", ".join(record) or "none"}); choose one with --content-field')
        text = record[content_field]
        if not isinstance(text, str):
            raise InputError(f'{where}: field "{content_field}" is {_JSON_TYPES[type(text)]}, '
                             f"expected a string")
        if text:
            yield where, text


def read_documents(paths, content_field="content"):
    """Yield (source_label, text) for every non-empty document, one file at a time (streamed).
    Labels are "path" for a whole file, "path:line N" (1-based) for a JSONL record."""
    for path in input_files(paths):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, content_field)
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if text:
            yield str(path), text


class ShardWriter:
    """Appends u32 ids to shard-NNNNN.bin files of exactly `shard_tokens` ids (the last: fewer),
    holding at most one shard's worth in memory; with `suffixes`, parallel per-token streams too
    (a mask, one u8 per token: shard-NNNNN.mask beside shard-NNNNN.bin, cut at the same tokens)."""

    def __init__(self, out_dir, shard_tokens, suffixes=()):
        self.out_dir, self.shard_tokens, self.suffixes = out_dir, shard_tokens, suffixes
        self.pending, self.pending_count, self.paths, self.total = [], 0, [], 0

    def add(self, ids, *streams):  # ids: (n,) <u4; each stream: (n,), one per suffix
        arrays = (ids, *streams)
        while self.pending_count + len(ids) >= self.shard_tokens:
            take = self.shard_tokens - self.pending_count
            self.pending.append([a[:take] for a in arrays])
            self.pending_count, arrays = self.shard_tokens, [a[take:] for a in arrays]
            ids = arrays[0]
            self.flush()
        if len(ids):
            self.pending.append(list(arrays))
            self.pending_count += len(ids)

    def flush(self):
        if self.pending_count:
            name = f"shard-{len(self.paths):05d}"
            self.paths.append(self.out_dir / f"{name}.bin")
            numpy.concatenate([p[0] for p in self.pending]).astype("<u4").tofile(self.paths[-1])
            for k, (suffix, dtype) in enumerate(self.suffixes, 1):
                self.paths.append(self.out_dir / f"{name}{suffix}")
                numpy.concatenate([p[k] for p in self.pending]).astype(dtype).tofile(self.paths[-1])
            self.total += self.pending_count
            self.pending, self.pending_count = [], 0

    def shards(self):
        return sum(p.suffix == ".bin" for p in self.paths)


def output_dir(out_dir):
    """out_dir, made if needed; an error if it already holds shards or a manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*")) + sorted(out.glob("manifest.json"))
    if old:
        raise InputError(f"{out}: already holds {old[0].name} ({len(old)} shard/manifest files); "
                         f"remove them or choose another output directory")
    return out


def tokenize_to_shards(tokenizer_path, out_dir, inputs, content_field="content",
                       shard_tokens=10_000_000, batch_docs=256):
    """Tokenize `inputs` (files or directories) into `out_dir` as u32 shards + manifest.json;
    return the manifest. Documents are encoded `batch_docs` at a time without the tokenizer's
    template tokens (add_special_tokens=False); a literal "<|endoftext|>" inside a document is
    encoded as plain text, so EOS ids in the stream mark document boundaries and nothing else.
    On any error the shards written so far are removed: no partial corpus is left behind."""
    start = time.perf_counter()
    if shard_tokens < 1 or batch_docs < 1:
        raise InputError(f"shard_tokens and batch_docs must be >= 1, got {shard_tokens} and {batch_docs}")
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.encode_special_tokens = True
    eos, vocab_size = find_eos(tokenizer, tokenizer_path), tokenizer.get_vocab_size(with_added_tokens=True)
    files, out = input_files(inputs), output_dir(out_dir)
    writer, documents = ShardWriter(out, shard_tokens), 0
    try:
        docs = read_documents(files, content_field)
        while batch := list(itertools.islice(docs, batch_docs)):
            flat, encodings = [], tokenizer.encode_batch([t for _, t in batch], add_special_tokens=False)
            for (label, _), ids in zip(batch, (e.ids for e in encodings)):  # .ids copies: read it once
                if ids and max(ids) >= vocab_size:
                    raise InputError(f"{tokenizer_path}: produced token id {max(ids)} >= its vocab_size "
                                     f"{vocab_size} on {label}")
                flat += ([eos] if documents else []) + ids
                documents += 1
            writer.add(numpy.array(flat, dtype="<u4"))
        writer.flush()
        if documents == 0:
            raise InputError(f"no documents in {', '.join(map(str, inputs)) or 'the inputs'} "
                             f"(files read: {len(files)}; empty documents are skipped)")
    except BaseException:
        for p in writer.paths:
            p.unlink(missing_ok=True)
        raise
    manifest = {"schema": "pretokenize-bin-v1", "tokenizer": str(tokenizer_path), "vocab_size": vocab_size,
                "eos_policy": "between", "eos_token_id": eos, "eos_token_count": documents - 1,
                "shard_count": writer.shards(), "total_tokens": writer.total, "total_documents": documents,
                "content_field": content_field, "input_files": [str(f) for f in files],
                "elapsed_seconds": round(time.perf_counter() - start, 3)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def train_bpe(files, vocab_size, out_path, eos="<|endoftext|>"):
    """Train a byte-level BPE tokenizer (GPT-2 style) on `files` and save it as `out_path`.

    Byte-level: text is first mapped byte by byte onto 256 printable characters, all of which
    start in the vocabulary, so every string encodes, and decoding gives it back exactly. `eos`
    is id 0; merges fill the rest up to `vocab_size` (fewer if the text runs out of pairs).
    Training is deterministic: the same files give the same tokenizer.json."""
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum:
        raise InputError(f"vocab_size must be >= {minimum} (256 byte tokens + {eos}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((text for _, text in read_documents(files)), trainer=trainer)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return tokenizer

"""minitrain/tokenize.py: text -> u32 shards with EOS between documents, and byte-level BPE."""

import json
import struct

import numpy
import pytest
from tokenizers import Tokenizer

from minitrain.corpus import Corpus, input_files
from minitrain.errors import InputError
from minitrain.demo import train_bpe
from minitrain.formats.vocab import find_eos
from minitrain.tokenize import tokenize_to_shards

CORPUS = ("def add(x, y):\n    return x + y\n\n"
          "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n"
          "The quick brown fox jumps over the lazy dog. Café, naïve, 東京.\n") * 8


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    train_bpe([d / "corpus.txt"], 300, d / "tokenizer.json")
    return d / "tokenizer.json"


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer.from_file(str(tok_path))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def write_inputs(d):
    """A .py file, a .txt file with CRLF and tabs (bytes kept exactly), and a .jsonl with two
    records whose text is under "text" (a decoy "content" field must be ignored)."""
    docs = ["def add(x, y):\n    return x + y\n", "line one\r\n\tTabbed café 東京 🙂\r\n",
            "class Point:\n    pass\n", "The quick brown fox.\n"]
    (d / "a.py").write_bytes(docs[0].encode())
    (d / "b.txt").write_bytes(docs[1].encode())
    (d / "c.jsonl").write_text("\n".join(json.dumps({"content": "decoy", "text": t}) for t in docs[2:]) + "\n")
    return [d / "a.py", d / "b.txt", d / "c.jsonl"], docs


def read_documents(paths, content_field="content"):
    return Corpus(paths).documents(content_field)


def read_shards(out):
    return numpy.concatenate([numpy.fromfile(p, dtype="<u4") for p in sorted(out.glob("shard-*.bin"))])


def test_round_trip_stream_bytes_and_manifest(tmp_path, tok_path, tok):
    files, docs = write_inputs(tmp_path)
    manifest = tokenize_to_shards(tok_path, tmp_path / "out", files, content_field="text")
    eos = find_eos(tok)
    expected = enc(tok, docs[0]) + [eos] + enc(tok, docs[1]) + [eos] + enc(tok, docs[2]) + [eos] + enc(tok, docs[3])
    assert max(expected) > 255  # so a big-endian or u8 write would differ
    raw = (tmp_path / "out" / "shard-00000.bin").read_bytes()
    assert raw == struct.pack(f"<{len(expected)}I", *expected)
    assert read_shards(tmp_path / "out").tolist() == expected
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    sizes = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.bin"))
    assert manifest["total_tokens"] == sizes // 4 == len(expected)
    assert {k: v for k, v in manifest.items() if k != "elapsed_seconds"} == {
        "schema": "pretokenize-bin-v1", "tokenizer": str(tok_path),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_policy": "between",
        "eos_token_id": eos, "eos_token_count": 3, "shard_count": 1, "total_tokens": len(expected),
        "total_documents": 4, "content_field": "text", "input_files": [str(f) for f in files],
        "input_bytes": sum(f.stat().st_size for f in files), "skipped_count": 0, "skipped": []}
    assert manifest["elapsed_seconds"] >= 0


@pytest.mark.parametrize("shard_tokens, batch_docs", [(7, 256), (7, 1), (1, 2), ("total", 1), ("total-1", 3)])
def test_shards_concatenate_to_the_single_shard_stream(tmp_path, tok_path, shard_tokens, batch_docs):
    files, _ = write_inputs(tmp_path)
    whole = tokenize_to_shards(tok_path, tmp_path / "one", files, content_field="text")
    total = whole["total_tokens"]
    n = {"total": total, "total-1": total - 1}.get(shard_tokens, shard_tokens)
    manifest = tokenize_to_shards(tok_path, tmp_path / "many", files, "text", shard_tokens=n, batch_docs=batch_docs)
    shards = sorted((tmp_path / "many").glob("*.bin"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.bin" for i in range(-(-total // n))]
    sizes = [p.stat().st_size // 4 for p in shards]
    assert all(s == n for s in sizes[:-1]) and 0 < sizes[-1] <= n
    assert read_shards(tmp_path / "many").tolist() == read_shards(tmp_path / "one").tolist()
    assert (manifest["shard_count"], manifest["total_tokens"]) == (len(shards), total)


def test_directories_recurse_sorted_and_skip_other_suffixes(tmp_path, tok_path, tok):
    d = tmp_path / "in"
    for name, text in [("z.md", "zed\n"), ("sub/deep/c.jsonl", '{"content": "cee"}\n'), ("a.txt", "ay\n"),
                       ("sub/b.py", "bee = 1\n"), ("sub/skip.rst", "no\n"), ("skip.bin", "no\n"),
                       ("config.json", '{\n  "a": 1\n}\n')]:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    order = [d / "a.txt", d / "sub/b.py", d / "sub/deep/c.jsonl", d / "z.md"]
    assert input_files([d]) == order
    assert [label for label, _ in read_documents([d])] == [str(order[0]), str(order[1]),
                                                           f"{order[2]}:line 1", str(order[3])]
    manifest = tokenize_to_shards(tok_path, tmp_path / "out", [d])
    assert manifest["input_files"] == [str(p) for p in order]
    eos = find_eos(tok)
    expected = sum(([eos] + enc(tok, t) for t in ["bee = 1\n", "cee", "zed\n"]), enc(tok, "ay\n"))
    assert read_shards(tmp_path / "out").tolist() == expected


def test_literal_eos_text_in_a_document_is_not_a_boundary(tmp_path, tok_path, tok):
    (tmp_path / "a.txt").write_text('sep = "<|endoftext|>"\n')
    (tmp_path / "b.txt").write_text("two\n")
    manifest = tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "a.txt", tmp_path / "b.txt"])
    ids = read_shards(tmp_path / "out")
    assert int((ids == manifest["eos_token_id"]).sum()) == manifest["eos_token_count"] == 1
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == 'sep = "<|endoftext|>"\n<|endoftext|>two\n'


@pytest.mark.parametrize("lines, problem", [
    (['{"content": "ok"}', "", "{not json"], "line 3: not valid JSON"),
    (['{"content": "ok"}', "[1, 2]"], "line 2: expected a JSON object, found array"),
    (['{"text": "x", "id": 1}'], 'line 1: no field "content" (fields: text, id)'),
    (['{"content": 5}'], 'line 1: field "content" is number, expected a string'),
])
def test_bad_jsonl_line_names_file_line_and_problem(tmp_path, tok_path, lines, problem):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "d.jsonl"])
    assert f"{tmp_path / 'd.jsonl'}:{problem}" in str(e.value)


@pytest.mark.parametrize("name, data, problem", [
    ("bad.txt", b"ok\n\xff\xfe\n", "bad.txt: not UTF-8 text (invalid start byte at byte 3)"),
    ("bad.jsonl", b'{"content": "ok"}\n{"content": "\xe9"}\n', "bad.jsonl:line 2: not UTF-8"),
])
def test_non_utf8_input_is_an_error_not_replaced(tmp_path, tok_path, name, data, problem):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match="not UTF-8") as e:
        list(read_documents([tmp_path / name]))
    assert f"{tmp_path}/{problem}" in str(e.value)
    with pytest.raises(InputError, match="not UTF-8"):
        train_bpe([tmp_path / name], 300, tmp_path / "t.json")


def test_missing_input_path(tmp_path, tok_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'nope.txt'}: no such file or directory"):
        tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "nope.txt"])


def test_no_documents_writes_nothing(tmp_path, tok_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('\n{"content": ""}\n')
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="no documents.*files read: 2"):
        tokenize_to_shards(tok_path, tmp_path / "out",
                           [tmp_path / "empty.txt", tmp_path / "blank.jsonl", tmp_path / "emptydir"])
    assert list((tmp_path / "out").iterdir()) == []


def test_an_error_midway_removes_the_shards_already_written(tmp_path, tok_path):
    (tmp_path / "a.txt").write_text(CORPUS)
    (tmp_path / "b.jsonl").write_text('{"content": 1}\n')
    with pytest.raises(InputError, match="b.jsonl:line 1"):
        tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "a.txt", tmp_path / "b.jsonl"],
                           shard_tokens=5, batch_docs=1)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_shards_in_out_dir_are_refused(tmp_path, tok_path):
    (tmp_path / "a.txt").write_text("hello\n")
    tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "a.txt"])
    with pytest.raises(InputError, match="already holds shard-00000.bin"):
        tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "a.txt"])


def test_tokenizer_without_eos(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    train_bpe([tmp_path / "c.txt"], 300, tmp_path / "t.json", eos="<pad>")
    with pytest.raises(InputError) as e:
        tokenize_to_shards(tmp_path / "t.json", tmp_path / "out", [tmp_path / "c.txt"])
    assert str(e.value) == f"{tmp_path / 't.json'}: no end-of-text token; tried <|endoftext|>, </s>, <eos>, <|eos|>"


def test_missing_or_invalid_tokenizer_file(tmp_path):
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(InputError, match=f"{tmp_path / 'nope.json'}: no such tokenizer file"):
        tokenize_to_shards(tmp_path / "nope.json", tmp_path / "out", [tmp_path / "c.txt"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match=f"{tmp_path / 'bad.json'}: not a valid tokenizer.json"):
        tokenize_to_shards(tmp_path / "bad.json", tmp_path / "out", [tmp_path / "c.txt"])


def test_token_id_beyond_vocab_is_an_error(tmp_path, tok_path, tok, monkeypatch):
    class Overflowing:  # a tokenizer whose encodings carry an id == vocab_size
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode_batch_fast(self, texts, add_special_tokens):
            return [type("E", (), {"ids": [1, tok.get_vocab_size(with_added_tokens=True)]}) for _ in texts]

    monkeypatch.setattr("minitrain.tokenize.load_tokenizer", lambda path: Overflowing())
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(InputError, match=r"produced token id 300 >= its vocab_size 300 on .*c\.txt"):
        tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "c.txt"])


def test_train_bpe_is_deterministic_and_lossless(tmp_path):
    (tmp_path / "c.py").write_text(CORPUS)
    a = train_bpe([tmp_path / "c.py"], 300, tmp_path / "a" / "tokenizer.json")
    train_bpe([tmp_path / "c.py"], 300, tmp_path / "b.json")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert 257 < a.get_vocab_size() <= 300 and a.token_to_id("<|endoftext|>") == 0
    snippet = "def f(x):\r\n\t  return {'ü': x ** 2}  # 東京 🙂 never seen\n\n   \x00\x7f"
    ids = a.encode(snippet, add_special_tokens=False).ids
    assert len(ids) < len(snippet.encode())  # merges were learned and used
    assert a.decode(ids) == snippet


def test_train_bpe_vocab_must_hold_all_bytes_and_eos(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    with pytest.raises(InputError, match="vocab_size must be >= 257"):
        train_bpe([tmp_path / "c.txt"], 256, tmp_path / "t.json")

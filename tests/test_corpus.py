"""minitrain/corpus.py through `tokenize`: every container a corpus ships in gives the same token
stream as plain JSON Lines; damaged files stop the run in one line, or are skipped and listed;
progress lines, --json and --dedup."""

import gzip
import json
import subprocess
import sys

import numpy
import pytest

from minitrain import corpus as corpus_module
from minitrain.corpus import Corpus
from minitrain.errors import InputError
from minitrain.demo import train_bpe
from minitrain.tokenize import tokenize_to_shards

DOCS = [f"def f{i}(x):\n    return x * {i}  # café 東京\n" for i in range(40)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("".join(DOCS))
    train_bpe([d / "corpus.txt"], 300, d / "tokenizer.json")
    return d / "tokenizer.json"


def jsonl(docs, field="content"):
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(docs)).encode()


def write_parquet(path, docs, field="content", row_group_size=7):
    import pyarrow
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pyarrow.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=row_group_size)


def zstd(data):
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def stream(out):
    return numpy.concatenate([numpy.fromfile(p, "<u4") for p in sorted(out.glob("shard-*.bin"))]).tolist()


def test_every_container_gives_the_plain_jsonl_stream(tmp_path, tok_path):
    """gzip and Zstandard JSON Lines (.jsonl and .json), a Parquet file of several row groups, a
    directory of Parquet shards as HF datasets lays them out, and a gzipped text file: each gives
    the tokens the plain files give."""
    (tmp_path / "plain.jsonl").write_bytes(jsonl(DOCS))
    reference = tokenize_to_shards(tok_path, tmp_path / "ref", [tmp_path / "plain.jsonl"])
    containers = {
        "c.jsonl.gz": lambda p: p.write_bytes(gzip.compress(jsonl(DOCS))),
        "c.json.gz": lambda p: p.write_bytes(gzip.compress(jsonl(DOCS))),
        "c.jsonl.zst": lambda p: p.write_bytes(zstd(jsonl(DOCS))),
        "c.json": lambda p: p.write_bytes(jsonl(DOCS)),
        "c.parquet": lambda p: write_parquet(p, DOCS),
    }
    for name, write in containers.items():
        write(tmp_path / name)
        m = tokenize_to_shards(tok_path, tmp_path / f"out-{name}", [tmp_path / name])
        assert stream(tmp_path / f"out-{name}") == stream(tmp_path / "ref"), name
        assert m["total_documents"] == len(DOCS) and m["input_bytes"] == (tmp_path / name).stat().st_size
    shards = tmp_path / "hf" / "data"
    for k in range(3):  # train-00000-of-00003.parquet ...: read in name order
        write_parquet(shards / f"train-{k:05d}-of-00003.parquet", DOCS[k * 14:(k + 1) * 14])
    m = tokenize_to_shards(tok_path, tmp_path / "out-hf", [tmp_path / "hf"])
    assert stream(tmp_path / "out-hf") == stream(tmp_path / "ref") and len(m["input_files"]) == 3
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.py.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    (tmp_path / "texts" / "b.py").write_text(DOCS[1])
    (tmp_path / "plain2.jsonl").write_bytes(jsonl(DOCS[:2]))
    tokenize_to_shards(tok_path, tmp_path / "out-texts", [tmp_path / "texts"])
    tokenize_to_shards(tok_path, tmp_path / "ref2", [tmp_path / "plain2.jsonl"])
    assert stream(tmp_path / "out-texts") == stream(tmp_path / "ref2")
    assert reference["total_documents"] == len(DOCS)


def test_a_missing_field_lists_the_fields_there_are(tmp_path, tok_path):
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl(DOCS, field="whole_func_string")))
    write_parquet(tmp_path / "c.parquet", DOCS, field="whole_func_string")
    with pytest.raises(InputError, match=r'c\.jsonl\.gz:line 1: no field "content" \(fields: id, whole_func_string\); '
                                         r"choose one with --content-field"):
        tokenize_to_shards(tok_path, tmp_path / "a", [tmp_path / "c.jsonl.gz"])
    with pytest.raises(InputError, match=r'c\.parquet: no column "content" \(columns: id, whole_func_string\); '
                                         r"choose one with --content-field"):
        tokenize_to_shards(tok_path, tmp_path / "b", [tmp_path / "c.parquet"])
    m = tokenize_to_shards(tok_path, tmp_path / "c", [tmp_path / "c.parquet"], content_field="whole_func_string")
    assert m["total_documents"] == len(DOCS)


def damaged_files(d):
    """name -> (bytes, the reason the error gives, documents readable before the damage)."""
    gz = gzip.compress(jsonl(DOCS))
    return {
        "a.jsonl.gz": (gz[:1] + b"\0" + gz[2:], "a damaged gzip stream (Not a gzipped file", None),
        "b.jsonl.gz": (gz[:len(gz) // 2], "a damaged gzip stream (Compressed file ended", None),
        "c.jsonl.zst": (zstd(jsonl(DOCS))[:-9], "a damaged Zstandard stream", None),
        "d.py": (b"x = 1\n\xff\n", "not UTF-8 text (invalid start byte at byte 6)", 0),
        "e.parquet": (b"PAR1 not really parquet", "Parquet cannot read it", 0),
        "f.jsonl": (jsonl(DOCS[:3]) + b"{oops\n" + jsonl(DOCS[3:5]), "line 4: not valid JSON", 5),
        "g.py.gz": (gzip.compress("".join(DOCS).encode())[:-12], "a damaged gzip stream", 0),
    }


@pytest.mark.parametrize("name", ["a.jsonl.gz", "b.jsonl.gz", "c.jsonl.zst", "d.py", "e.parquet", "f.jsonl", "g.py.gz"])
def test_a_damaged_file_stops_the_run_in_one_line_naming_it_and_the_option(tmp_path, tok_path, name):
    data, reason, _ = damaged_files(tmp_path)[name]
    (tmp_path / "good.jsonl").write_bytes(jsonl(DOCS))
    (tmp_path / name).write_bytes(data)
    out = subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--tokenizer", str(tok_path), "--out",
                          str(tmp_path / "out"), str(tmp_path / "good.jsonl"), str(tmp_path / name)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith(f"minitrain: error: {tmp_path / name}"), out.stderr
    assert reason in out.stderr and "--skip-invalid skips what cannot be read" in out.stderr, out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("minitrain:")][1:]  # one error line
    assert "Traceback" not in out.stderr and list((tmp_path / "out").glob("shard-*")) == []


def test_skip_invalid_skips_and_lists_each_with_its_reason(tmp_path, tok_path):
    """Every damaged file is skipped from its damage on, a bad record alone; each is listed in the
    manifest; what could be read is the plain stream of the readable documents."""
    files = damaged_files(tmp_path)
    for name, (data, _, _) in files.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    (tmp_path / "in" / "h.jsonl").write_bytes(jsonl(DOCS[:2]))
    m = tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "in"], skip_invalid=True)
    errors = [s["error"] for s in m["skipped"]]
    assert [s["what"] for s in m["skipped"]] == ["file"] * 5 + ["record", "file"]
    assert [s.get("read_before_the_damage") for s in m["skipped"]][3:] == [0, 0, None, 0]  # d.py, e.parquet, -, g.py.gz
    for (name, (_, reason, _)), error in zip(files.items(), errors):
        assert error.startswith(str(tmp_path / "in" / name)) and reason in error, (name, error)
    assert m["skipped_count"] == 7
    kept = m["total_documents"] - 2 - 5  # h.jsonl's and f.jsonl's good lines; the rest from the damaged streams
    assert 0 <= kept < 3 * len(DOCS)
    labels = [label for label, _ in Corpus([tmp_path / "in"], skip_invalid=True).documents("content")]
    assert f"{tmp_path / 'in' / 'f.jsonl'}:line 5" in labels and f"{tmp_path / 'in' / 'f.jsonl'}:line 4" not in labels
    assert not any(label.startswith(str(tmp_path / "in" / name)) for name in ("d.py", "g.py.gz") for label in labels)


def test_progress_lines_count_files_bytes_and_tokens(tmp_path, tok_path, monkeypatch):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(DOCS)))
    write_parquet(tmp_path / "b.parquet", DOCS)
    lines = []
    monkeypatch.setattr(corpus_module, "PROGRESS_EVERY_S", 0.0)
    m = tokenize_to_shards(tok_path, tmp_path / "out", [tmp_path / "a.jsonl.gz", tmp_path / "b.parquet"],
                           batch_docs=8, log=lines.append)
    total = (tmp_path / "a.jsonl.gz").stat().st_size + (tmp_path / "b.parquet").stat().st_size
    assert len(lines) > 5 and all(line.startswith("tokenize: ") and "tokens/s | ETA" in line for line in lines)
    assert lines[-1].startswith(f"tokenize: 2/2 files | {total / 1e6:,.1f}/{total / 1e6:,.1f} MB | "
                                f"{m['total_tokens']:,} tokens | ")
    assert any(line.startswith("tokenize: 1/2 files") for line in lines)  # the second file counted as it goes


def test_the_command_prints_progress_and_json_and_dedups(tmp_path, tok_path):
    (tmp_path / "a.jsonl.zst").write_bytes(zstd(jsonl(DOCS + DOCS[:10])))
    (tmp_path / "b.jsonl").write_bytes(jsonl(DOCS[5:8]))
    out = subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--tokenizer", str(tok_path), "--out",
                          str(tmp_path / "out"), "--dedup", "--json", str(tmp_path / "a.jsonl.zst"),
                          str(tmp_path / "b.jsonl")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[-1].startswith("tokenize: 2/2 files | ")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["documents"] == len(DOCS) and summary["duplicates"] == 13 and summary["files"] == 2
    assert summary["skipped"] == 0 and summary["tokens"] > 0 and summary["shards"] == 1
    assert "13 duplicates dropped" in out.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dedup"]["duplicates_dropped"] == 13
    (tmp_path / "unique.jsonl").write_bytes(jsonl(DOCS))
    tokenize_to_shards(tok_path, tmp_path / "ref", [tmp_path / "unique.jsonl"])
    assert stream(tmp_path / "out") == stream(tmp_path / "ref")  # first occurrences, in order


def test_chat_reads_the_same_containers(tmp_path, smollm2):
    """Conversations from a Parquet file (messages: a list of role/content structs) and from
    gzipped JSON Lines give the plain JSONL's shards and masks; a bad conversation is skipped and
    listed with --skip-invalid."""
    import pyarrow
    import pyarrow.parquet as pq

    from minitrain.tokenize_chat import tokenize_chat_to_shards

    talks = [[{"role": "user", "content": f"Square {i}?"}, {"role": "assistant", "content": f"{i * i}"}]
             for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress((tmp_path / "c.jsonl").read_bytes()))
    pq.write_table(pyarrow.table({"messages": talks}), tmp_path / "c.parquet", row_group_size=4)
    ref = tokenize_chat_to_shards(smollm2, tmp_path / "ref", [tmp_path / "c.jsonl"])
    for name in ("c.jsonl.gz", "c.parquet"):
        m = tokenize_chat_to_shards(smollm2, tmp_path / name.replace(".", "-"), [tmp_path / name])
        for suffix in (".bin", ".mask"):
            assert ((tmp_path / name.replace(".", "-") / f"shard-00000{suffix}").read_bytes()
                    == (tmp_path / "ref" / f"shard-00000{suffix}").read_bytes()), name
        assert m["chat"]["target_tokens"] == ref["chat"]["target_tokens"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": talks[0]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    m = tokenize_chat_to_shards(smollm2, tmp_path / "skip", [tmp_path / "bad.jsonl"], skip_invalid=True)
    assert m["chat"]["conversations"] == 1 and m["skipped"] == [
        {"what": "record", "error": f"{tmp_path / 'bad.jsonl'}:line 2: no `messages` and no string `prompt` and "
                                    f"`completion` (found keys: text)"}]

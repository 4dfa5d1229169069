"""Every reader fuzzed: seeded, structure-aware mutations of valid files -- counts, lengths,
types, dims, offsets, truncation, trailing bytes; JSON values of the wrong type, out of range,
missing -- through the command that reads them (or the reader itself where no command reads a
file alone). Each case must end in exit 0 or 2, and a 2 in one line naming the file: never a
traceback or an "unexpected error", never a hang (20 s a case), never an allocation sized by a
corrupt field before it is checked against the file's size (the cases run in a child process
whose address space is capped at 3 GiB: such an allocation fails there, as an unexpected error).
Last, every crash the coverage-guided fuzzer (tools/fuzz.py) found, kept in tests/fuzz_findings/,
replayed through the commands that read it.
"""

import json
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

CHILD = r'''
import contextlib, io, json, os, resource, signal, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from minitrain.cli import main
from minitrain.errors import InputError


def timeout(signum, frame):
    raise TimeoutError("the case ran past 20 s")


def call(case):
    if case["call"] == "adapter":
        from minitrain.formats import peft
        peft.read_adapter(case["path"])
    elif case["call"] == "resume":
        from minitrain.setup_run import build, configure
        build(*configure({"resume": case["path"], "out": case["out"]}))


signal.signal(signal.SIGALRM, timeout)
results, home = [], os.getcwd()
for case in json.load(open(sys.argv[1])):
    err = io.StringIO()
    os.chdir(case.get("cwd", home))
    signal.alarm(20)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if "argv" in case:
                sys.argv = ["minitrain", *case["argv"]]
                try:
                    main()
                    code = 0
                except SystemExit as e:
                    code = e.code or 0
            else:
                try:
                    call(case)
                    code = 0
                except InputError as e:
                    print(f"minitrain: error: {e}", file=sys.stderr)
                    code = 2
    except BaseException as e:  # what main() would have called unexpected
        code, err = 1, io.StringIO(f"unexpected: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    signal.alarm(0)
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
'''

INTERESTING = [0, 1, 2, 3, 7, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
               (1 << 40) + 3, (1 << 62), (1 << 63) - 1, (1 << 64) - 1]
JSON_VALUES = [None, True, -1, 0, 1.5, 2 ** 62, -(2 ** 40), "", "x", [], [1, -2], {}, {"a": 1}, 1e308]


def run_cases(tmp_path, cases, codes=(0, 2)):
    """Run the cases in one child process -> their results, each checked: exit 0 or 2 (`codes`),
    and a 2 in one line that names the file (`names`: the path, or the words the line must hold);
    any other exit without an error line."""
    (tmp_path / "cases.json").write_text(json.dumps([{k: v for k, v in c.items() if k not in ("names", "what")}
                                                      for c in cases]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "cases.json")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    bad = []
    for case, r in zip(cases, results):
        lines = r["stderr"].strip().splitlines()
        errors = [line for line in lines if line.startswith("minitrain:")]
        if r["code"] not in codes or (r["code"] == 2 and (len(errors) != 1 or case["names"] not in errors[0])) \
                or (r["code"] != 2 and errors):  # an exit 1 is a verdict (diff's), never an unexpected error
            bad.append((case.get("what"), r["code"], r["stderr"][-1500:]))
    kinds = {}
    for what, code, err in bad:
        kinds.setdefault(err.strip().splitlines()[-1][:160], what)
    assert not bad, f"{len(bad)} of {len(cases)} cases failed: " + "; ".join(f"{w} -> {e}" for e, w in kinds.items())
    return results


def write_mutant(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def put(data, offset, size, value):
    """data with the `size`-byte little-endian field at offset set to value (wrapped to fit)."""
    data = bytearray(data)
    data[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return data


def cut_and_trail(data, rng):
    """A truncation at a random byte, and trailing bytes."""
    return [("truncated", data[:rng.randrange(len(data))]), ("trailing", data + rng.randbytes(rng.randrange(1, 40)))]


# --- model files: GGUF, APR, a Hugging Face directory ------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny llama as GGUF, APR and an HF directory, with a small tokenizer."""
    from minitrain.convert import convert
    from minitrain.formats import gguf
    from minitrain.formats.hf import save_dir
    from minitrain.model import Model
    from minitrain.config import preset
    from minitrain.demo import train_bpe

    d = tmp_path_factory.mktemp("sources")
    (d / "text.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    tokenizer = train_bpe([d / "text.txt"], 280, d / "tokenizer.json")
    cfg = preset("tiny-llama")
    arrays = {n: t.data for n, t in Model.from_scratch(cfg, seed=0).params.items()}
    gguf.write_gguf(d / "m.gguf", cfg, arrays, tokenizer)
    save_dir(d / "hf", cfg, arrays)
    tokenizer.save(str(d / "hf" / "tokenizer.json"))
    convert(d / "m.gguf", d / "m.apr")
    return d


def gguf_parts(path):
    """(offset, size) of every count, length, type, dim and offset field of a GGUF file (gguf-py's
    reading of it): where a structure-aware mutation writes."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    parts = [(0, 4), (4, 4), (8, 8), (16, 8)]  # magic, version, tensor count, key-value count
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype.kind in "ui" and part.size == 1:  # a length, type, count, dim or offset
                parts.append((part.__array_interface__["data"][0] - base, part.itemsize))
    return parts


def binary_cases(data, fields, rng, n):
    """n mutants of a binary file: a structural field set to an interesting value, or a few
    bytes flipped inside one, or the file cut or grown."""
    out = []
    for k in range(n):
        if k % 6 == 5:
            out += cut_and_trail(data, rng)
            continue
        offset, size = rng.choice(fields)
        if k % 6 == 4:
            flipped = bytearray(data)
            flipped[offset + rng.randrange(size)] ^= 1 << rng.randrange(8)
            out.append((f"flip at {offset}", flipped))
        else:
            value = rng.choice(INTERESTING + [len(data), len(data) + 1, rng.randrange(1 << 16)])
            out.append((f"{value} at {offset}", put(data, offset, size, value)))
    return out


def model_cases(tmp_path, kind, mutants):
    """Each mutant file read by `inspect`, and every other one by `convert` too (every tensor read
    and written out)."""
    cases = []
    for k, (what, data) in enumerate(mutants):
        path = write_mutant(tmp_path / f"{k}" / f"m.{kind}", data)
        for argv in (["inspect", str(path)], ["convert", str(path), str(tmp_path / f"{k}" / "out.apr")])[:1 + k % 2]:
            cases.append({"argv": argv, "names": str(path), "what": f"{kind} {what}: {argv[0]}"})
    return cases


def test_gguf_files(sources, tmp_path):
    data = (sources / "m.gguf").read_bytes()
    run_cases(tmp_path, model_cases(tmp_path, "gguf", binary_cases(data, gguf_parts(sources / "m.gguf"),
                                                                   random.Random(1), 42)))


def apr_fields(data):
    """(offset, size) of the APR header's fields, and of every field of the tensor index."""
    from minitrain.formats.apr import HEADER

    fields, offset = [], 0
    for code in re.findall(r"\d*[a-zA-Z]", HEADER.format[1:]):
        size = struct.calcsize("<" + code)
        if code != "20s":  # the reserved bytes
            fields.append((offset, size))
        offset += size
    index_offset, data_offset = struct.unpack_from("<QQ", data, 24)
    at = index_offset
    while at < data_offset - 2:
        name_len = struct.unpack_from("<H", data, at)[0]
        if name_len == 0:
            break
        ndim = data[at + 2 + name_len + 1]
        fields += [(at, 2), (at + 2 + name_len, 1), (at + 3 + name_len, 1)]
        dims = at + 4 + name_len
        fields += [(dims + 8 * i, 8) for i in range(ndim + 2)]  # the dims, the offset and the size
        at = dims + 8 * (ndim + 2)
    return fields


def test_apr_files(sources, tmp_path):
    data = (sources / "m.apr").read_bytes()
    run_cases(tmp_path, model_cases(tmp_path, "apr", binary_cases(data, apr_fields(data), random.Random(2), 42)))


def json_mutants(obj, rng, n):
    """n variants of a JSON object: a value of the wrong type or out of range, a key removed,
    a nested value changed; and two that are not an object at all."""
    out = [("not JSON", b"{not json"), ("an array", b"[1, 2]")]
    keys = list(obj)
    for _ in range(n):
        changed, key = json.loads(json.dumps(obj)), rng.choice(keys)
        if rng.random() < 0.2:
            del changed[key]
            what = f"no {key}"
        elif isinstance(changed[key], dict) and changed[key] and rng.random() < 0.5:
            inner = rng.choice(list(changed[key]))
            changed[key][inner] = rng.choice(JSON_VALUES)
            what = f"{key}.{inner} = {changed[key][inner]!r}"
        else:
            changed[key] = rng.choice(JSON_VALUES)
            what = f"{key} = {changed[key]!r}"
        out.append((what, json.dumps(changed).encode()))
    return out


def safetensors_mutants(data, rng, n):
    """n variants of a safetensors file: its header length field, a tensor's dtype, shape or
    data_offsets wrong, a key of it removed; and the file cut or grown."""
    size = int.from_bytes(data[:8], "little")
    header, rest = json.loads(data[8:8 + size]), data[8 + size:]
    names = [k for k in header if k != "__metadata__"]
    out = [(f"header length {v}", put(data, 0, 8, v)) for v in (0, 2, size - 1, len(data), (1 << 63) - 1)]
    out += cut_and_trail(data, rng)
    for _ in range(n):
        changed, name = json.loads(json.dumps(header)), rng.choice(names)
        key = rng.choice(["dtype", "shape", "data_offsets", "delete", "entry"])
        if key == "delete":
            del changed[name][rng.choice(list(changed[name]))]
        elif key == "entry":
            changed[name] = rng.choice(JSON_VALUES)
        else:
            changed[name][key] = rng.choice(JSON_VALUES + [[2 ** 40], [-1, 4], [0, 2 ** 62], [3, 1], ["a", 1], "F32"])
        text = json.dumps(changed).encode()
        out.append((f"{name} {key}", len(text).to_bytes(8, "little") + text + rest))
    return out


def test_hugging_face_directories(sources, tmp_path):
    """config.json's values and types, and model.safetensors' header."""
    cases = []
    config = json.loads((sources / "hf" / "config.json").read_text())
    mutants = [("config.json", m) for m in json_mutants(config, random.Random(3), 40)]
    mutants += [("model.safetensors", m) for m in safetensors_mutants((sources / "hf" / "model.safetensors").read_bytes(),
                                                                     random.Random(4), 30)]
    for k, (name, (what, data)) in enumerate(mutants):
        d = tmp_path / f"{k}"
        shutil.copytree(sources / "hf", d)
        write_mutant(d / name, data)
        for argv in (["inspect", str(d)], ["convert", str(d), str(tmp_path / f"out{k}.apr")]):
            cases.append({"argv": argv, "names": str(d), "what": f"{name} {what}: {argv[0]}"})
    run_cases(tmp_path, cases)


def test_trace_files(tmp_path):
    """A trace's safetensors header and its manifest, each read by `minitrain diff` on either side
    of the valid trace: exit 0 or 1 (the comparison's verdict), or 2 in one line."""
    from minitrain.config import ModelConfig
    from minitrain.formats.hf import save_dir
    from minitrain.formats.trace_file import MANIFEST
    from minitrain.model import Model
    from minitrain.trace import trace

    cfg = ModelConfig(family="qwen2", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=8, intermediate_size=24, vocab_size=40, max_position_embeddings=16, rope_theta=1e4,
                      rms_norm_eps=1e-6, tie_word_embeddings=True)  # a trace of 20 kB
    save_dir(tmp_path / "hf", cfg, {n: t.data for n, t in Model.from_scratch(cfg, seed=0).params.items()})
    numpy.random.default_rng(0).integers(0, 40, 40).astype("<u4").tofile(tmp_path / "tokens.bin")
    seed = tmp_path / "seed.safetensors"
    trace(tmp_path / "hf", tmp_path / "tokens.bin", 8, 2, seed, say=lambda line: None)
    data = seed.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    manifest = json.loads(header["__metadata__"][MANIFEST])
    mutants = safetensors_mutants(data, random.Random(5), 30)
    for what, changed in json_mutants(manifest, random.Random(6), 30):
        header["__metadata__"][MANIFEST] = changed.decode()
        text = json.dumps(header).encode()
        mutants.append((f"manifest {what}", len(text).to_bytes(8, "little") + text + data[8 + size:]))
    cases = []
    for k, (what, changed) in enumerate(mutants):
        path = str(write_mutant(tmp_path / f"{k}.safetensors", changed))
        for argv in (["diff", str(seed), path], ["diff", path, str(seed)]):
            cases.append({"argv": argv, "names": path, "what": f"trace {what}: {argv[1] == path and 'as A' or 'as B'}"})
    run_cases(tmp_path, cases, codes=(0, 1, 2))


# --- adapters, token shards, checkpoints -------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(sources, tmp_path_factory):
    """A tiny LoRA run on the tiny llama: its adapter, its checkpoint, and its token shards."""
    d = tmp_path_factory.mktemp("run")
    ids = numpy.random.default_rng(0).integers(0, 280, 40 * 17).astype("<u4")
    (d / "data").mkdir()
    ids.tofile(d / "data" / "shard-00000.bin")
    (ids % 2).astype("u1").tofile(d / "data" / "shard-00000.mask")
    (d / "data" / "manifest.json").write_text(json.dumps({"schema": "pretokenize-bin-v1", "vocab_size": 280,
                                                          "eos_token_id": 0, "masks": True, "shard_count": 1}))
    out = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--init", str(sources / "m.apr"),
                          "--data", str(d / "data"), "--seq-len", "16", "--batch-size", "2", "--steps", "2",
                          "--save-every", "1", "--lora-rank", "4", "--eval-every", "0", "--val-windows", "4",
                          "--out", str(d / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return d


def test_adapter_directories(run_dir, tmp_path):
    adapter = run_dir / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    mutants = [("adapter_config.json", m) for m in json_mutants(config, random.Random(5), 30)]
    mutants += [("adapter_model.safetensors", m)
                for m in safetensors_mutants((adapter / "adapter_model.safetensors").read_bytes(), random.Random(6), 20)]
    cases = []
    for k, (name, (what, data)) in enumerate(mutants):
        d = tmp_path / f"{k}"
        shutil.copytree(adapter, d)
        write_mutant(d / name, data)
        cases.append({"call": "adapter", "path": str(d), "names": str(d), "what": f"{name} {what}"})
    run_cases(tmp_path, cases)


def test_token_shards_masks_and_manifests(run_dir, sources, tmp_path):
    """eval over mutated data directories: a shard cut inside a token, a mask of another length,
    positions that do not follow one another, token ids beyond the vocabulary, a manifest with
    wrong values."""
    data = run_dir / "data"
    ids = (data / "shard-00000.bin").read_bytes()
    rng = random.Random(7)
    mutants = [("shard-00000.bin", w) for w in [("cut in a token", ids[:-3]), ("no tokens", b""),
                                               ("beyond the vocabulary", put(ids, 40, 4, 9999))]]
    mask = (data / "shard-00000.mask").read_bytes()
    mutants += [("shard-00000.mask", w) for w in [("short", mask[:-5]), ("long", mask + b"\1")]]
    positions = numpy.arange(len(ids) // 4, dtype="<u4") % 17
    mutants += [("shard-00000.pos", w) for w in [("jumps", put(positions.tobytes(), 20, 4, 9)),
                                                 ("short", positions.tobytes()[:-4]), ("huge", put(positions.tobytes(), 8, 4, 2 ** 32 - 1))]]
    manifest = json.loads((data / "manifest.json").read_text())
    mutants += [("manifest.json", m) for m in json_mutants(manifest, rng, 25)]
    cases = []
    for k, (name, (what, blob)) in enumerate(mutants):
        d = tmp_path / f"{k}"
        shutil.copytree(data, d)
        write_mutant(d / name, blob)
        cases.append({"argv": ["eval", "--init", str(sources / "m.apr"), "--data", str(d), "--seq-len", "16",
                               "--batch-size", "2"], "names": str(d), "what": f"{name} {what}"})
    results = run_cases(tmp_path, cases)
    assert [r["code"] for r in results[:8]] == [2] * 8  # every damaged shard, mask and positions file is refused


def test_checkpoint_directories(run_dir, tmp_path):
    """--resume from mutated checkpoints: state.json's values, the safetensors files' headers,
    a file missing."""
    step = run_dir / "run" / "step-1"
    state = json.loads((step / "state.json").read_text())
    mutants = [("state.json", m) for m in json_mutants(state, random.Random(8), 30)]
    for name in ("model.safetensors", "optimizer.safetensors", "adapter.safetensors"):
        mutants += [(name, m) for m in safetensors_mutants((step / name).read_bytes(), random.Random(9), 8)]
    cases = []
    for k, (name, (what, blob)) in enumerate(mutants):
        d = tmp_path / f"{k}" / "step-1"
        shutil.copytree(step, d)
        write_mutant(d / name, blob)
        cases.append({"call": "resume", "path": str(d), "out": str(tmp_path / f"{k}"), "names": str(d.parent),
                      "what": f"{name} {what}"})
    run_cases(tmp_path, cases)


# --- the coverage-guided fuzzer's findings (tools/fuzz.py), replayed through the commands ----------

FINDINGS = Path(__file__).parent / "fuzz_findings"


def finding_commands(target, path, seeds, out):
    """The commands that read a finding of `target` at `path` (seeds: tools/fuzz.py's seeds)."""
    model = ["--prompt", "def", "--max-new-tokens", "1"]
    run = ["--data", str(seeds / "data"), "--seq-len", "8", "--batch-size", "2", "--steps", "1", "--eval-every", "0",
           "--val-windows", "2", "--out", str(out)]
    tokenizer = ["tokenize", "--tokenizer", str(seeds / "single" / "tokenizer.json"), "--out"]
    return {"peft": [["pretrain", "--init", str(seeds / "m.apr"), "--lora-from", path, *run]],
            "shards": [["eval", "--init", str(seeds / "m.apr"), "--data", path, "--seq-len", "8", "--batch-size", "1"]],
            "checkpoint": [["pretrain", "--resume", f"{path}/step-2", "--out", path]],
            "jsonl": [[*tokenizer, str(out / "plain"), path],
                      [*tokenizer, str(out / "chat"), "--chat", "--pack", "--seq-len", "8", path]],
            }.get(target, [["inspect", path], ["generate", "--init", path, *model]])  # gguf, apr, hf


def test_fuzz_findings_replay_through_the_commands(tmp_path):
    """Every crash tools/fuzz.py found, kept under tests/fuzz_findings/TARGET/ (a file, or for a
    directory target the files that differ from its seed's), read by the commands that read it:
    each ends in exit 0 or 2 with one line naming the input, and at least one refuses it."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    import fuzz

    seeds = tmp_path / "seeds"
    fuzz.make_seeds(seeds)
    cases, found = [], sorted(p for p in FINDINGS.glob("*/*") if not p.name.startswith("."))
    assert found, "no findings kept"
    for k, finding in enumerate(found):
        target = finding.parent.name
        case = fuzz.Case(target, seeds, tmp_path / f"{k}")
        path = str(case.finding(finding))
        for argv in finding_commands(target, path, seeds, tmp_path / f"{k}" / "out"):
            cases.append({"argv": argv, "names": path, "what": f"{finding.relative_to(FINDINGS)}: {argv[0]}",
                          "finding": k, "cwd": str(seeds)})
    results = run_cases(tmp_path, cases)
    refused = {c["finding"] for c, r in zip(cases, results) if r["code"] == 2}
    assert refused == set(range(len(found))), [str(found[k]) for k in range(len(found)) if k not in refused]

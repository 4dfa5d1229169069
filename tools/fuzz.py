"""Coverage-guided fuzzing of minitrain's readers, in-process, with atheris (libFuzzer's engine).

    python tools/fuzz.py --target gguf|apr|hf|peft|shards|pairs|checkpoint|jsonl|trace [--minutes N] [--work DIR]
    python tools/fuzz.py --target T --minimize CRASH --into FILE   (shrink one crash, same signature)

Each target makes its own small valid seeds (a one-layer model of 16 wide, a 60-token BPE
tokenizer, a 2-step LoRA run of it) and runs on every input what a command reads of it:

    gguf, apr    the file: inspect's reading, load_model, its tokenizer and special tokens, a prompt
                 encoded and decoded
    hf           one file of a Hugging Face directory (single or sharded safetensors), read as above
    peft         one file of a peft adapter directory: read_adapter, then the adapters on the model
    shards       one file of a token directory (shards, masks, positions): eval's windows
    pairs        one file of `tokenize --preference`'s directory (shards, masks, manifest): the pairs
                 as --objective dpo reads them
    checkpoint   one file of a LoRA run's step directory, or its metrics.jsonl: --resume's search,
                 configure and build
    jsonl        a JSON Lines corpus: tokenize's documents, tokenize --chat's conversations and
                 tokenize --preference's pairs
    trace        a trace (seeds: minitrain trace's, a trainer's file without a manifest): diff of
                 it against the seed trace both ways, and against itself, its report rendered

A directory target's input is one byte choosing the file (TARGET.files) and then its bytes; the
rest of the directory is the seed's. A case ends cleanly, or in InputError (the project's own
error). Anything else is a crash: another exception, a MemoryError under the address-space cap
(an allocation sized by a corrupt field), a case past the time cap. A crash's input is saved under
WORK/crashes/TARGET/ with its traceback, the first of each place (exception type and innermost
minitrain line), and the campaign goes on. At the end the corpus libFuzzer kept is replayed under
sys.settrace: the lines of the target's reader modules reached, against their executable lines.
The figures go to stdout and WORK/TARGET.json.
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEMORY_CAP = 3 << 30  # bytes of address space a case may use
TIME_CAP = 10  # seconds a case may run
TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 3
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
            "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class CaseTimeout(Exception):
    """A case ran past TIME_CAP."""


# --- seeds --------------------------------------------------------------------------------------

def micro_config():
    from minitrain.config import ModelConfig

    return ModelConfig(family="llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, intermediate_size=32, vocab_size=64,
                       max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def newer_configs(cfg):
    """The micro model as a Llama 3 (RoPE scaling with every band populated) and as a Qwen3."""
    from minitrain.config import RopeScaling

    scaling = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0, original_max_position_embeddings=64)
    return {"llama3": replace(cfg, rope_scaling=scaling), "qwen3": replace(cfg, family="qwen3")}


def make_seeds(root):
    """The seed files and directories of every target under `root` (made once; deterministic)."""
    if (root / "done").exists():
        pair_seeds(root)
        return trace_seeds(root)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import numpy

    from minitrain.convert import convert
    from minitrain.formats import gguf
    from minitrain.formats.hf import save_dir, write_chat_template
    from minitrain.formats.safetensors_io import save
    from minitrain.model import Model

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=60, special_tokens=specials,
                                                                show_progress=False))
    cfg = micro_config()
    arrays = {n: t.data for n, t in Model.from_scratch(cfg, seed=0).params.items()}
    gguf.write_gguf(root / "m.gguf", cfg, arrays, tokenizer, dtype="f16", chat_template=TEMPLATE)
    for name, newer in newer_configs(cfg).items():  # Llama 3's rope_freqs and keys; Qwen3's q/k norms
        newer_arrays = {n: t.data for n, t in Model.from_scratch(newer, seed=0).params.items()}
        gguf.write_gguf(root / f"{name}.gguf", newer, newer_arrays, tokenizer)
        save_dir(root / name, newer, newer_arrays)
        convert(root / name, root / f"{name}.apr")
    for layout in ("single", "sharded"):
        d = root / layout
        save_dir(d, cfg, arrays)
        tokenizer.save(str(d / "tokenizer.json"))
        write_chat_template(d, TEMPLATE, {"eos_token": "<|im_end|>"})
    d = root / "sharded"  # the same tensors in two shards and an index
    names = sorted(arrays)
    (d / "model.safetensors").unlink()
    index = {}
    for k, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save(d / shard, {n: arrays[n] for n in part})
        index.update({n: shard for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    convert(root / "single", root / "m.apr", tokenizer_path=root / "single" / "tokenizer.json")
    (root / "m-nofooter.apr").write_bytes((root / "m.apr").read_bytes()[:-4])  # the footer CRC is optional
    ids = numpy.array(tokenizer.encode(TEXT).ids * 4, dtype="<u4")
    data = root / "data"
    data.mkdir()
    for k, part in enumerate((ids[:90], ids[90:180])):
        part.tofile(data / f"shard-0000{k}.bin")
        (numpy.arange(len(part)) % 3 > 0).astype("u1").tofile(data / f"shard-0000{k}.mask")
        (numpy.arange(len(part)) % 9).astype("<u4").tofile(data / f"shard-0000{k}.pos")
    rows = [{"content": TEXT[:40]}, {"content": "x = 1\n"}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    talk = [{"role": "user", "content": "add one"}, {"role": "assistant", "content": TEXT[:30]}]
    (root / "chat.jsonl").write_text(json.dumps({"messages": talk}) + "\n" + json.dumps({"messages": talk[:1]}) + "\n")
    run = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--init", "m.apr", "--data", "data",
                          "--seq-len", "8", "--batch-size", "2", "--steps", "2", "--save-every", "1", "--lora-rank",
                          "2", "--eval-every", "0", "--val-windows", "2", "--out", "run"], cwd=root,
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"the seed run failed: {run.stderr[-2000:]}")
    pair_seeds(root)
    trace_seeds(root)
    (root / "done").write_text("")


def pair_seeds(root):
    """Preference pairs in both of TRL's forms (pairs.jsonl), and `tokenize --preference`'s windows
    of them (pairs/)."""
    if (root / "pairs").exists():
        return
    from minitrain.tokenize_pairs import tokenize_pairs_to_shards

    talk = [{"role": "user", "content": "add one"}]
    rows = [{"prompt": talk, "chosen": [{"role": "assistant", "content": TEXT[:30]}],
             "rejected": [{"role": "assistant", "content": TEXT[5:20]}]},
            {"prompt": "def f(x):", "chosen": " return x + 1", "rejected": " return x - 1"}]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenize_pairs_to_shards(root / "single" / "tokenizer.json", root / "pairs", [root / "pairs.jsonl"], 31,
                             log=lambda line: None)


def trace_seeds(root):
    """A float64 trace of the micro model on the packed data, and a trainer's file: a few of its
    tensors under other names, in float32, no manifest."""
    if (root / "t.safetensors").exists():
        return
    import numpy

    from minitrain.formats.safetensors_io import save
    from minitrain.formats.trace_file import Trace
    from minitrain.trace import trace

    trace(root / "single", root / "data", 8, 2, root / "t.safetensors", say=lambda line: None)
    t = Trace(root / "t.safetensors")
    save(root / "u.safetensors", {"embed": t.array("embed").astype(numpy.float32),
                                  "grad.logits": t.array("grad.logits").astype(numpy.float32)})


# --- targets ------------------------------------------------------------------------------------

def apr_header_crc(data):
    """An APR input with its header's CRC rewritten to fit: a checksum would stop every mutation
    of the header at the first check (the mismatch itself is tested in tests/test_apr.py). The
    footer's CRC needs no help: one seed has none."""
    if len(data) < 64 or data[:4] != b"APR\0":
        return data
    return data[:40] + zlib.crc32(data[:40] + data[44:64]).to_bytes(4, "little") + data[44:]


@dataclass
class Target:
    seed: str  # the seed file, or the seed directories' parent, under the seeds' root
    files: tuple  # a directory target's files (relative to `seed`); () for a file target
    modules: tuple  # the reader's modules, whose lines are counted
    suffix: str = ""  # a file target's suffix
    more_seeds: tuple = ()  # a file target's other seed files
    fresh: bool = False  # the readers write into the directory: a fresh copy of the seed for each case
    reader: str = "model"  # Case.read_<reader> reads an input
    fixup: object = None  # input -> the bytes written (checksums made to fit)
    compares: bool = True  # libFuzzer is shown the operands of comparisons (off where they are arrays)


MODEL_READERS = ("formats/sources.py", "inspect_model.py", "model.py", "formats/vocab.py")
TARGETS = {
    "gguf": Target("m.gguf", (), ("formats/gguf.py", "formats/gguf_check.py", "formats/gguf_vocab.py",
                                  *MODEL_READERS), ".gguf", ("llama3.gguf", "qwen3.gguf")),
    "apr": Target("m.apr", (), ("formats/apr.py", "formats/apr_model.py", "formats/apr_meta.py",
                                "formats/apr_quant.py", *MODEL_READERS), ".apr", ("m-nofooter.apr", "llama3.apr", "qwen3.apr"),
                  apr_header_crc),
    "hf": Target(".", ("single/config.json", "single/model.safetensors", "single/tokenizer.json",
                       "single/tokenizer_config.json", "single/chat_template.jinja",
                       "sharded/model.safetensors.index.json", "sharded/model-00001-of-00002.safetensors",
                       "sharded/model-00002-of-00002.safetensors"),
                 ("formats/hf.py", "formats/json_file.py", "formats/safetensors_io.py", *MODEL_READERS)),
    "peft": Target("run/adapter", ("adapter_config.json", "adapter_model.safetensors"),
                   ("formats/peft.py", "formats/json_file.py", "formats/safetensors_io.py", "lora.py"), reader="peft"),
    "shards": Target("data", ("shard-00000.bin", "shard-00000.mask", "shard-00000.pos", "shard-00001.bin",
                              "shard-00001.mask", "shard-00001.pos"), ("data.py",), reader="shards"),
    "pairs": Target("pairs", ("shard-00000.bin", "shard-00000.mask", "manifest.json"), ("data.py",),
                    reader="pairs"),
    "checkpoint": Target("run", ("step-2/state.json", "step-2/model.safetensors", "step-2/optimizer.safetensors",
                                 "step-2/adapter.safetensors", "metrics.jsonl"),
                         ("checkpoint.py", "setup_run.py", "options.py", "formats/json_file.py",
                          "formats/safetensors_io.py", "lora.py", "optim.py", "outputs.py"), fresh=True,
                         reader="checkpoint"),
    "trace": Target("t.safetensors", (), ("formats/trace_file.py", "formats/safetensors_io.py", "trace_diff.py",
                                          "trace_bounds.py"), ".safetensors", ("u.safetensors",), reader="trace",
                    compares=False),
    "jsonl": Target("corpus.jsonl", (), ("corpus.py", "tokenize.py", "tokenize_chat.py", "tokenize_pairs.py", "chat.py"),
                    ".jsonl", ("chat.jsonl", "pairs.jsonl"), reader="jsonl"),
}


class Case:
    """Where a target's inputs are written: a copy of its seed, one file of it replaced per case."""

    def __init__(self, name, seeds, work):
        self.name, self.target, self.seeds = name, TARGETS[name], seeds
        self.place = work / "case" / name  # one per target: campaigns run side by side
        shutil.rmtree(self.place, ignore_errors=True)
        if self.target.files:
            shutil.copytree(seeds / self.target.seed, self.place)
        self.place.mkdir(parents=True, exist_ok=True)
        self.changed = None

    def seed_inputs(self):
        t = self.target
        if not t.files:
            return [(self.seeds / f).read_bytes() for f in (t.seed, *t.more_seeds)]
        return [bytes([k]) + (self.seeds / t.seed / f).read_bytes() for k, f in enumerate(t.files)]

    def write(self, data):
        """The input in place -> the path the readers are given (a file, or the directory)."""
        t = self.target
        if not t.files:
            path = self.place / f"m{t.suffix}"
            path.write_bytes(t.fixup(data) if t.fixup else data)
            return path
        if t.fresh:
            shutil.rmtree(self.place)
            shutil.copytree(self.seeds / t.seed, self.place)
        elif self.changed is not None:  # the last case's file back as the seed has it
            shutil.copyfile(self.seeds / t.seed / self.changed, self.place / self.changed)
        self.changed = t.files[data[0] % len(t.files)] if data else t.files[0]
        (self.place / self.changed).write_bytes(data[1:])
        return self.given(Path(self.changed))

    def finding(self, found):
        """A finding kept under tests/ (a file; for a directory target, a directory of the files
        that differ from the seed's) in place -> the path the readers are given."""
        if not self.target.files:
            return self.write(Path(found).read_bytes())
        files = [f.relative_to(found) for f in Path(found).rglob("*") if f.is_file()]
        for f in files:
            shutil.copyfile(Path(found) / f, self.place / f)
        return self.given(files[0])

    def given(self, changed):
        """What the readers are given when the file `changed` (relative to the seed) is replaced:
        the directory, or for hf the layout's directory that holds it (single/ or sharded/)."""
        return self.place / changed.parts[0] if self.name == "hf" else self.place

    def run(self, data):
        """Read the input as the commands do (see the module's docstring)."""
        getattr(self, f"read_{self.target.reader}")(self.write(data))

    def read_model(self, path):
        from minitrain.formats import gguf
        from minitrain.formats.sources import load_model, load_tokenizer, model_tokenizer, special_tokens
        from minitrain.inspect_model import inspect, render

        gguf.close()  # a file rewritten in the same clock tick with the same size is another file
        render(inspect(path))
        load_model(path)
        tokenizer = load_tokenizer(model_tokenizer(path))
        special_tokens(path, tokenizer)
        tokenizer.decode(tokenizer.encode("def f(x): return 1<|im_end|>").ids)

    def read_peft(self, path):
        from minitrain import lora
        from minitrain.formats import peft

        spec, arrays = peft.read_adapter(path)
        lora.Adapters(spec, micro_config(), arrays, str(path))

    def read_shards(self, path):
        from minitrain.data import TokenWindows

        windows = TokenWindows(path, 8, micro_config().vocab_size)
        for k in range(len(windows)):
            windows.batch([k])
            windows.positions([k])

    def read_pairs(self, path):
        from minitrain.data import PairWindows, TokenWindows

        pairs = PairWindows(TokenWindows(path, 31, micro_config().vocab_size), path)
        for k in range(len(pairs)):
            pairs.examples([k])

    def read_checkpoint(self, path):
        from minitrain.checkpoint import newest
        from minitrain.setup_run import build, configure

        cwd = os.getcwd()
        os.chdir(self.seeds)  # the run's --init and --data are relative to the seeds' root
        try:
            newest(path)  # --resume auto's search
            build(*configure({"resume": str(path / "step-2"), "out": str(path)}))
        finally:
            os.chdir(cwd)

    def read_trace(self, path):
        from minitrain.trace_diff import as_json, diff, render

        seed = self.seeds / self.target.seed
        for a, b, rtol in ((seed, path, None), (path, seed, None), (path, path, 0.1)):
            report = diff(a, b, rtol=rtol)
            render(report, a, b)
            as_json(report)

    def read_jsonl(self, path):
        from minitrain.errors import InputError
        from minitrain.tokenize import tokenize_to_shards
        from minitrain.tokenize_chat import tokenize_chat_to_shards
        from minitrain.tokenize_pairs import tokenize_pairs_to_shards

        out, log = self.place / "out", lambda line: None
        tokenizer = self.seeds / "single" / "tokenizer.json"
        shutil.rmtree(out, ignore_errors=True)
        try:  # the documents; a record without "content" ends this reading, not the next
            tokenize_to_shards(tokenizer, out, [path], log=log)
        except InputError:
            pass
        shutil.rmtree(out, ignore_errors=True)
        try:  # the conversations
            tokenize_chat_to_shards(tokenizer, out, [path], pack_seq_len=8, log=log)
        except InputError:
            pass
        shutil.rmtree(out, ignore_errors=True)
        tokenize_pairs_to_shards(tokenizer, out, [path], 8, log=log)


# --- crashes ------------------------------------------------------------------------------------

def attempt(case, data):
    """None for a clean end or the project's own error; else (signature, report) of the crash."""
    from minitrain.errors import InputError

    def timeout(signum, frame):
        raise CaseTimeout(f"the case ran past {TIME_CAP} s")

    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(TIME_CAP)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            case.run(data)
        return None
    except InputError:
        return None
    except BaseException as e:  # noqa: B036 -- a Rust panic is a BaseException; everything else is a crash
        if isinstance(e, KeyboardInterrupt):
            raise
        return signature(e), "".join(traceback.format_exception(e))
    finally:
        signal.alarm(0)


def signature(e):
    """A crash's place: its type and the innermost line of minitrain (or of all) it passed."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/minitrain/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(e).__name__}@{where}"


def child(name, work, seconds):
    """The campaign itself (a process of its own: libFuzzer ends it with exit())."""
    import atheris

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    hooks = atheris.instrument_imports(include=["minitrain", "gguf"])
    if not TARGETS[name].compares:  # atheris 3.0 keeps the result of every traced comparison that is not
        # a bool (x == y of two arrays: 2000 of 100 000 elements held 191 MB): lines only, no comparisons
        hooks = atheris.import_hook.HookManager({"minitrain", "gguf"}, set(), True, trace_dataflow=False)
    with hooks:  # every module now: the commands import late
        import gguf  # noqa: F401
        import minitrain

        for module in pkgutil.walk_packages(minitrain.__path__, "minitrain."):
            if not module.name.startswith(("minitrain.gpu", "minitrain.__main__")):
                importlib.import_module(module.name)
    case = Case(name, work / "seeds", work)
    crashes, corpus = work / "crashes" / name, work / "corpus" / name
    crashes.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for k, data in enumerate(case.seed_inputs()):
            (corpus / f"seed-{k}").write_bytes(data)
    seen = {p.stem for p in crashes.glob("*.txt")}

    def one(data):
        found = attempt(case, data)
        if found is not None:
            sig, report = found
            key = re.sub(r"[^A-Za-z0-9_.@-]", "_", sig)
            if key not in seen:
                seen.add(key)
                (crashes / f"{key}.bin").write_bytes(data)
                (crashes / f"{key}.txt").write_text(report)
                print(f"crash {key}", file=sys.__stderr__, flush=True)

    longest = max(len(d) for d in case.seed_inputs())
    artifacts = work / "artifacts" / name  # libFuzzer's own slow-unit files go there, not into the repository
    artifacts.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=120", "-rss_limit_mb=0",
                   f"-artifact_prefix={artifacts}/",
                   f"-max_len={2 * longest}", "-print_final_stats=1"], one)
    atheris.Fuzz()


# --- lines reached ------------------------------------------------------------------------------

def executable_lines(path):
    """The line numbers of a module that hold code (every code object's lines)."""
    lines, stack = set(), [compile(path.read_text(), str(path), "exec")]
    while stack:
        code = stack.pop()
        lines.update(line for _, _, line in code.co_lines() if line is not None)
        stack += [c for c in code.co_consts if hasattr(c, "co_lines")]
    return lines


def lines_reached(name, work):
    """{module: (lines reached, executable lines)} over the campaign's corpus."""
    files = {str(REPO / "minitrain" / m): m for m in TARGETS[name].modules}
    hit = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename not in files:
            return None

        def line(frame, event, arg):
            if event == "line":
                hit.add((frame.f_code.co_filename, frame.f_lineno))
            return line
        hit.add((frame.f_code.co_filename, frame.f_code.co_firstlineno))
        return line

    case = Case(name, work / "seeds", work)
    for path in sorted((work / "corpus" / name).iterdir()):
        sys.settrace(tracer)
        try:
            attempt(case, path.read_bytes())
        finally:
            sys.settrace(None)
    out = {}
    for full, short in files.items():
        lines = executable_lines(Path(full))
        out[short] = (len({n for f, n in hit if f == full} & lines), len(lines))
    return out


# --- minimising ---------------------------------------------------------------------------------

def minimize(name, work, crash, into, seconds=120):
    """Shrink a crash's input while it crashes at the same place: chunks removed, then bytes
    zeroed, halving the chunk each round (a directory target keeps its first byte)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    case = Case(name, work / "seeds", work)
    data = Path(crash).read_bytes()
    found = attempt(case, data)
    if found is None:
        sys.exit(f"{crash}: does not crash {name}'s readers")
    want, head = found[0], 1 if TARGETS[name].files else 0
    end, chunk = time.monotonic() + seconds, max(1, (len(data) - head) // 2)
    while chunk >= 1 and time.monotonic() < end:
        at = head
        while at < len(data) and time.monotonic() < end:
            for trial in (data[:at] + data[at + chunk:], data[:at] + bytes(min(chunk, len(data) - at)) + data[at + chunk:]):
                if trial != data and (attempt(case, trial) or (None,))[0] == want:
                    data = trial
                    break
            else:
                at += chunk
        chunk //= 2
    into = Path(into)
    if head:  # a directory target's finding: the one file, under its place in the directory
        into = into / TARGETS[name].files[data[0] % len(TARGETS[name].files)]
        into.parent.mkdir(parents=True, exist_ok=True)
    fixup = TARGETS[name].fixup or (lambda body: body)
    into.write_bytes(fixup(data[head:]))
    print(f"{want}: {len(Path(crash).read_bytes()):,} -> {len(data):,} bytes, {into}")


# --- the campaign -------------------------------------------------------------------------------

def campaign(name, work, minutes):
    make_seeds(work / "seeds")
    log = work / f"{name}.log"
    started = time.monotonic()
    with open(log, "w") as f:
        subprocess.run([sys.executable, __file__, "--target", name, "--work", str(work), "--child",
                        str(int(minutes * 60))], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    text = log.read_text()
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    crashes = sorted(p.stem for p in (work / "crashes" / name).glob("*.txt"))
    replay = subprocess.run([sys.executable, __file__, "--target", name, "--work", str(work), "--lines"],
                            capture_output=True, text=True, cwd=REPO)
    if replay.returncode:
        sys.exit(f"replaying the corpus failed: {replay.stderr[-2000:]}")
    lines = json.loads(replay.stdout.splitlines()[-1])
    result = {"target": name, "minutes": round((time.monotonic() - started) / 60, 1),
              "cases": int(runs[-1]) if runs else None, "corpus": len(list((work / "corpus" / name).iterdir())),
              "lines": {m: list(v) for m, v in lines.items()},
              "lines_reached": sum(v[0] for v in lines.values()), "lines_total": sum(v[1] for v in lines.values()),
              "crashes": crashes}
    (work / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: {result['cases']:,} cases in {result['minutes']} min, corpus {result['corpus']}, "
          f"{result['lines_reached']}/{result['lines_total']} lines of {len(lines)} modules, "
          f"{len(crashes)} crash place(s){': ' + ', '.join(crashes) if crashes else ''}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, choices=list(TARGETS))
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/minitrain-fuzz"))
    p.add_argument("--minimize", metavar="CRASH")
    p.add_argument("--into", metavar="FILE")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lines", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = a.work.resolve()
    if a.child is not None:
        child(a.target, work, a.child)
    elif a.lines:
        print(json.dumps(lines_reached(a.target, work)))
    elif a.minimize:
        make_seeds(work / "seeds")
        minimize(a.target, work, a.minimize, a.into or f"{a.minimize}.min")
    else:
        try:
            import atheris  # noqa: F401
        except ImportError:
            sys.exit("tools/fuzz.py needs atheris: pip install atheris")
        campaign(a.target, work, a.minutes)


if __name__ == "__main__":
    main()

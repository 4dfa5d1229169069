"""The embedded demo: `minitrain pretrain` with no options.

A corpus present on every machine with Python: the standard library's own source. The demo
trains a byte-level BPE tokenizer on it (cached), tokenizes it into u32 shards (cached), then
trains the `tiny-llama` preset from scratch on the CPU for a few minutes, holding out the last
windows for validation, and writes a run directory (final.apr, metrics.jsonl, run.json, and a
copy of the tokenizer) that `minitrain generate` and `minitrain plot` can read.
"""

import hashlib
import math
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minitrain.corpus import Corpus
from minitrain.errors import InputError
from minitrain.options import TrainConfig
from minitrain.setup_run import build

VOCAB = 8192  # tiny-llama's vocabulary
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DEMO = dict(arch="tiny-llama", seq_len=128, batch_size=8, steps=600, data_order="shuffle", lr=3e-3, min_lr=3e-4,
            warmup_steps=50, weight_decay=0.1, beta2=0.95, eval_every=100, val_windows=64, seed=0)
LEARNED = 3.0  # the demo fails (exit 1) unless the final validation loss is this far below ln V


def stdlib_sources():
    """Every .py file of the standard library, tests and third-party packages left out, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]


def cache_dir():
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minitrain" / f"demo-py{sys.version_info.major}.{sys.version_info.minor}"


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
    tokenizer.train_from_iterator((text for _, text in Corpus(files).documents("content")), trainer=trainer)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return tokenizer


def prepare(log=sys.stderr):
    """(tokenizer.json, token directory), built once per Python version and cached."""
    from minitrain.tokenize import tokenize_to_shards

    cache = cache_dir()
    files = stdlib_sources()
    fingerprint = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:16]
    tokenizer, tokens = cache / "tokenizer.json", cache / f"tokens-{fingerprint}"
    if not tokenizer.exists():
        print(f"demo: training a {VOCAB}-token byte-level BPE tokenizer on {len(files)} standard-library files "
              f"(once; cached in {cache})", file=log, flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        train_bpe(files, VOCAB, cache / "tokenizer.json.partial")
        os.replace(cache / "tokenizer.json.partial", tokenizer)
    if not (tokens / "manifest.json").exists():
        print(f"demo: tokenizing {len(files)} files into {tokens}", file=log, flush=True)
        partial = cache / (tokens.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        tokenize_to_shards(tokenizer, partial, files)
        shutil.rmtree(tokens, ignore_errors=True)
        os.replace(partial, tokens)
    return tokenizer, tokens


def run_demo(out="runs/demo", log=sys.stderr):
    tokenizer, tokens = prepare(log)
    Path(out).mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer, Path(out) / "tokenizer.json")
    print(f"demo: training tiny-llama from scratch on {tokens} -> {out}", file=log, flush=True)
    run = build(TrainConfig(data=str(tokens), out=out, tokenizer=str(tokenizer), **DEMO).resolved(), log=log)
    report = run.run()
    uniform = math.log(run.model.config.vocab_size)
    if report["final_val_loss"] > uniform - LEARNED:
        raise RuntimeError(f"demo: final validation loss {report['final_val_loss']:.3f} is not {LEARNED} below "
                           f"ln V = {uniform:.3f}: the model did not learn")
    print(f"demo: validation loss {report['init_loss']:.3f} -> {report['final_val_loss']:.3f} "
          f"(ln V = {uniform:.3f}). Next:\n  minitrain generate --init {out}/final.apr --tokenizer "
          f"{out}/tokenizer.json --prompt 'def '\n  minitrain plot {out}", file=log, flush=True)
    return report

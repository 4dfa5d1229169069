"""`tokenize --preference` (minitrain/tokenize_pairs.py): preference pairs in TRL's plain and
conversational forms tokenized as TRL's DPOTrainer tokenizes them -- transformers'
apply_chat_template / tokenizer(text) for the ids, the completion from where the tokenized prompt
stops being a prefix -- and written as the pair windows `pretrain --objective dpo` reads. The
tokenizer and chat template are the real SmolLM2-135M-Instruct's."""

import json
import subprocess
import sys

import numpy as np
import pytest

from minitrain import tokenize_pairs
from minitrain.errors import InputError
from minitrain.tokenize_pairs import tokenize_pairs_to_shards

PAIRS = [
    {"prompt": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                {"role": "user", "content": "Now subtract."}],
     "chosen": [{"role": "assistant", "content": "def sub(a, b):\n    return a - b"}],
     "rejected": [{"role": "assistant", "content": "def sub(a, b):\n    return b - a\n"}]},
    {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi!"}],
     "rejected": [{"role": "assistant", "content": "Hello there, how can I help you today?"}]},
    {"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "    return a - b<|im_end|>"},
    {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"},
]
T = 95  # --seq-len: windows of 96 tokens


@pytest.fixture(scope="module")
def hf(smollm2):
    """transformers' tokenizer of the real model, with its chat template: the oracle."""
    transformers = pytest.importorskip("transformers")
    from minitrain import chat
    from minitrain.formats.sources import load_tokenizer

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(smollm2), eos_token="<|im_end|>")
    tokenizer.chat_template = chat.model_template(smollm2).text
    return tokenizer


def trl_sequences(hf, pair):
    """(chosen ids, rejected ids, completion start) as TRL 1.16's tokenize_fn makes them."""
    if isinstance(pair["prompt"], list):
        p = hf.apply_chat_template(pair["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)
        c, r = (hf.apply_chat_template(pair["prompt"] + pair[k], tokenize=True, return_dict=True)
                for k in ("chosen", "rejected"))
    else:
        eos = hf.eos_token
        p, c, r = (hf(text=t) for t in (pair["prompt"],
                                        *(pair["prompt"] + s + ("" if s.endswith(eos) else eos)
                                          for s in (pair["chosen"], pair["rejected"]))))
    p, c, r = p["input_ids"], c["input_ids"], r["input_ids"]

    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return c, r, min(prefix(p, c), prefix(p, r))


def tokenize(smollm2, tmp_path, records, *args, name="out"):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--preference", "--tokenizer", smollm2,
                           "--out", str(tmp_path / name), *args, str(data)], capture_output=True, text=True)


def windows(directory):
    ids = np.concatenate([np.fromfile(p, "<u4") for p in sorted(directory.glob("shard-*.bin"))])
    mask = np.concatenate([np.fromfile(p, "u1") for p in sorted(directory.glob("shard-*.mask"))])
    return ids.reshape(-1, T + 1), mask.reshape(-1, T + 1)


def mismatches(hf, directory):
    """The pairs whose windows are not TRL's sequences, masks and EOS padding (mask 0)."""
    ids, mask = windows(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    bad = []
    for k, pair in enumerate(PAIRS):
        c, r, start = trl_sequences(hf, pair)
        for row, seq in ((2 * k, c), (2 * k + 1, r)):
            want_ids = seq + [manifest["eos_token_id"]] * (T + 1 - len(seq))
            want_mask = [0] * start + [1] * (len(seq) - start) + [0] * (T + 1 - len(seq))
            if ids[row].tolist() != want_ids or mask[row].tolist() != want_mask:
                bad.append(row)
    return bad


def test_pairs_are_trls_sequences_and_masks(hf, smollm2, tmp_path):
    run = tokenize(smollm2, tmp_path, PAIRS, "--seq-len", str(T), "--shard-tokens", "100")
    assert run.returncode == 0, run.stderr
    assert mismatches(hf, tmp_path / "out") == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["pairs"]["pairs"] == 4 and manifest["pairs"]["plain"] == 2 and manifest["masks"]
    assert manifest["pairs"]["seq_len"] == T and manifest["pairs"]["template_origin"].endswith("(tokenizer.chat_template)")
    # --shard-tokens 100 holds one pair (2 x 96 tokens): every shard whole pairs
    assert [p.stat().st_size for p in sorted((tmp_path / "out").glob("shard-*.bin"))] == [4 * 2 * (T + 1)] * 4
    ids, mask = windows(tmp_path / "out")
    from minitrain.formats.sources import load_tokenizer

    chosen, rejected = (load_tokenizer(smollm2).decode(ids[k][mask[k] == 1].tolist(), skip_special_tokens=False)
                        for k in (4, 5))
    assert chosen.endswith("return a + b\n<|im_end|>")  # plain: the EOS text appended, and trained on ...
    assert rejected.endswith("return a - b<|im_end|>") and rejected.count("<|im_end|>") == 1  # ... once


def test_a_completion_start_off_by_one_is_caught(hf, smollm2, tmp_path, monkeypatch):
    """The comparison above fails when the completion starts one token late (a planted bug)."""
    common = tokenize_pairs.common_prefix
    monkeypatch.setattr(tokenize_pairs, "common_prefix", lambda a, b: common(a, b) + 1)
    shards(smollm2, tmp_path, PAIRS, "late")
    assert len(mismatches(hf, tmp_path / "late")) == 2 * len(PAIRS)


def shards(smollm2, tmp_path, records, name, **options):
    """tokenize_pairs_to_shards in this process (the command's work without its start-up)."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tokenize_pairs_to_shards(smollm2, tmp_path / name, [data], T, log=lambda *_: None, **options)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "b"}, "no `rejected` (a preference pair is `prompt`, `chosen` and `rejected`"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "`chosen` and `rejected` are the same"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "`chosen` must be a list of one assistant message"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
     "expected three strings (plain) or three lists of messages (conversational), found prompt str, chosen list"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "prompt: message 1 has role 'robot'"),
    ({"prompt": "x " * 120, "chosen": "b", "rejected": "c"},
     "its prompt of 120 tokens leaves no completion token in a window of 96"),
])
def test_bad_pairs_name_the_line_and_skip_invalid_lists_them(smollm2, tmp_path, record, message):
    with pytest.raises(InputError) as e:
        shards(smollm2, tmp_path, [PAIRS[3], record], "out")
    assert f"{tmp_path / 'out.jsonl'}:line 2: {message}" in str(e.value)
    assert not list((tmp_path / "out").glob("shard-*"))  # nothing half-written is left
    manifest = shards(smollm2, tmp_path, [PAIRS[3], record], "skipped", skip_invalid=True)
    assert manifest["pairs"]["pairs"] == 1 and message in manifest["skipped"][0]["error"]


def test_a_bad_pair_is_one_line_from_the_command(smollm2, tmp_path):
    run = tokenize(smollm2, tmp_path, [PAIRS[3], {"prompt": "a", "chosen": "b", "rejected": "b"}], "--seq-len", str(T))
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert f"{tmp_path / 'out.jsonl'}:line 2: `chosen` and `rejected` are the same" in run.stderr


def test_long_pairs_are_cut_and_counted_or_refused(hf, smollm2, tmp_path):
    long = {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4" * 120, "rejected": " 5"}
    assert shards(smollm2, tmp_path, [long], "out")["pairs"]["truncated"] == 1
    ids, mask = windows(tmp_path / "out")
    c, _, start = trl_sequences(hf, long)
    assert ids[0].tolist() == c[:T + 1] and mask[0].tolist() == [0] * start + [1] * (T + 1 - start)
    with pytest.raises(InputError, match=r"does not fit a window of 96 \(--seq-len \+ 1\); drop --no-truncate"):
        shards(smollm2, tmp_path, [long], "refused", truncate=False)


@pytest.mark.parametrize("args, message", [
    ([], "--preference needs --seq-len T"),
    (["--seq-len", "7", "--chat"], "--preference writes pairs, not conversations: drop --chat"),
    (["--seq-len", "7", "--pack"], "--preference writes pairs, not conversations: drop --pack"),
])
def test_option_mistakes_are_one_line(smollm2, tmp_path, args, message):
    run = tokenize(smollm2, tmp_path, PAIRS, *args)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and message in run.stderr, run.stderr

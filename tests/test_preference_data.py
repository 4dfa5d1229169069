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

from minitrain import chat, tokenize_pairs
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
LONG = {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4" * 120, "rejected": " 5"}  # chosen: 252 tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from minitrain.formats.sources import load_tokenizer

    return load_tokenizer(smollm2)


def hf_tokenizer(tokenizer, template):
    """transformers' tokenizer around ours, with the model's EOS (TRL's add_eos appends its text)
    and `template`: the oracle."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    hf.chat_template = template
    return hf


@pytest.fixture(scope="module")
def hf(tokenizer, smollm2):
    return hf_tokenizer(tokenizer, chat.model_template(smollm2).text)


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


def shards(tokenizer_path, tmp_path, records, name, **options):
    """tokenize_pairs_to_shards in this process (the command's work without its start-up)."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tokenize_pairs_to_shards(tokenizer_path, tmp_path / name, [data], T, log=lambda *_: None, **options)


def tokenize(smollm2, tmp_path, records, *args, name="out"):
    """The command, in a process of its own."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--preference", "--tokenizer", smollm2,
                           "--out", str(tmp_path / name), *args, str(data)], capture_output=True, text=True, check=False)


def windows(directory):
    """ids and mask (windows, T + 1) of every shard, in order."""
    ids = np.concatenate([np.fromfile(p, "<u4") for p in sorted(directory.glob("shard-*.bin"))])
    mask = np.concatenate([np.fromfile(p, "u1") for p in sorted(directory.glob("shard-*.mask"))])
    return ids.reshape(-1, T + 1), mask.reshape(-1, T + 1)


def mismatches(hf, directory, pairs=PAIRS):
    """The windows that are not TRL's sequence of their pair (2k: chosen, 2k + 1: rejected), its
    mask (1 from TRL's completion start on) and EOS padding with mask 0."""
    ids, mask = windows(directory)
    eos = json.loads((directory / "manifest.json").read_text())["eos_token_id"]
    assert len(ids) == 2 * len(pairs)
    bad = []
    for k, pair in enumerate(pairs):
        c, r, start = trl_sequences(hf, pair)
        for row, seq in ((2 * k, c), (2 * k + 1, r)):
            want_ids = seq + [eos] * (T + 1 - len(seq))
            want_mask = [0] * start + [1] * (len(seq) - start) + [0] * (T + 1 - len(seq))
            if ids[row].tolist() != want_ids or mask[row].tolist() != want_mask:
                bad.append(row)
    return bad


def test_pairs_are_trls_sequences_and_masks(hf, smollm2, tokenizer, tmp_path):
    manifest = shards(smollm2, tmp_path, PAIRS, "out", shard_tokens=3 * 2 * (T + 1) - 1)
    assert mismatches(hf, tmp_path / "out") == []
    p = manifest["pairs"]
    assert (p["pairs"], p["plain"], p["conversational"], p["truncated"], p["seq_len"]) == (4, 2, 2, 0, T)
    assert p["template_origin"].endswith("(tokenizer.chat_template)") and manifest["masks"]
    ids, mask = windows(tmp_path / "out")
    assert (p["chosen_tokens"], p["rejected_tokens"]) == (int(mask[0::2].sum()), int(mask[1::2].sum()))
    # --shard-tokens just under 3 pairs: shards of 2 whole pairs (ids and masks cut alike)
    for suffix, size in ((".bin", 4), (".mask", 1)):
        sizes = [f.stat().st_size for f in sorted((tmp_path / "out").glob(f"shard-*{suffix}"))]
        assert sizes == [2 * 2 * (T + 1) * size] * 2
    chosen, rejected = (tokenizer.decode(ids[k][mask[k] == 1].tolist(), skip_special_tokens=False) for k in (4, 5))
    # plain: the EOS text appended, and trained on once; the prompt's last "\n" merges with the
    # completion's indent, so (TRL's way) the completion starts at that token
    assert (chosen, rejected) == ("\n    return a + b\n<|im_end|>", "\n    return a - b<|im_end|>")
    chosen = tokenizer.decode(ids[0][mask[0] == 1].tolist(), skip_special_tokens=False)
    assert chosen == "def sub(a, b):\n    return a - b<|im_end|>\n"  # conversational: the turn and its end


def test_a_completion_start_off_by_one_is_caught(hf, smollm2, tmp_path, monkeypatch):
    """The comparison above fails when the completion starts one token late (a planted bug)."""
    common = tokenize_pairs.common_prefix
    monkeypatch.setattr(tokenize_pairs, "common_prefix", lambda a, b: common(a, b) + 1)
    shards(smollm2, tmp_path, PAIRS, "late")
    assert mismatches(hf, tmp_path / "late") == list(range(2 * len(PAIRS)))


def test_plain_pairs_have_the_tokens_the_tokenizer_adds(smollm2, tokenizer, tmp_path):
    """A tokenizer that adds a BOS (an HF directory): plain pairs get it, as TRL's tokenizer(text)
    does; conversational ones do not (apply_chat_template adds none). Without a chat template plain
    pairs are fine and a conversational one is refused."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    adds_bos = Tokenizer.from_str(tokenizer.to_str())
    adds_bos.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    model = tmp_path / "model"
    model.mkdir()
    adds_bos.save(str(model / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert "template_origin" not in shards(model / "tokenizer.json", tmp_path, PAIRS[2:], "plain")["pairs"]
    with pytest.raises(InputError, match=r"model: the model has no chat template, which the conversational pair of "
                                         r".*conversational.jsonl:line 1 needs; give one with --chat-template"):
        shards(model / "tokenizer.json", tmp_path, PAIRS, "conversational")
    template = chat.model_template(smollm2).text
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    shards(model / "tokenizer.json", tmp_path, PAIRS, "out")
    assert mismatches(hf_tokenizer(adds_bos, template), tmp_path / "out") == []
    ids, _ = windows(tmp_path / "out")
    assert ids[4:, 0].tolist() == [0] * 4 and 0 not in ids[:4, :5]


BAD = [  # records and the error naming them
    ({"prompt": "a", "chosen": "b"}, "no `rejected` (a preference pair is `prompt`, `chosen` and `rejected`"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "`chosen` and `rejected` are the same"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]},
     "`chosen` must be a list of one assistant message, found roles user"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
     "expected three strings (plain) or three lists of messages (conversational), found prompt str, chosen list"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "prompt: message 1 has role 'robot'"),
    ({"prompt": "x " * 120, "chosen": "b", "rejected": "c"},
     "its prompt of 120 tokens leaves no completion token in a window of 96 (--seq-len 95)"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_a_bad_pair_names_its_line_and_leaves_nothing(smollm2, tmp_path, record, message):
    with pytest.raises(InputError) as e:
        shards(smollm2, tmp_path, [PAIRS[3], record], "out")
    assert f"{tmp_path / 'out.jsonl'}:line 2: {message}" in str(e.value)
    assert not list((tmp_path / "out").glob("shard-*"))  # the first pair's shard is removed


def test_bad_pairs_from_the_command_one_line_or_skipped_and_listed(smollm2, tmp_path):
    bad = BAD + [(LONG, "a sequence of 252 tokens does not fit a window of 96 (--seq-len 95); drop --no-truncate")]
    records = [PAIRS[3]] + [record for record, _ in bad] + [PAIRS[3], PAIRS[0]]  # PAIRS[3] twice: --dedup
    run = tokenize(smollm2, tmp_path, records, "--seq-len", str(T), "--no-truncate")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert run.stderr.startswith(f"minitrain: error: {tmp_path / 'out.jsonl'}:line 2: {bad[0][1]}"), run.stderr
    assert not list((tmp_path / "out").iterdir())
    run = tokenize(smollm2, tmp_path, records, "--seq-len", str(T), "--no-truncate", "--skip-invalid", "--dedup",
                   "--json", name="skipped")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "skipped" / "manifest.json").read_text())
    errors = [s["error"] for s in manifest["skipped"]]
    assert len(errors) == len(bad)
    for line, (error, (_, message)) in enumerate(zip(errors, bad), 2):
        assert error.startswith(f"{tmp_path / 'skipped.jsonl'}:line {line}: {message}"), error
    assert manifest["pairs"]["pairs"] == 2 and manifest["dedup"]["duplicates_dropped"] == 1
    summary, counts = run.stdout.strip().split("\n")
    assert summary.startswith("2 pairs (1 plain, 1 conversational) -> 384 tokens (") and "0 truncated" in summary
    assert json.loads(counts)["pairs"] == 2 and json.loads(counts)["skipped"] == len(bad)


def test_long_pairs_are_cut_and_counted(hf, smollm2, tmp_path):
    assert shards(smollm2, tmp_path, [LONG], "out")["pairs"]["truncated"] == 1
    ids, mask = windows(tmp_path / "out")
    c, r, start = trl_sequences(hf, LONG)
    assert len(c) > T + 1 and ids[0].tolist() == c[:T + 1] and mask[0].tolist() == [0] * start + [1] * (T + 1 - start)
    assert ids[1, :len(r)].tolist() == r and mask[1].sum() == len(r) - start  # the short side as it is


@pytest.mark.parametrize("args, message", [
    ([], "--preference needs --seq-len T (the windows the pairs are written in)"),
    (["--seq-len", "7", "--chat"], "--preference writes pairs, not conversations: drop --chat"),
    (["--seq-len", "7", "--pack"], "--preference writes pairs, not conversations: drop --pack"),
])
def test_option_mistakes_are_one_line(smollm2, tmp_path, args, message):
    run = tokenize(smollm2, tmp_path, PAIRS, *args)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and message in run.stderr, run.stderr

"""`minitrain tokenize`, `generate` and `plot` from the command line, on a tiny trained run, and
loading a trained run's final.apr back."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from minitrain.formats.sources import load_model
from minitrain.demo import train_bpe
from minitrain.setup_run import build, configure

CORPUS = "def add(x, y):\n    return x + y\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n" * 40


def minitrain(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tokenizer (vocab 300), its token shards, and a 3-step tiny-llama run on them that
    embeds the tokenizer in its final.apr."""
    d = tmp_path_factory.mktemp("run")
    (d / "corpus.py").write_text(CORPUS)
    train_bpe([d / "corpus.py"], 300, d / "tokenizer.json")
    out = minitrain("tokenize", "--tokenizer", str(d / "tokenizer.json"), "--out", str(d / "tokens"),
                    str(d / "corpus.py"), str(d / "corpus.py"))
    assert out.returncode == 0, out.stderr
    assert "2 documents" in out.stdout and "EOS 0 between documents" in out.stdout
    run = build(*configure(dict(data=str(d / "tokens"), out=str(d / "out"), arch="tiny-llama", seq_len=16,
                              batch_size=2, steps=3, val_windows=2, lr=1e-3, warmup_steps=1,
                              tokenizer=str(d / "tokenizer.json"))))
    run.run()
    return d, run


def test_final_apr_loads_back_exactly(run_dir):
    d, run = run_dir
    model = load_model(d / "out" / "final.apr")
    assert model.config == run.model.config and model.config.tie_word_embeddings
    for name, t in run.model.params.items():
        np.testing.assert_array_equal(model.params[name].data, t.data, err_msg=name)


def test_eval_of_final_apr_matches_the_last_validation_loss(run_dir):
    d, run = run_dir
    out = minitrain("eval", "--init", str(d / "out" / "final.apr"), "--data", str(d / "tokens"), "--seq-len", "16",
                    "--batch-size", "1", "--json")
    assert out.returncode == 0, out.stderr
    windows = len(run.data.stream.windows)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == windows * 16
    # the last two windows are the run's validation set; eval them alone through the tokens file
    val = np.fromfile(d / "tokens" / "shard-00000.bin", dtype="<u4")[(windows - 2) * 17: windows * 17]
    val.tofile(d / "val.bin")
    out = minitrain("eval", "--init", str(d / "out" / "final.apr"), "--data", str(d / "val.bin"), "--seq-len", "16",
                    "--batch-size", "2", "--json")
    assert json.loads(out.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(run.state["last_val_loss"], rel=1e-6)


def test_generate_is_seeded_and_greedy_is_deterministic(run_dir):
    d, _ = run_dir
    base = ["generate", "--init", str(d / "out" / "final.apr"), "--tokenizer", str(d / "tokenizer.json"),
            "--prompt", "def add", "--max-new-tokens", "12"]
    greedy = [minitrain(*base, "--temperature", "0", "--seed", str(s)) for s in (1, 2)]
    assert greedy[0].returncode == 0, greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("def add")
    sampled = [minitrain(*base, "--temperature", "1.5", "--top-k", "0", "--seed", str(s)).stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_uses_the_tokenizer_an_apr_file_embeds(run_dir):
    d, _ = run_dir
    base = ["generate", "--init", str(d / "out" / "final.apr"), "--prompt", "def add", "--max-new-tokens", "8",
            "--temperature", "0"]
    own, given = minitrain(*base), minitrain(*base, "--tokenizer", str(d / "tokenizer.json"))
    assert own.returncode == 0, own.stderr
    assert own.stdout == given.stdout and own.stdout.startswith("def add")


def test_generate_refuses_a_tokenizer_larger_than_the_model(run_dir, tmp_path):
    d, _ = run_dir
    (tmp_path / "big.txt").write_text("".join(chr(0x4E00 + i) for i in range(9000)))  # 9000 distinct tokens
    train_bpe([tmp_path / "big.txt"], 8300, tmp_path / "big.json")
    out = minitrain("generate", "--init", str(d / "out" / "final.apr"), "--tokenizer", str(tmp_path / "big.json"),
                    "--prompt", "x")
    assert out.returncode == 2 and "larger than the model's vocab_size 8192" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) is absent")
def test_plot_writes_a_png(run_dir, tmp_path):
    d, _ = run_dir
    out = minitrain("plot", str(d / "out"), "-o", str(tmp_path / "loss.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_directory_without_metrics_is_exit_2(tmp_path):
    out = minitrain("plot", str(tmp_path))
    assert out.returncode == 2 and "metrics.jsonl: no such file" in out.stderr


def test_inspect_human_view_of_a_run(run_dir):
    d, run = run_dir
    out = minitrain("inspect", str(d / "out" / "final.apr"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("format        APR v2.0") and "LAYOUT_ROW_MAJOR" in lines[0] and "verified" in lines[0]
    assert lines[1].startswith("architecture  llama: hidden_size=256")
    # the tokenizer embedded by --tokenizer: 300 tokens padded with "<unk>" to the 8192 embedding rows
    assert any(line.startswith('  tokenizer.vocabulary: [8192 items: "<|endoftext|>"') for line in lines)
    assert '  tokenizer.eos_token_id: 0' in lines
    assert any(line.startswith(f"tensors       {len(run.model.params) + 1} ") for line in lines)  # + tied lm_head copy


def test_inspect_of_a_broken_file_is_exit_2(tmp_path):
    (tmp_path / "x.apr").write_bytes(b"APRN" + bytes(60))
    out = minitrain("inspect", str(tmp_path / "x.apr"))
    assert out.returncode == 2 and "APR v1 file" in out.stderr and len(out.stderr.splitlines()) == 1


def test_inspect_of_a_directory_names_its_broken_config_before_its_missing_weights(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"')
    out = minitrain("inspect", str(tmp_path / "hf"))
    assert out.returncode == 2 and "config.json: not valid JSON" in out.stderr and len(out.stderr.splitlines()) == 1

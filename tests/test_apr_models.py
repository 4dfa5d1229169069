"""APR files as model sources: the headline claim (fine-tuning starts where training stopped),
HF <-> APR conversion through transformers, and eval on APR vs HF in F32, F16 and BF16."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from minitrain.formats import hf
from minitrain.formats.apr import read_apr
from minitrain.formats.sources import load_model

T = 16


def minitrain(*args):
    out = subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


def last_json(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def patterned(tmp_path_factory):
    """Tokens a small model learns fast: a fixed 37-token cycle with a random token every 5th."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, 8192, 37), 120)
    stream[::5] = rng.integers(0, 8192, stream[::5].size)
    stream.astype("<u4").tofile(d / "tokens.bin")
    return d / "tokens.bin"


def pretrain(*args):
    return last_json(minitrain("pretrain", "--seq-len", str(T), "--batch-size", "4", "--val-windows", "8",
                               "--json", *args))


@pytest.mark.numerics
def test_fine_tuning_starts_exactly_where_training_stopped(patterned, tmp_path):
    scratch = pretrain("--arch", "tiny-qwen2", "--data", str(patterned), "--out", str(tmp_path / "scratch"),
                       "--steps", "40", "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "0")
    saved = tmp_path / "scratch" / "final.apr"
    assert scratch["final_val_loss"] < scratch["init_loss"] - 3, "the from-scratch run must learn something"
    tuned = pretrain("--init", str(saved), "--arch", "tiny-qwen2", "--data", str(patterned), "--out",
                     str(tmp_path / "tuned"), "--steps", "20", "--lr", "1e-3", "--warmup-steps", "2")
    assert tuned["init_loss"] == scratch["final_val_loss"]  # the same weights, data and code: the same bits
    assert tuned["init_loss"] < scratch["init_loss"] - 3  # far below the from-scratch start (about ln V)
    assert tuned["final_val_loss"] < tuned["init_loss"]  # and the fine-tune keeps improving
    run = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert run["config"]["mode"] == "finetune"
    first, second = load_model(saved), load_model(saved)
    for name, t in first.params.items():
        assert t.data.tobytes() == second.params[name].data.tobytes(), name


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers Qwen2 (GQA 7:1, biases, tied) saved as a Hugging Face directory, and tokens."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=56, num_hidden_layers=2, num_attention_heads=7,
                                      num_key_value_heads=1, intermediate_size=40, vocab_size=97,
                                      max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.25 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d / "model")
    np.random.default_rng(1).integers(0, 97, 6 * (T + 1)).astype("<u4").tofile(d / "tokens.bin")
    return d / "model", d / "tokens.bin", model


def test_hf_to_apr_to_hf_is_lossless_and_loads_in_transformers(hf_dir, tmp_path):
    directory, tokens, model = hf_dir
    minitrain("convert", str(directory), str(tmp_path / "m.apr"))
    minitrain("convert", str(tmp_path / "m.apr"), str(tmp_path / "back"))
    _, before = hf.load_dir(directory)
    _, after = hf.load_dir(tmp_path / "back")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    ids = torch.tensor(np.fromfile(tokens, dtype="<u4")[:T].astype(np.int64))[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    info = last_json(minitrain("inspect", str(tmp_path / "m.apr"), "--json"))
    assert info["format"] == "apr" and info["architecture"]["ok"] and info["architecture"]["family"] == "qwen2"
    assert info["metadata"]["rope_theta"] == 1e6 and info["metadata"]["rope_type"] == 2
    assert {t["name"] for t in info["tensors"]} == set(before) | {"lm_head.weight"}  # the tied head as a copy


@pytest.mark.numerics
@pytest.mark.parametrize("dtype, rounding", [("f32", None), ("f16", np.float16), ("bf16", "bf16")])
def test_eval_of_apr_equals_eval_of_hf_up_to_the_storage_rounding(hf_dir, tmp_path, dtype, rounding):
    directory, tokens, _ = hf_dir
    minitrain("convert", str(directory), str(tmp_path / "m.apr"), "--dtype", dtype)
    args = ["--data", str(tokens), "--seq-len", str(T), "--batch-size", "2", "--json"]
    from_apr = last_json(minitrain("eval", "--init", str(tmp_path / "m.apr"), *args))
    from_hf = last_json(minitrain("eval", "--init", str(directory), *args))
    codes = {t.dtype_name for t in read_apr(tmp_path / "m.apr").tensors.values()}
    assert codes == {dtype.upper()}
    if rounding is None:
        assert from_apr == from_hf  # F32: the very same weights, the very same loss
        return
    # F16/BF16: exactly the loss of the HF weights rounded to that format ...
    cfg, arrays = hf.load_dir(directory)
    if rounding == "bf16":  # torch's own bf16 rounding as the independent reference
        rounded = {n: torch.from_numpy(a.copy()).to(torch.bfloat16).float().numpy() for n, a in arrays.items()}
    else:
        rounded = {n: a.astype(np.float16).astype(np.float32) for n, a in arrays.items()}
    hf.save_dir(tmp_path / "rounded", cfg, rounded)
    expected = last_json(minitrain("eval", "--init", str(tmp_path / "rounded"), *args))
    assert from_apr["loss"] == expected["loss"]
    # ... which is close to, but not exactly, the F32 loss
    assert from_apr["loss"] != from_hf["loss"]
    assert abs(from_apr["loss"] - from_hf["loss"]) < {"f16": 1e-3, "bf16": 2e-2}[dtype] * from_hf["loss"]


def test_convert_refuses_a_tokenizer_larger_than_the_model(hf_dir, tmp_path):
    import shutil

    from minitrain.demo import train_bpe

    directory, _, _ = hf_dir
    shutil.copytree(directory, tmp_path / "model")
    (tmp_path / "text.txt").write_text("def f(x):\n    return x\n" * 50)
    train_bpe([tmp_path / "text.txt"], 300, tmp_path / "model" / "tokenizer.json")
    out = subprocess.run([sys.executable, "-m", "minitrain", "convert", str(tmp_path / "model"), str(tmp_path / "m.apr")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "is larger than the model's vocab_size 97" in out.stderr
    assert not (tmp_path / "m.apr").exists()

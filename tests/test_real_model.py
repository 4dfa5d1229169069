"""A real pretrained model from the field: SmolLM2-135M-Instruct as the Q4_1 GGUF on PyPI
(conftest's `smollm2`), read directly, judged by readers nobody here wrote.

- its loss on Python source equals transformers' (its own GGUF loader, in float64 throughout:
  hf_oracle.float64_model) within 1e-5 in fp32, and within the derived rounding bound in fp64;
- greedy generation equals transformers' token for token;
- its tokenizer gives llama.cpp's ids (recorded below from llama.cpp itself);
- a short `pretrain --init model.gguf` lowers the validation loss;
- GGUF -> minitrain (.apr) -> GGUF is exact.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest
import torch

from minitrain import backend
from minitrain.autograd import no_grad
from minitrain.formats.gguf import load_gguf
from minitrain.formats.sources import load_model
from minitrain.generate import Sampling, generate
from minitrain.formats.sources import load_tokenizer

pytestmark = pytest.mark.slow

B, T = 2, 128
# Token ids from llama.cpp itself (llama-cpp-python 0.3.36 built from its sdist, which vendors
# llama.cpp): Llama(model_path=..., vocab_only=True).tokenize(text.encode(), add_bos=False,
# special=False), on this very file (see docs/formats.md for the run).
LLAMA_CPP_IDS = {
    "def fibonacci(n):\n    return 12345 + n":
        [1604, 3987, 46477, 24, 94, 727, 472, 1003, 216, 33, 34, 35, 36, 37, 1232, 304],
    "    x = [1, 22, 333]  # café naïve — 日本語\n\n\n\tif x:\r\n  pass":
        [333, 1792, 446, 933, 33, 28, 216, 34, 34, 28, 216, 35, 35, 35, 77, 216, 907, 37366, 15486, 46494, 1841,
         17097, 241, 115, 40993, 179, 120, 248, 16506, 197, 342, 1792, 42, 23799, 1301],
    "It's they're we'll I'VE don't\n   \n  trailing   ":
        [1589, 506, 502, 2316, 392, 3060, 339, 23, 18525, 1326, 982, 472, 3805, 35079, 333],
    "<|im_start|>user\nhi<|im_end|>": [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46],
    "x=3.14159e-10;y=0x1F": [104, 45, 35, 30, 33, 36, 33, 37, 41, 85, 29, 33, 32, 43, 105, 45, 32, 104, 33, 54],
}
PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):"]


def minitrain(*args):
    out = subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def python_windows(tokenizer):
    """(B, T + 1) ids of the standard library's textwrap.py."""
    ids = tokenizer.encode(Path(textwrap.__file__).read_text(), add_special_tokens=False).ids
    return numpy.array(ids[:B * (T + 1)], dtype=numpy.int64).reshape(B, T + 1)


@pytest.fixture(scope="module")
def oracle(smollm2):
    from hf_oracle import float64_model

    return float64_model(smollm2.parent, gguf_file=smollm2.name)


def test_the_tokenizer_gives_llama_cpps_ids(tokenizer):
    tokenizer.encode_special_tokens = True  # llama.cpp's special=False: markers are text
    try:
        for text, ids in LLAMA_CPP_IDS.items():
            assert tokenizer.encode(text, add_special_tokens=False).ids == ids, text
    finally:
        tokenizer.encode_special_tokens = False
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids == [1, 4093, 198, 6004, 2]


@pytest.mark.numerics
def test_loss_on_python_source_equals_float64_transformers(smollm2, oracle, python_windows):
    from hf_oracle import UNIT_ROUNDOFF, depth, logits_and_loss

    inputs, targets = python_windows[:, :-1], python_windows[:, 1:]
    with torch.no_grad():
        truth = float(logits_and_loss(oracle, inputs, targets)[1])
    losses = {}
    for dtype in ("fp32", "fp64"):
        with backend.precision(dtype), no_grad():
            losses[dtype] = float(load_model(smollm2).loss(inputs, targets).data)
    cfg = load_gguf(smollm2)[0]
    bound64 = depth(cfg, B, T)[0] * UNIT_ROUNDOFF["fp64"] * truth
    assert abs(losses["fp64"] - truth) <= bound64, (losses, truth, bound64)
    assert abs(losses["fp32"] - truth) <= 1e-5, (losses, truth)
    assert 0.5 < truth < 3.0  # a pretrained code model on real code, not a random one (ln V = 10.8)


def test_greedy_generation_equals_transformers_token_for_token(smollm2, oracle, tokenizer):
    model = load_model(smollm2)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        ours = ids + generate(model, [ids], 12, Sampling(temperature=0))[0][0].ids
        with torch.no_grad():
            theirs = oracle.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, top_k=None, top_p=None)
        assert ours == theirs[0].tolist(), (prompt, tokenizer.decode(ours), tokenizer.decode(theirs[0].tolist()))


def test_a_short_fine_tune_from_the_gguf_lowers_the_validation_loss(smollm2, tmp_path):
    import json as json_module

    minitrain("tokenize", "--tokenizer", str(smollm2), "--out", str(tmp_path / "data"), json_module.__file__,
              Path(json_module.__file__).parent / "decoder.py", Path(json_module.__file__).parent / "encoder.py")
    out = minitrain("pretrain", "--init", str(smollm2), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                    "--seq-len", "64", "--batch-size", "2", "--steps", "6", "--val-windows", "4", "--lr", "3e-5",
                    "--warmup-steps", "0", "--schedule", "constant", "--eval-every", "0", "--json")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["final_val_loss"] < report["init_loss"] - 0.01, report
    assert report["init_loss"] < 3.0, report  # started from the pretrained weights


def test_gguf_to_minitrain_to_gguf_is_exact(smollm2, tmp_path, tokenizer):
    minitrain("convert", str(smollm2), str(tmp_path / "m.apr"))
    minitrain("convert", str(tmp_path / "m.apr"), str(tmp_path / "back.gguf"), "--tokenizer", str(smollm2))
    (cfg, arrays), (cfg2, arrays2) = load_gguf(smollm2), load_gguf(tmp_path / "back.gguf")
    assert cfg2 == cfg and arrays2.keys() == arrays.keys()
    for name in arrays:
        assert numpy.array_equal(arrays2[name], arrays[name]), name
    back = load_tokenizer(tmp_path / "back.gguf")
    assert back.get_vocab(with_added_tokens=True) == tokenizer.get_vocab(with_added_tokens=True)
    for text in [*LLAMA_CPP_IDS, *PROMPTS]:
        assert back.encode(text).ids == tokenizer.encode(text).ids

"""The APR files aprender really writes (docs/formats.md, "aprender's own files"), written here
the way each of its paths writes them, and loaded through the command line:

- `apr pretrain` (entrenar): HF class names, `format: "entrenar-checkpoint"`; the CUDA trainer's
  hyperparameters, or the CPU trainer's none at all (then `--arch` must supply them, and agree);
- `apr import`: rope_type 0 over Hugging Face rows, or (its raw GGUF import) over llama.cpp's
  interleaved rows; refused without `--rope-layout`, and with it the loss equals transformers' on
  the original Hugging Face model.
"""

import json
import subprocess
import sys

import numpy
import pytest
import torch

from minitrain import backend
from minitrain.autograd import no_grad
from minitrain.config import parameter_count, preset
from minitrain.convert import apr_tensors
from minitrain.formats import hf
from minitrain.formats.apr import write_apr
from minitrain.formats.apr_meta import model_metadata
from minitrain.formats.rope_layout import hf_to_interleaved, permute_qk
from minitrain.formats.sources import load_source
from minitrain.model import Model

B, T = 2, 16
HF_CLASS = {"tiny-llama": "LlamaForCausalLM", "tiny-qwen2": "Qwen2ForCausalLM"}
CUDA_TRAINER_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "intermediate_size",
                     "max_position_embeddings", "rope_theta", "rms_norm_eps")


def run(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *map(str, args)], capture_output=True, text=True)


def refused(out, *words):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("minitrain: error:"), out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def eval_loss(path, data, *extra):
    out = run("eval", "--init", path, "--data", data, "--seq-len", T, "--batch-size", B, "--batches", 1, "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["loss"]


class Family:
    """One small random model of a family: its HF directory, token data, the float64 truth."""

    def __init__(self, name, d):
        self.name, self.cfg = name, preset(name)
        model = Model.from_scratch(self.cfg, seed=11)
        rng = numpy.random.default_rng(11)
        self.arrays = {n: backend.to_numpy(t.data) + (rng.normal(0, 0.05, t.shape).astype(numpy.float32)
                                                     if n.endswith(".bias") else 0) for n, t in model.params.items()}
        hf.save_dir(d / "hf", self.cfg, self.arrays)
        self.windows = rng.integers(0, self.cfg.vocab_size, size=(B, T + 1))
        (d / "tokens.bin").write_bytes(self.windows.astype("<u4").tobytes())
        self.dir, self.data = d, d / "tokens.bin"
        from hf_oracle import float64_model, logits_and_loss

        with torch.no_grad():
            self.truth = float(logits_and_loss(float64_model(d / "hf"), self.windows[:, :-1], self.windows[:, 1:])[1])

    def apr(self, name, meta, arrays=None):
        """An APR file of this model's tensors (or `arrays`) with exactly the metadata `meta`."""
        path = self.dir / name
        write_apr(path, list(apr_tensors(self.cfg, arrays or self.arrays)), meta)
        return path

    def full_meta(self):
        return model_metadata(self.cfg, parameter_count(self.cfg))

    def entrenar_meta(self, cuda=True):
        meta = {"architecture": HF_CLASS[self.name], "model_name": f"{self.name}-ft", "version": "1.0.0",
                "format": "entrenar-checkpoint"}
        if cuda:
            full = self.full_meta()
            meta.update({k: full[k] for k in CUDA_TRAINER_KEYS})
        return meta


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def family(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def fp64_loss(family, path, **options):
    """minitrain's float64 loss of the file on the family's windows."""
    cfg, arrays = load_source(path, **options)
    with backend.precision("fp64"), no_grad():
        return float(Model.from_arrays(cfg, arrays).loss(family.windows[:, :-1], family.windows[:, 1:]).data)


@pytest.mark.numerics
def test_the_cuda_trainers_file_loads_as_it_is(family):
    path = family.apr("cuda.apr", family.entrenar_meta(cuda=True))
    assert load_source(path)[0] == family.cfg
    assert abs(fp64_loss(family, path) - family.truth) <= 1e-12 * family.truth
    assert abs(eval_loss(path, family.data) - family.truth) <= 1e-5


def test_the_cpu_trainers_file_needs_arch_and_loads_with_it(family):
    path = family.apr("cpu.apr", family.entrenar_meta(cuda=False))
    refused(run("eval", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B),
            str(path), "add --arch NAME")
    assert abs(eval_loss(path, family.data, "--arch", family.name) - family.truth) <= 1e-5
    info = json.loads(run("inspect", path, "--json").stdout.strip().splitlines()[-1])
    assert not info["architecture"]["ok"] and "--arch" in info["architecture"]["error"]
    info = json.loads(run("inspect", path, "--arch", family.name, "--json").stdout.strip().splitlines()[-1])
    assert info["architecture"]["ok"] and info["architecture"]["num_attention_heads"] == family.cfg.num_attention_heads


def test_arch_must_agree_with_the_tensors_and_with_every_field_present(family):
    other = {"tiny-llama": "tiny-qwen2", "tiny-qwen2": "tiny-llama"}[family.name]
    path = family.apr("cpu.apr", family.entrenar_meta(cuda=False))
    refused(run("eval", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B, "--arch", other),
            str(path), f"--arch {other} is {preset(other).family}")
    path = family.apr("theta.apr", {**family.entrenar_meta(cuda=False), "rope_theta": 500000.0})
    refused(run("eval", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B,
                "--arch", family.name), "rope_theta", "500000.0")


def test_pretrain_from_a_cpu_trainers_file_with_arch_writes_a_complete_file(family, tmp_path):
    path = family.apr("cpu.apr", family.entrenar_meta(cuda=False))
    tokens = numpy.random.default_rng(3).integers(0, family.cfg.vocab_size, 40 * (T + 1)).astype("<u4")
    (tmp_path / "train.bin").write_bytes(tokens.tobytes())
    out = run("pretrain", "--init", path, "--arch", family.name, "--data", tmp_path / "train.bin", "--seq-len", T,
              "--batch-size", B, "--steps", 2, "--val-windows", 4, "--out", tmp_path / "run", "--json")
    assert out.returncode == 0, out.stderr
    assert load_source(tmp_path / "run" / "final.apr")[0] == family.cfg  # no --arch needed any more


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["hf", "interleaved"])
def test_rope_type_0_loads_only_when_rope_layout_says_which(family, layout):
    """`apr import` of an HF model (HF rows) and its raw GGUF import (q/k permuted as llama.cpp
    stores them), both rope_type 0: refused by default; with the right --rope-layout the loss is
    transformers' on the original HF model; with the wrong one it is not."""
    arrays = family.arrays if layout == "hf" else permute_qk(family.arrays, family.cfg, hf_to_interleaved)
    path = family.apr(f"rope0-{layout}.apr", {**family.full_meta(), "rope_type": 0, "original_format": "gguf"}, arrays)
    refused(run("eval", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B),
            "rope_type 0 is ambiguous", "--rope-layout hf", "--rope-layout interleaved")
    assert abs(fp64_loss(family, path, rope_layout=layout) - family.truth) <= 1e-12 * family.truth
    assert abs(eval_loss(path, family.data, "--rope-layout", layout) - family.truth) <= 1e-5
    wrong = {"hf": "interleaved", "interleaved": "hf"}[layout]
    assert abs(fp64_loss(family, path, rope_layout=wrong) - family.truth) > 1e-6 * family.truth


def test_rope_layout_that_contradicts_the_file_or_has_no_file_to_apply_to(family):
    path = family.apr("rope2.apr", family.full_meta())  # rope_type 2
    refused(run("eval", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B,
                "--rope-layout", "interleaved"), "rope_type 2", "contradicts")
    path = family.apr("cuda.apr", family.entrenar_meta(cuda=True))  # no rope_type: entrenar's HF rows
    refused(run("eval", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B,
                "--rope-layout", "interleaved"), "no rope_type means", "contradicts")
    refused(run("eval", "--init", family.dir / "hf", "--data", family.data, "--seq-len", T, "--batch-size", B,
                "--rope-layout", "hf"), "--rope-layout is for .apr files")

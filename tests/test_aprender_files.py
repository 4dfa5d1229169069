"""aprender's real APR files, modelled as each of its writers lays them out (../shared/docs/
apr-format.md), and loaded through minitrain's command line (`main()`, in process: the very
error handling of the console entry point, without a Python start-up per call).

- `apr pretrain` (entrenar), CUDA trainer: the HF class name as `architecture`, `format:
  "entrenar-checkpoint"`, the hyperparameters but no rope_type and no head_dim, HF q/k rows.
  It loads as it is, to the weights of the same model's HF directory.
- `apr pretrain`, CPU trainer: only architecture, model_name, version, format. Refused without
  `--arch`; with a matching `--arch` it loads; with one of the other family, refused naming both;
  with one that disagrees with the tensors' shapes or a field the file does have, refused naming
  the field.
- rope_type 0, ambiguous: `apr import` of an HF model (HF rows) and aprender's raw GGUF import
  (rows permuted to llama.cpp's interleaved order). Refused without `--rope-layout`; with the
  right one the loss is transformers' float64 loss on the ORIGINAL HF directory, with the wrong
  one it clearly is not.

Every model is a random tiny preset whose norms and biases are not 1 and 0 and whose q/k and
embedding weights are scaled up, so attention is far from uniform and a wrong RoPE pairing shows
in the loss.
"""

import contextlib
import io
import json
import re
import sys

import numpy
import pytest
import torch

from minitrain import backend
from minitrain.autograd import no_grad
from minitrain.cli import main
from minitrain.config import PRESETS, parameter_count, preset
from minitrain.formats.apr import apr_tensors
from minitrain.formats import gguf, hf
from minitrain.formats.apr import read_apr, write_apr
from minitrain.formats.apr_meta import model_metadata
from minitrain.formats.rope_layout import hf_to_interleaved, permute_qk
from minitrain.formats.sources import load_source
from minitrain.model import Model

T, B, BATCHES = 16, 2, 2  # eval: 2 batches of 2 windows of 16 + 1 tokens
QK_SCALE = 5.0  # q/k x5: scores of O(1), so attention depends on which features RoPE pairs
EMBED_SCALE = 5.0  # embedding (and tied head) x5: logits of O(1), so attention shows in the loss
# A wrong RoPE pairing moves these models' losses by 0.4-1% (measured); 1e-3 is 100 times the
# fp32 tolerance below and still 4 times under the smallest effect.
WRONG_LAYOUT_GAP = 1e-3
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CUDA_TRAINER_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "intermediate_size",
                     "max_position_embeddings", "rope_theta", "rms_norm_eps")
APR_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
            "vocab_size": "vocab_size"}  # the shape fields: APR metadata key -> ModelConfig field


# ---------------------------------------------------------------------------------- the CLI


def cli(*args):
    """`minitrain ARGS` through the console entry point: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["minitrain", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def succeeded(result):
    code, out, err = result
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def refusal(result, *words):
    """The one error line of a refused command (exit 2, no traceback), containing every word."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err == lines[0] + "\n", err
    assert lines[0].startswith("minitrain: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def eval_args(path, data, *extra):
    return ("eval", "--init", path, "--data", data, "--seq-len", T, "--batch-size", B, "--batches", BATCHES,
            "--json", *extra)


def eval_loss(path, data, *extra):
    return succeeded(cli(*eval_args(path, data, *extra)))["loss"]


# ------------------------------------------------------------------------------- the models


class Family:
    """A random model of a tiny preset: its HF directory, token windows, and its float64 truth
    (transformers in float64 on that HF directory, tests/hf_oracle.py)."""

    def __init__(self, name, d):
        self.name, self.cfg, self.dir = name, preset(name), d
        rng = numpy.random.default_rng({"tiny-llama": 21, "tiny-qwen2": 22}[name])
        model = Model.from_scratch(self.cfg, seed=5)
        self.arrays = {}
        for n, t in model.params.items():
            a = backend.to_numpy(t.data).astype(numpy.float32)
            if n.endswith("norm.weight") or n.endswith(".bias"):
                a = a + rng.normal(0, 0.2, a.shape)
            if ".q_proj." in n or ".k_proj." in n:
                a = a * QK_SCALE
            if n == "model.embed_tokens.weight":
                a = a * EMBED_SCALE
            self.arrays[n] = numpy.ascontiguousarray(a, dtype=numpy.float32)
        hf.save_dir(d / "hf", self.cfg, self.arrays)
        self.windows = rng.integers(0, self.cfg.vocab_size, size=(B * BATCHES, T + 1))
        self.data = d / "tokens.bin"
        self.windows.astype("<u4").tofile(self.data)
        from hf_oracle import float64_model, logits_and_loss

        with torch.no_grad():
            loss = logits_and_loss(float64_model(d / "hf"), self.windows[:, :-1], self.windows[:, 1:])[1]
        self.truth = float(loss)
        self._hf_loss = None

    @property
    def hf_loss(self):
        """minitrain's own eval (fp32) of the HF directory: the reference for an APR file that
        holds the very same weights."""
        if self._hf_loss is None:
            self._hf_loss = eval_loss(self.dir / "hf", self.data)
        return self._hf_loss

    @property
    def family(self):
        return self.cfg.family

    def apr(self, name, meta, arrays=None):
        path = self.dir / name
        write_apr(path, dict(apr_tensors(self.cfg, self.arrays if arrays is None else arrays)), meta)
        return path

    def cpu_trainer_meta(self):
        return {"architecture": HF_CLASS[self.family], "model_name": f"{self.name}-pretrained", "version": "1.0.0",
                "format": "entrenar-checkpoint"}

    def cuda_trainer_meta(self):
        full = model_metadata(self.cfg, parameter_count(self.cfg))
        return {**self.cpu_trainer_meta(), **{k: full[k] for k in CUDA_TRAINER_KEYS}}

    def import_meta(self):
        """`apr import` of an HF model: the Rust Debug name as model_type, head_dim written,
        tensor_shapes and tied_embeddings custom keys, and rope_type 0 (for qwen2 too: a file
        that says 0 is what is under test)."""
        full = model_metadata(self.cfg, parameter_count(self.cfg))
        full.update({"model_type": {"llama": "Llama", "qwen2": "Qwen2"}[self.family], "name": "model",
                     "rope_type": 0, "original_format": "safetensors", "tied_embeddings": True,
                     "tensor_shapes": {n: list(a.shape) for n, a in self.arrays.items()}})
        return full

    def gguf_import_meta(self):
        """aprender's raw GGUF import: rope_type 0 over llama.cpp's rows, the model.* dotted keys."""
        full = self.import_meta()
        full.update({"original_format": "gguf", "version": "1.0.0",
                     "description": "GGUF Q4_K model imported with native quantization",
                     "model.architecture": self.family, "model.hidden_size": self.cfg.hidden_size,
                     "model.rope_type": 0})
        return full

    def fp64_loss(self, path, **options):
        """minitrain's loss of the file on all the windows, computed in float64."""
        cfg, arrays = load_source(path, **options)
        with backend.precision("fp64"), no_grad():
            model = Model.from_arrays(cfg, arrays)
            return float(model.loss(self.windows[:, :-1], self.windows[:, 1:]).data)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def family(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return Family("tiny-llama", tmp_path_factory.mktemp("llama"))


def assert_same_arrays(got, expected):
    assert got.keys() == expected.keys()
    for n, a in expected.items():
        assert got[n].dtype == numpy.float32 and got[n].tobytes() == a.tobytes(), n


# ------------------------------------------------------------------- entrenar, CUDA trainer


@pytest.mark.numerics
def test_cuda_trainer_file_loads_with_no_options_as_the_hf_directory(family):
    meta = family.cuda_trainer_meta()
    assert "rope_type" not in meta and "head_dim" not in meta
    path = family.apr("cuda.apr", meta)
    cfg, arrays = load_source(path)
    assert cfg == family.cfg
    assert_same_arrays(arrays, family.arrays)  # HF rows, taken as they are
    assert eval_loss(path, family.data) == family.hf_loss  # the same weights: the same bits
    assert abs(family.hf_loss - family.truth) <= 1e-5 * family.truth


# -------------------------------------------------------------------- entrenar, CPU trainer


def test_cpu_trainer_file_without_arch_is_refused_with_the_arch_hint(llama, tmp_path):
    path = llama.apr("cpu.apr", llama.cpu_trainer_meta())
    meta = read_apr(path).metadata
    assert {"architecture", "model_name", "version", "format"} <= set(meta)
    assert not {"hidden_size", "num_heads", "head_dim", "rope_theta", "rms_norm_eps"} & set(meta)
    refusal(cli(*eval_args(path, llama.data)), str(path), "add --arch NAME")
    out = tmp_path / "run"
    refusal(cli("pretrain", "--init", path, "--data", llama.data, "--seq-len", T, "--batch-size", B,
                "--steps", 2, "--val-windows", 1, "--out", out), str(path), "--arch")
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.numerics
def test_cpu_trainer_file_with_a_matching_arch_loads_as_the_hf_directory(llama):
    path = llama.apr("cpu.apr", llama.cpu_trainer_meta())
    cfg, arrays = load_source(path, arch="tiny-llama")
    assert cfg == llama.cfg
    assert_same_arrays(arrays, llama.arrays)
    assert eval_loss(path, llama.data, "--arch", "tiny-llama") == llama.hf_loss


def test_cpu_trainer_file_with_an_arch_of_the_other_family_is_refused_naming_both(llama):
    path = llama.apr("cpu.apr", llama.cpu_trainer_meta())
    refusal(cli(*eval_args(path, llama.data, "--arch", "tiny-qwen2")), str(path), "a llama model",
            "--arch tiny-qwen2 is qwen2")


def test_cpu_trainer_file_with_an_arch_of_other_shapes_is_refused_naming_the_field(llama):
    """The line names a shape field, the preset's value of it, and a different value the tensors give."""
    arch = "llama-370m"
    path = llama.apr("cpu.apr", llama.cpu_trainer_meta())
    line = refusal(cli(*eval_args(path, llama.data, "--arch", arch)), str(path))
    m = re.search(rf"--arch {arch} (\w+) (\S+) but the tensors say (\S+)$", line)
    assert m, line
    key, said, found = m.groups()
    assert key in APR_KEYS and said == str(getattr(PRESETS[arch], APR_KEYS[key])) and found != said, line


@pytest.mark.parametrize("field, value, preset_value", [
    ("rope_theta", 500000.0, 10000.0),
    ("max_position_embeddings", 2048, 1024),
])
def test_a_field_the_file_has_that_disagrees_with_arch_is_refused_naming_it(llama, field, value, preset_value):
    assert getattr(PRESETS["tiny-llama"], field) == preset_value
    path = llama.apr(f"cpu-{field}.apr", {**llama.cpu_trainer_meta(), field: value})
    line = refusal(cli(*eval_args(path, llama.data, "--arch", "tiny-llama")), str(path), "tiny-llama", field,
                   str(value), str(preset_value))
    for other in ("hidden_size", "rms_norm_eps", "num_attention_heads", "vocab_size"):  # only what differs
        assert other not in line, line


def test_inspect_of_the_cpu_trainer_file_says_add_arch_and_loads_with_it(llama):
    path = llama.apr("cpu.apr", llama.cpu_trainer_meta())
    info = succeeded(cli("inspect", path, "--json"))
    assert info["format"] == "apr" and info["metadata"]["format"] == "entrenar-checkpoint"
    assert info["architecture"]["ok"] is False and "--arch" in info["architecture"]["error"]
    info = succeeded(cli("inspect", path, "--arch", "tiny-llama", "--json"))
    assert info["architecture"] == {"ok": True, **llama.cfg.as_dict()}


def test_pretrain_from_the_cpu_trainer_file_with_arch_writes_a_file_that_needs_no_arch(llama, tmp_path):
    path = llama.apr("cpu.apr", llama.cpu_trainer_meta())
    numpy.random.default_rng(9).integers(0, llama.cfg.vocab_size, 12 * (T + 1)).astype("<u4").tofile(tmp_path / "t.bin")
    report = succeeded(cli("pretrain", "--init", path, "--arch", "tiny-llama", "--data", tmp_path / "t.bin",
                           "--seq-len", T, "--batch-size", B, "--steps", 2, "--val-windows", 2, "--lr", "1e-3",
                           "--warmup-steps", 0, "--out", tmp_path / "run", "--json"))
    assert report["status"] == "ok" and report["steps"] == 2
    final = tmp_path / "run" / "final.apr"
    cfg, arrays = load_source(final)  # no --arch any more
    assert cfg == llama.cfg
    assert any(arrays[n].tobytes() != a.tobytes() for n, a in llama.arrays.items())  # it did train
    assert succeeded(cli(*eval_args(final, llama.data)))["tokens"] == B * BATCHES * T


# ------------------------------------------------------------------------- rope_type 0


@pytest.mark.parametrize("kind", ["import", "gguf-import"])
def test_rope_type_0_without_rope_layout_is_refused_naming_both_choices(family, kind, tmp_path):
    meta = family.import_meta() if kind == "import" else family.gguf_import_meta()
    path = family.apr(f"rope0-{kind}.apr", meta)
    refusal(cli(*eval_args(path, family.data)), str(path), "rope_type 0", "ambiguous", "--rope-layout hf",
            "--rope-layout interleaved")
    refusal(cli("pretrain", "--init", path, "--data", family.data, "--seq-len", T, "--batch-size", B,
                "--steps", 1, "--val-windows", 1, "--out", tmp_path / "run"), "--rope-layout hf")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    info = succeeded(cli("inspect", path, "--json"))
    assert info["architecture"]["ok"] is False and "--rope-layout" in info["architecture"]["error"]


@pytest.mark.numerics
def test_apr_import_of_an_hf_model_with_rope_layout_hf_is_transformers_loss(family):
    path = family.apr("rope0-hf.apr", family.import_meta())
    assert abs(family.fp64_loss(path, rope_layout="hf") - family.truth) <= 1e-10 * family.truth
    loss = eval_loss(path, family.data, "--rope-layout", "hf")
    assert loss == family.hf_loss  # HF rows, untouched
    assert abs(loss - family.truth) <= 1e-5 * family.truth


@pytest.mark.numerics
def test_raw_gguf_import_with_rope_layout_interleaved_is_transformers_loss_on_the_original(family):
    rows = permute_qk(family.arrays, family.cfg, hf_to_interleaved)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not numpy.array_equal(rows[q], family.arrays[q])  # the planted permutation is real
    if family.family == "qwen2":
        qb = "model.layers.0.self_attn.q_proj.bias"
        assert not numpy.array_equal(rows[qb], family.arrays[qb])  # and moves the biases too
    path = family.apr("rope0-interleaved.apr", family.gguf_import_meta(), rows)
    assert abs(family.fp64_loss(path, rope_layout="interleaved") - family.truth) <= 1e-10 * family.truth
    loss = eval_loss(path, family.data, "--rope-layout", "interleaved")
    assert abs(loss - family.truth) <= 1e-5 * family.truth
    assert loss == family.hf_loss
    cfg, arrays = load_source(path, rope_layout="interleaved")
    assert cfg == family.cfg
    assert_same_arrays(arrays, family.arrays)  # un-permuted to exactly the original rows
    # the wrong layout loads (nothing in the file can tell), and gives a clearly different loss
    wrong = eval_loss(path, family.data, "--rope-layout", "hf")
    assert abs(wrong - family.truth) > WRONG_LAYOUT_GAP * family.truth, (wrong, family.truth)


def test_convert_with_rope_layout_interleaved_gives_back_the_original_hf_weights(llama, tmp_path):
    rows = permute_qk(llama.arrays, llama.cfg, hf_to_interleaved)
    path = llama.apr("rope0-interleaved.apr", llama.gguf_import_meta(), rows)
    code, _, err = cli("convert", path, tmp_path / "back", "--rope-layout", "interleaved")
    assert code == 0, err
    cfg, arrays = hf.load_dir(tmp_path / "back")
    assert cfg == llama.cfg
    assert_same_arrays(arrays, llama.arrays)


# ------------------------------------------------------------ --rope-layout where it has no say


def test_rope_layout_interleaved_contradicts_rope_type_2(family):
    path = family.apr("rope2.apr", model_metadata(family.cfg, parameter_count(family.cfg)))
    assert read_apr(path).metadata["rope_type"] == 2
    refusal(cli(*eval_args(path, family.data, "--rope-layout", "interleaved")), str(path), "rope_type 2",
            "contradicts")
    assert eval_loss(path, family.data, "--rope-layout", "hf") == family.hf_loss  # agreeing is fine


def test_rope_layout_interleaved_contradicts_a_file_without_rope_type(family):
    """entrenar writes no rope_type: its rows are Hugging Face's, so interleaved cannot apply."""
    path = family.apr("cuda.apr", family.cuda_trainer_meta())
    refusal(cli(*eval_args(path, family.data, "--rope-layout", "interleaved")), str(path), "no rope_type means",
            "contradicts")


@pytest.mark.parametrize("layout", ["hf", "interleaved"])
def test_rope_layout_on_an_hf_directory_or_a_gguf_file_is_refused(llama, layout, tmp_path):
    from tokenizers import Tokenizer

    from minitrain.demo import train_bpe

    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    train_bpe([tmp_path / "text.txt"], 300, tmp_path / "tok.json")
    path = tmp_path / "m.gguf"
    gguf.write_gguf(path, llama.cfg, llama.arrays, Tokenizer.from_file(str(tmp_path / "tok.json")), "f32")
    assert eval_loss(path, llama.data) == llama.hf_loss  # the GGUF itself loads, to the same weights
    refusal(cli(*eval_args(path, llama.data, "--rope-layout", layout)), "--rope-layout", str(path), "GGUF")
    refusal(cli(*eval_args(llama.dir / "hf", llama.data, "--rope-layout", layout)), "--rope-layout",
            str(llama.dir / "hf"), "Hugging Face directory")

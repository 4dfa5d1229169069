"""`minitrain trace` and `minitrain diff`: a float64 trace of minitrain and one of transformers
(tools/hf_trace.py) agree on every tensor of a Qwen2 and a Llama model within the derived bounds;
each defect planted in transformers' step is named at the tensor where it first shows, not later;
a bf16 trace (the kernel path, through the CPU emulation) stays within the bounds of the float64
one; what cannot be compared is exit 2 with one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from kernel_emu import launcher

import hf_oracle
from minitrain import backend
from minitrain import trace as tracing
from minitrain.config import ModelConfig
from minitrain.formats import hf
from minitrain.formats.trace_file import Trace, TraceWriter
from minitrain.model import Model
from minitrain.trace_diff import diff

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import hf_trace  # noqa: E402


FAMILIES = {  # a biased, tied GQA Qwen2 and an untied Llama
    "qwen2": dict(family="qwen2", hidden_size=56, num_attention_heads=7, num_key_value_heads=1, intermediate_size=40,
                  vocab_size=50, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama": dict(family="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                  vocab_size=37, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
B, T = 2, 12
LAYER = ("attn_norm", "q", "k", "v", "q_rope", "k_rope", "attn", "o_proj", "attn_residual", "mlp_norm", "gate", "up",
         "act", "down", "mlp_residual")


def tokens(path, vocab, n=200, seed=0):
    np.random.default_rng(seed).integers(0, vocab, n).astype("<u4").tofile(path)
    return path


def quiet(line):
    pass


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory):
    """(family, HF directory, data, minitrain's float64 trace, transformers' float64 trace)."""
    d = tmp_path_factory.mktemp(request.param)
    hf_oracle.build_hf(FAMILIES[request.param], seed=5).save_pretrained(d / "hf")
    data = tokens(d / "data.bin", FAMILIES[request.param]["vocab_size"])
    tracing.trace(d / "hf", data, T, B, d / "ours.safetensors", "fp64", say=quiet)
    hf_trace.hf_trace(d / "hf", data, T, B, d / "hf.safetensors", "fp64")
    return request.param, d / "hf", data, d / "ours.safetensors", d / "hf.safetensors"


NEWER = {  # Qwen3 (q/k norms, head_dim apart from hidden/heads) and a Llama with Llama 3's RoPE scaling
    "qwen3": dict(family="qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=40, vocab_size=41, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama3": dict(family="llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   intermediate_size=40, vocab_size=43, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=1024, rope_parameters=dict(
                       rope_type="llama3", rope_theta=1e4, factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0,
                       original_max_position_embeddings=256)),
}


@pytest.mark.numerics  # tools/avx2_leg.py runs it again on the AVX2 code paths
def test_float64_traces_of_minitrain_and_transformers_agree_on_every_tensor(case):
    _, directory, _, ours, theirs = case
    agree_on_every_tensor(directory, ours, theirs, LAYER)


@pytest.mark.numerics
@pytest.mark.parametrize("family", list(NEWER))
def test_qwen3_and_llama3_traces_agree_on_every_tensor(family, tmp_path):
    """Qwen3's traces name its norms layers.i.q_norm and layers.i.k_norm, between q, k and RoPE."""
    hf_oracle.build_hf(NEWER[family], seed=5).save_pretrained(tmp_path / "hf")
    data = tokens(tmp_path / "data.bin", NEWER[family]["vocab_size"])
    tracing.trace(tmp_path / "hf", data, T, B, tmp_path / "ours.safetensors", "fp64", say=quiet)
    hf_trace.hf_trace(tmp_path / "hf", data, T, B, tmp_path / "hf.safetensors", "fp64")
    layer = LAYER if family == "llama3" else LAYER[:4] + ("q_norm", "k_norm") + LAYER[4:]
    agree_on_every_tensor(tmp_path / "hf", tmp_path / "ours.safetensors", tmp_path / "hf.safetensors", layer)
    names = Trace(tmp_path / "ours.safetensors").names
    assert family == "llama3" or names.index("layers.0.k") < names.index("layers.0.q_norm") < names.index(
        "layers.0.k_norm") < names.index("layers.0.q_rope")
    documented = documented_names(qwen3=family == "qwen3")  # docs/auditing.md's names, Qwen3's included
    assert documented - {"positions"} == forward_names(tmp_path / "ours.safetensors")


def agree_on_every_tensor(directory, ours, theirs, layer):
    """minitrain's and transformers' float64 traces of one step: the same tensors (the forward's
    in `layer` per layer, every gradient, AdamW's step), each within its bound and to 1e-12."""
    report = diff(ours, theirs)
    assert report["first_divergence"] is None, report["first_divergence"]
    assert report["missing_in_a"] == report["missing_in_b"] == []
    names = {r["name"] for r in report["rows"]}
    params = set(hf.load_dir(directory)[1])
    layers = {f"layers.{i}.{n}" for i in range(2) for n in layer}
    forward = {"embed", "norm", "logits"} | layers
    steps = {f"step.{k}.{p}" for p in params for k in ("m", "v", "update", "param")}
    assert forward | {"loss"} | {f"grad.{n}" for n in forward | params} | steps == names
    assert max(r["ratio"] for r in report["rows"]) < 1
    worst = max(r["max_rel"] for r in report["rows"] if not r["name"].startswith("step.update"))
    assert worst < 1e-12, worst  # float64 both sides: the math itself agrees
    order = Trace(ours).names
    assert order[:3] == ["input_ids", "targets", "embed"] and order.index("loss") < order.index("grad.logits")
    assert order.index("grad.layers.1.q") < order.index("grad.layers.0.q")  # the backward's order


PLANTS = {"rope-offset": "layers.0.q_rope", "norm-eps": "layers.0.attn_norm", "no-scale": "layers.0.attn",
          "no-bias": "layers.0.q", "adamw-no-bias-correction": "step.update.model.embed_tokens.weight"}


@pytest.mark.numerics  # tools/avx2_leg.py runs it again on the AVX2 code paths
@pytest.mark.parametrize("plant", list(PLANTS))
def test_each_planted_defect_is_named_where_it_first_shows(case, plant, tmp_path):
    """Everything before the named tensor agrees; the named one does not."""
    family, directory, data, ours, _ = case
    if plant == "no-bias" and family == "llama":
        pytest.skip("a Llama has no bias to drop")
    planted = tmp_path / "planted.safetensors"
    hf_trace.hf_trace(directory, data, T, B, planted, "fp64", plant=plant)
    report = diff(ours, planted)
    assert report["first_divergence"] == PLANTS[plant]
    rows = [r["name"] for r in report["rows"]]
    assert all(r["within"] for r in report["rows"][:rows.index(PLANTS[plant])])


def test_the_command_line_diff_exits_1_and_reports_json(case, tmp_path):
    family, directory, data, ours, _ = case
    planted = tmp_path / "planted.safetensors"
    hf_trace.hf_trace(directory, data, T, B, planted, "fp64", plant="norm-eps")
    out = run("diff", str(ours), str(planted), "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert {"compared", "beyond", "first_divergence", "missing_in_a", "missing_in_b", "rows"} <= set(report)
    assert report["first_divergence"] == "layers.0.attn_norm"
    assert {"name", "max_abs", "max_rel", "within"} <= set(report["rows"][0])
    text = run("diff", str(ours), str(planted)).stdout
    assert "first divergence: layers.0.attn_norm" in text and "<- beyond" in text
    same = run("diff", str(ours), str(ours))
    assert same.returncode == 0 and same.stdout.splitlines()[-1].startswith("all ")


def test_your_own_names_map_onto_the_trace(case, tmp_path):
    """A trainer's own file: any subset, its own names (--map), its own dtype; a wrong value is found."""
    _, _, _, ours, _ = case
    a = Trace(ours)
    mine = {"emb_out": a.array("embed").astype(np.float32), "l0_q": a.array("layers.0.q").astype(np.float32),
            "l0_k": a.array("layers.0.k").astype(np.float32) * 1.01}
    safetensors.numpy.save_file(mine, tmp_path / "mine.safetensors")
    (tmp_path / "map.json").write_text(json.dumps({"emb_out": "embed", "l0_q": "layers.0.q", "l0_k": "layers.0.k"}))
    report = diff(ours, tmp_path / "mine.safetensors", map_path=tmp_path / "map.json")
    assert report["compared"] == 3 and report["first_divergence"] == "layers.0.k"
    assert "grad.embed" in report["missing_in_b"]
    fixed = diff(ours, tmp_path / "mine.safetensors", map_path=tmp_path / "map.json", rtol=0.02)
    assert fixed["first_divergence"] is None and fixed["tolerance"] == {"rtol": 0.02, "atol": 0.0}


def test_layers_selects_a_subset(case, tmp_path):
    _, directory, data, ours, _ = case
    tracing.trace(directory, data, T, B, tmp_path / "one.safetensors", "fp64", layers="1", say=quiet)
    names = Trace(tmp_path / "one.safetensors").names
    assert "layers.1.q" in names and "grad.model.layers.1.mlp.up_proj.weight" in names and "embed" in names
    assert not any(".0." in n for n in names)
    assert diff(ours, tmp_path / "one.safetensors")["first_divergence"] is None


@pytest.mark.numerics  # tools/avx2_leg.py runs it again on the AVX2 code paths
def test_a_bf16_trace_stays_within_the_derived_bounds_of_the_float64_one(tmp_path, monkeypatch):
    """Mixed precision on the kernel path (the CUDA kernels through the CPU emulation): the bf16
    activations' rounding, carried along the chain, bounds every difference; an fp32 trace too."""
    cfg = ModelConfig(family="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, intermediate_size=96, vocab_size=257,
                      max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = Model.from_scratch(cfg, seed=4)
    hf.save_dir(tmp_path / "hf", cfg, {n: t.data for n, t in model.params.items()})
    data = tokens(tmp_path / "data.bin", 257, seed=2)
    tracing.trace(tmp_path / "hf", data, 9, 2, tmp_path / "fp64.safetensors", "fp64", say=quiet)
    tracing.trace(tmp_path / "hf", data, 9, 2, tmp_path / "fp32.safetensors", "fp32", say=quiet)

    def emulated(name):
        monkeypatch.setattr(backend, "launch", launcher())
        monkeypatch.setattr(backend, "matmul_backward", "kernels")
        return "cuda"

    monkeypatch.setattr(tracing, "use_device", emulated)
    tracing.trace(tmp_path / "hf", data, 9, 2, tmp_path / "bf16.safetensors", "bf16", "cuda", say=quiet)
    monkeypatch.undo()
    assert Trace(tmp_path / "bf16.safetensors").manifest["dtype"] == "bf16"
    for other in ("fp32", "bf16"):
        report = diff(tmp_path / "fp64.safetensors", tmp_path / f"{other}.safetensors")
        assert report["first_divergence"] is None, (other, report["first_divergence"])
        assert report["precisions"] == ["fp64", other]
    rows = {r["name"]: r for r in diff(tmp_path / "fp64.safetensors", tmp_path / "bf16.safetensors")["rows"]}
    assert rows["logits"]["max_rel"] > 2 ** -12  # bf16's rounding is really there: not an fp32 run


def run(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)


def test_what_cannot_be_compared_is_exit_2_with_one_line(case, tmp_path):
    family, directory, data, ours, _ = case
    other = "llama" if family == "qwen2" else "qwen2"
    hf_oracle.build_hf(FAMILIES[other], seed=1).save_pretrained(tmp_path / "other")
    tracing.trace(tmp_path / "other", tokens(tmp_path / "d.bin", 37), T, B, tmp_path / "other.safetensors", "fp64",
                  say=quiet)
    tracing.trace(directory, tokens(tmp_path / "e.bin", 37, seed=9), T, B, tmp_path / "batch.safetensors", "fp64",
                  say=quiet)
    (tmp_path / "text.safetensors").write_text("not a trace\n")
    safetensors.numpy.save_file({"unrelated": np.zeros(3)}, tmp_path / "unrelated.safetensors")
    safetensors.numpy.save_file({"embed": np.zeros(3)}, tmp_path / "shape.safetensors")
    (tmp_path / "bad_map.json").write_text("[1]")
    truth = Trace(ours)
    for name, manifest, shape in (("forged.safetensors", truth.manifest, (3,)),
                                  ("no-model.safetensors", {**truth.manifest, "model": {"hidden_size": "56"}}, None)):
        writer = TraceWriter(tmp_path / name)
        writer.add("embed", np.zeros(shape or truth.shape("embed")))
        writer.close(manifest)
    cases = {
        "other.safetensors": "trace different steps: model",
        "batch.safetensors": "trace different batches: input_ids differ",
        "text.safetensors": "not a safetensors file",
        "unrelated.safetensors": "no tensor named as in",
        "shape.safetensors": "tensor embed: ",
        "missing.safetensors": "no such file",
        "forged.safetensors": "tensor embed has shape [3]; a trace of its manifest's model and batch has",
        "no-model.safetensors": "manifest model: expected a model configuration",
    }
    for name, expected in cases.items():
        out = run("diff", str(ours), str(tmp_path / name))
        assert out.returncode == 2 and expected in out.stderr and len(out.stderr.splitlines()) == 1, (name, out.stderr)
    out = run("diff", str(ours), str(ours), "--map", str(tmp_path / "bad_map.json"))
    assert out.returncode == 2 and "expected a JSON object" in out.stderr
    out = run("trace", "--init", str(directory), "--data", str(data), "--seq-len", str(T), "--batch-size", "2",
              "--dtype", "bf16", "--out", str(tmp_path / "x.safetensors"))
    assert out.returncode == 2 and "--dtype bf16 on cpu" in out.stderr and not (tmp_path / "x.safetensors").exists()
    out = run("trace", "--init", str(directory), "--data", str(data), "--seq-len", str(T), "--batch-size", "2",
              "--layers", "0,7", "--out", str(tmp_path / "x.safetensors"))
    assert out.returncode == 2 and "--layers '0,7': 7 is not within the model's layers 0-1" in out.stderr
    assert not list(tmp_path.glob("x.safetensors*"))


def documented_names(qwen3):
    """The forward names of docs/auditing.md's table (layer 0's), those of Qwen3 only where `qwen3`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "auditing.md").read_text()
    table = text[text.index("| name | shape |"):].split("\n\n")[0]
    documented = set()
    for row in table.splitlines()[2:]:
        if qwen3 or "Qwen3 only" not in row:
            documented |= {n.replace(".i.", ".0.") for n in re.findall(r"`([a-z_.]+)`", row.split("|")[1])}
    return documented


def forward_names(path):
    return {n for n in Trace(path).names if not n.startswith(("grad.", "step.")) and not n.startswith("layers.1.")}


def test_the_documented_names_are_the_traced_ones(case):
    """docs/auditing.md's table names every forward tensor a trace holds, and no other."""
    documented, traced = documented_names(qwen3=False), forward_names(case[3])
    assert documented - {"positions"} == traced, documented ^ traced

"""LoRA (minitrain/lora.py, formats/peft.py, `pretrain --lora-rank`): parity of three AdamW steps
with peft + torch (float64 tight, fp32 within hf_oracle's derived bound), adapters that
`peft.PeftModel.from_pretrained` loads with our logits, the merged final.apr, a frozen base that
gets no gradient and no optimizer state, step 0 equal to the base, exact resume with dropout,
`--lora-from`, and the bad inputs. The op itself is gradient-checked in test_gradcheck.py."""

import json
import shutil
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers

import hf_oracle
from hf_oracle import UNIT_ROUNDOFF, depth, rel_to_bound
from minitrain import backend, lora
from minitrain.formats import hf
from minitrain.formats import peft as peft_format
from minitrain.formats.sources import load_model
from minitrain.model import Model
from minitrain.ops.linear import Linear
from minitrain.ops.lora import LoRALinear
from minitrain.optim import AdamW
from minitrain.setup_run import build, configure

SPECS = {  # GQA with q/k/v biases and a tied head; MHA with an untied head; Qwen3
    "qwen2-gqa-tied": dict(family="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=40, vocab_size=50, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=True),
    "llama-untied": dict(family="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=24, vocab_size=43, rope_theta=1e4, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
    # Qwen3: q/k norms (frozen, as every base tensor) between the adapted q/k and RoPE; q 64 wide on 32
    "qwen3-gqa-tied": dict(family="qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=40, vocab_size=47, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=True),
}
B, T, RANK, ALPHA = 2, 12, 4, 8.0
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
U64 = UNIT_ROUNDOFF["fp64"]


@pytest.fixture(scope="module", params=list(SPECS))
def base(request, tmp_path_factory):
    """(an HF checkpoint directory of a tiny model, its ModelConfig)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf_oracle.build_hf(SPECS[request.param], seed=len(request.param)).save_pretrained(directory)
    return directory, hf.load_dir(directory)[0]


def adapter_arrays(config, spec, trained):
    """Fresh adapters (B = 0), or `trained` ones: B drawn too, so dA is not zero at step 1."""
    with backend.precision("fp64"):
        arrays = lora.Adapters.fresh(spec, config, seed=5).arrays()
    if trained:
        rng = np.random.default_rng(9)
        arrays = {n: rng.standard_normal(a.shape) * 0.2 if n.endswith("lora_B.weight") else a for n, a in arrays.items()}
    return {n: a.astype(np.float32) for n, a in arrays.items()}  # what an adapter file holds


def ours(directory, precision, spec, arrays):
    """Our model of the checkpoint with the adapters attached, in `precision`."""
    cfg, base_arrays = hf.load_dir(directory)
    with backend.precision(precision):
        return lora.Adapters(spec, cfg, arrays).attach(Model.from_arrays(cfg, base_arrays))


def peft_name(name):
    """Our adapter tensor name -> peft's parameter name on a PeftModel."""
    return peft_format.PREFIX + name.replace(".weight", ".default.weight")


def peft_truth(directory, adapter_dir, trainable=False):
    """peft's model of our adapter files on the float64 truth of the base."""
    model = peft.PeftModel.from_pretrained(hf_oracle.float64_model(directory), adapter_dir, is_trainable=trainable)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    return model


def batches(vocab, n, seed):
    windows = np.random.default_rng(seed).integers(0, vocab, (n, B, T + 1))
    return [(w[:, :-1], w[:, 1:]) for w in windows]


# --- parity with peft + torch -------------------------------------------------------------

def three_steps(directory, config, precision, trained, tmp_path):
    """(our adapters after three AdamW steps, peft's in float64, the bound's history)."""
    spec = lora.LoRASpec(RANK, ALPHA)
    arrays = adapter_arrays(config, spec, trained)
    peft_format.write_adapter(tmp_path / "start", spec, arrays)
    data = batches(config.vocab_size, 3, seed=11)
    expected, history = hf_oracle.reference_steps(peft_truth(directory, tmp_path / "start", trainable=True),
                                                  "adamw", ADAMW, data)
    model = ours(directory, precision, spec, arrays)
    with backend.precision(precision):
        opt = AdamW(model.adapters.parameters(), **ADAMW)
        for inputs, targets in data:
            for p in model.adapters.parameters():
                p.zero_grad()
            model.loss(inputs, targets).backward()
            opt.step()
    assert set(map(peft_name, model.adapters.params)) == set(expected), "peft trains exactly our tensors"
    return {n: t.data for n, t in model.adapters.params.items()}, expected, history, arrays


def parity_ratios(directory, config, precision, trained, tmp_path):
    got, expected, history, start = three_steps(directory, config, precision, trained, tmp_path)
    assert max(np.abs(a - start[n]).max() for n, a in got.items()) > 1e-3, "the adapters did not move"
    grad_bound = depth(config, B, T, RANK)[1] * (UNIT_ROUNDOFF[precision] + U64)
    return {n: rel_to_bound(np.abs(a - expected[peft_name(n)]),
                            hf_oracle.weight_bound(peft_name(n), expected[peft_name(n)], history, "adamw", ADAMW,
                                                   UNIT_ROUNDOFF[precision] + U64, grad_bound))
            for n, a in got.items()}


@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("trained", [False, True], ids=["from-B=0", "from-trained"])
def test_three_adamw_steps_land_on_peft_and_torch_adapters(base, precision, trained, tmp_path):
    directory, config = base
    ratios = parity_ratios(directory, config, precision, trained, tmp_path)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1, f"{worst}: {ratios[worst]:.2f} x the {precision} bound"


@pytest.mark.numerics
def test_rslora_scale_planted_breaks_the_parity(base, tmp_path, monkeypatch):
    """alpha / sqrt(R) (rsLoRA) for alpha / R: the gradient checks cannot see a scale; parity must."""
    directory, config = base
    monkeypatch.setattr(lora.LoRASpec, "scale", property(lambda s: s.alpha / s.rank ** 0.5))
    assert max(parity_ratios(directory, config, "fp64", True, tmp_path).values()) > 1


def test_a_is_drawn_as_peft_draws_it_and_b_is_zero(base):
    """peft: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)). Ours and peft's own
    draws (rank 64, for the statistics) fill that interval, and only it."""
    directory, config = base
    spec = lora.LoRASpec(64, 64.0)
    arrays = lora.Adapters.fresh(spec, config, seed=0).arrays()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                 peft.LoraConfig(r=64, lora_alpha=64, target_modules=["down_proj"]))
    layer = theirs.base_model.model.model.layers[0].mlp.down_proj
    drawn = {"ours": arrays["model.layers.0.mlp.down_proj.lora_A.weight"],  # (64, intermediate)
             "peft": layer.lora_A["default"].weight.detach().numpy()}
    assert drawn["ours"].shape == drawn["peft"].shape and layer.lora_B["default"].weight.abs().max() == 0
    for who, a in drawn.items():
        bound = 1 / np.sqrt(a.shape[1])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound, who
        n = a.size  # a uniform's variance is bound^2 / 3; its sample estimate within 6 standard errors
        assert abs(a.var() / (bound ** 2 / 3) - 1) < 6 * np.sqrt(0.8 / n), who
    assert all(not a.any() for n, a in arrays.items() if n.endswith("lora_B.weight"))
    assert list(arrays) == list(lora.tensor_table(config, spec))


# --- the files: peft loads our adapter, final.apr is the merged model ----------------------

def tokens(path, vocab, windows=24):
    np.random.default_rng(1).integers(0, vocab, windows * (T + 1)).astype("<u4").tofile(path)
    return path


def minitrain(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *map(str, args)], capture_output=True, text=True)


def lora_run(directory, config, out, *extra):
    """pretrain with rank-4 adapters on every target, 3 steps at a real lr; the JSON report."""
    data = tokens(out.parent / "tokens.bin", config.vocab_size)
    done = minitrain("pretrain", "--init", directory, "--data", data, "--seq-len", T, "--batch-size", B, "--steps", 3,
                     "--val-windows", 4, "--lr", 1e-2, "--warmup-steps", 0, "--lora-rank", RANK, "--lora-alpha", ALPHA,
                     "--out", out, "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.numerics
def test_peft_loads_the_adapter_with_our_logits_and_final_apr_is_the_merged_model(base, tmp_path):
    directory, config = base
    report = lora_run(directory, config, tmp_path / "out")
    adapter = tmp_path / "out" / "adapter"
    assert report["lora"]["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert report["lora"]["trained_params"] == sum(np.prod(s) for s in lora.tensor_table(config, lora.LoRASpec(RANK, ALPHA)).values())
    spec, arrays = peft_format.read_adapter(adapter)
    assert spec == lora.LoRASpec(RANK, ALPHA) and max(np.abs(a).max() for n, a in arrays.items() if "lora_B" in n) > 0
    (inputs, targets), = batches(config.vocab_size, 1, seed=3)
    fp32_peft = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), adapter)
    with torch.no_grad():
        truth = peft_truth(directory, adapter)(torch.tensor(inputs)).logits.numpy()
        theirs = fp32_peft(torch.tensor(inputs)).logits.numpy()
        merged_theirs = fp32_peft.merge_and_unload()(torch.tensor(inputs)).logits.numpy()
    d_fwd = depth(config, B, T, RANK)[0]
    scale = np.abs(truth).max()
    with backend.precision("fp64"):  # float64 both sides, from the same stored values: the math itself
        exact = ours(directory, "fp64", spec, arrays).forward(inputs).data
    assert np.abs(exact - truth).max() <= d_fwd * 2 * U64 * scale
    mine = ours(directory, "fp32", spec, arrays).forward(inputs).data
    merged = load_model(tmp_path / "out" / "final.apr").forward(inputs).data  # W + s B A, as any model
    fp32 = d_fwd * (UNIT_ROUNDOFF["fp32"] + U64) * scale  # each fp32 computation against the truth
    for name, logits in {"ours": mine, "peft": theirs, "final.apr": merged, "peft merged": merged_theirs}.items():
        assert np.abs(logits - truth).max() <= fp32, name
    evaluated = minitrain("eval", "--init", tmp_path / "out" / "final.apr", "--data", tmp_path / "tokens.bin",
                          "--seq-len", T, "--batch-size", B, "--batches", 1, "--json")
    assert evaluated.returncode == 0, evaluated.stderr


# --- training: frozen base, step 0, resume, --lora-from -------------------------------------

def run_options(directory, data, out, **changes):
    options = dict(init=str(directory), data=str(data), out=str(out), seq_len=T, batch_size=B, steps=4, val_windows=4,
                   eval_every=2, warmup_steps=0, lr=1e-2, lora_rank=RANK, seed=3)
    options.update(changes)
    return options


def test_the_base_is_frozen_no_dw_is_formed_and_adamw_holds_state_for_the_adapters_only(base, tmp_path, monkeypatch):
    directory, config = base
    seen = []
    for fn in (LoRALinear, Linear):  # the head's and every linear's backward: which gradients they were asked for
        backward = fn.backward
        monkeypatch.setattr(fn, "backward", lambda self, g, backward=backward: (seen.append(self.needs_grad), backward(self, g))[1])
    run = build(*configure(run_options(directory, tokens(tmp_path / "t.bin", config.vocab_size), tmp_path / "out",
                                     lora_targets="q,v,down")))
    run.train_step(0)
    assert seen and all(not needs[1] and not needs[2] for needs in seen), "a dW or db was formed"
    assert all(p.grad is None and not p.requires_grad for p in run.model.parameters())
    assert all(p.grad is not None for p in run.adapters.parameters())
    trained = sum(p.data.size for p in run.adapters.parameters())
    assert run.optimizer.state_bytes() == 2 * 4 * trained  # m and v, fp32, of the adapters alone
    assert set(run.optimizer.state()[1]) == {f"{k}.{n}" for n in run.adapters.params for k in "mv"}
    assert {n.split(".")[4] for n in run.adapters.params} == {"q_proj", "v_proj", "down_proj"}


@pytest.mark.numerics
def test_step_zero_is_the_base_model_bit_for_bit(base, tmp_path):
    directory, config = base
    data = tokens(tmp_path / "t.bin", config.vocab_size)
    full = build(*configure(run_options(directory, data, tmp_path / "full", lora_rank=None)))
    adapted = build(*configure(run_options(directory, data, tmp_path / "lora", lora_dropout=0.5)))
    assert adapted.evaluate() == full.evaluate()
    inputs, targets = adapted.data.stream.batch(0, B)
    assert float(adapted.model.loss(inputs, targets).data) == float(full.model.loss(inputs, targets).data)


def adapter_bytes(out):
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.numerics
def test_resume_restores_adapters_and_their_optimizer_state_exactly(base, tmp_path):
    directory, config = base
    data = tokens(tmp_path / "t.bin", config.vocab_size)
    options = run_options(directory, data, tmp_path / "whole", lora_dropout=0.25, save_every=2, schedule="constant")
    build(*configure(options)).run()
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for name in ("adapter", "final.apr", "step-4"):
        shutil.rmtree(tmp_path / "cut" / name) if name != "final.apr" else (tmp_path / "cut" / name).unlink()
    assert (tmp_path / "whole" / "step-2" / "adapter.safetensors").exists()
    build(*configure({"resume": str(tmp_path / "cut" / "step-2")})).run()
    assert adapter_bytes(tmp_path / "cut") == adapter_bytes(tmp_path / "whole")
    assert (tmp_path / "cut" / "final.apr").read_bytes() == (tmp_path / "whole" / "final.apr").read_bytes()
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "cut" / "step-4" / name).read_bytes() == (tmp_path / "whole" / "step-4" / name).read_bytes()
    # the dropout is on: without it the run ends elsewhere
    build(*configure(run_options(directory, data, tmp_path / "nodrop", save_every=2, schedule="constant"))).run()
    assert adapter_bytes(tmp_path / "nodrop") != adapter_bytes(tmp_path / "whole")


def test_lora_from_continues_from_the_files_adapters(base, tmp_path):
    directory, config = base
    spec = lora.LoRASpec(RANK, ALPHA, targets=("k", "o", "up"))
    arrays = adapter_arrays(config, spec, trained=True)
    peft_format.write_adapter(tmp_path / "given", spec, arrays)
    data = tokens(tmp_path / "t.bin", config.vocab_size)
    run = build(*configure(run_options(directory, data, tmp_path / "out", lora_rank=None, lora_from=str(tmp_path / "given"))))
    assert run.adapters.spec == spec
    assert all(np.array_equal(t.data, arrays[n]) for n, t in run.adapters.params.items())
    run.run()
    info = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert (info["lora_rank"], info["lora_alpha"], info["lora_targets"]) == (RANK, ALPHA, "k,o,up")
    assert peft_format.read_adapter(tmp_path / "out" / "adapter")[0] == spec


# --- bad inputs: exit 2, one line -------------------------------------------------------------

def broken_adapter(tmp_path, config, **changes):
    spec = lora.LoRASpec(RANK, ALPHA)
    arrays = adapter_arrays(config, spec, trained=False)
    if changes.pop("wrong_rank", False):
        arrays["model.layers.1.mlp.up_proj.lora_B.weight"] = np.zeros((config.intermediate_size, 2), np.float32)
    peft_format.write_adapter(tmp_path / "bad", spec, arrays)
    path = tmp_path / "bad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return tmp_path / "bad"


@pytest.mark.parametrize("case, message", [
    ("no init", "give it with --init"),
    ("bf16", "no bf16 path"),
    ("unknown target", "unknown: qkv"),
    ("no target", "LoRA targets : expected distinct names"),
    ("missing adapter", "not a directory"),
    ("rslora", "use_rslora = True"),
    ("wrong rank", "model.layers.1.mlp.up_proj.lora_B.weight expected [24, 4] found [24, 2]"),
    ("clash", "--lora-rank 8 (the adapter's: 4)"),
    ("regex targets", "target_modules '.*proj'"),
])
def test_bad_lora_input_is_exit_2_with_one_line(base, tmp_path, case, message):
    directory, config = base
    if case == "wrong rank" and config.intermediate_size != 24:
        pytest.skip("the expected shape is written for the llama spec")
    data = tokens(tmp_path / "t.bin", config.vocab_size)
    args = ["pretrain", "--init", directory, "--data", data, "--seq-len", T, "--batch-size", B, "--steps", 1,
            "--out", tmp_path / "out"]
    extra = {"no init": lambda: ["--lora-rank", 4], "bf16": lambda: ["--lora-rank", 4, "--dtype", "bf16"],
             "unknown target": lambda: ["--lora-rank", 4, "--lora-targets", "q,qkv"],
             "no target": lambda: ["--lora-rank", 4, "--lora-targets", ""],
             "missing adapter": lambda: ["--lora-from", tmp_path / "nowhere"],
             "rslora": lambda: ["--lora-from", broken_adapter(tmp_path, config, use_rslora=True)],
             "wrong rank": lambda: ["--lora-from", broken_adapter(tmp_path, config, wrong_rank=True)],
             "clash": lambda: ["--lora-from", broken_adapter(tmp_path, config), "--lora-rank", 8],
             "regex targets": lambda: ["--lora-from", broken_adapter(tmp_path, config, target_modules=".*proj")]}[case]()
    if case == "no init":
        args = ["pretrain", "--arch", "tiny-llama", *args[3:]]
    done = minitrain(*args, *extra)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_lora_checkpoint_without_its_adapters_is_refused(base, tmp_path):
    directory, config = base
    build(*configure(run_options(directory, tokens(tmp_path / "t.bin", config.vocab_size), tmp_path / "out",
                               steps=2, save_every=2))).run()
    (tmp_path / "out" / "step-2" / "adapter.safetensors").unlink()
    done = minitrain("pretrain", "--resume", tmp_path / "out" / "step-2")
    assert done.returncode == 2 and "no adapter.safetensors, but the run trained LoRA adapters" in done.stderr


@pytest.mark.slow
@pytest.mark.numerics
def test_a_real_smollm2_adapter_loads_in_peft_with_our_logits(smollm2, tmp_path):
    """Rank 8 on the real SmolLM2-135M (its GGUF, through transformers' own GGUF loader for peft)."""
    import json as json_module

    from minitrain.formats.gguf import load_gguf

    data = tmp_path / "data"
    assert minitrain("tokenize", "--tokenizer", smollm2, "--out", data, json_module.__file__).returncode == 0
    done = minitrain("pretrain", "--init", smollm2, "--data", data, "--out", tmp_path / "run", "--seq-len", 32,
                     "--batch-size", 2, "--steps", 2, "--val-windows", 2, "--lr", 1e-3, "--warmup-steps", 0,
                     "--lora-rank", 8, "--lora-alpha", 16, "--json")
    assert done.returncode == 0, done.stderr
    adapter = tmp_path / "run" / "adapter"
    spec, arrays = peft_format.read_adapter(adapter)
    assert max(np.abs(a).max() for n, a in arrays.items() if "lora_B" in n) > 0
    config = load_gguf(smollm2)[0]
    inputs = np.fromfile(next(data.glob("*.bin")), dtype="<u4")[: 2 * 32].astype(np.int64).reshape(2, 32)
    truth_model = peft.PeftModel.from_pretrained(hf_oracle.float64_model(smollm2.parent, gguf_file=smollm2.name), adapter)
    with torch.no_grad():
        truth = truth_model(torch.tensor(inputs)).logits.numpy()
    mine = lora.Adapters(spec, config, arrays).attach(load_model(smollm2)).forward(inputs).data
    bound = depth(config, 2, 32, spec.rank)[0] * (UNIT_ROUNDOFF["fp32"] + U64) * np.abs(truth).max()
    assert np.abs(mine - truth).max() <= bound

"""DPO (`pretrain --objective dpo`): the loss and the sequence log-probabilities against TRL's own
formulas in float64 torch, three AdamW steps of a tiny model against torch's, and the run around
them: the reference's log-probabilities kept beside the run, resume, --recompute, --grad-accum,
LoRA, and the refusals.

TRL 1.16.0 (trl/trainer/dpo_trainer.py) is not installed as an oracle: it brings datasets, pandas,
dill, multiprocess and xxhash, and its loss is a method of a trainer that needs a whole training
setup. Its formula is written out in torch below, with the lines it comes from."""

import json
import subprocess
import sys

import numpy as np
import pytest

from minitrain import backend, ops
from minitrain.data import PairWindows, TokenWindows
from minitrain.objectives import DPO
from minitrain.ops import dpo as dpo_module

torch = pytest.importorskip("torch")

BETA = 0.1


def trl_loss(logps, reference, beta):
    """TRL's "sigmoid" loss with f_divergence reverse_kl (dpo_trainer.py): logps.chunk(2) (line
    1318), chosen_logratios = chosen_logps - ref_chosen_logps and the same for rejected (1349-1350),
    delta_score = chosen - rejected (1384), per_sequence_loss = -F.logsigmoid(beta * delta_score)
    (1388), loss += per_sequence_loss.mean() (1528)."""
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    ref_chosen, ref_rejected = reference.chunk(2, dim=0)
    delta_score = (chosen_logps - ref_chosen) - (rejected_logps - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * delta_score).mean()


def trl_logps(logits, input_ids, completion_mask):
    """TRL's sequence log-probabilities: labels = input_ids where completion_mask, else -100
    (dpo_trainer.py 1297-1298); the fused head's per-token log_probs of the next token's label,
    0 where it is -100 (trainer/utils.py 1513-1521, 1617-1627); summed over the sequence (1302-1304)."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != -100)).sum(dim=1)


def dpo_error(logps, reference, beta):
    """(max |loss - TRL's|, max |gradient - TRL's|) on the same float64 log-probabilities."""
    with backend.precision("fp64"):
        from minitrain.autograd import Tensor

        p = Tensor(logps.copy(), requires_grad=True)
        loss = ops.dpo_loss(p, reference, beta)
        loss.backward()
    t = torch.tensor(logps, requires_grad=True)
    want = trl_loss(t, torch.tensor(reference), beta)
    want.backward()
    return abs(float(loss.data) - want.item()), float(np.abs(p.grad - t.grad.numpy()).max())


CASES = {  # (policy, reference) log-probabilities of 4 pairs: near the reference, far from it, ties
    "near": (np.array([-10.0, -20.5, -7.25, -30.0, -12.0, -19.0, -8.0, -29.0]), 0.3),
    "far": (np.array([-200.0, -15.0, -90.0, -1.0, -20.0, -150.0, -3.0, -80.0]), 60.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_loss_and_its_gradient_are_trls(case, beta):
    base, spread = CASES[case]
    rng = np.random.default_rng(len(case))
    logps, reference = base + spread * rng.standard_normal(8), base.copy()
    loss_err, grad_err = dpo_error(logps, reference, beta)
    assert loss_err <= 1e-12 and grad_err <= 1e-12, (loss_err, grad_err)


def test_beta_twice_or_chosen_swapped_with_rejected_is_caught(monkeypatch):
    """Two planted bugs in the implicit rewards: beta applied twice, chosen and rejected swapped."""
    logps, reference = CASES["near"][0] + np.linspace(-1, 1, 8), CASES["near"][0]
    assert max(dpo_error(logps, reference, 0.5)) <= 1e-12
    margins = dpo_module.margins
    monkeypatch.setattr(dpo_module, "margins", lambda p, r, beta: margins(p, r, beta * beta))
    assert dpo_error(logps, reference, 0.5)[0] > 1e-3
    monkeypatch.setattr(dpo_module, "margins", lambda p, r, beta: margins(p, r, beta)[::-1])
    assert dpo_error(logps, reference, 0.5)[0] > 1e-3


# --- a tiny model on pairs --------------------------------------------------------------------

SPEC = dict(family="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            vocab_size=47, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False)
T = 15  # --seq-len: windows of 16 tokens


def write_pairs(directory, n, seed, seq_len=T, vocab=47):
    """n pairs as `tokenize --preference` lays them out: pair k = windows 2k (prompt + chosen) and
    2k + 1 (prompt + rejected), a shared prompt, the completions' tokens marked, EOS padding."""
    directory.mkdir(parents=True, exist_ok=True)
    rng, ids, mask = np.random.default_rng(seed), [], []
    for _ in range(n):
        prompt = rng.integers(0, vocab, rng.integers(2, 7))
        for _ in range(2):
            completion = rng.integers(0, vocab, rng.integers(1, seq_len + 1 - len(prompt) + 1))
            pad = seq_len + 1 - len(prompt) - len(completion)
            ids += [prompt, completion, np.full(pad, vocab - 1)]
            mask += [np.zeros(len(prompt)), np.ones(len(completion)), np.zeros(pad)]
    np.concatenate(ids).astype("<u4").tofile(directory / "shard-00000.bin")
    np.concatenate(mask).astype("u1").tofile(directory / "shard-00000.mask")
    (directory / "manifest.json").write_text(json.dumps({"masks": True, "pairs": {"seq_len": seq_len, "pairs": n}}))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a tiny Llama's HF directory, its float64 truth's constructor, pairs of its vocabulary)."""
    import hf_oracle

    root = tmp_path_factory.mktemp("dpo")
    hf_oracle.build_hf(SPEC, seed=5).save_pretrained(root / "hf")
    return root / "hf", write_pairs(root / "pairs", 10, seed=1)


def raw_pairs(path, ids):
    """The pairs' full windows and masks as TRL's collator would hand them over: (2B, T+1) each,
    the chosen first."""
    tokens = np.fromfile(path / "shard-00000.bin", "<u4").astype(np.int64).reshape(-1, T + 1)
    mask = np.fromfile(path / "shard-00000.mask", "u1").astype(np.int64).reshape(-1, T + 1)
    rows = [2 * k for k in ids] + [2 * k + 1 for k in ids]
    return torch.tensor(tokens[rows]), torch.tensor(mask[rows])


def objective_error(directory, pairs):
    """max |ours - TRL's| over the loss and every gradient of one batch of 4 pairs in float64,
    relative to each quantity's largest magnitude; the reference: the same model's start."""
    import hf_oracle

    from minitrain.formats import hf
    from minitrain.model import Model

    ids = [0, 3, 5, 8]
    truth = hf_oracle.float64_model(directory)
    input_ids, completion_mask = raw_pairs(pairs, ids)
    with torch.no_grad():
        reference = trl_logps(truth(input_ids).logits, input_ids, completion_mask)
    with torch.no_grad():  # move the policy off the reference: a loss that is not ln 2, gradients of both signs
        for name, p in truth.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    loss_t = trl_loss(trl_logps(truth(input_ids).logits, input_ids, completion_mask), reference, BETA)
    loss_t.backward()
    with backend.precision("fp64"):
        cfg, arrays = hf.load_dir(directory)
        model = Model.from_arrays(cfg, {n: a.astype(np.float64) for n, a in arrays.items()})
        moved = dict(truth.named_parameters())
        for name, t in model.params.items():
            t.data[...] = moved[name].detach().numpy()
        source = PairWindows(TokenWindows(pairs, T, cfg.vocab_size), pairs)
        source.reference = np.zeros((len(source), 2))
        source.reference[ids] = reference.numpy().reshape(2, -1).T
        loss, _ = DPO(model, BETA, "test").loss(source.examples(ids))
        loss.backward()
    errors = {"loss": abs(float(loss.data) - loss_t.item()) / abs(loss_t.item())}
    for name, t in model.params.items():
        want = moved[name].grad.numpy()
        errors[name] = float(np.abs(t.grad - want).max() / np.abs(want).max())
    return errors


@pytest.mark.numerics
def test_a_models_loss_and_every_gradient_are_trls(tiny):
    """The whole objective: pairs read from shards (the padding cut), each sequence's log-probability
    of its completion (the head fused), the loss, back through every parameter: TRL's in float64."""
    errors = objective_error(*tiny)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-12, (worst, errors[worst])


def test_a_mask_off_by_one_is_caught(tiny, monkeypatch):
    """The targets taken from the mask of the token before (a planted bug) make the loss TRL's no more."""
    batch = TokenWindows.batch

    def shifted(self, indices):
        inputs, targets = batch(self, indices)
        masks = np.stack([self.masks[i][s: s + self.seq_len + 1] for i, s in map(self._locate, indices)])
        full = np.stack([self.window(k) for k in indices])[:, 1:]
        return inputs, np.where(masks[:, :-1] == 1, full, -100)

    monkeypatch.setattr(TokenWindows, "batch", shifted)
    assert objective_error(*tiny)["loss"] > 1e-3


# --- the run: three AdamW steps, the reference beside it, resume, recompute, LoRA, refusals ----

def options(directory, pairs, out, **more):
    return {"data": str(pairs), "init": str(directory), "objective": "dpo", "seq_len": T, "batch_size": 2,
            "steps": 3, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "val_windows": 2, "eval_every": 0,
            "out": str(out), **more}


@pytest.mark.numerics
def test_three_adamw_steps_are_torchs(tiny, tmp_path):
    """`pretrain --objective dpo --dtype fp64` (the reference computed by the policy before its first
    step, pairs 0-1, 2-3, 4-5 in order, AdamW with decay on matrices, no clipping) against torch's
    AdamW on TRL's loss, the reference log-probabilities computed by the float64 truth at the start."""
    import hf_oracle

    from minitrain.setup_run import build, configure

    directory, pairs = tiny
    with backend.precision("fp64"):  # build sets the run's dtype; the context puts fp32 back after
        run = build(*configure(options(directory, pairs, tmp_path / "run", dtype="fp64", grad_clip=0.0)),
                    log=sys.stdout)
        run.run()
    truth = hf_oracle.float64_model(directory)
    input_ids, mask = raw_pairs(pairs, list(range(6)))
    with torch.no_grad():
        reference = trl_logps(truth(input_ids).logits, input_ids, mask).reshape(2, 6)
    named = dict(truth.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for p in named.values() if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    start = {n: p.detach().clone() for n, p in named.items()}
    for step in range(3):
        ids = [2 * step, 2 * step + 1]
        input_ids, mask = raw_pairs(pairs, ids)
        opt.zero_grad()
        trl_loss(trl_logps(truth(input_ids).logits, input_ids, mask), reference[:, ids].reshape(-1), BETA).backward()
        opt.step()
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in named.items())
    assert moved > 1e-3, "the weights did not move"
    # float64 on both sides: rounding of ~1e-16 per operation, through a few hundred dependent
    # ones and AdamW's division by sqrt(v), stays many orders below 1e-10 of the weights' size
    errors = {n: float(np.abs(t.data - named[n].detach().numpy()).max() / np.abs(t.data).max())
              for n, t in run.model.params.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])


def pretrain(directory, pairs, out, *args):
    opts = options(directory, pairs, out)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    return subprocess.run([sys.executable, "-m", "minitrain", "pretrain", *argv, "--json", *args],
                          capture_output=True, text=True, timeout=300)


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "wall_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_reference_is_computed_once_and_a_resumed_run_reads_it(tiny, tmp_path):
    """A run stopped at step 2 and resumed ends with the bytes of the straight run; the resumed run
    reads OUT/reference/ instead of computing it. The evaluations log TRL's rewards, no perplexity;
    the first loss is ln 2 exactly (the policy is its reference), with --ref given too."""
    directory, pairs = tiny
    whole = pretrain(directory, pairs, tmp_path / "whole", "--steps=4", "--eval-every=2")
    assert whole.returncode == 0, whole.stderr
    assert "reference log-probabilities of 10 pairs" in whole.stderr
    saved = np.load(tmp_path / "whole" / "reference" / "train.npy")
    assert saved.shape == (10, 2) and (saved < 0).all()
    cut = pretrain(directory, pairs, tmp_path / "cut", "--steps=2", "--eval-every=2", "--save-every=2")
    assert cut.returncode == 0, cut.stderr
    resumed = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--resume", str(tmp_path / "cut" / "step-2"),
                              "--steps", "4"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "reference log-probabilities: read" in resumed.stderr and "of 10 pairs" not in resumed.stderr
    assert (tmp_path / "whole" / "final.apr").read_bytes() == (tmp_path / "cut" / "final.apr").read_bytes()
    assert records(tmp_path / "whole") == records(tmp_path / "cut")
    evals = [r for r in records(tmp_path / "whole") if r["type"] == "eval"]
    assert evals[0]["val_loss"] == float(np.float32(np.log(2))) and "ppl" not in evals[0]
    assert set(evals[-1]) >= {"val_rewards_chosen", "val_rewards_rejected", "val_reward_margin",
                              "val_reward_accuracy", "val_logps_chosen", "val_logps_rejected"}
    assert evals[0]["val_reward_margin"] == 0 and evals[0]["val_logps_chosen"] < 0
    if __import__("importlib").util.find_spec("matplotlib"):  # the plot extra: loss, rewards, lr
        drawn = subprocess.run([sys.executable, "-m", "minitrain", "plot", str(tmp_path / "whole")],
                               capture_output=True, text=True, timeout=300)
        assert drawn.returncode == 0 and (tmp_path / "whole" / "loss.png").stat().st_size > 0, drawn.stderr
    loaded = pretrain(directory, pairs, tmp_path / "ref", "--steps=4", "--eval-every=2", f"--ref={directory}")
    assert loaded.returncode == 0 and f"reference {directory}" in loaded.stderr, loaded.stderr
    assert (tmp_path / "ref" / "final.apr").read_bytes() == (tmp_path / "whole" / "final.apr").read_bytes()


@pytest.mark.slow
def test_recompute_keeps_the_bits_and_accumulation_weighs_by_pairs(tiny, tmp_path):
    directory, pairs = tiny
    runs = {name: pretrain(directory, pairs, tmp_path / name, *args) for name, args in
            {"plain": ["--batch-size=4"], "recompute": ["--batch-size=4", "--recompute=layer"],
             "accum": ["--batch-size=2", "--grad-accum=2"]}.items()}
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr)
    assert (tmp_path / "plain" / "final.apr").read_bytes() == (tmp_path / "recompute" / "final.apr").read_bytes()
    # 2 micro-batches of 2 pairs, each weighed 1/2: the mean over the 4 pairs, as one batch of 4
    # (to rounding: the batches' sequences are cut to their own longest)
    plain, accum = ([r for r in records(tmp_path / n) if r["type"] == "step"] for n in ("plain", "accum"))
    for a, b in zip(plain, accum):
        for key in ("loss", "grad_norm", "reward_margin", "reward_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_lora_trains_adapters_against_the_base(tiny, tmp_path):
    directory, pairs = tiny
    run = pretrain(directory, pairs, tmp_path / "lora", "--lora-rank=4", "--lr=1e-2")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["init_loss"] == float(np.float32(np.log(2))) and report["lora"]["rank"] == 4
    assert report["dpo"]["beta"] == BETA and report["final_train_loss"] < report["init_loss"]
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--objective=sft"], "preference pairs (tokenize --preference); --objective sft would train on the rejected"),
    (["--seq-len=7"], "pairs written for --seq-len 15 (manifest.json), not 7"),
    (["--beta=0"], "'--beta': 0.0 is not in the range x>0"),
    (["--teacher=x"], "--teacher distills on next-token targets; --objective dpo trains on pairs"),
    (["--ref=/nonexistent"], "/nonexistent"),
])
def test_bad_runs_are_one_line(tiny, tmp_path, args, message):
    directory, pairs = tiny
    run = pretrain(directory, pairs, tmp_path / "out", *args)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and message in run.stderr, run.stderr


def test_no_pairs_no_reference_or_a_reference_of_another_vocabulary_are_refused(tiny, tmp_path):
    directory, pairs = tiny
    plain = tmp_path / "plain"
    plain.mkdir()
    np.arange(200, dtype="<u4").__mod__(47).astype("<u4").tofile(plain / "shard-00000.bin")
    for argv, message in [
        ([f"--data={plain}", f"--init={directory}"], "no preference pairs (its manifest.json has no \"pairs\")"),
        ([f"--data={pairs}", "--arch=tiny-llama"], "--objective dpo compares the policy with a reference model"),
    ]:
        run = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--objective=dpo", f"--seq-len={T}",
                              f"--out={tmp_path / 'o'}", *argv], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and message in run.stderr, run.stderr
    import hf_oracle

    hf_oracle.build_hf({**SPEC, "vocab_size": 53}, seed=6).save_pretrained(tmp_path / "other")
    run = pretrain(directory, pairs, tmp_path / "o", f"--ref={tmp_path / 'other'}")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "its vocabulary has 53 tokens, the policy's 47" in run.stderr
    run = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--beta=0.2", f"--data={plain}",
                          "--arch=tiny-llama", f"--out={tmp_path / 'o'}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--beta is for preference pairs: give --objective dpo" in run.stderr


@pytest.mark.slow
def test_a_resumed_run_refuses_a_reference_made_for_other_data(tiny, tmp_path):
    directory, pairs = tiny
    cut = pretrain(directory, pairs, tmp_path / "cut", "--steps=2", "--save-every=1")
    assert cut.returncode == 0, cut.stderr
    record = json.loads((tmp_path / "cut" / "reference" / "reference.json").read_text())
    record["train"]["manifest_sha256"] = "0" * 64
    (tmp_path / "cut" / "reference" / "reference.json").write_text(json.dumps(record))
    run = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--resume", str(tmp_path / "cut" / "step-1")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "reference.json: train.manifest_sha256 " in run.stderr and "remove" in run.stderr

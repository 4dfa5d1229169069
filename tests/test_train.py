"""The training loop: data windows and hold-out, accumulation, schedule, clipping, resume,
determinism, and the abort / bad-input exits."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minitrain import checkpoint
from minitrain.data import TokenWindows, TrainStream
from minitrain.errors import InputError, TrainingAborted
from minitrain.formats import safetensors_io
from minitrain.schedule import learning_rate
from minitrain.setup_run import build, configure

VOCAB = 8192  # tiny-llama / tiny-qwen2


@pytest.fixture
def tokens(tmp_path):
    """A token file of 61 windows of 17 tokens (seq_len 16) plus a 5-token tail."""
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, VOCAB, 61 * 17 + 5).astype("<u4").tofile(path)
    return path


def small(tokens, out, **changes):
    options = dict(data=str(tokens), out=str(out), arch="tiny-qwen2", seq_len=16, batch_size=2, steps=4,
                   val_windows=4, eval_every=2, warmup_steps=1, lr=1e-3, seed=3)
    options.update(changes)
    return options


def train(options):
    run = build(*configure(options))
    return run, run.run()


def step_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


def records(out):
    """metrics.jsonl without its wall-clock fields: what must have the same bits run to run."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "tokens_per_sec")} for line in lines]


def minitrain(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)


# --- data ----------------------------------------------------------------------------------

def test_masked_windows_ignore_the_targets_their_mask_leaves_out(tokens):
    mask = mask_beside(tokens)
    windows = TokenWindows(tokens, 16, VOCAB)
    inputs, targets = windows.batch([0, 1, 3])
    ids = np.fromfile(tokens, "<u4").astype(np.int64)
    for row, k in enumerate([0, 1, 3]):
        w, m = ids[17 * k: 17 * (k + 1)], mask[17 * k: 17 * (k + 1)]
        assert inputs[row].tolist() == w[:-1].tolist()
        assert targets[row].tolist() == np.where(m[1:] == 1, w[1:], -100).tolist()
    assert (targets[1] == -100).all()  # window 1: no target at all


def test_mask_shards_must_match_their_token_shards(tokens, tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    for name in ("shard-00000", "shard-00001"):
        (directory / f"{name}.bin").write_bytes(tokens.read_bytes())
    (directory / "shard-00000.mask").write_bytes(bytes(tokens.stat().st_size // 4))
    with pytest.raises(InputError, match="shard-00001.mask: missing; 1 of the 2 token shards have a .mask shard"):
        TokenWindows(directory, 16, VOCAB)
    (directory / "shard-00001.mask").write_bytes(bytes(7))
    with pytest.raises(InputError, match="shard-00001.mask: 7 bytes for the 1042 tokens of shard-00001.bin"):
        TokenWindows(directory, 16, VOCAB)


def test_windows_follow_the_interface(tmp_path):
    a, b = tmp_path / "d" / "a.bin", tmp_path / "d" / "b.bin"
    a.parent.mkdir()
    np.arange(0, 23, dtype="<u4").tofile(a)  # 2 windows of 10 (seq_len 9) + a 3-token tail, dropped
    np.arange(100, 110, dtype="<u4").tofile(b)  # exactly 1 window
    w = TokenWindows(a.parent, 9, 200)
    assert len(w) == 3
    inputs, targets = w.batch([0, 1, 2])
    np.testing.assert_array_equal(inputs[1], np.arange(10, 19))
    np.testing.assert_array_equal(targets[1], np.arange(11, 20))  # each input token's next token
    np.testing.assert_array_equal(inputs[2], np.arange(100, 109))


@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_validation_windows_are_never_trained_on_even_after_wrapping(tokens, tmp_path, order):
    run = build(*configure(small(tokens, tmp_path / "out", data_order=order, val_windows=7)))
    assert run.data.n_train == 54 and run.data.val_ids == list(range(54, 61))
    seen = run.data.stream.window_ids(0, 5 * 54 + 3)  # five epochs and a bit
    assert set(seen) == set(range(54)), "every training window used, no validation window"
    for epoch in range(5):
        assert sorted(seen[epoch * 54: (epoch + 1) * 54]) == list(range(54))  # each epoch is a permutation
    if order == "shuffle":
        assert seen[:54] != seen[54:108], "a fresh order every epoch"
        assert seen[:54] != list(range(54))


def test_sequential_step_uses_consecutive_windows(tokens):
    stream = TrainStream(TokenWindows(tokens, 16, VOCAB), 10, "sequential", 0)
    assert stream.window_ids(4 * 3, 4) == [2, 3, 4, 5]  # step 3 with batch 4: samples 12..15, wrapped at 10


def test_separate_validation_data_is_used_whole(tokens, tmp_path):
    run = build(*configure(small(tokens, tmp_path / "out", val_data=str(tokens), eval_windows=5)))
    assert run.data.n_train == 61 and run.data.val_ids == [0, 1, 2, 3, 4]
    assert run.data.val_source is not run.data.stream.windows


# --- schedule, clipping, accumulation ------------------------------------------------------

def test_schedule_values():
    lr = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=111)  # cosine over steps 10..110
    cos = [learning_rate(s, schedule="cosine", **lr) for s in range(111)]
    assert cos[0] == pytest.approx(1e-4) and cos[4] == pytest.approx(5e-4) and cos[9] == pytest.approx(1e-3)
    assert cos[10] == pytest.approx(1e-3)  # the peak, right after warmup
    assert cos[60] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)  # halfway down the cosine
    assert cos[110] == pytest.approx(1e-4)  # the last step is at min_lr
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert {learning_rate(s, schedule="constant", **lr) for s in range(10, 111)} == {1e-3}


def test_the_scheduled_lr_is_the_one_applied(tokens, tmp_path):
    """Plain SGD: every parameter moves by exactly -lr(step) * grad (no clipping)."""
    run = build(*configure(small(tokens, tmp_path / "out", optimizer="sgd", lr=0.5, warmup_steps=4, steps=8,
                               grad_clip=0, dtype="fp64")))
    p = run.model.params["model.norm.weight"]
    for step in range(3):
        before = p.data.copy()
        _, _, lr, _ = run.train_step(step)
        assert lr == pytest.approx(0.5 * (step + 1) / 4)
        np.testing.assert_allclose(before - p.data, lr * p.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.numerics
def test_clipping_by_the_true_global_norm(tokens, tmp_path):
    run = build(*configure(small(tokens, tmp_path / "out", optimizer="sgd", grad_clip=0.25, dtype="fp64")))
    _, norm, _, _ = run.train_step(0)
    grads = [p.grad for p in run.model.parameters()]
    clipped = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert norm > 0.25  # the reported norm is the pre-clip one ...
    assert clipped == pytest.approx(0.25, rel=1e-5)  # ... and the gradients were scaled to the limit
    run2 = build(*configure(small(tokens, tmp_path / "out2", optimizer="sgd", grad_clip=0, dtype="fp64")))
    _, norm2, _, _ = run2.train_step(0)
    unclipped = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in run2.model.parameters()))
    assert norm == pytest.approx(norm2, rel=1e-12) == pytest.approx(unclipped, rel=1e-12)


def mask_beside(tokens, seed=0):
    """A loss mask beside the token file: runs of targets and of none, a window with none."""
    n = tokens.stat().st_size // 4
    mask = np.repeat(np.random.default_rng(seed).random(-(-n // 5)) < 0.5, 5)[:n].astype(np.uint8)
    mask[17: 2 * 17] = 0
    mask.tofile(tokens.with_suffix(".mask"))
    return mask


@pytest.mark.numerics
@pytest.mark.parametrize("optimizer, masked", [("sgd", False), ("adamw", False), ("adamw", True)])
def test_accumulation_gives_the_big_batch_update(tokens, tmp_path, optimizer, masked):
    """Two micro-batches of 2 make the update of one batch of 4; with loss masks too, where the
    micro-batches hold different numbers of targets (the step's mean is over all of them)."""
    if masked:
        mask_beside(tokens)
    common = dict(optimizer=optimizer, steps=3, dtype="fp64", grad_clip=0.5, eval_every=0)
    big, _ = train(small(tokens, tmp_path / "big", batch_size=4, grad_accum=1, **common))
    acc, _ = train(small(tokens, tmp_path / "acc", batch_size=2, grad_accum=2, **common))
    np.testing.assert_allclose(step_losses(tmp_path / "big"), step_losses(tmp_path / "acc"), rtol=1e-13)
    for name, t in big.model.params.items():
        if optimizer == "adamw" and name.endswith("k_proj.bias"):
            # its gradient is 0 without RoPE (adding b_k to every key adds q.b_k to a whole row of
            # scores, which the softmax cancels), and next to 0 in the dimensions RoPE barely turns
            # (theta 1e6): there the two runs compute rounding noise, which AdamW scales up to
            # steps of up to lr in whatever direction the noise points
            continue
        np.testing.assert_allclose(acc.model.params[name].data, t.data, rtol=1e-10, atol=1e-14, err_msg=name)


# --- determinism, resume, checkpoints ------------------------------------------------------

@pytest.mark.numerics
def test_same_seed_same_losses_different_seed_different(tokens, tmp_path):
    train(small(tokens, tmp_path / "a", data_order="shuffle"))
    train(small(tokens, tmp_path / "b", data_order="shuffle"))
    train(small(tokens, tmp_path / "c", data_order="shuffle", seed=4))
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    assert step_losses(tmp_path / "a") != step_losses(tmp_path / "c")


@pytest.mark.numerics
@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_resume_continues_bit_identically(tokens, tmp_path, order):
    straight = small(tokens, tmp_path / "straight", steps=4, save_every=2, data_order=order, grad_accum=2)
    train(straight)
    resumed, report = train({"resume": str(tmp_path / "straight" / "step-2"), "out": str(tmp_path / "resumed")})
    assert report["steps"] == 4 and report["init_loss"] == json.loads(
        (tmp_path / "straight" / "step-2" / "state.json").read_text())["init_loss"]
    kept = [r for r in records(tmp_path / "straight") if r["step"] > 2]
    assert [r for r in records(tmp_path / "resumed") if r["step"] > 2] == kept  # losses, grad norms, lrs, val
    a = safetensors_io.load(tmp_path / "straight" / "step-4" / "model.safetensors")
    for name, t in resumed.model.params.items():
        np.testing.assert_array_equal(t.data, a[name], err_msg=name)


@pytest.mark.numerics
def test_resume_into_its_own_directory_keeps_the_metrics_up_to_the_checkpoint(tokens, tmp_path):
    train(small(tokens, tmp_path / "run", steps=4, save_every=2))
    before = records(tmp_path / "run")
    train({"resume": str(tmp_path / "run" / "step-2")})  # --out defaults to the checkpoint's directory
    assert records(tmp_path / "run") == before  # steps 1-2 kept once, steps 3-4 rewritten with the same values


@pytest.mark.numerics
def test_a_cpu_hungry_neighbour_changes_no_bit(tokens, tmp_path):
    """The same run twice, the second with a busy loop on every core beside it: the threads of
    OpenBLAS and of AdamW/grad norm are preempted at other moments, the results are the same."""
    args = ["pretrain", "--data", str(tokens), "--arch", "tiny-llama", "--seq-len", "16", "--batch-size", "2",
            "--grad-accum", "2", "--steps", "6", "--val-windows", "4", "--eval-every", "3", "--warmup-steps", "2"]
    quiet = minitrain(*args, "--out", str(tmp_path / "quiet"))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        loaded = minitrain(*args, "--out", str(tmp_path / "loaded"))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert quiet.returncode == loaded.returncode == 0, quiet.stderr + loaded.stderr
    assert records(tmp_path / "loaded") == records(tmp_path / "quiet")
    assert (tmp_path / "loaded" / "final.apr").read_bytes() == (tmp_path / "quiet" / "final.apr").read_bytes()


@pytest.mark.numerics
def test_resume_auto_starts_or_continues_and_keep_last_prunes(tokens, tmp_path):
    """A job run twice with the same options and --resume auto: the first starts fresh (no
    checkpoint in --out yet) and, with --keep-last 2, leaves the newest two complete checkpoints
    (an incomplete one is left alone); after a crash past step 5 (step-6 and final.apr lost) the
    second continues from step-5, and the result is the straight run's, bit for bit."""
    straight = small(tokens, tmp_path / "straight", steps=6)
    train(straight)
    job = small(tokens, tmp_path / "job", steps=6, save_every=1, keep_last=2, resume="auto")
    (tmp_path / "job" / "step-9").mkdir(parents=True)  # incomplete (no state.json): neither resumed nor pruned
    train(job)
    assert sorted(p.name for p in (tmp_path / "job").glob("step-*")) == ["step-5", "step-6", "step-9"]
    shutil.rmtree(tmp_path / "job" / "step-6")
    (tmp_path / "job" / "final.apr").unlink()
    assert configure(job)[0].resume == str(tmp_path / "job" / "step-5")
    train(job)
    assert records(tmp_path / "job") == records(tmp_path / "straight")
    assert (tmp_path / "job" / "final.apr").read_bytes() == (tmp_path / "straight" / "final.apr").read_bytes()
    with pytest.raises(InputError, match="--resume auto continues from the newest checkpoint in --out DIR"):
        configure({k: v for k, v in job.items() if k != "out"})


def test_a_config_file_gives_the_options_and_run_json_repeats_the_run(tokens, tmp_path):
    """YAML with - or _ in its keys, the command line winning over it, and an earlier run's
    run.json as the config: each gives the command line's run, final.apr byte for byte. An
    unknown key and a bad value are exit 2, one line naming the file and the key."""
    args = ["--data", str(tokens), "--arch", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--steps", "3",
            "--val-windows", "4", "--eval-every", "3", "--warmup-steps", "1", "--lr", "0.001"]
    assert minitrain("pretrain", *args, "--out", str(tmp_path / "a")).returncode == 0
    (tmp_path / "c.yaml").write_text(f"data: {tokens}\narch: tiny-llama\nseq-len: 16\nbatch_size: 2\nsteps: 3\n"
                                     f"val-windows: 4\neval_every: 3\nwarmup-steps: 1\nlr: 0.5\n")
    b = minitrain("pretrain", "--config", str(tmp_path / "c.yaml"), "--lr", "0.001", "--out", str(tmp_path / "b"))
    c = minitrain("pretrain", "--config", str(tmp_path / "a" / "run.json"), "--out", str(tmp_path / "c"))
    assert b.returncode == c.returncode == 0, b.stderr + c.stderr
    for run in ("b", "c"):
        assert (tmp_path / run / "final.apr").read_bytes() == (tmp_path / "a" / "final.apr").read_bytes(), run
        assert records(tmp_path / run) == records(tmp_path / "a"), run
    for text, message in [("sequence_len: 16\n", "unknown key 'sequence_len' (pretrain's options: "),
                          ("steps: many\n", "steps: 'many' is not a valid integer"),
                          ("- steps\n", "expected a mapping of option names to values")]:
        (tmp_path / "bad.yaml").write_text(text)
        bad = minitrain("pretrain", "--config", str(tmp_path / "bad.yaml"), *args)
        assert bad.returncode == 2 and bad.stderr.startswith(f"minitrain: error: --config {tmp_path / 'bad.yaml'}: "
                                                             f"{message}") and bad.stderr.count("\n") == 1, bad.stderr


SIGNALLED = ["pretrain", "--arch", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--steps", "30",
             "--val-windows", "4", "--eval-every", "10", "--warmup-steps", "2", "--save-every", "12"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(the token file, the run a signal interrupts, uninterrupted): its final.apr and metrics."""
    root = tmp_path_factory.mktemp("signalled")
    data = root / "tokens.bin"
    np.random.default_rng(0).integers(0, VOCAB, 61 * 17 + 5).astype("<u4").tofile(data)
    assert minitrain(*SIGNALLED, "--data", str(data), "--out", str(root / "straight")).returncode == 0
    return data, root / "straight"


@pytest.mark.numerics
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_finishes_the_run(straight, tmp_path, name, code):
    """SIGTERM (schedulers, spot instances) or SIGINT mid-run: the step finishes, a checkpoint is
    written, the line says where and how to go on, exit 128 + N; resuming from it ends in the
    straight run's final.apr and metrics, bit for bit."""
    import signal

    tokens, whole = straight
    args = [*SIGNALLED, "--data", str(tokens)]
    run = subprocess.Popen([sys.executable, "-m", "minitrain", *args, "--out", str(tmp_path / "run")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count('"type": "step"') >= 3) and time.monotonic() < deadline:
        time.sleep(0.005)
    run.send_signal(getattr(signal, name))
    out, err = run.communicate(timeout=120)
    assert run.returncode == code, err
    stopped = re.search(rf"minitrain: stopped by {name} after step (\d+) of 30: checkpoint (\S+); continue with "
                        rf"`minitrain pretrain --resume (\S+)`", err)
    assert stopped and stopped[2] == stopped[3] == str(tmp_path / "run" / f"step-{stopped[1]}"), err
    assert 3 <= int(stopped[1]) < 30 and (tmp_path / "run" / f"step-{stopped[1]}" / "state.json").exists()
    assert f"minitrain: {name}: stopping after this step with a checkpoint" in err
    assert not (tmp_path / "run" / "final.apr").exists()
    resumed = minitrain("pretrain", "--resume", stopped[2])
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run" / "final.apr").read_bytes() == (whole / "final.apr").read_bytes()
    assert records(tmp_path / "run") == records(whole)


def test_a_second_signal_stops_at_once(monkeypatch):
    import signal

    from minitrain import preempt

    killed, said = [], []
    monkeypatch.setattr(preempt.os, "kill", lambda pid, signum: killed.append(signum))
    before = signal.getsignal(signal.SIGTERM)
    with preempt.StopRequests(said.append) as stops:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stops.signum == signal.SIGTERM and killed == [] and len(said) == 1
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert killed == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == before


def test_resume_refuses_a_changed_option(tokens, tmp_path):
    train(small(tokens, tmp_path / "run", steps=2, save_every=2))
    with pytest.raises(InputError, match=r"--lr 0.01 \(checkpoint: 0.001\)"):
        configure({"resume": str(tmp_path / "run" / "step-2"), "lr": 0.01})


def test_a_save_killed_midway_leaves_no_checkpoint(tokens, tmp_path, monkeypatch):
    run = build(*configure(small(tokens, tmp_path / "run", steps=2)))
    run.train_step(0)
    run.state["step"] = 1
    real_save, calls = safetensors_io.save, []

    def dies_on_the_second_file(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_save(path, arrays)

    monkeypatch.setattr(safetensors_io, "save", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint()
    assert not (tmp_path / "run" / "step-1").exists()
    partial = [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".step-1.partial")]
    assert partial, "the half-written checkpoint is under a temporary name"
    with pytest.raises(InputError, match="not a complete checkpoint"):
        checkpoint.load(partial[0])


# --- outputs -------------------------------------------------------------------------------

def test_run_files_and_json_report(tokens, tmp_path):
    out = minitrain("pretrain", "--data", str(tokens), "--out", str(tmp_path / "run"), "--arch", "tiny-llama",
                    "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--val-windows", "4", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("status", "arch", "params", "steps", "tokens", "init_loss", "final_train_loss", "final_val_loss",
                "tokens_per_sec", "wall_s"):
        assert report[key] is not None, key
    assert report["status"] == "ok" and report["arch"] == "tiny-llama" and report["tokens"] == 3 * 2 * 16
    assert abs(report["init_loss"] - math.log(VOCAB)) < 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert set(steps[0]) == {"type", "step", "loss", "grad_norm", "lr", "tokens_per_sec", "wall_s"}
    assert records[0] == {"type": "eval", "step": 0, "val_loss": report["init_loss"],
                          "ppl": pytest.approx(math.exp(report["init_loss"]))}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["lr"] == 3e-4 and run["config"]["warmup_steps"] == 1000  # from-scratch defaults
    assert (tmp_path / "run" / "final.apr").stat().st_size > 4 * report["params"]
    assert "step 3/3" in out.stderr and "tok/s" in out.stderr


# --- aborts and bad input ------------------------------------------------------------------

def test_non_finite_loss_aborts_with_exit_3_before_logging_it(tokens, tmp_path):
    out = minitrain("pretrain", "--data", str(tokens), "--out", str(tmp_path / "run"), "--arch", "tiny-llama",
                    "--seq-len", "16", "--batch-size", "2", "--steps", "20", "--optimizer", "sgd", "--lr", "1e12",
                    "--warmup-steps", "0", "--grad-clip", "0", "--val-windows", "0")
    assert out.returncode == 3, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("minitrain: training aborted: step")
    assert "Traceback" not in out.stderr
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_a_diverging_validation_loss_aborts(tokens, tmp_path, monkeypatch):
    run = build(*configure(small(tokens, tmp_path / "run", steps=4, eval_every=1)))
    values = iter([[5.0], [6.0], [12.5]])  # the mean loss (and no terms)
    monkeypatch.setattr(run, "evaluate", lambda: next(values))
    with pytest.raises(TrainingAborted, match="more than twice the previous 6.0000"):
        run.run()


@pytest.mark.parametrize("case", ["token-too-big", "odd-size", "all-held-out", "no-data", "unknown-arch", "seq-too-long",
                                  "bf16-on-cpu"])
def test_bad_input_exits_2_before_training(tokens, tmp_path, case):
    data = tmp_path / "bad.bin"
    args = ["--arch", "tiny-llama", "--seq-len", "16", "--out", str(tmp_path / "run")]
    if case == "token-too-big":
        t = np.zeros(100, dtype="<u4")
        t[57] = VOCAB
        t.tofile(data)
        expect = [str(data), "position 57", f">= the model's vocab_size {VOCAB}"]
    elif case == "odd-size":
        data.write_bytes(b"\0" * 10)
        expect = ["not a multiple of 4"]
    elif case == "all-held-out":
        data = tokens
        args += ["--val-windows", "61"]
        expect = ["leaves none to train on"]
    elif case == "no-data":
        data = tmp_path / "missing.bin"
        expect = ["no such file"]
    elif case == "unknown-arch":
        data = tokens
        args[1] = "gpt-5"
        expect = ["unknown architecture 'gpt-5'"]
    elif case == "bf16-on-cpu":
        data = tokens
        args += ["--dtype", "bf16", "--device", "cpu"]
        expect = ["--dtype bf16 on cpu", "--device cuda"]
    else:
        data = tokens
        args[3] = "5000"
        expect = ["max_position_embeddings 1024"]
    out = minitrain("pretrain", "--data", str(data), *args)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    for word in expect:
        assert word in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

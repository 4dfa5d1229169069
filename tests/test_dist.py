"""Data parallel over MPI (minitrain/dist.py), launched for real: `mpiexec -n N minitrain
pretrain` (MPICH from PyPI, the `dist` extra; oversubscribed on a 2-core machine) against one
process with grad-accum N times larger on the same windows. Bit for bit: the same final.apr
bytes and the same metrics (losses, gradient norms, validation losses); under ZeRO-1 too, whose
checkpoints hold the whole optimizer state and resume on another number of ranks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    MPIEXEC is None or __import__("importlib").util.find_spec("mpi4py") is None,
    reason="DATA-PARALLEL TESTS NOT RUN: no mpiexec or mpi4py (pip install -e '.[dist]')")]

# tiny-llama has a tied head: the embedding's two gradient contributions per micro-batch are where
# a summation order that followed the split would show first. Shuffled windows, a real lr.
COMMON = ["pretrain", "--arch", "tiny-llama", "--mode", "from-scratch", "--seq-len", "32", "--batch-size", "2",
          "--val-windows", "6", "--eval-every", "1", "--lr", "1e-3", "--warmup-steps", "0", "--data-order", "shuffle",
          "--seed", "3", "--json"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "tokens.bin"
    numpy.random.default_rng(0).integers(0, 8192, 60 * 33).astype("<u4").tofile(path)
    return path


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory):
    """The same kind of tokens with a loss mask beside them: runs of targets and of none (a
    conversation's turns), whole windows without a target among them."""
    directory = tmp_path_factory.mktemp("masked")
    rng = numpy.random.default_rng(1)
    rng.integers(0, 8192, 60 * 33).astype("<u4").tofile(directory / "shard-00000.bin")
    mask = numpy.repeat(rng.random(60 * 33 // 11) < 0.5, 11).astype(numpy.uint8)
    mask[5 * 33: 9 * 33] = 0
    mask.tofile(directory / "shard-00000.mask")
    return directory


def launch(ranks):
    """The command prefix that starts `ranks` processes (none for one)."""
    return [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []


def pretrain(ranks, out, *args):
    return subprocess.run([*launch(ranks), sys.executable, "-m", "minitrain", *COMMON, "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)


def metrics(out):
    """Every record without its timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "wall_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    assert (a / "final.apr").read_bytes() == (b / "final.apr").read_bytes()
    assert metrics(a) == metrics(b)


@pytest.mark.parametrize("ranks, accum", [(2, 1), (4, 1), (2, 2)])
def test_n_ranks_equal_one_process_with_n_times_the_accumulation(ranks, accum, data, tmp_path):
    one = pretrain(1, tmp_path / "one", "--data", data, "--steps", "3", "--grad-accum", str(ranks * accum))
    assert one.returncode == 0, one.stderr
    dp = pretrain(ranks, tmp_path / "dp", "--data", data, "--steps", "3", "--grad-accum", str(accum))
    assert dp.returncode == 0, dp.stderr
    assert_same_run(tmp_path / "one", tmp_path / "dp")
    report = json.loads(dp.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert dp.stdout.count('"status"') == 1 and report["tokens"] == 3 * ranks * accum * 2 * 32
    assert [line.split()[0] for line in dp.stderr.splitlines()].count("init_loss") == 1  # progress once too
    assert json.loads((tmp_path / "dp" / "run.json").read_text())["ranks"] == ranks


def test_with_loss_masks_n_ranks_equal_one_process_too(masked_data, tmp_path):
    """With loss masks each micro-batch has its own number of targets: the step's loss is the mean
    over all of them (every micro-batch and rank), still the same bits over 2 ranks as in one
    process; metrics.jsonl counts them."""
    one = pretrain(1, tmp_path / "one", "--data", masked_data, "--steps", "3", "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    dp = pretrain(2, tmp_path / "dp", "--data", masked_data, "--steps", "3")
    assert dp.returncode == 0, dp.stderr
    assert_same_run(tmp_path / "one", tmp_path / "dp")
    steps = [r for r in metrics(tmp_path / "one") if r["type"] == "step"]
    assert all(0 < r["target_tokens"] < 2 * 2 * 32 for r in steps)


def resume(ranks, checkpoint, *args):
    return subprocess.run([*launch(ranks), sys.executable, "-m", "minitrain", "pretrain", "--resume", str(checkpoint),
                           "--steps", "4", *args], capture_output=True, text=True, timeout=600)


def test_resume_continues_exactly_with_the_same_ranks(data, tmp_path):
    # a constant lr: the cut run's 2 steps and the whole run's 4 follow the same schedule
    whole = pretrain(2, tmp_path / "whole", "--data", data, "--steps", "4", "--schedule", "constant")
    assert whole.returncode == 0, whole.stderr
    first = pretrain(2, tmp_path / "cut", "--data", data, "--steps", "2", "--save-every", "2", "--schedule", "constant")
    assert first.returncode == 0, first.stderr
    resumed = resume(2, tmp_path / "cut" / "step-2")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(data, tmp_path):
    """SIGTERM to rank 1 alone (a preemption reaches the ranks at their own moments): every rank
    stops after the same step, rank 0 writes the checkpoint and says so, each exits 143; resumed
    on 2 ranks, the run ends as the straight one did, bit for bit."""
    import os
    import re
    import signal
    import time

    args = ["--data", str(data), "--steps", "16", "--schedule", "constant", "--eval-every", "8"]
    straight = pretrain(2, tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr
    run = subprocess.Popen([*launch(2), sys.executable, "-m", "minitrain", *COMMON, "--out", str(tmp_path / "run"),
                            *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics_file.exists() and metrics_file.read_text().count('"type": "step"') >= 2):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.005)
    ranks = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"minitrain" in cmdline and str(tmp_path / "run").encode() in cmdline:
            rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"PMI_RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = int(proc.name)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 only
    out, err = run.communicate(timeout=300)
    stopped = re.search(r"minitrain: stopped by SIGTERM after step (\d+) of 16: checkpoint (\S+);", err)
    assert stopped and run.returncode != 0 and err.count("minitrain: stopped by SIGTERM") == 1, err
    assert "EXIT CODE: 143" in out + err or run.returncode == 143, (run.returncode, err)
    resumed = resume(2, Path(stopped[2]), "--steps", "16")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "run")


# --- ZeRO-1 -----------------------------------------------------------------------------------
# 4 micro-batches per step, 4 steps at a constant lr, a checkpoint at step 2: one process with
# grad-accum 4 is the run that every sharded, split and resumed run below must reproduce.
ZERO_RUN = ["--steps", "4", "--schedule", "constant", "--save-every", "2"]


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "one"
    run = pretrain(1, out, "--data", data, *ZERO_RUN, "--grad-accum", "4")
    assert run.returncode == 0, run.stderr
    return out, json.loads(run.stdout.strip().splitlines()[-1])


def assert_same_checkpoint(a, b):
    """The whole optimizer state, not a shard: the same bytes as one process's."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("ranks, accum", [(4, 1), (2, 2)])
def test_zero1_gives_the_bits_of_one_process_with_a_shard_of_the_optimizer_per_rank(ranks, accum, data, tmp_path,
                                                                                      one_process):
    one, single = one_process
    dp = pretrain(ranks, tmp_path / "zero", "--data", data, *ZERO_RUN, "--grad-accum", str(accum), "--zero", "1")
    assert dp.returncode == 0, dp.stderr
    assert_same_run(one, tmp_path / "zero")
    assert_same_checkpoint(one / "step-2", tmp_path / "zero" / "step-2")
    # measured: every rank holds m and v (8 bytes per fp32 parameter) for its shard alone
    state = [m["optimizer_state_bytes"] for m in json.loads(dp.stdout.strip().splitlines()[-1])["memory_per_rank"]]
    assert [m["optimizer_state_bytes"] for m in single["memory_per_rank"]] == [8 * single["params"]]
    assert len(state) == ranks and sum(state) == 8 * single["params"]
    assert all(abs(s - 8 * single["params"] / ranks) < 8 * (1 << 16) for s in state)  # within one CHUNK
    assert "memory per rank (ZeRO-1): optimizer state" in dp.stderr


def test_a_zero1_run_resumes_exactly_on_another_number_of_ranks(data, tmp_path, one_process):
    one, _ = one_process
    cut = tmp_path / "cut"
    first = pretrain(2, cut, "--data", data, *ZERO_RUN[:-2], "--steps", "2", "--save-every", "2", "--grad-accum", "2",
                     "--zero", "1")
    assert first.returncode == 0, first.stderr
    assert_same_checkpoint(one / "step-2", cut / "step-2")
    on_four = resume(4, cut / "step-2", "--zero", "1")  # grad-accum follows: 4 ranks x 1
    assert on_four.returncode == 0, on_four.stderr
    assert_same_run(one, cut)
    alone = resume(1, cut / "step-2", "--zero", "0", "--out", str(tmp_path / "alone"))  # 1 process x 4, unsharded
    assert alone.returncode == 0, alone.stderr
    assert (one / "final.apr").read_bytes() == (tmp_path / "alone" / "final.apr").read_bytes()
    for ranks, args in ((3, ()), (1, ("--grad-accum", "2"))):  # 3 x 1 or 1 x 2 micro-batches: another step
        refused = resume(ranks, cut / "step-2", *args)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("minitrain: error:") == 1
        assert "the run took 4 micro-batches per step (2 rank(s) x --grad-accum 2)" in refused.stderr


def test_lora_with_dropout_under_zero1_gives_the_bits_of_one_process(data, tmp_path, one_process):
    """Adapters on one_process's final.apr: the dropout masks follow the global micro-batch, the
    shards are the adapters' (the frozen base has no optimizer state to shard)."""
    lora = ["--init", str(one_process[0] / "final.apr"), "--lora-rank", "4", "--lora-dropout", "0.2", *ZERO_RUN]
    one = pretrain(1, tmp_path / "one", "--data", data, *lora, "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    dp = pretrain(2, tmp_path / "dp", "--data", data, *lora, "--zero", "1")
    assert dp.returncode == 0, dp.stderr
    assert_same_run(tmp_path / "one", tmp_path / "dp")
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "one" / "step-2" / name).read_bytes() == (tmp_path / "dp" / "step-2" / name).read_bytes()
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "one" / weights).read_bytes() == (tmp_path / "dp" / weights).read_bytes()
    trained = json.loads(one.stdout.strip().splitlines()[-1])["lora"]["trained_params"]
    state = [m["optimizer_state_bytes"] for m in json.loads(dp.stdout.strip().splitlines()[-1])["memory_per_rank"]]
    assert sum(state) == 8 * trained and min(state) > 0


def test_distillation_over_ranks_gives_the_bits_of_one_process(data, tmp_path, one_process):
    """A teacher (one_process's trained model) pulls a fresh student: every rank runs the teacher
    on its own micro-batches, and the step's loss, its CE and KD parts are gathered like the plain
    loss. Two ranks must write one process's final.apr, losses and kd_loss."""
    distill = ["--teacher", str(one_process[0] / "final.apr"), "--distill-weight", "0.7", "--steps", "3"]
    one = pretrain(1, tmp_path / "one", "--data", data, *distill, "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    dp = pretrain(2, tmp_path / "dp", "--data", data, *distill)
    assert dp.returncode == 0, dp.stderr
    assert_same_run(tmp_path / "one", tmp_path / "dp")
    kd = [m["kd_loss"] for m in metrics(tmp_path / "dp") if "kd_loss" in m]
    assert len(kd) == 3 and min(kd) > 0, kd
    reports = [json.loads(run.stdout.strip().splitlines()[-1]) for run in (one, dp)]
    assert reports[0]["distill"] == reports[1]["distill"]


def test_bad_input_is_exit_2_from_every_rank_with_the_line_once(tmp_path):
    out = pretrain(2, tmp_path / "bad", "--data", tmp_path / "missing.bin", "--steps", "1")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("minitrain: error:")]
    assert len(lines) == 1 and "missing.bin" in lines[0], out.stderr
    assert not (tmp_path / "bad").exists()


def rank_pid(out, rank):
    """The pid of the minitrain process of `rank` in the job writing to `out`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} writing {out}")


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_stops_the_job_non_zero_within_the_timeout(fault, data, tmp_path):
    """Rank 1 is SIGKILLed (the launcher sees it die) or SIGSTOPped (nobody hears from it again:
    the others must give up after --dist-timeout) while the job trains."""
    import signal
    import time

    out = tmp_path / "job"
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "minitrain", *COMMON, "--out", str(out),
                            "--data", str(data), "--steps", "100000", "--dist-timeout", "3"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ((out / "metrics.jsonl").exists() and '"step"' in (out / "metrics.jsonl").read_text()):
            assert job.poll() is None, job.communicate()
            time.sleep(0.2)
        pid = rank_pid(out, 1)
        os_kill = __import__("os").kill
        os_kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = job.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, err
    assert elapsed < 30, elapsed
    if fault == "hung":
        assert "waited 3 s for" in err and "died or hung" in err and "Traceback" not in err, err


# --- NCCL (--device cuda), through its CPU stand-in ------------------------------------------------
STANDIN = Path(__file__).with_name("nccl_standin.py")


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_nccl_group_moves_the_bytes_the_mpi_group_moves(ranks):
    run = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(STANDIN), "same-bits"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("NCCLGroup == MPIGroup") == ranks


def test_a_silent_rank_makes_the_nccl_group_abort_nccl_and_give_up():
    run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(STANDIN), "hang"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "rank 0: RankLost after 1." in run.stdout and "aborted=True" in run.stdout, run.stdout


def test_recomputed_layers_over_ranks_give_the_bits_of_one_process(data, tmp_path, one_process):
    """--recompute layer under mpiexec (2 ranks x grad-accum 2): one process's run without it."""
    dp = pretrain(2, tmp_path / "dp", "--data", data, *ZERO_RUN, "--grad-accum", "2", "--recompute", "layer")
    assert dp.returncode == 0, dp.stderr
    assert_same_run(one_process[0], tmp_path / "dp")


def test_dpo_over_ranks_gives_the_bits_of_one_process(tmp_path, one_process):
    """Preference pairs on one_process's final.apr (the policy and its reference), ZeRO-1 on two
    ranks: each rank computes a share of the reference's log-probabilities and receives the others';
    the steps' losses, rewards and final.apr are one process's bits."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_dpo import write_pairs

    pairs = write_pairs(tmp_path / "pairs", 20, seed=4, seq_len=32, vocab=8192)
    dpo = ["--init", str(one_process[0] / "final.apr"), "--objective", "dpo", "--beta", "0.2", "--steps", "3"]
    one = pretrain(1, tmp_path / "one", "--data", pairs, *dpo, "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    dp = pretrain(2, tmp_path / "dp", "--data", pairs, *dpo, "--zero", "1")
    assert dp.returncode == 0, dp.stderr
    assert_same_run(tmp_path / "one", tmp_path / "dp")
    assert (tmp_path / "one" / "reference" / "train.npy").read_bytes() == \
        (tmp_path / "dp" / "reference" / "train.npy").read_bytes()
    assert [m["reward_accuracy"] for m in metrics(tmp_path / "dp") if m["type"] == "step"]

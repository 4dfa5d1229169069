"""The preflight (minitrain/memory.py): the activations it counts are the bytes the graph keeps,
the step's arrays peak where it says, the peak RSS of a real run is within 20% of its estimate,
and a run that cannot fit in memory or on disk is refused before anything is written."""

import json
import subprocess
import sys
import tracemalloc
from dataclasses import replace

import numpy
import pytest

from minitrain import backend, memory
from minitrain.autograd import Tensor
from minitrain.config import PRESETS
from minitrain.dist import Single
from minitrain.errors import InputError
from minitrain.model import Model
from minitrain.options import TrainConfig
from minitrain.setup_run import build, configure


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.bin"
    numpy.random.default_rng(0).integers(0, 8192, 40 * 129).astype("<u4").tofile(path)
    return path


def graph_bytes(loss, exclude):
    """Bytes of every distinct array the graph under `loss` keeps (the tensors its functions hold
    as inputs and what they saved; views counted once, by their base), but those in `exclude`."""
    seen, total, stack, done = set(), 0, [loss], set()
    while stack:
        t = stack.pop()
        if id(t) in done:
            continue
        done.add(id(t))
        for a in (t.data, *(t.ctx.saved or () if t.ctx else ())):
            while isinstance(a, numpy.ndarray) and isinstance(a.base, numpy.ndarray):
                a = a.base
            if isinstance(a, numpy.ndarray) and id(a) not in seen | exclude:
                seen.add(id(a))
                total += a.nbytes
        stack += [i for i in (t.ctx.inputs or () if t.ctx else ()) if isinstance(i, Tensor)]
    return total


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-llama", "tiny-qwen3", "tiny-llama3"])  # one kv head (its transposes are views) and more
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("B, T", [(2, 8), (3, 5), (1, 1)])
@pytest.mark.parametrize("recompute", ["none", "attention", "mlp", "layer"])
def test_the_counted_activations_are_the_graphs_bytes(arch, dtype, B, T, recompute):
    backend.set_dtype(dtype)
    try:
        c = replace(PRESETS[arch], num_hidden_layers=2)
        model = Model.from_scratch(c)
        model.recompute = recompute
        ids = numpy.random.default_rng(0).integers(0, c.vocab_size, (B, T))
        loss = model.loss(ids, ids)
        itemsize = loss.data.itemsize
        kept = graph_bytes(loss, {id(p.data) for p in model.parameters()})
        # the graph also holds the lm_head's dW (the fused loss's) and the loss itself
        assert kept == (memory.activation_bytes(c, B, T, itemsize, recompute=recompute)
                        + c.vocab_size * c.hidden_size * itemsize + itemsize)
    finally:
        backend.set_dtype("fp32")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", ["none", "attention", "mlp", "layer"])
def test_lora_activations_are_an_upper_bound(dropout, recompute):
    """With LoRA nothing before the first adapters needs a gradient: the first norm keeps no x̂ and
    1/rms, the embedding no ids, and under dropout q, k and v of the first layer no mask (their
    input needs no gradient). The count is as if it did: exactly those above the graph (only the
    ids where the first attention block is recomputed: it keeps none of the rest)."""
    from minitrain.lora import Adapters, LoRASpec

    c = replace(PRESETS["tiny-llama"], num_hidden_layers=2)
    model = Model.from_scratch(c)
    model.recompute = recompute
    for p in model.parameters():
        p.requires_grad = False
    spec = LoRASpec(4, 8.0, dropout)
    adapters = Adapters.fresh(spec, c, 0)
    adapters.attach(model)
    adapters.reseed(0, 0)
    B, T = 2, 8
    ids = numpy.random.default_rng(0).integers(0, c.vocab_size, (B, T))
    loss = model.loss(ids, ids)
    kept = graph_bytes(loss, {id(p.data) for p in model.parameters() + adapters.parameters()}) - 4
    counted = memory.activation_bytes(c, B, T, 4, spec, recompute)
    H = c.hidden_size
    first_block = 0 if recompute in ("attention", "layer") else (H + 1) * 4 + (3 * H * 4 if dropout else 0)
    assert counted - kept == B * T * (memory.ID_BYTES + first_block)


def run_options(tokens, out, **changes):
    return {"data": str(tokens), "out": str(out), "arch": "tiny-llama", "seq_len": 128, "batch_size": 4, "steps": 2,
            "val_windows": 0, "eval_every": 0, "warmup_steps": 1, "lr": 1e-4, **changes}


@pytest.mark.parametrize("changes", [{}, {"grad_accum": 2, "batch_size": 2}, {"arch": "tiny-qwen2", "optimizer": "sgd"}])
def test_a_steps_arrays_peak_where_the_estimate_says(tokens, tmp_path, changes):
    """NumPy reports its arrays to tracemalloc: the largest a step holds at once, beyond what is
    resident, is the largest of the estimate's three moments. Small arrays the estimate leaves
    out (norm blocks, per-row statistics) stay within 2%."""
    run = build(*configure(run_options(tokens, tmp_path / "out", **changes)))
    est = memory.Estimate(**{k: v for k, v in json.loads((tmp_path / "out" / "run.json").read_text())
                             ["memory_estimate"].items() if k != "peak"})  # what the run estimated
    tracemalloc.start()
    try:
        for step in range(2):  # the second with the first one's gradients and the optimizer's moments
            tracemalloc.reset_peak()
            resident = tracemalloc.get_traced_memory()[0]
            run.train_step(step)
            step_peak = tracemalloc.get_traced_memory()[1] - resident + (est.gradients if step else 0)
            assert abs(step_peak / max(est.forward_end, est.backward_start, est.update) - 1) < 0.02, step
    finally:
        tracemalloc.stop()


# A process's peak RSS counts, from its exec on, the RSS of the process it was forked from (the
# kernel folds the forked copy's high-water mark in at exec): forked from this test process (GBs
# after a long suite) the run would report that. A small launcher forks it instead and reports its
# peak (wait4's ru_maxrss, bytes).
LAUNCHER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
            "_, status, usage = os.wait4(pid, 0)\nprint(status, usage.ru_maxrss * 1024)")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_the_peak_rss_of_a_run_is_within_20_percent_of_its_estimate(tokens, tmp_path, arch):
    cmd = [sys.executable, "-c", LAUNCHER, "-m", "minitrain", "pretrain", "--json"]
    for key, value in run_options(tokens, tmp_path / "out", arch=arch, batch_size=8).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    status, peak = map(int, run.stdout.strip().splitlines()[-1].split())
    assert status == 0, run.stderr
    estimated = json.loads((tmp_path / "out" / "run.json").read_text())["memory_estimate"]["peak"]
    assert abs(estimated / peak - 1) < 0.20


def test_a_run_that_cannot_fit_is_refused_with_what_would(monkeypatch):
    c, rss = PRESETS["tiny-llama"], 10**8
    cfg = TrainConfig(data="d", out="o", arch="tiny-llama", seq_len=128, batch_size=8).resolved()
    monkeypatch.setattr(memory, "current_rss", lambda: rss)  # held 0: all of it is the runtime
    two, four = (memory.estimate(c, replace(cfg, batch_size=b, grad_accum=8 // b), runtime=rss) for b in (2, 4))
    assert two.peak < four.peak
    monkeypatch.setattr(memory, "available_memory", lambda: two.peak - rss)  # room for 2 windows at a time, not 4
    with pytest.raises(InputError) as e:
        memory.preflight(c, cfg, Single(), 0, lambda line: None)
    message = str(e.value)
    assert message.startswith("this run would need ") and "activations 0.10 GB at 8 x 128 tokens" in message, message
    assert message.endswith("it would fit with --recompute layer (the same bits), or --batch-size 2 --grad-accum 4 "
                            "(the same windows per step)"), message
    monkeypatch.setattr(memory, "available_memory", lambda: 0)
    with pytest.raises(InputError, match="neither recomputation, a smaller batch, LoRA nor ZeRO-1 brings it within"):
        memory.preflight(c, cfg, Single(), 0, lambda line: None)


def test_a_refused_run_writes_nothing(tokens, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 0)
    monkeypatch.setattr(sys, "argv", ["minitrain", "pretrain", "--data", str(tokens), "--arch", "tiny-llama",
                                      "--out", str(tmp_path / "refused")])
    from minitrain.cli import main

    with pytest.raises(SystemExit) as exit:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].startswith("minitrain: error: this run would need "), err
    assert "Traceback" not in "".join(err) and not (tmp_path / "refused").exists()


def test_memory_of_every_rank_on_a_machine_counts(monkeypatch):
    """Ranks on one machine share its memory: each needs 3 GB more, 5 GB is there for two."""

    class TwoRanks(Single):
        size = 2

        def gather(self, rows, per_rank, width):
            return list(rows) * 2

    c = PRESETS["tiny-llama"]
    cfg = TrainConfig(data="d", out="o", arch="tiny-llama").resolved()
    peak = memory.estimate(c, cfg, 2).peak
    monkeypatch.setattr(memory, "current_rss", lambda: peak - 3 * 10**9)
    monkeypatch.setattr(memory, "available_memory", lambda: 5 * 10**9)
    with pytest.raises(InputError, match="2 ranks on this machine would need 6.00 GB more memory"):
        memory.preflight(c, cfg, TwoRanks(), 0, lambda line: None)
    memory.preflight(c, cfg, Single(), 0, lambda line: None)  # one rank fits


def test_sizes_are_shown_in_the_unit_that_shows_them():
    assert [memory.size(n) for n in (512, 1_700, 1_734_210, 5.93e9)] == ["512 bytes", "1.7 kB", "1.7 MB", "5.93 GB"]


def test_a_disk_that_cannot_take_the_first_save_is_refused(tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_disk", lambda path: 10**6)
    with pytest.raises(InputError, match=r"--out .*refused: the run's first save needs \d+\.\d MB \(a checkpoint\) "
                                         r"and 1\.0 MB is free there"):
        build(*configure(run_options(tokens, tmp_path / "refused", save_every=1)))
    with pytest.raises(InputError, match=r"first save needs \d+\.\d MB \(final.apr\)"):
        build(*configure(run_options(tokens, tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()

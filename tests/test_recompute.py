"""--recompute (ops/recompute.py): a run that recomputes its blocks' activations in the backward
writes the same final.apr bytes and metrics as one that keeps them: in fp32 and fp64, with LoRA
under dropout, with a teacher, with grad-accum (mpiexec: tests/test_dist.py), and through the
kernels' CPU emulation. The graph it keeps is measured in tests/test_memory.py."""

import json

import numpy
import pytest
from kernel_emu import launcher

from minitrain import backend
from minitrain.config import ModelConfig
from minitrain.model import Model
from minitrain.optim import SGD
from minitrain.setup_run import build, configure

MODES = ["attention", "mlp", "layer"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("recompute") / "tokens.bin"
    numpy.random.default_rng(0).integers(0, 8192, 40 * 17).astype("<u4").tofile(path)
    return path


def train(tokens, out, **changes):
    options = {"data": str(tokens), "out": str(out), "arch": "tiny-qwen2", "seq_len": 16, "batch_size": 2, "steps": 3,
               "val_windows": 4, "eval_every": 2, "warmup_steps": 1, "lr": 1e-3, "seed": 3, "data_order": "shuffle",
               **changes}
    build(*configure(options)).run()
    return out


def same_run(a, b):
    """final.apr's bytes and every metric but the timings."""
    def records(out):
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "tokens_per_sec")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    return (a / "final.apr").read_bytes() == (b / "final.apr").read_bytes() and records(a) == records(b)


@pytest.fixture(scope="module")
def base(tokens, tmp_path_factory):
    """A trained tiny-qwen2, to fine-tune with LoRA and to teach."""
    return train(tokens, tmp_path_factory.mktemp("base") / "run") / "final.apr"


@pytest.mark.parametrize("dtype, arch", [("fp32", "tiny-qwen2"), ("fp64", "tiny-qwen2"), ("fp32", "tiny-qwen3"),
                                         ("fp32", "tiny-llama3")])
def test_every_mode_writes_the_bits_of_keeping_everything(tokens, tmp_path, dtype, arch):
    kept = train(tokens, tmp_path / "none", dtype=dtype, arch=arch)
    for mode in MODES:
        assert same_run(kept, train(tokens, tmp_path / mode, dtype=dtype, arch=arch, recompute=mode)), mode


@pytest.mark.parametrize("mode", ["attention", "layer"])
def test_lora_under_dropout_draws_the_same_masks_again(tokens, tmp_path, base, mode):
    """The recomputed forward redraws the adapters' dropout masks from the generator's state as it
    was, and leaves the generator where the forward left it."""
    lora = dict(init=str(base), lora_rank=4, lora_dropout=0.2)
    assert same_run(train(tokens, tmp_path / "none", **lora), train(tokens, tmp_path / mode, recompute=mode, **lora))


def test_with_a_teacher_and_grad_accum(tokens, tmp_path, base):
    distill = dict(teacher=str(base), grad_accum=2, batch_size=1)
    assert same_run(train(tokens, tmp_path / "none", **distill),
                    train(tokens, tmp_path / "layer", recompute="layer", **distill))


def test_the_kernel_path_recomputes_with_the_same_bits(monkeypatch):
    """Through the kernels' CPU emulation (packed projections, fused SwiGLU, the attention kernel):
    two SGD steps' losses, gradients and weights are those of the run that keeps everything."""
    monkeypatch.setattr(backend, "launch", launcher())
    monkeypatch.setattr(backend, "matmul_backward", "kernels")
    cfg = ModelConfig(family="qwen2", hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, intermediate_size=96, vocab_size=257,
                      max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    ids = numpy.random.default_rng(2).integers(0, 257, (2, 8))

    def two_steps(recompute):
        model = Model.from_scratch(cfg, seed=3)
        model.recompute = recompute
        assert model.packed  # the kernel path's fused projections
        opt, seen = SGD(model.parameters(), lr=0.5), []
        for _ in range(2):
            for p in model.parameters():
                p.zero_grad()
            loss = model.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            seen += [loss.data.copy()] + [t.grad.copy() for t in model.params.values()]
            opt.step()
        return seen + [t.data for t in model.params.values()]

    kept = two_steps("none")
    for mode in MODES:
        assert all(a.tobytes() == b.tobytes() for a, b in zip(kept, two_steps(mode))), mode

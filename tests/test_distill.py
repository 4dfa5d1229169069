"""Distillation's fused head + loss (ops/distill.py): against torch's unfused composition, its
exact cases, and its memory. The gradient check itself is in `minitrain gradcheck`."""

import tracemalloc

import numpy as np
import pytest

from minitrain import ops
from minitrain.autograd import Tensor


def _inputs(rng, N=13, H=16, Ht=24, V=301, dtype=np.float64):
    x, W = rng.standard_normal((1, N, H)), rng.standard_normal((V, H)) * 0.5
    xt, Wt = rng.standard_normal((1, N, Ht)), rng.standard_normal((V, Ht)) * 0.5
    return [a.astype(dtype) for a in (x, W, xt, Wt)] + [rng.integers(0, V, (1, N))]


def _ours(x, W, xt, Wt, t, weight, T, chunk_rows=None, g=1.0):
    xs, Ws = Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)
    parts = {}
    loss = ops.linear_distillation(xs, Ws, xt, Wt, t, weight, T, chunk_rows=chunk_rows, parts=parts)
    loss.backward(np.asarray(g, dtype=x.dtype))
    return loss.data, parts, xs.grad, Ws.grad


@pytest.mark.numerics
@pytest.mark.parametrize("weight, T, chunk_rows", [(0.5, 2.0, None), (0.9, 1.0, 4), (1.0, 4.0, 1), (0.3, 0.7, 13)])
def test_equals_torchs_unfused_composition_in_float64(weight, T, chunk_rows):
    """(1 - w) F.cross_entropy + w T^2 F.kl_div(log q, log p, batchmean) on the whole logits."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, W, xt, Wt, t = _inputs(np.random.default_rng(1))
    loss, parts, dx, dW = _ours(x, W, xt, Wt, t, weight, T, chunk_rows, g=0.25)  # g != 1, as with --grad-accum 4

    xs, Ws = torch.tensor(x[0], requires_grad=True), torch.tensor(W, requires_grad=True)
    z, zt = xs @ Ws.T, torch.tensor(xt[0] @ Wt.T)
    ce = F.cross_entropy(z, torch.tensor(t[0]))
    kd = T * T * F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(zt / T, -1), reduction="batchmean", log_target=True)
    ref = (1 - weight) * ce + weight * kd
    (0.25 * ref).backward()
    # float64 both sides, a few hundred operations per value: rounding alone is ~1e-14 relative.
    # The oracle itself is not reproducible that far: torch's float64 KL on these inputs took two
    # values 4e-11 apart (relative) in 3 of 25 identical processes. 1e-9 relative leaves 25x that
    # jitter and is still 1e7 times finer than any wrong factor (a T^2 for T fails by 1 - 1/T).
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-9)
    assert parts["ce_loss"] == pytest.approx(float(ce.detach()), rel=1e-9)
    assert parts["kd_loss"] == pytest.approx(float(kd.detach()), rel=1e-9, abs=1e-15)
    np.testing.assert_allclose(dx[0], xs.grad.numpy(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(dW, Ws.grad.numpy(), rtol=1e-9, atol=1e-15)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_student_as_its_own_teacher_has_zero_kl_and_zero_gradient(dtype):
    x, W, _, _, t = _inputs(np.random.default_rng(2), dtype=dtype)
    loss, parts, dx, dW = _ours(x, W, x, W, t, 1.0, 2.0, chunk_rows=5)
    assert float(loss) == 0.0 and parts["kd_loss"] == 0.0
    assert not dx.any() and not dW.any()
    assert parts["ce_loss"] > 1.0  # the CE term was formed, and weighted out


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_weight_zero_is_the_plain_loss_bit_for_bit(chunk_rows):
    x, W, xt, Wt, t = _inputs(np.random.default_rng(3), dtype=np.float32)
    loss, parts, dx, dW = _ours(x, W, xt, Wt, t, 0.0, 2.0, chunk_rows)
    xs, Ws = Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)
    plain = ops.linear_cross_entropy(xs, Ws, t, chunk_rows=chunk_rows)
    plain.backward()
    assert loss.tobytes() == plain.data.tobytes()
    assert dx.tobytes() == xs.grad.tobytes() and dW.tobytes() == Ws.grad.tobytes()
    assert parts["kd_loss"] > 0.0  # the teacher differs: the KL term was formed, and weighted out


def test_never_holds_either_models_whole_logits_at_qwens_vocabulary():
    """V = 151 936 (Qwen2.5's vocabulary), N = 256 rows in chunks of 8: the two models' logits
    would be 2 x 156 MB whole; a chunk holds six (8, V) fp32 arrays (29 MB) and dW's two (V, 16)."""
    rng = np.random.default_rng(4)
    N, V, H = 256, 151_936, 16
    x = Tensor(rng.standard_normal((N, H), dtype=np.float32), requires_grad=True)
    W = Tensor(rng.standard_normal((V, H), dtype=np.float32), requires_grad=True)
    xt, Wt = rng.standard_normal((N, H), dtype=np.float32), rng.standard_normal((V, H), dtype=np.float32)
    t = rng.integers(0, V, N)
    tracemalloc.start()
    ops.linear_distillation(x, W, xt, Wt, t, 0.5, 2.0, chunk_rows=8).backward()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * N * V * 4, f"peak {peak / 1e6:.1f} MB vs {N * V * 4 / 1e6:.1f} MB of one model's logits"
    assert np.isfinite(x.grad).all() and np.isfinite(W.grad).all()


def test_a_teacher_of_another_vocabulary_is_refused_with_both_sizes():
    x, W, xt, Wt, t = _inputs(np.random.default_rng(5))
    with pytest.raises(ValueError, match="301"):
        ops.linear_distillation(Tensor(x), Tensor(W), xt, Wt[:300], t, 0.5, 2.0)


# --- pretrain --teacher ------------------------------------------------------------------------
# The newer families: a Qwen3 student (q/k norms) and a wider, untied Llama teacher with Llama 3's
# RoPE scaling
STUDENT = dict(family="qwen3", hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
               vocab_size=50, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
TEACHER = dict(family="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
               vocab_size=50, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=1024,
               rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=4.0, low_freq_factor=1.0,
                                    high_freq_factor=8.0, original_max_position_embeddings=256))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """HF directories: the student, a teacher of its vocabulary, one of another vocabulary; the data."""
    hf_oracle = pytest.importorskip("hf_oracle")
    root = tmp_path_factory.mktemp("distill")
    for name, spec, seed in (("student", STUDENT, 1), ("teacher", TEACHER, 2),
                             ("other", {**TEACHER, "vocab_size": 43}, 3)):
        hf_oracle.build_hf(spec, seed).save_pretrained(root / name)
    np.random.default_rng(1).integers(0, 43, 24 * 13).astype("<u4").tofile(root / "tokens.bin")
    return root


def pretrain(models, out, *extra, init="student"):
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--init", str(models / init),
                           "--data", str(models / "tokens.bin"), "--seq-len", "12", "--batch-size", "2",
                           "--steps", "3", "--val-windows", "4", "--lr", "1e-2", "--warmup-steps", "0",
                           "--out", str(out), "--json", *map(str, extra)], capture_output=True, text=True)
    if done.returncode:
        return done
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads(done.stdout.strip().splitlines()[-1]), [r for r in steps if r["type"] == "step"], done.stderr


def test_pretrain_with_a_teacher_logs_both_terms_and_reports_them(models, tmp_path):
    report, steps, err = pretrain(models, tmp_path / "kd", "--teacher", models / "teacher",
                                  "--distill-weight", 0.7, "--distill-temperature", 1.5)
    for r in steps:  # the logged loss is the mix of the two logged terms
        assert r["loss"] == pytest.approx(0.3 * r["ce_loss"] + 0.7 * r["kd_loss"], rel=1e-6)
        assert r["kd_loss"] > 0
    assert report["distill"] == {"teacher": str(models / "teacher"), "weight": 0.7, "temperature": 1.5,
                                 "final_ce_loss": steps[-1]["ce_loss"], "final_kd_loss": steps[-1]["kd_loss"]}
    assert "(ce " in err and ", kd " in err and "teacher " in err

    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from minitrain.plot import plot

    figures = []
    real_close = plt.close
    plt.close = lambda fig: (figures.append(fig), real_close(fig))
    try:
        assert plot(tmp_path / "kd").stat().st_size > 0
    finally:
        plt.close = real_close
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert "train CE (distillation)" in labels and "train T^2 KL to the teacher" in labels


@pytest.mark.numerics
def test_weight_zero_trains_bit_for_bit_as_without_a_teacher(models, tmp_path):
    plain = pretrain(models, tmp_path / "plain")
    taught = pretrain(models, tmp_path / "w0", "--teacher", models / "teacher", "--distill-weight", 0)
    assert [r["loss"] for r in taught[1]] == [r["loss"] for r in plain[1]]
    assert [r["loss"] for r in taught[1]] == [float(np.float32(r["ce_loss"])) for r in taught[1]]  # CE's float64 mean
    assert (tmp_path / "w0" / "final.apr").read_bytes() == (tmp_path / "plain" / "final.apr").read_bytes()


@pytest.mark.numerics
def test_the_teacher_as_its_own_student_at_weight_one_has_nothing_to_learn(models, tmp_path):
    report, steps, _ = pretrain(models, tmp_path / "self", "--teacher", models / "teacher", "--distill-weight", 1,
                                init="teacher")
    assert steps[0]["kd_loss"] == 0.0 and steps[0]["grad_norm"] == 0.0 and steps[0]["loss"] == 0.0


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "{other}"], "vocabulary has 43 tokens, the student's 50"),
    (["--distill-weight", "0.5"], "need --teacher"),
    (["--teacher", "{teacher}", "--distill-weight", "1.5"], "--distill-weight"),
    (["--teacher", "{teacher}", "--distill-temperature", "0"], "--distill-temperature"),
    (["--teacher", "{missing}"], "missing"),
])
def test_bad_distillation_inputs_are_one_line_exit_2(models, tmp_path, extra, message):
    paths = {"other": models / "other", "teacher": models / "teacher", "missing": models / "missing"}
    done = pretrain(models, tmp_path / "bad", *(a.format(**paths) for a in extra))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _word_tokenizer(path, words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(str(path))
    return path


def test_the_tokenizers_are_compared_when_both_are_given(models, tmp_path):
    import shutil

    words = [f"w{i}" for i in range(50)]
    teacher = tmp_path / "teacher"
    shutil.copytree(models / "teacher", teacher)
    _word_tokenizer(teacher / "tokenizer.json", words)
    same = _word_tokenizer(tmp_path / "same.json", words)
    other = _word_tokenizer(tmp_path / "other.json", words[:7] + ["x7"] + words[8:])
    assert isinstance(pretrain(models, tmp_path / "same", "--teacher", teacher, "--tokenizer", same), tuple)
    done = pretrain(models, tmp_path / "other", "--teacher", teacher, "--tokenizer", other)
    assert done.returncode == 2 and "tokenizer differs" in done.stderr and "id 7" in done.stderr, done.stderr


@pytest.mark.numerics
def test_resume_with_a_teacher_continues_exactly(models, tmp_path):
    teacher = ("--teacher", models / "teacher", "--distill-weight", 0.6)
    straight = pretrain(models, tmp_path / "straight", *teacher, "--steps", 4)
    pretrain(models, tmp_path / "split", *teacher, "--steps", 4, "--save-every", 2)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--resume", str(tmp_path / "split" / "step-2"),
                           "--out", str(tmp_path / "resumed")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "resumed" / "final.apr").read_bytes() == (tmp_path / "straight" / "final.apr").read_bytes()
    resumed = [line for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in line]
    assert straight[1][-1]["kd_loss"] == __import__("json").loads(resumed[-1])["kd_loss"]

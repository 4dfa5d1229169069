"""`minitrain plot RUN_DIR`: training and validation loss, and the learning rate, from
RUN_DIR/metrics.jsonl, as one PNG (matplotlib, the optional `plot` extra); for a DPO run also
the reward margin and the validation reward accuracy."""

import json
import math
from pathlib import Path

from minitrain.errors import InputError


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise InputError(f"{path}: no such file (is {run_dir} a pretrain --out directory?)")
    steps, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        (steps if record.get("type") == "step" else evals).append(record)
    if not steps:
        raise InputError(f"{path}: no training steps recorded")
    return steps, evals


def plot(run_dir, out=None):
    steps, evals = read_metrics(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("minitrain plot needs matplotlib: pip install 'minitrain[plot]'") from None
    out = Path(out) if out else Path(run_dir) / "loss.png"
    run = json.loads((Path(run_dir) / "run.json").read_text()) if (Path(run_dir) / "run.json").exists() else {}
    pairs = run.get("config", {}).get("objective") == "dpo"
    fig, axes = plt.subplots(3 if pairs else 2, 1, figsize=(8, 8 if pairs else 6), sharex=True,
                             height_ratios=(3, 2, 1) if pairs else (3, 1))
    ax_loss, ax_lr = axes[0], axes[-1]
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    for key, label in (("ce_loss", "train CE (distillation)"), ("kd_loss", "train T^2 KL to the teacher")):
        if steps and key in steps[0]:
            ax_loss.plot([r["step"] for r in steps], [r[key] for r in steps], lw=0.8, ls="--", label=label)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    vocab = run.get("model_config", {}).get("vocab_size")
    if pairs:
        ax_loss.axhline(math.log(2), color="gray", ls=":", label="ln 2 (the policy is the reference)")
        _rewards(axes[1], steps, evals)
    elif vocab:
        ax_loss.axhline(math.log(vocab), color="gray", ls=":", label=f"ln V = {math.log(vocab):.2f} (uniform guess)")
    ax_loss.set_ylabel("DPO loss (-log sigmoid, per pair)" if pairs else "cross-entropy (nats/token)")
    ax_loss.set_title(f"{run.get('arch', Path(run_dir).name)}: {Path(run_dir).name}")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rewards(ax, steps, evals):
    """A DPO run's reward margin (training and validation) and, on the right, the validation
    reward accuracy."""
    ax.plot([r["step"] for r in steps], [r["reward_margin"] for r in steps], lw=0.8, label="train reward margin")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_reward_margin"] for r in evals], "o-", label="validation margin")
        right = ax.twinx()
        right.plot([r["step"] for r in evals], [r["val_reward_accuracy"] for r in evals], "s--", color="tab:red",
                   label="validation reward accuracy")
        right.set_ylim(0, 1)
        right.set_ylabel("accuracy")
        right.legend(loc="lower right")
    ax.set_ylabel("beta (log-ratio c - r)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

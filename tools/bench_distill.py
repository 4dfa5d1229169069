"""The cost of a teacher: one training step of a layer-truncated student with and without
distillation from the full model, side by side in one process.

    python tools/bench_distill.py --preset smollm2-135m --student-layers 6 --seq-len 128 --batch-size 4

The student is the preset with its first --student-layers layers (docs/fine-tuning.md's demonstration
truncates the real SmolLM2-135M so), the teacher the whole preset; both are random-initialized
(speed does not depend on the weights). A plain step is forward + backward + AdamW of the student
with the fused CE head; a distillation step adds the teacher's forward (no graph) and the fused
CE + KL head (ops/distill.py). The two alternate for --rounds rounds of --steps steps after a
warm-up of each; the best step of each is reported, and their ratio.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cpu import config_of  # noqa: E402
from workload import ADAMW  # noqa: E402

from minitrain import ops  # noqa: E402
from minitrain.autograd import no_grad  # noqa: E402
from minitrain.model import Model  # noqa: E402
from minitrain.optim import AdamW  # noqa: E402


def steps(cfg, layers, batch, seq_len, weight=0.5, temperature=2.0):
    """{"plain": step(), "distill": step()} over one student and its teacher."""
    import numpy

    teacher = Model.from_scratch(cfg, seed=1)
    student = Model.from_scratch(dataclasses.replace(cfg, num_hidden_layers=layers), seed=0)
    params = student.parameters()
    opt = AdamW(params, **ADAMW)
    ids = numpy.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def distilled():
        with no_grad():
            hidden = teacher.hidden(inputs).data
        return ops.linear_distillation(student.hidden(inputs), student.head, hidden, teacher.head.data, targets,
                                       weight, temperature)

    def step(loss):
        def run():
            for p in params:
                p.zero_grad()
            loss().backward()
            opt.step()
        return run

    return {"plain": step(lambda: student.loss(inputs, targets)), "distill": step(distilled)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = config_of(args.preset)
    runs = steps(cfg, args.student_layers, args.batch_size, args.seq_len)
    best = {name: float("inf") for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
    tokens = args.seq_len * args.batch_size
    print(f"{args.preset}: student {args.student_layers} of {cfg.num_hidden_layers} layers, teacher all of them; "
          f"seq {args.seq_len}, batch {args.batch_size}; best of {args.rounds} alternating rounds of {args.steps} steps")
    print(f"{'run':<26}{'step s':>8}{'tokens/s':>10}")
    for name, label in (("plain", "student alone (CE)"), ("distill", "student + teacher (KD)")):
        print(f"{label:<26}{best[name]:>8.3f}{tokens / best[name]:>10.1f}")
    print(f"a teacher costs {best['distill'] / best['plain']:.2f}x the step time")


if __name__ == "__main__":
    main()

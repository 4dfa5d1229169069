"""The docs are honest.

- The Python examples in docs/ run and their hand-computed numbers hold.
- Every `minitrain` command shown in README.md and docs/*.md (in a code block, or in inline code)
  names a real subcommand and only options that subcommand has, checked against the click
  objects themselves; no command is run.
- Every relative link in those pages reaches a file, and one with an #anchor a heading of it.
- The shown outputs that are deterministic and cheap to make are the real ones:
  `minitrain shapes` (made in-process), and the rows of a shown `minitrain gradcheck` table
  (each one of the checks `minitrain/gradcheck.py` runs, in their order).

Each checker is also run on a planted fault below, so that each can be seen to fail.
"""

import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))


# ---------------------------------------------------------------- markdown: fenced blocks, prose

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})([^`]*)$")


def fenced_blocks(text):
    """(info string, line number of the first body line, body lines) of every top-level fenced
    block; a fence inside a longer one (```` around ```) is body, as Markdown reads it."""
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        j, body = i + 1, []
        while j < len(lines):
            close = re.match(r"^\s*(`{3,}|~{3,})\s*$", lines[j])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            body.append(lines[j].removeprefix(indent))
            j += 1
        blocks.append((info.strip(), i + 2, body))
        i = j + 1
    return blocks


def prose(text):
    """The text with every fenced block's lines blanked (line numbers kept)."""
    lines = text.split("\n")
    for _, first, body in fenced_blocks(text):
        for k in range(first - 2, min(first + len(body), len(lines))):
            lines[k] = ""
    return "\n".join(lines)


def inline_code(text):
    """(line number, content) of each inline code span in the prose, a span's line breaks as spaces."""
    spans, lines = [], prose(text).split("\n")
    start = 0
    for k in range(len(lines) + 1):
        if k < len(lines) and lines[k].strip():
            continue
        paragraph = " ".join(lines[start:k])
        for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", paragraph):
            spans.append((start + 1, m.group(2).strip()))
        start = k + 1
    return spans


# ---------------------------------------------------------------- the Python examples

BLOCKS = [(path.name, i, "\n".join(body) + "\n") for path in sorted(DOCS.glob("*.md"))
          for i, body in enumerate(body for info, _, body in fenced_blocks(path.read_text()) if info == "python")]


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_doc_example_runs(name, index, code):
    exec(compile(code, f"{name} block {index}", "exec"), {})


def test_there_are_examples():
    assert any(name == "autograd.md" for name, _, _ in BLOCKS)


# ---------------------------------------------------------------- shell words

OPERATORS = ("&&", "||", ">>", "|", ";", "&", ">", "<")


def shell_words(s):
    """The words of the shell command line at the start of s, quotes removed, operators as words
    of their own; and where the line ends (an unquoted newline not escaped by a backslash).
    Each word is (text, quoted); an operator's `quoted` is None."""
    words, cur, quoted, quote, i = [], None, False, None, 0

    def flush():
        nonlocal cur, quoted
        if cur is not None:
            words.append(("".join(cur), quoted))
        cur, quoted = None, False

    while i < len(s):
        ch = s[i]
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                cur.append(ch)
        elif quote == '"':
            if ch == '"':
                quote = None
            elif ch == "\\" and i + 1 < len(s) and s[i + 1] in '"\\$`\n':
                cur.append(s[i + 1])
                i += 1
            else:
                cur.append(ch)
        elif ch == "\\" and i + 1 < len(s):
            if s[i + 1] != "\n":  # a backslash-newline continues the line
                cur = [] if cur is None else cur
                cur.append(s[i + 1])
            i += 1
        elif ch in "'\"":
            quote, quoted = ch, True
            cur = [] if cur is None else cur
        elif ch == "\n":
            flush()
            return words, i + 1
        elif ch in " \t":
            flush()
        elif ch == "#" and cur is None:
            end = s.find("\n", i)
            flush()
            return words, len(s) if end < 0 else end + 1
        elif ch in "|;&<>":
            flush()
            op = next(o for o in OPERATORS if s.startswith(o, i))
            words.append((op, None))
            i += len(op)
            continue
        else:
            cur = [] if cur is None else cur
            cur.append(ch)
        i += 1
    flush()
    return words, len(s)


def segments(words):
    """The simple commands of a command line: split at | ; & && ||, redirections dropped with their
    targets. Each is a list of (text, quoted)."""
    out, cur, skip = [], [], False
    for text, quoted in words:
        if skip:
            skip = False
        elif quoted is None and text in (">", ">>", "<"):
            skip = True
        elif quoted is None:
            out.append(cur)
            cur = []
        else:
            cur.append((text, quoted))
    out.append(cur)
    return [c for c in out if c]


ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.DOTALL)


def minitrain_args(segment, variables):
    """The arguments after `minitrain` when the simple command runs minitrain (as `minitrain`,
    `.venv/bin/minitrain`, `python -m minitrain` or under `mpiexec -n N`), else None. An unquoted
    `$NAME` that the same block assigned (NAME="...") stands for that value's words."""
    words = []
    for text, quoted in segment:
        m = re.fullmatch(r"\$\{?([A-Za-z_]\w*)\}?", text)
        if not quoted and m and m.group(1) in variables:
            words.extend(variables[m.group(1)])
        else:
            words.append(text)
    if words and words[0] == "mpiexec":
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[2:] if words[0] in ("-n", "-np") else words[1:]
    if len(words) >= 3 and re.fullmatch(r"(\S*/)?python3?", words[0]) and words[1:3] == ["-m", "minitrain"]:
        return words[3:]
    if words and re.fullmatch(r"(\S*/)?minitrain", words[0]) and words[0] != "minitrain/":
        return words[1:]
    return None


SHELL_BLOCKS = ("bash", "sh", "shell", "console")
COMMAND_START = re.compile(r"^(\.venv/bin/minitrain|minitrain|mpiexec -n? ?\S+ minitrain|python3? -m minitrain)( |$)")


def shown_commands(text):
    """Every minitrain command a page shows: (line number, the arguments after `minitrain`, the
    pipeline after it as a list of argument lists). In a block with `$ ` prompts, the prompted
    lines are the commands and the rest is output; in a bash block without prompts, every line;
    in any other block, the lines that start with minitrain. Inline code that starts with
    minitrain is a command too."""
    found = []
    for info, first, body in fenced_blocks(text):
        lang = info.split()[0] if info else ""
        if lang not in SHELL_BLOCKS + ("", "text"):
            continue
        prompted = any(line.lstrip().startswith("$ ") for line in body)
        whole = "\n".join(body)
        starts = [sum(len(line) + 1 for line in body[:k]) for k in range(len(body))]
        variables, free = {}, 0
        for k, line in enumerate(body):
            if starts[k] < free:
                continue  # inside the previous command (a continuation or a quoted newline)
            stripped = line.lstrip()
            if prompted:
                if not stripped.startswith("$ "):
                    continue
                at = starts[k] + len(line) - len(stripped) + 2
            elif lang in SHELL_BLOCKS or COMMAND_START.match(stripped):
                at = starts[k] + len(line) - len(stripped)
            else:
                continue
            words, end = shell_words(whole[at:])
            free = at + end
            pipeline = segments(words)
            for n, seg in enumerate(pipeline):
                if len(seg) == 1 and ASSIGNMENT.match(seg[0][0]):
                    name, value = ASSIGNMENT.match(seg[0][0]).groups()
                    variables[name] = [w for w, _ in shell_words(value.replace("\n", " "))[0]]
                    continue
                args = minitrain_args(seg, variables)
                if args is not None:
                    after = [[w for w, _ in s] for s in pipeline[n + 1:]]
                    found.append((first + k, args, after))
    for line, span in inline_code(text):
        if COMMAND_START.match(span) and " " in span:  # `minitrain` alone names the program
            words, _ = shell_words(span.replace("[", " ").replace("]", " "))
            for seg in segments(words):
                args = minitrain_args(seg, {})
                if args is not None:
                    found.append((line, args, []))
    return found


# ---------------------------------------------------------------- commands against the click objects

def command_problems(args):
    """What is wrong with `minitrain ARGS`: an unknown subcommand, or an option the subcommand
    does not have. Values (placeholders such as $M, ...) are not judged."""
    from minitrain.cli import cli

    helps = cli.context_settings.get("help_option_names", ["--help"])
    if not args:
        return ["no subcommand"]
    if args[0] in helps or args[0] == "--version":
        return []
    command = cli.commands.get(args[0])
    if command is None:
        return [f"no subcommand {args[0]!r} (there are: {', '.join(sorted(cli.commands))})"]
    options = {name: p for p in command.params if isinstance(p, click.Option)
               for name in p.opts + p.secondary_opts}
    problems, value_next = [], False
    for word in args[1:]:
        if value_next:
            value_next = False
            continue
        if not (re.match(r"--[A-Za-z0-9]", word) or re.fullmatch(r"-[A-Za-z]", word)):
            continue
        name = word.split("=", 1)[0]
        if name in helps:
            continue
        option = options.get(name)
        if option is None:
            problems.append(f"`minitrain {args[0]}` has no option {name}")
        elif not option.is_flag and not option.count and "=" not in word:
            value_next = True
    return problems


def page_command_problems(text, page="page"):
    return [f"{page}:{line}: {p}" for line, args, _ in shown_commands(text) for p in command_problems(args)]


def test_every_shown_command_is_real():
    problems = [p for path in PAGES for p in page_command_problems(path.read_text(), path.relative_to(ROOT))]
    assert not problems, "\n".join(problems)


def test_the_commands_are_found():
    """The collector sees the commands the pages do show (an empty collection would pass anything)."""
    readme = shown_commands((ROOT / "README.md").read_text())
    subcommands = {args[0] for _, args, _ in readme if args}
    assert {"pretrain", "tokenize", "eval", "generate", "humaneval", "inspect", "convert", "shapes",
            "gradcheck", "plot", "trace", "diff"} <= subcommands
    every = [c for path in PAGES for c in shown_commands(path.read_text())]
    assert len(every) > 60
    assert any(args[:2] == ["pretrain", "--init"] and "--teacher" in args for _, args, _ in every)


PLANTED = """Some prose with `minitrain eval --init M --data D --seq-len 8 [--batches N] [--json]`.

```text
$ minitrain pretrain --data d --out o \\
      --no-such-option 3
init_loss 9.0 (output, not a command: --not-an-option-either)
$ S="--init m --stale-in-a-variable"
$ minitrain pretrain $S --out o
$ minitrain generate --init m --prompt "a
--looks-like-an-option but is in the quoted prompt" --max-new-tokens 4 | tail -1
$ mpiexec -n 2 minitrain pretrain --zero 1 --gone
$ minitrain frobnicate --json
```

```bash
minitrain plot runs/demo -o x.png --dpi 300
```

And inline: `minitrain convert a.apr b.gguf --dtype q8_0 --no-such-flag`.
"""


def test_a_stale_option_is_caught():
    problems = page_command_problems(PLANTED)
    assert problems == [
        "page:4: `minitrain pretrain` has no option --no-such-option",
        "page:8: `minitrain pretrain` has no option --stale-in-a-variable",
        "page:11: `minitrain pretrain` has no option --gone",
        ("page:12: no subcommand 'frobnicate' (there are: convert, diff, eval, generate, gradcheck, humaneval, "
         "inspect, plot, pretrain, shapes, tokenize, trace)"),
        "page:16: `minitrain plot` has no option --dpi",
        "page:19: `minitrain convert` has no option --no-such-flag",
    ], problems
    # the same text without the planted faults passes
    clean = "\n".join(line for line in PLANTED.split("\n")
                      if not re.search(r"no-such|stale|gone|frobnicate|dpi", line))
    assert page_command_problems(clean.replace("--data d --out o \\", "--data d --out o")) == []


# ---------------------------------------------------------------- links and anchors

def slug(heading):
    """GitHub's anchor of a heading: lowercase, formatting and punctuation other than - and _
    dropped, each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text):
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen, out = {}, set()
    for line in prose(text).split("\n"):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)(\s+#+)?\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def link_problems(text, here, pages=None):
    """The relative links of a page (at path `here`) that miss: no such file, or no such heading.
    `pages` maps a path to its text instead of the disk (for the planted test)."""
    pages = pages or {}

    def read(path):
        return pages[path] if path in pages else path.read_text()

    body = prose(text)
    body = re.sub(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", "", body)  # links in inline code are code
    problems = []
    for m in LINK.finditer(body):
        target = m.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        line = body.count("\n", 0, m.start()) + 1
        path, _, anchor = target.partition("#")
        where = (here.parent / path).resolve() if path else here
        if path and where not in pages and not where.exists():
            problems.append(f"{here.name}:{line}: {target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(read(where)):
            problems.append(f"{here.name}:{line}: {target}: no heading with the anchor #{anchor}")
    return problems


def test_every_link_reaches_its_file_and_heading():
    problems = [p for path in PAGES for p in link_problems(path.read_text(), path)]
    assert not problems, "\n".join(problems)


def test_the_links_are_found():
    readme = (ROOT / "README.md").read_text()
    assert len(LINK.findall(prose(readme))) >= 20
    assert "walkthrough-the-demo" in anchors((DOCS / "usage.md").read_text())
    assert slug("The headline: `--init` starts exactly where training stopped") == \
        "the-headline---init-starts-exactly-where-training-stopped"
    assert slug("LoRA vs the full fine-tune vs peft + torch") == "lora-vs-the-full-fine-tune-vs-peft--torch"


def test_a_broken_link_is_caught():
    here = DOCS / "planted.md"
    text = ("# Planted\n\nSee [usage](usage.md#walkthrough-the-demo), [up](#planted), [gone](nope.md), "
            "[stale](usage.md#no-such-heading), [self](#nowhere), [web](https://example.com/x#y)\n"
            "and `[in code](nope.md)`.\n")
    assert link_problems(text, here, {here: text}) == [
        "planted.md:3: nope.md: no such file",
        "planted.md:3: usage.md#no-such-heading: no heading with the anchor #no-such-heading",
        "planted.md:3: #nowhere: no heading with the anchor #nowhere",
    ]


# ---------------------------------------------------------------- shown outputs

CHEAP = {"shapes"}  # subcommands whose output is deterministic and made in well under a second


def shown_outputs(text):
    """(line number, arguments, pipeline after, shown output lines) of each prompted command whose
    subcommand is in CHEAP: the output is the block's lines up to the next prompt."""
    out = []
    for info, first, body in fenced_blocks(text):
        prompts = [k for k, line in enumerate(body) if line.startswith("$ ")]
        for n, k in enumerate(prompts):
            words, _ = shell_words(body[k][2:])
            pipeline = segments(words)
            args = minitrain_args(pipeline[0], {}) if pipeline else None
            if args and args[0] in CHEAP:
                end = prompts[n + 1] if n + 1 < len(prompts) else len(body)
                out.append((first + k, args, [[w for w, _ in s] for s in pipeline[1:]], body[k + 1:end]))
    return out


def real_output(args, pipeline):
    from click.testing import CliRunner

    from minitrain.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").split("\n")
    for stage in pipeline:
        m = re.fullmatch(r"(tail|head) (?:-n )?-?(\d+)", " ".join(stage))
        assert m, f"cannot apply {' '.join(stage)!r}"
        n = int(m.group(2))
        lines = lines[-n:] if m.group(1) == "tail" else lines[:n]
    return lines


def matches(shown, real):
    """Whether the shown lines are the real ones, a line `...` standing for any run of lines."""
    if not shown:
        return not real
    if shown[0].strip() == "...":
        return any(matches(shown[1:], real[i:]) for i in range(len(real) + 1))
    return bool(real) and shown[0].rstrip() == real[0].rstrip() and matches(shown[1:], real[1:])


def output_problems(text, page="page"):
    return [f"{page}:{line}: `minitrain {' '.join(args)}` shows output it does not print"
            for line, args, pipeline, shown in shown_outputs(text) if not matches(shown, real_output(args, pipeline))]


def test_shown_outputs_are_real():
    shown = [(path, o) for path in PAGES for o in shown_outputs(path.read_text())]
    assert any(path.name == "README.md" and o[1] == ["shapes", "--arch", "qwen2.5-0.5b"] for path, o in shown)
    problems = [p for path in PAGES for p in output_problems(path.read_text(), path.relative_to(ROOT))]
    assert not problems, "\n".join(problems)


def test_a_stale_output_is_caught():
    from minitrain.config import PRESETS

    text = ("```text\n$ minitrain shapes --arch qwen2.5-0.5b | tail -1\n"
            "total parameters: 494,032,769 (tied: lm_head is model.embed_tokens.weight, counted once; "
            f"presets: {', '.join(PRESETS)})\n```\n")
    assert output_problems(text) == ["page:2: `minitrain shapes --arch qwen2.5-0.5b` shows output it does not print"]
    assert output_problems(text.replace("494,032,769", "494,032,768")) == []


GRADCHECK_HEADER = re.compile(r"^op\s+case\s+inputs\s+max abs err\s+max rel err\s+result$")


def gradcheck_rows(text):
    """(line number, op, case) of each row of every gradcheck table a page shows."""
    rows = []
    for _, first, body in fenced_blocks(text):
        for k, line in enumerate(body):
            if not GRADCHECK_HEADER.match(line):
                continue
            case_at, inputs_at = line.index("case"), line.index("inputs")
            for j in range(k + 1, len(body)):
                row = body[j]
                if row.strip() == "...":
                    continue
                if not re.search(r"\s(PASS|FAIL)$", row):
                    break
                rows.append((first + j, row[:case_at].strip(), row[case_at:inputs_at].strip()))
    return rows


def gradcheck_problems(text, page="page"):
    from minitrain import gradcheck

    cases = [(c.op, c.note or "-") for c in gradcheck.cases()]
    problems, at = [], 0
    for line, op, case in gradcheck_rows(text):
        if (op, case) not in cases[at:]:
            problems.append(f"{page}:{line}: gradcheck has no check {op} / {case} (in this order)")
            continue
        at = cases.index((op, case), at) + 1
    for m in re.finditer(r"`minitrain gradcheck` runs (\d+) checks", text):
        if int(m.group(1)) != len(cases):
            problems.append(f"{page}: says gradcheck runs {m.group(1)} checks; it runs {len(cases)}")
    return problems


def test_shown_gradcheck_rows_are_real_checks():
    assert len(gradcheck_rows((DOCS / "usage.md").read_text())) >= 39
    problems = [p for path in PAGES for p in gradcheck_problems(path.read_text(), path.relative_to(ROOT))]
    assert not problems, "\n".join(problems)


def test_a_stale_gradcheck_row_is_caught():
    text = ("```\nop    case       inputs  max abs err  max rel err  result\n"
            "rope  theta=1e4  x(2, 5)  1.85e-12     7.27e-13     PASS\n"
            "add   -          a(2, 3)  4.43e-13     1.92e-12     PASS\n"
            "frob  -          x(3, 4)  3.77e-14     1.17e-13     PASS\n```\n\n"
            "Today `minitrain gradcheck` runs 3 checks.\n")
    problems = gradcheck_problems(text)
    assert problems[:2] == ["page:4: gradcheck has no check add / - (in this order)",
                            "page:5: gradcheck has no check frob / - (in this order)"], problems
    assert problems[2].startswith("page: says gradcheck runs 3 checks")

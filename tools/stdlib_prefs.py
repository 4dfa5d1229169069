"""Preference pairs for DPO from the Python standard library: a documented function's source is chosen, the
same source with one planted defect that a test catches is rejected.

    python tools/stdlib_prefs.py --out runs/dpo/data      # runs/dpo/data/train.jsonl, runs/dpo/data/val.jsonl

The functions, the prompt and the chosen reply are tools/stdlib_sft.py's (the same request, the source without
its docstring in a code block), from modules that compute without touching the outside world. Each record is
TRL's conversational preference form plus what was planted and what catches it:

    {"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn],
     "function": "module.name", "defect": "line 3: `<` -> `<=`", "caught_by": "derived test: 3 of 12 calls differ"}

A defect is one token of the source text changed, so rejected differs from chosen in one place only: a
comparison swapped with its partner (< <=, > >=, == !=, in / not in, is / is not), + <-> -, * -> +, // -> /,
% -> //, and <-> or (augmented assignments too), a `not` dropped, or a constant 0, 1 or 2 made one more.

A function's test is taken from the original (executed again from its docstring-less source): its docstring's
examples, when they all pass, and up to 12 calls on arguments from a fixed pool (as many as it has required
positional parameters, at most 3) that return in time, show the same result twice and reach neither the file
system, the environment, the clock nor randomness. A defect is kept when the examples fail or a call's result,
its arguments after it or its exception differ; defects that do not compile, hang or reach the outside world
are discarded; at most --per-function defects are kept, the first caught in an order seeded by the name.
The split is stdlib_sft's (a hash of the name, --val-share), the files the same from run to run. Prints the counts.
"""

import argparse
import ast
import contextlib
import copy
import doctest
import inspect
import io
import itertools
import json
import os
import random
import re
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from stdlib_sft import functions, held_out, turns

MODULES = ["string", "textwrap", "shlex", "fnmatch", "posixpath", "ntpath", "difflib", "heapq", "bisect",
           "colorsys", "calendar", "base64", "quopri", "html", "json.encoder", "json.decoder", "urllib.parse",
           "email.utils", "email.quoprimime", "email.base64mime", "statistics", "fractions", "keyword", "ipaddress",
           "reprlib", "xml.sax.saxutils", "http.cookiejar"]

SWAPS = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"), ast.Eq: ("==", "!="),
         ast.NotEq: ("!=", "=="), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"), ast.Is: ("is", "is not"),
         ast.IsNot: ("is not", "is"), ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "+"),
         ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//"), ast.And: ("and", "or"), ast.Or: ("or", "and")}

POOL = [0, 1, 2, 3, 7, -1, 10, 0.5, 2.5, -1.5, "", "a", "hello world", "a/b/c.txt", "  indented\n  text", "x=1&y=2",
        "Hello, World!", "C:\\dir\\file.txt", "café", [], [3, 1, 2], [1, 2, 2, 5], [1.5, 2.5, 4.0], ["b", "a", "c"],
        b"", b"hello", b"\x00\xff", (255, 128, 0)]

OUTSIDE = {"posix", "nt", "io", "_io", "time", "random", "_random", "pwd", "grp", "_socket", "_locale"}  # C functions'
CLOCK = {"now", "today", "utcnow"}
ENVIRON = {f.__code__ for f in vars(os._Environ).values() if inspect.isfunction(f)}


class Discarded(Exception):
    """A defect that does not compile, hangs or reaches the outside world."""


class Hang(BaseException):
    """Raised in code that runs past its time (a BaseException, so that `except Exception` lets it through)."""


@contextlib.contextmanager
def limit(seconds):
    """Run the block for at most the seconds: past them Hang is raised in it, and again on leaving it."""
    expired = []

    def interrupt(signum, frame):
        expired.append(signum)
        raise Hang

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if expired:
        raise Hang


def outside(arg):
    """The module of a C function (of its owner's type, for a method) that reaches the outside world, else None:
    one of OUTSIDE's (but os.fspath, and an in-memory file's methods), or a datetime's now or today."""
    owner = getattr(arg, "__self__", None)
    module = getattr(arg, "__module__", None) or getattr(owner if isinstance(owner, type) else type(owner),
                                                           "__module__", None)
    if getattr(arg, "__name__", None) in CLOCK:
        return "the clock"
    if module in OUTSIDE and arg is not os.fspath and not isinstance(owner, (io.StringIO, io.BytesIO)):
        return module
    return None


@contextlib.contextmanager
def sealed():
    """Run the block, raising Discarded after it if it called into the file system, the environment, the clock
    or randomness (outside(...), or os.environ)."""
    reached = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code in ENVIRON:
            reached.append("os.environ")
        elif event == "c_call" and outside(arg):
            reached.append(outside(arg))

    sys.setprofile(watch)
    try:
        yield
    finally:
        sys.setprofile(None)
    if reached:
        raise Discarded(f"reaches {reached[0]}")


def sites(source):
    """(start, end, replacement) of every token of the source where one defect can be planted, in source order:
    the operators of SWAPS, a `not`, a constant 0, 1 or 2 (f-strings, whose positions are unreliable, left out)."""
    lines = source.split("\n")

    def at(line, col):  # ast's columns count UTF-8 bytes
        return sum(len(text) + 1 for text in lines[:line - 1]) + len(lines[line - 1].encode()[:col].decode())

    found = []
    for node in walk(ast.parse(source).body[0].body):
        for op, left, right in operands(node):
            old, new = SWAPS.get(type(op), (None, None))
            if old is None:
                continue
            if isinstance(node, ast.AugAssign):
                old, new = old + "=", new + "="
            start = at(left.end_lineno, left.end_col_offset)
            token = re.escape(old).replace(r"\ ", r"[ \t]+")
            gap = re.fullmatch(rf"[\s()\\]*({token})[\s()\\]*", source[start:at(right.lineno, right.col_offset)])
            if gap:
                found.append((start + gap.start(1), start + gap.end(1), new))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start = at(node.lineno, node.col_offset)
            gap = re.fullmatch(r"(not[ \t]*)[\s(]*", source[start:at(node.operand.lineno, node.operand.col_offset)])
            if gap:
                found.append((start, start + gap.end(1), ""))
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value in (0, 1, 2):
            start, end = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
            if source[start:end] == str(node.value):
                found.append((start, end, str(node.value + 1)))
    return sorted(found)


def walk(nodes):
    """The nodes and all those under them, depth first, f-strings left out."""
    for node in nodes:
        if not isinstance(node, ast.JoinedStr):
            yield node
            yield from walk(ast.iter_child_nodes(node))


def operands(node):
    """(operator, left operand, right operand) of each binary operator token of a node."""
    if isinstance(node, ast.Compare):
        return zip(node.ops, [node.left, *node.comparators], node.comparators)
    if isinstance(node, ast.BinOp):
        return [(node.op, node.left, node.right)]
    if isinstance(node, ast.AugAssign):
        return [(node.op, node.target, node.value)]
    if isinstance(node, ast.BoolOp):
        return [(node.op, left, right) for left, right in zip(node.values, node.values[1:])]
    return []


def plant(source, site):
    """The source with the site's token replaced, and the defect described ("line 3: `<` -> `<=`")."""
    start, end, new = site
    old = source[start:end]
    change = f"`{old.strip()}` dropped" if not new else f"`{old}` -> `{new}`"
    return source[:start] + new + source[end:], f"line {source.count(chr(10), 0, start) + 1}: {change}"


def load(attr, fn, source):
    """The globals of fn's module copied, with fn replaced by the function the source defines (so its calls to
    itself reach it); Discarded when the source does not compile or run."""
    globs = dict(fn.__globals__)
    try:
        exec(compile(source, f"<{attr}>", "exec"), globs)
    except Exception as e:
        raise Discarded(f"{type(e).__name__}: {e}") from e
    globs[attr] = globs[fn.__name__]
    return globs


def examples_fail(fn, globs, seconds):
    """Whether any of fn's docstring examples fails, run in (a copy of) the globals; None when it has none."""
    test = doctest.DocTestParser().get_doctest(fn.__doc__, dict(globs), fn.__name__, None, 0)
    if not test.examples:
        return None
    with limit(seconds):
        failed, _ = doctest.DocTestRunner(optionflags=doctest.FAIL_FAST).run(test, out=lambda text: None)
    return failed > 0


def observe(f, args, seconds):
    """("returns", repr of the result (an iterator's items listed), of the arguments after and what it printed)
    or ("raises", the exception's type) for a call on a deep copy of the arguments; Hang or Discarded past the
    seconds or when it reaches the outside world."""
    args = copy.deepcopy(args)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as printed, \
            contextlib.redirect_stderr(printed), limit(seconds), sealed():
        warnings.simplefilter("ignore")
        try:
            result = f(*args)
            if isinstance(result, Iterator):
                result = list(itertools.islice(result, 1000))
            return "returns", f"{result!r} {args!r} {printed.getvalue()!r}"
        except (Exception, SystemExit) as e:
            return "raises", type(e).__name__


def calls(qualified, f, seconds):
    """Up to 12 (arguments, observation) of f on tuples drawn from the pool in an order seeded by the name,
    as many as its required positional parameters (at most 3), that return, the same twice and without an address."""
    required = [p for p in inspect.signature(f).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) > 3 or any(p.kind == p.KEYWORD_ONLY for p in required):
        return []
    arity, kept = len(required), []
    draws = random.Random(qualified).sample(range(len(POOL) ** arity), min(80, len(POOL) ** arity))
    for draw in draws:
        args = tuple(POOL[draw // len(POOL) ** i % len(POOL)] for i in range(arity))
        try:
            seen = observe(f, args, seconds)
            if seen[0] == "returns" and " at 0x" not in seen[1] and observe(f, args, seconds) == seen:
                kept.append((args, seen))
        except (Hang, Discarded):
            continue
        if len(kept) == 12:
            break
    return kept


def derive(qualified, attr, fn, source, seconds):
    """The test of a function, taken from its source run again: {"doctest": whether its docstring's examples all
    pass, "calls": calls(...)}; None when it has neither."""
    try:
        globs = load(attr, fn, source)
        doctest_passes = examples_fail(fn, globs, seconds) is False
    except (Discarded, Hang):
        return None
    test = {"doctest": doctest_passes, "calls": calls(qualified, globs[attr], seconds)}
    return test if test["doctest"] or test["calls"] else None


def caught(test, attr, fn, source, seconds):
    """How the test catches the source: "doctest", "derived test: k of n calls differ", or None when it passes;
    Discarded when it does not compile, hangs or reaches the outside world."""
    globs = load(attr, fn, source)
    try:
        if test["doctest"] and examples_fail(fn, globs, seconds):
            return "doctest"
        differ = sum(observe(globs[attr], args, seconds) != seen for args, seen in test["calls"])
    except Hang as e:
        raise Discarded("hangs") from e
    return f"derived test: {differ} of {len(test['calls'])} calls differ" if differ else None


def records(modules, max_chars, per_function, seconds, counts):
    """(qualified name, preference record) for each caught defect of the modules' functions, in a fixed order;
    counts what was considered, tested, tried and caught."""
    for qualified, attr, fn, source, signature in functions(max_chars, modules):
        counts["functions"] += 1
        test = derive(qualified, attr, fn, source, seconds)
        if test is None:
            continue
        counts["tested"] += 1
        counts["doctest"] += test["doctest"]
        counts["derived"] += bool(test["calls"])
        prompt, chosen = turns(attr, fn, source, signature)
        order = sites(source)
        random.Random(qualified).shuffle(order)
        kept = []
        for site in order:
            if len(kept) == per_function:
                break
            mutant, defect = plant(source, site)
            counts["tried"] += 1
            try:
                by = caught(test, attr, fn, mutant, seconds)
            except Discarded:
                counts["discarded"] += 1
                continue
            if by:
                kept.append({"prompt": [{"role": "user", "content": prompt}],
                             "chosen": [{"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "assistant", "content": turns(attr, fn, mutant, signature)[1]}],
                             "function": qualified, "defect": defect, "caught_by": by})
        counts["caught"] += len(kept)
        for record in kept:
            yield qualified, record


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Directory for train.jsonl and val.jsonl.")
    ap.add_argument("--max-chars", type=int, default=800, help="Longest function source taken.")
    ap.add_argument("--per-function", type=int, default=2, help="Most defects kept per function.")
    ap.add_argument("--timeout", type=float, default=2.0, help="Seconds a call or the examples may run.")
    ap.add_argument("--val-share", type=float, default=0.1, help="Share held out, by a hash of the name.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    with open(out / "train.jsonl", "w") as train, open(out / "val.jsonl", "w") as val:
        for qualified, record in records(MODULES, args.max_chars, args.per_function, args.timeout, counts):
            held = held_out(qualified, args.val_share)
            (val if held else train).write(json.dumps(record) + "\n")
            counts["val" if held else "train"] += 1
    print(f"{counts['functions']} functions, {counts['tested']} with a test ({counts['doctest']} docstring examples, "
          f"{counts['derived']} derived calls); {counts['tried']} defects tried, {counts['discarded']} discarded "
          f"(no compile, hang, outside world), {counts['caught']} caught; "
          f"{counts['train']} training and {counts['val']} held-out pairs in {out}")


if __name__ == "__main__":
    main()

"""Instruction data from code nobody here wrote: the Python standard library's documented functions.

    python tools/stdlib_sft.py --out data/sft          # data/sft/train.jsonl, data/sft/val.jsonl

Each module-level function of the modules below that has a docstring becomes one conversation:

    user:      Write a Python function `name(signature)` that <its docstring's first line>
    assistant: ```python
               <its source, docstring left out>
               ```

Functions whose source is longer than --max-chars are skipped, and those whose signature shows an
object's address (it differs from run to run). A function goes to val.jsonl when
a hash of its qualified name falls in the held-out share (--val-share): the split is the same on
every machine and run, and no function is in both. Prints the counts.
"""

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import textwrap
from pathlib import Path

MODULES = ["textwrap", "string", "shlex", "fnmatch", "posixpath", "ntpath", "genericpath", "glob", "difflib",
           "heapq", "bisect", "colorsys", "calendar", "base64", "quopri", "html", "csv", "json.encoder",
           "json.decoder", "urllib.parse", "email.utils", "email.quoprimime", "gettext", "locale", "statistics",
           "fractions", "random", "copy", "functools", "operator", "keyword", "tokenize", "ipaddress", "uuid",
           "pprint", "reprlib", "dataclasses", "enum", "typing", "inspect", "dis", "pathlib", "zipfile", "tarfile",
           "shutil", "filecmp", "tempfile", "os", "subprocess", "platform", "sysconfig", "site", "argparse",
           "getopt", "optparse", "configparser", "logging", "warnings", "traceback", "linecache", "codecs",
           "mimetypes", "mailbox", "smtplib", "http.cookies", "http.client", "wsgiref.util", "xml.sax.saxutils",
           "sched", "queue", "threading", "contextlib", "abc", "numbers", "decimal", "datetime", "zoneinfo",
           "secrets", "hmac", "hashlib", "stat", "imghdr", "sndhdr", "wave", "chunk", "plistlib", "netrc"]


def without_docstring(source):
    """A function's source with its docstring removed (and dedented)."""
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    fn = tree.body[0]
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines = source.splitlines()
        doc = body[0]
        if len(body) == 1:
            return None  # nothing but a docstring
        del lines[doc.lineno - 1: doc.end_lineno]
        source = "\n".join(lines) + "\n"
    return source


def functions(max_chars, modules=MODULES):
    """(qualified name, name in its module, function, source without docstring, signature) for every usable
    function of the modules, in a fixed order."""
    seen = set()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, fn in sorted(vars(module).items()):
            if attr.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            qualified = f"{fn.__module__}.{attr}"
            if not inspect.getdoc(fn) or qualified in seen:
                continue
            try:
                source, signature = without_docstring(inspect.getsource(fn)), str(inspect.signature(fn))
            except (OSError, TypeError, ValueError, SyntaxError):
                continue
            if source is None or len(source) > max_chars or " at 0x" in signature:
                continue  # too long; or a default whose repr is an address (not the same from run to run)
            seen.add(qualified)
            yield qualified, attr, fn, source, signature


def turns(attr, fn, source, signature):
    """The user's request for a function and the assistant's reply, its source in a code block."""
    first = inspect.getdoc(fn).strip().splitlines()[0].strip().rstrip(".")
    prompt = f"Write a Python function `{attr}{signature}` that {first[0].lower() + first[1:]}."
    return prompt, f"```python\n{source.rstrip()}\n```"


def conversations(max_chars):
    """(qualified name, conversation) for every usable function, in a fixed order."""
    for qualified, *function in functions(max_chars):
        prompt, reply = turns(*function)
        yield qualified, {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def held_out(qualified, share):
    """Whether a function goes to the held-out file: a hash of its qualified name falls in the share."""
    return int(hashlib.sha256(qualified.encode()).hexdigest()[:8], 16) / 2 ** 32 < share


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Directory for train.jsonl and val.jsonl.")
    ap.add_argument("--max-chars", type=int, default=1200, help="Longest function source taken.")
    ap.add_argument("--val-share", type=float, default=0.1, help="Share held out, by a hash of the name.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    with open(out / "train.jsonl", "w") as train, open(out / "val.jsonl", "w") as val:
        for qualified, conversation in conversations(args.max_chars):
            held = held_out(qualified, args.val_share)
            (val if held else train).write(json.dumps(conversation) + "\n")
            counts["val" if held else "train"] += 1
    print(f"{counts['train']} training and {counts['val']} held-out conversations in {out}")


if __name__ == "__main__":
    main()

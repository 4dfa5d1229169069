"""The house has floors: no module imports, at any depth and not even inside a function, a module
that imports it back. And the training loop (train.py) touches no file format and no GPU code."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minitrain"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """The minitrain modules `path` imports anywhere in it (a package's own __init__ stands for
    `from package import name` only where name is not a module of its own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return {n for n in names if n == "minitrain" or n.startswith("minitrain.")}


def graph():
    return {module_name(p): imports(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def circles(edges):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert circles(graph()) == []


def test_the_circle_check_finds_a_planted_circle():
    edges = graph()
    edges["minitrain.backend"] = edges["minitrain.backend"] | {"minitrain.model"}  # model -> ops -> backend
    assert any("minitrain.backend" in c and "minitrain.model" in c for c in circles(edges))


def test_the_loop_reads_no_file_format_and_no_gpu_module():
    touched = graph()["minitrain.train"]
    assert not {m for m in touched if m.startswith(("minitrain.formats", "minitrain.gpu"))}, touched

"""`minitrain diff A B`: two traces of one step compared tensor by tensor, in A's execution order.

Each tensor both hold is compared in float64: |a - b| element by element against a bound, the
derived one of trace_bounds.py (the two sides' precisions from their manifests) or, with --rtol
and --atol, atol + rtol max|a| (the tensor's scale: rounding errors are relative to the terms a
value is summed from, not to the value, which may cancel to near zero). A row per tensor: the
largest |a - b| (max_abs), that over max|a| (max_rel), the element furthest beyond its bound
(or nearest it) with both values, and whether every element is within. The first tensor beyond
is where the two implementations part: everything before it agrees.

What cannot be compared is bad input (exit 2): a file that is not safetensors, two traces of
different models or batches (their manifests, or input_ids, targets or positions that differ),
a tensor both hold in different shapes, no tensor in common.
"""

import json
from dataclasses import asdict, dataclass

import numpy

from minitrain.errors import InputError
from minitrain.formats.json_file import load_json
from minitrain.formats.trace_file import Trace
from minitrain.trace_bounds import Bounds

INPUTS = ("input_ids", "targets", "positions")  # what the step was given: equal, or it is another step


@dataclass
class Row:
    name: str
    shape: list
    max_abs: float
    max_rel: float
    within: bool
    index: list  # the element furthest beyond (or nearest) its bound
    a: float
    b: float
    bound: float  # the bound at that element
    ratio: float  # |a - b| / bound there (<= 1: within)


def diff(path_a, path_b, rtol=None, atol=None, map_path=None, assume="fp32"):
    """-> the report of `minitrain diff --json` (rows as dicts). A trace may hold infinities and
    NaNs (a diverged step): they are compared, silently."""
    with numpy.errstate(all="ignore"):
        return _diff(path_a, path_b, rtol, atol, map_path, assume)


def _diff(path_a, path_b, rtol, atol, map_path, assume):
    a, b = Trace(path_a), Trace(path_b)
    rename = _mapping(map_path) if map_path else {}
    names_b = {rename.get(n, n): n for n in b.names}
    _same_step(a, b, path_a, path_b)
    common = [n for n in a.names if n in names_b]
    if not common:
        raise InputError(f"{path_b}: no tensor named as in {path_a} ({len(b.names)} tensors, e.g. "
                         f"{', '.join(b.names[:3]) or 'none'}); trace names are in docs/auditing.md, --map renames")
    precisions = [(t.manifest or {}).get("dtype", assume) for t in (a, b)]  # a manifest's is checked
    judge = None
    if rtol is None and atol is None:  # the derived bounds: from A's manifest and tensors (else B's)
        source = a if a.manifest else b if b.manifest else None
        if source is None:
            raise InputError(f"neither {path_a} nor {path_b} is a trace with a manifest (minitrain trace, "
                             "tools/hf_trace.py): the derived bounds need the model; give --rtol and --atol")
        judge = Bounds(source, precisions)
    rows = []
    for name in common:
        other = names_b[name]
        if a.shape(name) != b.shape(other):
            raise InputError(f"tensor {name}: {path_a} has shape {list(a.shape(name))}, {path_b} "
                             f"{list(b.shape(other))}{f' (as {other})' if other != name else ''}; a trace's "
                             "shapes are in docs/auditing.md")
        x, y = a.array(name), b.array(other)
        if name in INPUTS:
            _equal_inputs(name, x, y, path_a, path_b)
            continue
        limit = judge.bound(name, x) if judge else (atol or 0.0) + (rtol or 0.0) * float(numpy.max(abs(x), initial=0.0))
        rows.append(_row(name, x, y, limit))
    first = next((r.name for r in rows if not r.within), None)
    return {"compared": len(rows), "beyond": sum(not r.within for r in rows), "first_divergence": first,
            "missing_in_a": [n for n in names_b if n not in a.header],
            "missing_in_b": [n for n in a.names if n not in names_b],
            "precisions": precisions, "tolerance": "derived" if judge else {"rtol": rtol or 0.0, "atol": atol or 0.0},
            "rows": [asdict(r) for r in rows]}


def _row(name, x, y, limit):
    err = numpy.abs(x - y)
    both_nan = numpy.isnan(x) & numpy.isnan(y)
    err = numpy.where(both_nan | (x == y), 0.0, numpy.where(numpy.isnan(err), numpy.inf, err))
    limit = numpy.broadcast_to(numpy.asarray(limit, dtype=numpy.float64), x.shape)
    ratio = numpy.where(err == 0, 0.0, err / limit)
    flat = int(numpy.argmax(ratio)) if ratio.size else 0
    at = tuple(int(i) for i in numpy.unravel_index(flat, x.shape)) if x.size else ()
    scale = float(numpy.max(abs(x), initial=0.0))
    max_abs = float(err.max(initial=0.0))
    worst = float(ratio.max(initial=0.0))
    return Row(name, list(x.shape), max_abs, max_abs / scale if scale else (0.0 if max_abs == 0 else numpy.inf),
               worst <= 1.0, list(at), float(x[at]) if x.size else 0.0, float(y[at]) if y.size else 0.0,
               float(limit[at]) if x.size else 0.0, worst)


def _mapping(path):
    data = load_json(path)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise InputError(f"--map {path}: expected a JSON object of B's names to A's names (strings)")
    return data


def _same_step(a, b, path_a, path_b):
    """Two manifests must describe one model, batch shape and optimizer."""
    ma, mb = a.manifest or {}, b.manifest or {}
    for key in ("model", "batch_size", "seq_len", "optimizer"):
        if key in ma and key in mb and ma[key] != mb[key]:
            x, y = ma[key], mb[key]
            if isinstance(x, dict) and isinstance(y, dict):
                fields = [f"{k} {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
                x, y = None, "; ".join(fields)
            raise InputError(f"{path_a} and {path_b} trace different steps: {key} "
                             + (f"{x} vs {y}" if x is not None else y))


def _equal_inputs(name, x, y, path_a, path_b):
    if not numpy.array_equal(x, y):
        at = tuple(int(i) for i in numpy.argwhere(x != y)[0])
        raise InputError(f"{path_a} and {path_b} trace different batches: {name} differ at {list(at)} "
                         f"({x[at]} vs {y[at]})")


def render(report, path_a, path_b):
    """The report as lines: one per tensor, then the verdict."""
    rows = report["rows"]
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f"{'tensor'.ljust(width)}  {'max_abs':>9}  {'max_rel':>9}  {'/bound':>9}  worst element: A vs B"]
    for r in rows:
        mark = "" if r["within"] else "  <- beyond"
        lines.append(f"{r['name'].ljust(width)}  {r['max_abs']:9.2e}  {r['max_rel']:9.2e}  {r['ratio']:9.2e}  "
                     f"{r['index']}: {r['a']:.9g} vs {r['b']:.9g}{mark}")
    for key, side in (("missing_in_b", path_b), ("missing_in_a", path_a)):
        if report[key]:
            more = f" (+{len(report[key]) - 8} more)" if len(report[key]) > 8 else ""
            lines.append(f"not in {side}: {', '.join(report[key][:8])}{more}")
    how = ("derived bounds (" + " vs ".join(report["precisions"]) + ")" if report["tolerance"] == "derived"
           else f"rtol {report['tolerance']['rtol']:g}, atol {report['tolerance']['atol']:g}")
    first = report["first_divergence"]
    if first is None:
        lines.append(f"all {report['compared']} tensors within {how}")
    else:
        r = next(r for r in rows if r["name"] == first)
        lines.append(f"first divergence: {first} (|a - b| {abs(r['a'] - r['b']):.3g} at {r['index']}: {r['a']:.9g} vs "
                     f"{r['b']:.9g}, {r['ratio']:.3g} x its bound); {report['beyond']} of {report['compared']} "
                     f"tensors beyond {how}")
    return lines


def as_json(report):
    """Strict JSON: an infinite ratio (a difference where the bound is 0) or a NaN as a string."""
    rows = [{k: (str(v) if isinstance(v, float) and not numpy.isfinite(v) else v) for k, v in r.items()}
            for r in report["rows"]]
    return json.dumps({**report, "rows": rows})

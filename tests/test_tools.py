"""The CPU benchmarks and profiler run end to end (tiny sizes, one step), so docs/performance.md
stays reproducible. Timings are printed, never asserted."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def run(script, *args):
    out = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_profile_accounts_for_the_step():
    out = run("profile_cpu.py", "--preset", "tiny-llama", "--steps", "1")
    step = float(re.search(r"step ([\d.]+) s", out).group(1))
    rows = {line.split()[0]: float(line.split()[-2 if "%" in line.split()[-1] else -3])
            for line in out.splitlines()[2:]}
    for op in ("Linear", "LinearCrossEntropy", "Attention", "RMSNorm", "SwiGLU", "RoPE", "AdamW"):
        assert op in rows, f"{op} missing from the profile:\n{out}"
    rounding = 0.0005 * (len(rows) + 1) + 1e-9  # every printed figure is rounded to the millisecond
    assert abs(sum(rows.values()) - step) <= rounding, out  # the rows, the engine included, add up
    assert rows["engine"] >= -rounding, out  # no time counted twice (a Function timed inside another)


def test_bench_compares_both_frameworks():
    pytest.importorskip("transformers")
    out = run("bench_cpu.py", "--preset", "tiny-llama", "--rounds", "1", "--warmup", "0", "--steps", "1")
    assert re.search(r"sgemm peak [\d.]+ GFLOP/s", out), out
    assert re.search(r"tiny-llama\s+minitrain .* [\d.]+x$", out, re.M), out
    assert re.search(r"tiny-llama\s+torch .*torch threads", out), out


def test_bench_lora_compares_the_three_runs():
    pytest.importorskip("peft")
    out = run("bench_cpu.py", "--lora", "2", "--preset", "tiny-llama", "--rounds", "1", "--warmup", "0", "--steps", "1")
    assert re.search(r"tiny-llama\s+minitrain lora .* peak RSS [\d.]+x the full fine-tune's, [\d.]+x peft's tokens/s$",
                     out, re.M), out
    assert re.search(r"tiny-llama\s+minitrain full\s+[\d.]+", out), out
    assert re.search(r"tiny-llama\s+peft \+ torch .*torch threads", out), out


@pytest.mark.slow
def test_bench_generate_compares_both_frameworks(smollm2):
    out = run("bench_generate.py", "--model", "smollm2-135m", "--prompt-tokens", "8", "--new-tokens", "2",
              "--repeats", "1", "--rounds", "1")
    assert re.search(r"smollm2-135m\s+minitrain\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M), out
    assert re.search(r"smollm2-135m\s+transformers\s+[\d.]+\s+[\d.]+\s+\(torch threads", out), out


@pytest.mark.slow
def test_bench_zero_measures_the_shards_and_checks_the_bytes():
    pytest.importorskip("mpi4py")
    out = run("bench_zero.py", "--arch", "tiny-llama", "--ranks", "1", "2", "--steps", "1")
    rows = {(r[0], r[1]): float(r[2].replace(",", "")) for r in
            ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if re.match(r"\| \d x \d", line))}
    assert len(rows) == 4 and "DIFFERENT" not in out, out
    assert rows["1 x 4", "0"] == rows["1 x 4", "1"] == rows["2 x 2", "0"], out  # every rank holds all of m and v
    assert abs(rows["2 x 2", "1"] - rows["2 x 2", "0"] / 2) < 1.0, out  # half, within a 0.5 MB slice


def test_bench_distill_times_both_steps():
    out = run("bench_distill.py", "--preset", "tiny-llama", "--student-layers", "2", "--seq-len", "16",
              "--batch-size", "2", "--steps", "1", "--rounds", "1")
    assert re.search(r"student alone \(CE\)\s+[\d.]+\s+[\d.]+$", out, re.M), out
    assert re.search(r"student \+ teacher \(KD\)\s+[\d.]+\s+[\d.]+$", out, re.M), out
    assert re.search(r"a teacher costs [\d.]+x the step time", out), out


def test_bench_parts_times_both_frameworks():
    out = run("bench_parts.py", "--preset", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--steps", "1",
              "--rounds", "1")
    assert re.search(r"^base matmuls \(4 x 7 linears, y and dX\)\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M), out
    assert re.search(r"^attention \(4 layers, fwd \+ bwd\)\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M), out


def test_count_launches_counts_the_fused_step():
    """tools/count_launches.py counts a bf16 step on the GPU path without a GPU (here of a small
    Qwen2 with head_dim 64, which the bf16 attention kernels take). The counts are the design's:
    per layer, the linears are 4 GEMMs forward and 8 backward (q, k, v one GEMM; gate, up one), no
    weight is rounded to bf16 again (AdamW keeps the copies), and AdamW with the gradient norm is
    one launch each."""
    sys.path.insert(0, str(TOOLS))
    import count_launches

    from minitrain.config import ModelConfig

    config = ModelConfig(family="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, intermediate_size=96, vocab_size=300,
                         max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    one, two = (count_launches.count_step(config, n, "bf16", 2, 16) for n in (1, 2))
    parts = [count_launches.totals(step, count_launches.part) for step in (one, two)]
    per_layer = {p: parts[1][p][0] - parts[0].get(p, [0])[0] for p in parts[1]}
    assert per_layer["GEMMs: layers"] == 12, per_layer
    assert per_layer["attention"] == 4, per_layer  # forward; delta, dq, dkdv
    assert parts[1]["optimizer, grad norm"][0] == 2
    assert not [w for kind, name, _, w in two if name == "cast.cast_f32_to_bf16" and "linear" in w]


@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-llama3"])
def test_fullsize_parity_runs_the_preset_against_float64_transformers(arch):
    """The tool docs/performance.md's full-size Qwen3 and Llama 3 figures come from, on the tiny
    presets: every gradient compared, all within the bounds."""
    import json

    pytest.importorskip("transformers")
    report = json.loads(run("fullsize_parity.py", "--arch", arch, "--seq-len", "8").splitlines()[-1])
    assert report["within"] and report["gradients"] == {"tiny-qwen3": 46, "tiny-llama3": 38}[arch]
    assert report["grad_max_rel"] < 1e-12


def test_stdlib_prefs_plants_one_defect_the_test_catches(tmp_path, monkeypatch):
    """tools/stdlib_prefs.py: each rejected reply is the chosen one with one line changed (the line the defect
    names), prompt and chosen are stdlib_sft's turns, and the recorded test passes the chosen source and fails
    the rejected one (docstring examples checked again by doctest itself); the split is by name, the same from
    run to run. Planted: a check that calls every defect caught lets defects the test misses through."""
    import difflib
    import doctest
    import json
    from collections import Counter

    sys.path.insert(0, str(TOOLS))
    import stdlib_prefs
    import stdlib_sft

    def failed_examples(fn, source):
        globs = dict(fn.__globals__)
        exec(source, globs)
        test = doctest.DocTestParser().get_doctest(fn.__doc__, globs, fn.__name__, None, 0)
        return doctest.DocTestRunner().run(test, out=lambda text: None).failed

    def source(turn):
        return turn[0]["content"].removeprefix("```python\n").removesuffix("```")

    modules = ["statistics", "textwrap"]
    found = {qualified: (attr, fn, text) for qualified, attr, fn, text, _ in stdlib_sft.functions(800, modules)}
    sft = {qualified: [m["content"] for m in c["messages"]] for qualified, c in stdlib_sft.conversations(800)}
    records = [r for _, r in stdlib_prefs.records(modules, 800, 2, 1.0, Counter())]
    assert {r["caught_by"].split(":")[0] for r in records} == {"doctest", "derived test"}, records
    for r in records:
        chosen, rejected = source(r["chosen"]), source(r["rejected"])
        assert [r["prompt"][0]["content"], r["chosen"][0]["content"]] == sft[r["function"]]
        ops = [op for op in difflib.SequenceMatcher(None, chosen.splitlines(), rejected.splitlines()).get_opcodes()
               if op[0] != "equal"]
        line, old, new = re.fullmatch(r"line (\d+): `(.+)` (?:-> `(.*)`|dropped)", r["defect"]).groups()
        line = int(line)
        assert ops == [("replace", line - 1, line, line - 1, line)], r
        before, after = chosen.splitlines()[line - 1], rejected.splitlines()[line - 1]
        assert after in {before[:m.start()] + (new or "") + before[m.end():]
                         for m in re.finditer(re.escape(old) + ("" if new else "[ \t]*"), before)}, r
        attr, fn, text = found[r["function"]]
        assert chosen == text
        if r["caught_by"] == "doctest":
            assert failed_examples(fn, chosen) == 0 < failed_examples(fn, rejected), r
        test = stdlib_prefs.derive(r["function"], attr, fn, chosen, 1.0)
        assert stdlib_prefs.caught(test, attr, fn, chosen, 1.0) is None
        assert stdlib_prefs.caught(test, attr, fn, rejected, 1.0) == r["caught_by"], r

    check = stdlib_prefs.caught
    monkeypatch.setattr(stdlib_prefs, "caught", lambda *args: "caught")
    missed = []
    for qualified, r in stdlib_prefs.records(modules, 800, 2, 1.0, Counter()):
        attr, fn, text = found[qualified]
        test = stdlib_prefs.derive(qualified, attr, fn, text, 1.0)
        missed += [r] if check(test, attr, fn, source(r["rejected"]), 1.0) is None else []
    assert missed, "with every defect called caught, none the test misses got through?"
    monkeypatch.undo()

    out = run("stdlib_prefs.py", "--out", str(tmp_path))
    counts = re.search(r"(\d+) training and (\d+) held-out pairs", out)
    split = {part: [json.loads(line)["function"] for line in (tmp_path / f"{part}.jsonl").read_text().splitlines()]
             for part in ("train", "val")}
    assert (len(split["train"]), len(split["val"])) == tuple(map(int, counts.groups())), out
    assert all(stdlib_sft.held_out(name, 0.1) == (part == "val") for part in split for name in split[part])
    first = (tmp_path / "train.jsonl").read_bytes()
    run("stdlib_prefs.py", "--out", str(tmp_path))
    assert (tmp_path / "train.jsonl").read_bytes() == first

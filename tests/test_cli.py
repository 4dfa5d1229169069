"""`minitrain gradcheck` from the command line: table, exit codes, one-line errors."""

import subprocess
import sys

from click.testing import CliRunner

from minitrain import gradcheck
from minitrain.cli import cli


def minitrain(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)


def test_gradcheck_prints_a_table_and_passes():
    out = minitrain("gradcheck", "--op", "linear", "--op", "attention")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["op", "case", "inputs"]
    assert any(line.startswith("attention") and "GQA 7:1" in line and line.endswith("PASS") for line in lines)
    assert not any(line.startswith("rmsnorm") for line in lines)
    assert "checks passed" in lines[-1]


def test_unknown_op_is_one_line_and_exit_2():
    out = minitrain("gradcheck", "--op", "nope")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown op nope" in out.stderr and "Traceback" not in out.stderr


def test_a_broken_backward_makes_gradcheck_fail(rmsnorm_without_mean_term):
    result = CliRunner().invoke(cli, ["gradcheck", "--op", "rmsnorm"])
    assert result.exit_code == 1
    cases = sum(c.op == "rmsnorm" for c in gradcheck.cases())  # the hidden size's and Qwen3's per head
    assert "FAIL" in result.output and f"0/{cases} checks passed" in result.output and cases == 3


def test_help_works():
    out = minitrain("gradcheck", "--help")
    assert out.returncode == 0 and "--op NAME" in out.stdout

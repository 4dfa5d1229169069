"""Both full presets build and run one forward + backward (batch 1, seq 128) on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fullsize_check.py"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama-370m", "qwen2.5-0.5b"])
def test_full_preset_forward_backward(arch):
    out = subprocess.run([sys.executable, str(TOOL), "--one", "--arch", arch], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] == {"llama-370m": 322_045_952, "qwen2.5-0.5b": 494_032_768}[arch]
    assert r["grads_finite"]
    # near-uniform prediction: ln V, plus about the logit variance / 2 = H * 0.02^2 / 2 ~ 0.2
    assert r["ln_V"] < r["loss"] < r["ln_V"] + 0.3

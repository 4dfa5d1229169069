"""The array module and dtype policy are chosen in one place; CuPy is optional and lazy."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from minitrain import backend


def test_defaults_are_numpy_fp32():
    assert backend.xp is np and backend.dtype == np.float32
    assert backend.asarray([1, 2]).dtype == np.float32


def test_precision_switches_and_restores():
    with backend.precision("fp64"):
        assert backend.asarray([1.0]).dtype == np.float64
    assert backend.dtype == np.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        backend.set_dtype("fp8")


def test_accumulation_dtype_is_at_least_fp32():
    assert backend.acc_dtype(np.float16) == np.float32
    assert backend.acc_dtype(np.float32) == np.float32
    assert backend.acc_dtype(np.float64) == np.float64


def test_importing_everything_does_not_import_cupy():
    code = "import minitrain.cli, minitrain.gradcheck, sys; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_without_cupy_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"minitrain\[gpu\]"):
        backend.use("cuda")
    assert backend.xp is np
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.use("tpu")


FAULTS = """
import resource, sys
import numpy
if sys.argv[1] == "minitrain":
    import minitrain.backend

def cycle():  # what a training step does: many large arrays made, then all freed
    arrays = [numpy.ones(2 << 20, dtype=numpy.float32) for _ in range(12)]  # 12 x 8 MiB
    del arrays

for _ in range(2):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_not_refaulted():
    """backend.keep_freed_memory: the second step reuses the first step's pages. Without it glibc
    trims the freed heap and every step pays a page fault per fresh 4 KiB page."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    plain = faults("numpy")
    if plain < 10_000:
        pytest.skip(f"this malloc does not return freed memory here ({plain} faults without minitrain)")
    assert faults("minitrain") < 1_000, "freed arrays were given back to the kernel and faulted in again"

"""Every kernels/*.cu compiles with nvcc for sm_80 and sm_90 and through NVRTC (no GPU needed);
ptxas's register and spill counts are reported at the end of the test run."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from minitrain.gpu import runtime

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
REPORT = []  # (source, arch, kernel, registers, spill stores, spill loads), printed by conftest


def nvcc():
    path = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(path).exists():
        pytest.fail("nvcc not found: the CUDA toolkit is part of this machine's set-up")
    return path


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_nvcc_compiles(source, arch, tmp_path):
    out = subprocess.run([nvcc(), f"-arch={arch}", "-cubin", "-std=c++17", "-Xptxas", "-v", f"-I{KERNELS}",
                          str(source), "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernel = None
    for line in out.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            kernel = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif m := re.search(r"Used (\d+) registers", line):
            REPORT.append((source.stem, arch, kernel, int(m.group(1)), *spills))
    assert kernel is not None, "ptxas reported no kernel"


def _nvrtc():
    nvidia = pytest.importorskip("nvidia.cuda_nvrtc", reason="the nvidia-cuda-nvrtc-cu12 wheel (test extra)")
    return ctypes.CDLL(str(Path(list(nvidia.__path__)[0]) / "lib" / "libnvrtc.so.12"))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_nvrtc_compiles(source):
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0, None, None) == 0
    # CuPy's own options: ours (runtime.options()), then the architecture and -ftz=true it appends
    options = [*(o.encode() for o in runtime.options()), b"--gpu-architecture=compute_80", b"-ftz=true"]
    result = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert result == 0, log.value.decode(errors="replace")

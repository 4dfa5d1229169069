"""Run the exactness and parity tests again on the code paths an AVX2-only CPU takes.

    python tools/avx2_leg.py [extra pytest arguments]

Results in the last bits depend on which SIMD kernels NumPy, OpenBLAS and torch dispatch to, so
a machine with AVX-512 never executes what most laptops and cloud VMs execute. This runs the
tests marked `numerics` (bit-identity of resume, seeds, accumulation, threads and load; parity
with the float64 truth) in a child whose libraries are held to AVX2:

    NPY_DISABLE_CPU_FEATURES   NumPy's AVX-512 dispatch targets, as this NumPy names them (if any)
    OPENBLAS_CORETYPE=Haswell  OpenBLAS's AVX2 + FMA kernels (run on every AVX2 CPU)
    ATEN_CPU_CAPABILITY=avx2   torch's own kernels; MKL_ENABLE_INSTRUCTIONS, DNNL_MAX_CPU_ISA for MKL, oneDNN

It checks in the child that each setting took effect (an ignored variable would make the leg a
silent repeat of the first run), then runs pytest there. On a CPU without AVX2 it says so and
exits 0: there is no AVX2 path to check. Exit status: pytest's, or 1 if a setting did not apply.
"""

import ctypes
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy

try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
except ImportError:  # NumPy 1.x
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__

ROOT = Path(__file__).resolve().parent.parent
# NumPy's AVX-512 dispatch targets that this CPU has (and, in the child, those still active)
AVX512_TARGETS = [f for f in __cpu_dispatch__
                  if (f.startswith("AVX512") or f == "X86_V4") and __cpu_features__.get(f)]
ENV = {
    **({"NPY_DISABLE_CPU_FEATURES": " ".join(AVX512_TARGETS)} if AVX512_TARGETS else {}),
    "OPENBLAS_CORETYPE": "Haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
}


def openblas_core():
    """The kernel set OpenBLAS chose in this process ("Haswell", "SkylakeX", ...), or None when
    NumPy's BLAS is not the OpenBLAS its wheel ships."""
    for path in glob.glob(str(Path(numpy.__file__).parent.parent / "numpy.libs" / "*openblas*.so*")):
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                       "openblas_get_corename"):
            if hasattr(lib, symbol):
                getattr(lib, symbol).restype = ctypes.c_char_p
                return getattr(lib, symbol)().decode()
    return None


def report():
    """What the libraries of this process dispatch to, as one JSON object."""
    import torch

    return {"numpy_avx512": AVX512_TARGETS,
            "openblas": openblas_core(), "torch": torch.backends.cpu.get_cpu_capability()}


def main():
    if not __cpu_features__.get("AVX2"):
        print("avx2 leg: this CPU has no AVX2; nothing to check", file=sys.stderr)
        return 0
    env = {**os.environ, **ENV}
    child = subprocess.run([sys.executable, __file__, "--report"], env=env, capture_output=True, text=True)
    if child.returncode != 0:
        print(f"avx2 leg: could not inspect the child's libraries:\n{child.stderr}", file=sys.stderr)
        return 1
    seen = json.loads(child.stdout)
    problems = []
    if seen["numpy_avx512"]:
        problems.append(f"NumPy still dispatches to {seen['numpy_avx512']}")
    if seen["openblas"] is not None and seen["openblas"].lower() != "haswell":
        problems.append(f"OpenBLAS chose {seen['openblas']} kernels, not Haswell")
    if seen["torch"] not in ("AVX2", "DEFAULT"):
        problems.append(f"torch runs its {seen['torch']} kernels")
    if problems:
        print("avx2 leg: the settings did not take effect: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"avx2 leg: NumPy without {' '.join(AVX512_TARGETS) or 'AVX-512 targets'}, OpenBLAS "
          f"{seen['openblas'] or '(not scipy-openblas: its own choice)'}, torch {seen['torch']}", file=sys.stderr)
    command = [sys.executable, "-m", "pytest", "-m", "numerics", "-p", "no:cacheprovider", *sys.argv[1:]]
    return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        print(json.dumps(report()))
        sys.exit(0)
    sys.exit(main())

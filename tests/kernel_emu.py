"""Build a kernels/*.cu file with g++ under kernels/cuda_emu.h and call its kernels from Python.

    lib = library("swiglu")
    launch(lib, "swiglu_forward_f32", grid=(4,), block=(128,), args=(a, u, y, n), reverse=False)

The same CUDA source that nvcc compiles runs on the CPU: every CUDA thread is scheduled
deterministically up to its next barrier (see cuda_emu.h), in thread order or, with
reverse=True, in reverse order. Arguments: NumPy arrays (C-contiguous) are passed as pointers,
Python ints as C `long`, Python floats as C `float` (kernel signatures use those types).
Builds are cached under build/emu/, keyed by a hash of the sources and flags.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
BUILD = ROOT / "build" / "emu"
FLAGS = ["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unused-function",
         f"-I{KERNELS}", "-include", str(KERNELS / "cuda_emu.h"), "-x", "c++"]


@functools.lru_cache(maxsize=None)
def library(name, plant=None):
    """The emulation build of kernels/NAME.cu. `plant=(old, new)` builds it with the source text
    `old` replaced by `new` (exactly once): a planted bug, to show that the tests catch it."""
    text = (KERNELS / f"{name}.cu").read_text()
    if plant:
        if text.count(plant[0]) != 1:
            raise ValueError(f"planted bug: {plant[0]!r} occurs {text.count(plant[0])} times in {name}.cu")
        text = text.replace(*plant)
    digest = hashlib.sha256(text.encode())
    for part in [*sorted(KERNELS.glob("*.h")), *sorted(KERNELS.glob("*.cuh"))]:
        digest.update(part.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    so = BUILD / f"{name}-{digest.hexdigest()[:16]}.so"
    if not so.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        src, tmp = so.with_suffix(".cu"), so.with_suffix(".tmp")
        src.write_text(text)
        out = subprocess.run(["g++", *FLAGS, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"g++ failed on {name}.cu:\n{out.stderr}")
        tmp.rename(so)
    return ctypes.CDLL(str(so))


def _c(arg):
    if isinstance(arg, np.ndarray):
        if not arg.flags.c_contiguous:
            raise ValueError("kernel arguments must be C-contiguous arrays")
        return ctypes.c_void_p(arg.ctypes.data)
    if isinstance(arg, (bool, np.bool_)):
        raise TypeError("pass flags as ints")
    if isinstance(arg, (int, np.integer)):
        return ctypes.c_long(int(arg))
    if isinstance(arg, (float, np.floating)):
        return ctypes.c_float(float(arg))
    raise TypeError(f"unsupported kernel argument {type(arg).__name__}")


def launch(lib, kernel, grid, block, args, reverse=False):
    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    fn = getattr(lib, f"emu_{kernel}")
    fn.restype = None
    fn(*(ctypes.c_uint(v) for v in grid + block), ctypes.c_int(int(reverse)), *(_c(a) for a in args))


def launcher(reverse=False, plant=None, planted_in=None, host_pointers=False):
    """A `launch(source, kernel, grid, block, args)` for minitrain.gpu's launch functions that
    runs the kernel on the CPU; with MINITRAIN_KERNEL_DEVICE=gpu (tools/gpu_check.sh), on the GPU.
    `plant=(old, new)` runs the emulation build with that planted bug (see `library`), always on
    the CPU: in every source launched, or only in the source `planted_in`. `host_pointers`: the
    arguments carry host addresses (the multi-tensor tables of adamw.cu and grad_norm.cu), which the
    GPU route cannot map (it copies arrays, not what an address points into): always on the CPU;
    tests/test_gpu.py runs those kernels on the device through the optimizer."""
    if os.environ.get("MINITRAIN_KERNEL_DEVICE") == "gpu" and plant is None and not host_pointers:
        return _on_gpu

    def run(source, kernel, grid, block, args):
        launch(library(source, plant if planted_in in (None, source) else None), kernel, grid, block, args, reverse)
    return run


def _root(a):
    """The NumPy array that owns a's memory (a guarded buffer, when a test made one)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _on_gpu(source, kernel, grid, block, args):
    """Run the real kernel on the GPU on device copies of the arguments' whole buffers: each host
    array's owner (with the guard regions the tests put around an output) goes to the device
    once, the kernel gets a view at the same byte offset, and every owner comes back in place, so
    the tests' guard checks see what the kernel wrote on the device, and two host views of one
    buffer stay one device buffer (an in-place kernel, y = x). With MINITRAIN_CUPY_POOL=0
    (tools/gpu_check.sh's compute-sanitizer pass) CuPy's memory pool is off: every buffer is its
    own cudaMalloc, whose end memcheck watches."""
    import cupy

    from minitrain.gpu.runtime import launch as gpu_launch

    if os.environ.get("MINITRAIN_CUPY_POOL") == "0":
        cupy.cuda.set_allocator(None)
    owners = {}  # id(host owner) -> (host owner, device copy)
    device = []
    for a in args:
        if not isinstance(a, np.ndarray):
            device.append(a)
            continue
        root = _root(a)
        if not root.flags.c_contiguous:
            raise ValueError("kernel arguments must live in C-contiguous buffers")
        if id(root) not in owners:
            owners[id(root)] = (root, cupy.asarray(root))
        offset = a.ctypes.data - root.ctypes.data
        flat = owners[id(root)][1].reshape(-1).view(cupy.uint8)
        device.append(flat[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape))
    gpu_launch(source, kernel, grid, block, device)
    for root, copy in owners.values():
        if root.flags.writeable:
            root[...] = copy.get()

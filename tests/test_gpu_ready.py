"""What the lent GPU machine needs of the code, checked on the CPU (issue 25): the training
command imports and runs without gguf-py (that machine has none), ..."""

import subprocess
import sys

import numpy as np

WITHOUT_GGUF = """
import runpy, sys
sys.modules["gguf"] = None  # any `import gguf` now raises ImportError
import minitrain.train  # noqa: F401
sys.argv = ["minitrain", *sys.argv[1:]]
runpy.run_module("minitrain", run_name="__main__")
"""


def test_pretrain_runs_without_gguf(tmp_path):
    np.random.default_rng(0).integers(0, 256, 2000, dtype="<u4").tofile(tmp_path / "tokens.bin")
    out = subprocess.run([sys.executable, "-c", WITHOUT_GGUF, "pretrain", "--data", str(tmp_path / "tokens.bin"),
                          "--arch", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--steps", "2",
                          "--val-windows", "2", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "final.apr").is_file()


def test_kernel_options_follow_the_headers(tmp_path, monkeypatch):
    """CuPy keys its kernel cache by source text and options only: an edit of a header must change
    the options, or a stale binary would be reused."""
    from minitrain.gpu import runtime

    for header in runtime.KERNELS.glob("*.cuh"):
        (tmp_path / header.name).write_bytes(header.read_bytes())
    monkeypatch.setattr(runtime, "KERNELS", tmp_path)
    before = runtime.options()
    with open(tmp_path / "common.cuh", "a") as f:
        f.write("\n// edited\n")
    assert runtime.options() != before


class _DeviceArray(np.ndarray):
    """A stand-in for a CuPy array: its own memory, and get() copies it back to the host."""

    def get(self):
        return np.array(self)


def _standin_cupy():
    import types

    return types.SimpleNamespace(asarray=lambda a: np.array(a).view(_DeviceArray), uint8=np.uint8,
                                 cuda=types.SimpleNamespace(set_allocator=lambda allocator: None))


def test_gpu_route_of_the_kernel_tests_keeps_guards_and_aliases(monkeypatch):
    """kernel_emu's GPU route (MINITRAIN_KERNEL_DEVICE=gpu), with CuPy and the launch stood in for
    (device copies, kernels run by the emulation on them): each buffer goes over whole, guard
    regions included, so a write past an output shows in the test's guard check; a kernel called
    in place (rope, y = x) writes the one buffer both names share."""
    import kernel_emu
    import test_kernels_matmul as tm
    from minitrain.gpu import fused, runtime

    plant = None

    def device_launch(source, kernel, grid, block, args):
        assert all(isinstance(a, _DeviceArray) for a in args if isinstance(a, np.ndarray)), "a host array reached the kernel"
        kernel_emu.launch(kernel_emu.library(source, plant), kernel, grid, block, args)

    monkeypatch.setitem(sys.modules, "cupy", _standin_cupy())
    monkeypatch.setattr(runtime, "launch", device_launch)
    results, guards = tm.backward(kernel_emu._on_gpu, tm.CASES[0], "f32")
    assert guards and all(tm.close(got, want, rtol) for _, got, want, rtol in results)
    plant = ("row < M && col < P", "row <= M && col < P")  # writes one row past dX and dW
    _, guards = tm.backward(kernel_emu._on_gpu, tm.CASES[0], "f32")
    assert not guards, "a write past the end of an output went unseen"
    plant = None
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 8)).astype(np.float32)
    cos, sin = np.cos(np.ones((3, 4), np.float32)), np.sin(np.ones((3, 4), np.float32))
    want = x.copy()
    fused.rope_forward(kernel_emu.launcher(), want, cos, sin, want)  # the emulation, on the host
    fused.rope_forward(kernel_emu._on_gpu, x, cos, sin, x)
    assert x.tobytes() == want.tobytes()

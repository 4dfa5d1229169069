"""What the lent GPU machine needs of the code, checked on the CPU (issue 25): the training
command imports and runs without gguf-py (that machine has none), ..."""

import subprocess
import sys

import numpy as np
import pytest

from minitrain.config import ModelConfig

WITHOUT_GGUF = """
import runpy, sys
sys.modules["gguf"] = None  # any `import gguf` now raises ImportError
import minitrain.setup_run  # noqa: F401
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


SMALL = ModelConfig(family="qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=64, intermediate_size=96, vocab_size=256, max_position_embeddings=64, rope_theta=1e6,
                    rms_norm_eps=1e-6, tie_word_embeddings=True)  # head_dim 64: the attention kernel runs


@pytest.mark.parametrize("case", ["plain", "grad-accum, lora and a teacher", "bf16"])
def test_a_training_step_on_the_gpu_path_reads_two_values_from_the_device(case, tmp_path, monkeypatch):
    """One training step on the GPU path (CuPy stood in for by tests/cupy_standin.py, the kernels
    by their CPU emulation, cuBLAS's bf16 GEMMs by the stand-in's) moves two things to the host: the
    step's losses and the gradient norm's slice sums; with grad-accum, LoRA adapters (dropout masks
    go up) and a teacher (its two loss terms come with the losses) too, and in bf16. Nothing else
    waits for the device: token ids are checked on the host."""
    import cupy_standin
    from kernel_emu import launcher

    from minitrain import backend, setup_run
    from minitrain.formats.apr import apr_tensors, write_apr
    from minitrain.formats.apr_meta import model_metadata
    from minitrain.gpu import gemm
    from minitrain.model import Model

    model = Model.from_scratch(SMALL, seed=0)
    write_apr(tmp_path / "small.apr", apr_tensors(SMALL, {n: t.data for n, t in model.params.items()}),
              model_metadata(SMALL, model.num_parameters()))
    np.random.default_rng(0).integers(0, 256, 20 * 17, dtype="<u4").tofile(tmp_path / "tokens.bin")
    options = dict(init=str(tmp_path / "small.apr"), data=str(tmp_path / "tokens.bin"), out=str(tmp_path / "run"),
                   seq_len=16, batch_size=2, steps=3, val_windows=2, seed=1,
                   **{"plain": {}, "bf16": {"dtype": "bf16"},
                      "grad-accum, lora and a teacher": {"grad_accum": 2, "lora_rank": 4, "lora_dropout": 0.1,
                                                         "teacher": str(tmp_path / "small.apr")}}[case])
    xp = cupy_standin.module()

    def gpu(name):
        monkeypatch.setattr(backend, "xp", xp)
        monkeypatch.setattr(backend, "launch", launcher())
        return "cuda"

    monkeypatch.setattr(setup_run, "use_device", gpu)
    monkeypatch.setattr(gemm, "_gemm_ex", cupy_standin.gemm_ex)
    monkeypatch.setattr(backend, "dtype", backend.dtype)  # Run sets the precision: restored after the test
    monkeypatch.setattr(backend, "bf16", backend.bf16)
    run = setup_run.build(*setup_run.configure(options))
    assert isinstance(next(iter(run.trained)).data, cupy_standin.DeviceArray)
    cupy_standin.TRANSFERS.clear()
    loss = run.train_step(0)[0]  # the first step, one-time work included
    assert len(cupy_standin.TRANSFERS) <= 2, cupy_standin.TRANSFERS
    assert 1.0 < loss < 10.0  # a working step (ln 256 = 5.5 for a fresh model), not zeros


def test_the_backends_casts_on_the_gpu_path_are_its_numpy_casts(monkeypatch):
    """backend.to_bf16, from_bf16, add_bf16 and add_bias_bf16 run kernels/cast.cu on the GPU (CuPy
    stood in for, the kernel emulated): the same bits as their NumPy expressions, a broadcast sum
    included."""
    import cupy_standin
    from kernel_emu import launcher

    from minitrain import backend

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 70)) * 100).astype(np.float32)
    a, b, row = backend.to_bf16(x), backend.to_bf16(x[::-1] / 3), backend.to_bf16(x[0])
    casts = lambda: [backend.to_bf16(x), backend.from_bf16(a), backend.add_bf16(a, b),  # noqa: E731
                     backend.add_bf16(a, row), backend.add_bias_bf16(x, x[1])]
    want = casts()
    monkeypatch.setattr(backend, "xp", cupy_standin.module())
    monkeypatch.setattr(backend, "launch", launcher())
    got = casts()
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.view(np.ndarray).tobytes() == w.tobytes()

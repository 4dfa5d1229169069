"""On a real GPU (skipped without one): a tiny model's loss and every gradient with --device cuda
(CuPy + the kernels of kernels/) against the CPU path, with both matmul-backward routes, in fp32
and in bf16 mixed precision (where cuBLAS GemmEx runs the bf16 matmuls); --recompute's bits.
tools/gpu_check.sh runs this file and the kernel tests on the device."""

import importlib.util

import numpy as np
import pytest

from minitrain import backend
from minitrain.config import ModelConfig
from minitrain.model import Model


def _gpu():
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _gpu(), reason="no CUDA device")

CFG = ModelConfig(family="qwen2", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=64, intermediate_size=512, vocab_size=1000, max_position_embeddings=512,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


def loss_and_grads(device, matmul_backward="cublas", precision="fp32", recompute="none"):
    backend.use(device)
    backend.matmul_backward = matmul_backward
    try:
        with backend.precision(precision):
            model = Model.from_scratch(CFG, seed=0)
            model.recompute = recompute
            ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 130))
            loss = model.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            return float(loss.data), {n: backend.to_numpy(t.grad) for n, t in model.params.items()}
    finally:
        backend.use("cpu")
        backend.matmul_backward = "cublas"


@pytest.mark.parametrize("route", backend.MATMUL_BACKWARD)
def test_tiny_model_on_the_gpu_matches_the_cpu(route):
    cpu_loss, cpu_grads = loss_and_grads("cpu")
    gpu_loss, gpu_grads = loss_and_grads("cuda", route)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    for name, g in cpu_grads.items():
        np.testing.assert_allclose(gpu_grads[name], g, rtol=1e-3, atol=1e-4 * float(np.abs(g).max()), err_msg=name)


@pytest.mark.parametrize("route", backend.MATMUL_BACKWARD)
def test_tiny_model_in_bf16_on_the_gpu_tracks_fp32(route):
    cpu_loss, cpu_grads = loss_and_grads("cpu")
    gpu_loss, gpu_grads = loss_and_grads("cuda", route, "bf16")
    assert gpu_loss == pytest.approx(cpu_loss, rel=5e-3)
    for name, g in cpu_grads.items():
        assert gpu_grads[name].dtype == np.float32, name
        assert np.linalg.norm(gpu_grads[name] - g) < 5e-2 * np.linalg.norm(g), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_gpu_runs_give_the_same_bits(precision):
    """No atomics anywhere in a step (the embedding's backward included: kernels/embedding.cu),
    so the loss and every gradient repeat bit for bit on one GPU."""
    first, second = (loss_and_grads("cuda", precision=precision) for _ in range(2))
    assert first[0] == second[0]
    for name, g in first[1].items():
        assert g.tobytes() == second[1][name].tobytes(), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recomputed_layers_give_the_same_bits_on_the_gpu(precision):
    """--recompute layer through the kernels: the forward again, the same bits."""
    kept, recomputed = (loss_and_grads("cuda", precision=precision, recompute=r) for r in ("none", "layer"))
    assert kept[0] == recomputed[0]
    for name, g in kept[1].items():
        assert g.tobytes() == recomputed[1][name].tobytes(), name


def test_cupy_compiles_our_kernels_with_subnormals_flushed():
    """CuPy appends -ftz=true to NVRTC's options (minitrain/gpu/runtime.py): an fp32 subnormal
    becomes 0 in a kernel's arithmetic, so the kernels match NumPy bit for bit on normal numbers
    only. If this fails, CuPy stopped flushing: update runtime.py's docstring and kernels/README.md."""
    import cupy

    from minitrain.gpu import runtime

    module = cupy.RawModule(code='extern "C" __global__ void twice(const float* x, float* y) { y[0] = x[0] * 2.0f; }',
                            options=runtime.options())
    x, y = cupy.asarray(np.array([1e-40], np.float32)), cupy.zeros(1, np.float32)
    module.get_function("twice")((1,), (1,), (x, y))
    assert float(y[0]) == 0.0 and np.float32(1e-40) * 2 != 0


def test_adamw_and_the_gradient_norm_on_the_gpu_are_the_cpus():
    """kernels/adamw.cu and grad_norm.cu run from tables of device addresses, one launch each for
    every parameter (the kernel tests run them in the emulation only): two AdamW steps and the
    global gradient norm on the GPU are the CPU's bits (normal numbers: CuPy flushes subnormals)."""
    from minitrain.autograd import Tensor
    from minitrain.optim import AdamW, global_grad_norm

    rng = np.random.default_rng(0)
    shapes = [(300, 70), (70,), (5,), ((1 << 17) + 3,)]  # a tensor past two 65 536-element chunks
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]

    def run(device):
        backend.use(device)
        try:
            params = [Tensor(backend.xp.asarray(a), requires_grad=True, name=f"p{i}") for i, a in enumerate(start)]
            opt, norms = AdamW(params, lr=1e-2, weight_decay=0.1), []
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = backend.xp.asarray(g)
                norms.append(global_grad_norm(params))
                opt.step()
            return norms, [backend.to_numpy(p.data) for p in params]
        finally:
            backend.use("cpu")

    (cpu_norms, cpu), (gpu_norms, gpu) = run("cpu"), run("cuda")
    assert cpu_norms == gpu_norms
    for want, got in zip(cpu, gpu):
        assert got.tobytes() == want.tobytes()

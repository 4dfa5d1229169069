#!/usr/bin/env bash
# The one script for a lent GPU machine: the device tool runs `bash tools/gpu_check.sh` with
# timeout_s 420. It installs nothing: the machine's image has CuPy (CUDA 13), torch, transformers,
# pytest, numpy, safetensors, tokenizers and click, and minitrain runs from this checkout
# (PYTHONPATH). Everything goes to $OUT as it happens (build/gpu_out without the device tool):
#   gpu_check.log    this whole log, every step's output
#   bench_gpu.json   every benchmark row, written as each is measured (tools/bench_gpu.py)
# Steps in order of what matters most, each under its own cap (timeout -k 10: a hung step is
# killed and the next one runs). The device call's timeout_s (390) ends the run whatever is left,
# so a run leaves room for a second one in 15 minutes of device time (docs/performance.md,
# "The GPU check"); every step before the cut has written its output already:
#   kernel tests with the kernels on the GPU (MINITRAIN_KERNEL_DEVICE=gpu: the same cases and
#     float64 references as the CPU emulation; planted-bug tests stay on the emulation)        70 s
#   a tiny model's loss and every gradient on the GPU vs the CPU path (tests/test_gpu.py)       40 s
#   bench (tools/bench_gpu.py, one part per process): matmul peaks; the Qwen2.5-0.5B step at
#     8 x 1024, minitrain bf16 and transformers bf16; attention kernels vs torch SDPA; table   140 s
#   the single-GPU NCCL path (tools/nccl_check.py), where mpi4py loads an MPI library           30 s
#   compute-sanitizer memcheck over the kernel tests, CuPy's memory pool off                    60 s
#   bench, if time is left: minitrain bf16 with the kernels' matmul backward, both fp32 steps  135 s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BENCH_JSON="$OUT/bench_gpu.json"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # commands run as root there
status=0
step() {  # step NAME CAP_SECONDS COMMAND...: run it under its cap, log its time and exit status
    local name=$1 cap=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (cap ${cap} s) $(date -u +%H:%M:%S)"
    timeout -k 10 "$cap" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    [ $rc -eq 0 ] || status=1
}
KERNEL_TESTS=(tests/test_kernels_emu.py tests/test_kernels_attention.py tests/test_kernels_matmul.py
              tests/test_kernels_fused.py)
BENCH=(python3 tools/bench_gpu.py)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import cupy, numpy, torch, transformers; print('cupy', cupy.__version__, 'numpy', numpy.__version__,
'torch', torch.__version__, 'transformers', transformers.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())"
step "kernel tests on the GPU" 70 env MINITRAIN_KERNEL_DEVICE=gpu python3 -m pytest -q -p no:cacheprovider \
    -k "not planted" "${KERNEL_TESTS[@]}"
step "tiny model, GPU vs CPU" 40 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step "bench: matmul peaks" 20 "${BENCH[@]}" peak
step "bench: minitrain bf16 step (cuBLAS backward)" 45 "${BENCH[@]}" step minitrain bf16 --route cublas
step "bench: transformers bf16 step" 35 "${BENCH[@]}" step hf bf16
step "bench: attention" 30 "${BENCH[@]}" attention
step "bench: table" 10 "${BENCH[@]}" table
if python3 -c "from mpi4py import MPI" 2>/dev/null; then
    step "NCCL, one rank" 30 python3 tools/nccl_check.py
else
    echo "=== NCCL check: not run: $(python3 -c 'from mpi4py import MPI' 2>&1 | tail -1)"
fi
if command -v compute-sanitizer >/dev/null; then
    step "compute-sanitizer memcheck, kernel tests" 60 env MINITRAIN_KERNEL_DEVICE=gpu MINITRAIN_CUPY_POOL=0 \
        compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
        python3 -m pytest -q -p no:cacheprovider -x -k "not planted" "${KERNEL_TESTS[@]}"
else
    echo "=== compute-sanitizer: not found"
fi
step "bench: minitrain bf16 step (kernels backward)" 45 "${BENCH[@]}" step minitrain bf16 --route kernels
step "bench: minitrain fp32 step" 45 "${BENCH[@]}" step minitrain fp32
step "bench: transformers fp32 step" 35 "${BENCH[@]}" step hf fp32
step "bench: table" 10 "${BENCH[@]}" table
echo "=== gpu_check: exit $status"
exit $status

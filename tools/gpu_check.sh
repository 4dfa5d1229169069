#!/usr/bin/env bash
# The one script for a lent GPU machine: the device tool runs `bash tools/gpu_check.sh` with
# timeout_s 420. It installs nothing: the machine's image has CuPy (CUDA 13), torch, transformers,
# pytest, numpy, safetensors, tokenizers, click and mpi4py, and minitrain runs from this checkout
# (PYTHONPATH). Everything goes to $OUT as it happens (build/gpu_out without the device tool):
#   gpu_check.log    this whole log, every step's output
#   bench_gpu.json   every benchmark row, written as each is measured (tools/bench_gpu.py)
# `bash tools/gpu_check.sh KEY...` runs only the steps named (a rerun of what failed): kernels,
# tiny, peak, bf16, hf-bf16, attention, table, profile, nccl, sanitizer, bf16-kernels, fp32, hf-fp32.
# Steps in order of what matters most, each under its own cap (timeout -k 10: a hung step is
# killed and the next one runs); the device call's timeout_s ends the run whatever is left, and
# every step before the cut has written its output already. On the H200 (2026-12-04) the whole
# script took 226 s without the profiles, 290 s with them, plus about 30 s to start the machine:
# a second, partial run fits in 15 minutes of device time (docs/performance.md, "The GPU check").
#                                                                                   cap    took
#   kernels    the kernel tests with the kernels on the GPU (MINITRAIN_KERNEL_DEVICE=gpu:
#              the CPU emulation's cases and float64 references; planted bugs stay there)  70 s   17 s
#   tiny       a tiny model's loss and gradients on the GPU vs the CPU, two runs' bits     40 s   16 s
#   peak, bf16, hf-bf16, attention, table: bench (tools/bench_gpu.py, one process each):
#              matmul peaks; the Qwen2.5-0.5B step at 8 x 1024, minitrain and
#              transformers in bf16; attention kernels vs torch SDPA (hd 64, 128)        190 s   76 s
#   profile    both bf16 steps kernel by kernel (tools/gpu_profile.py)                     90 s   50 s
#   nccl       the single-GPU NCCL path (tools/nccl_check.py)                              30 s    3 s
#   sanitizer  compute-sanitizer memcheck over the kernel tests, CuPy's pool off           60 s    4 s
#   bf16-kernels, fp32, hf-fp32: minitrain bf16 with the kernels' matmul backward, and
#              both fp32 steps                                                           165 s   97 s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BENCH_JSON="$OUT/bench_gpu.json"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # commands run as root there
status=0
ONLY=" $* "  # step keys given on the command line: run only those (a rerun), else every step
step() {  # step KEY NAME CAP_SECONDS COMMAND...: run it under its cap, log its time and exit status
    local key=$1 name=$2 cap=$3 start=$SECONDS rc
    shift 3
    [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $key "* ]] || return 0
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
step kernels "kernel tests on the GPU" 70 env MINITRAIN_KERNEL_DEVICE=gpu python3 -m pytest -q -p no:cacheprovider \
    -k "not planted" "${KERNEL_TESTS[@]}"
step tiny "tiny model, GPU vs CPU" 40 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step peak "bench: matmul peaks" 20 "${BENCH[@]}" peak
step bf16 "bench: minitrain bf16 step (cuBLAS backward)" 45 "${BENCH[@]}" step minitrain bf16 --route cublas
step hf-bf16 "bench: transformers bf16 step" 60 "${BENCH[@]}" step hf bf16
step attention "bench: attention" 45 "${BENCH[@]}" attention
step table "bench: table" 10 "${BENCH[@]}" table
step profile "profile: minitrain bf16 step, kernel by kernel" 45 python3 tools/gpu_profile.py minitrain bf16
step profile "profile: transformers bf16 step, kernel by kernel" 45 python3 tools/gpu_profile.py hf bf16
if python3 -c "from mpi4py import MPI" 2>/dev/null; then
    step nccl "NCCL, one rank" 30 python3 tools/nccl_check.py
elif [ "$ONLY" = "  " ] || [[ "$ONLY" == *" nccl "* ]]; then
    echo "=== NCCL check: not run: $(python3 -c 'from mpi4py import MPI' 2>&1 | tail -1)"
fi
if command -v compute-sanitizer >/dev/null; then
    step sanitizer "compute-sanitizer memcheck, kernel tests" 60 env MINITRAIN_KERNEL_DEVICE=gpu MINITRAIN_CUPY_POOL=0 \
        compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
        python3 -m pytest -q -p no:cacheprovider -x -k "not planted" "${KERNEL_TESTS[@]}"
elif [ "$ONLY" = "  " ] || [[ "$ONLY" == *" sanitizer "* ]]; then
    echo "=== compute-sanitizer: not found"
fi
step bf16-kernels "bench: minitrain bf16 step (kernels backward)" 60 "${BENCH[@]}" step minitrain bf16 --route kernels
step fp32 "bench: minitrain fp32 step" 45 "${BENCH[@]}" step minitrain fp32
step hf-fp32 "bench: transformers fp32 step" 60 "${BENCH[@]}" step hf fp32
step table "bench: table" 10 "${BENCH[@]}" table
echo "=== gpu_check: exit $status"
exit $status

#!/usr/bin/env bash
# The one script for a lent GPU machine (device tool: run `bash tools/gpu_check.sh`, timeout 600).
# Installs nothing: the machine's image has CuPy (CUDA 13), torch, transformers, pytest, numpy,
# safetensors, tokenizers and click, and minitrain runs from this checkout (PYTHONPATH).
#   1. every kernel test file with the kernels on the GPU (MINITRAIN_KERNEL_DEVICE=gpu: the same
#      cases and float64 references as the CPU emulation; planted-bug tests stay on the emulation)
#   2. a tiny model's loss and every gradient on the GPU vs the CPU path (tests/test_gpu.py)
#   3. the single-GPU NCCL path (tools/nccl_check.py), where the image has mpi4py
#   4. the benchmark (tools/bench_gpu.py), whose table is printed last
# Budget: well under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, torch, transformers; print('cupy', cupy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
MINITRAIN_KERNEL_DEVICE=gpu timeout 240 python3 -m pytest -q -p no:cacheprovider -k "not planted" \
    tests/test_kernels_emu.py tests/test_kernels_attention.py tests/test_kernels_matmul.py \
    tests/test_kernels_fused.py tests/test_gpu.py || status=1
if python3 -c "import mpi4py" 2>/dev/null; then
    timeout 60 python3 tools/nccl_check.py || status=1
else
    echo "NCCL check: not run (no mpi4py on this machine)"
fi
timeout 240 python3 tools/bench_gpu.py || status=1
exit $status

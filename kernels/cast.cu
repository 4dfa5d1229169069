// cast.cu: the bf16 glue of mixed precision in one pass each: fp32 -> bf16, bf16 -> fp32, and the
// sum of two bf16 tensors rounded once (the residual adds and gradient sums of a bf16 run).
//
//   to_bf16:   y = round_to_nearest_even(x)      (store() in common.cuh: NaN stays a quiet NaN)
//   from_bf16: y = x widened, exactly            (a bf16 is the top half of an fp32)
//   add_bf16:  y = round(widen(a) + widen(b))    (one fp32 add, one rounding)
//   add_bias_bf16: y = round(acc + b[column])    (a bf16 linear's fp32 GEMM product, its bias added,
//                                                rounded once: one pass instead of an add and a cast)
//
// The same bits as minitrain.backend's NumPy expressions for every input, but for add_bf16 on the
// GPU, where an fp32 sum below the normal range flushes to zero (CuPy compiles with -ftz=true).
// Written in CuPy, each cast was about 11 generated kernels (shifts, masks, a where, copies), each
// a pass over the tensor: half the device time of a Qwen2.5-0.5B bf16 step (docs/performance.md).
// Here one grid-stride pass reads 4 (or 2 + 2) bytes and writes 2 (or 4) per element.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        store(y, i, x[i]);
}
EMU_EXPORT(cast_f32_to_bf16, (const float* x, bf16* y, long n), (x, y, n))

extern "C" __global__ void cast_bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = to_f32(x[i]);
}
EMU_EXPORT(cast_bf16_to_f32, (const bf16* x, float* y, long n), (x, y, n))

// y may be a or b (an in-place sum).
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        store(y, i, to_f32(a[i]) + to_f32(b[i]));
}
EMU_EXPORT(add_bf16, (const bf16* a, const bf16* b, bf16* y, long n), (a, b, y, n))

// acc (rows, cols) fp32, b (cols,) fp32 -> y (rows, cols) bf16; n = rows * cols.
extern "C" __global__ void add_bias_bf16(const float* __restrict__ acc, const float* __restrict__ b,
                                         bf16* __restrict__ y, long n, long cols) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        store(y, i, acc[i] + b[i % cols]);
}
EMU_EXPORT(add_bias_bf16, (const float* acc, const float* b, bf16* y, long n, long cols), (acc, b, y, n, cols))

// adamw.cu: one AdamW step, in place, on one flat fp32 parameter (fp32 master weights p, grad g,
// moments m and v), with exactly minitrain.optim.AdamW's arithmetic, operation by operation:
//
//   p <- p * decay                               decay = 1 - lr wd  (1 where no decay applies)
//   m <- b1 m + (1 - b1) g ;  v <- b2 v + ((1 - b2) g) g
//   p <- p - (step_size m) / (sqrt(v) / bc2_sqrt + eps)
//                                step_size = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t)
//
// (No backward: this is the optimizer.) Every scalar is an fp32 parameter that the caller rounds
// from its float64 value (decay, 1 - b1, 1 - b2 included), as NumPy does when it combines a
// Python float with an fp32 array; each operation is rounded on its own (_rn intrinsics: nvcc
// must not contract a multiply and an add into one fma), so the result is bit for bit the NumPy
// one. adamw_step_bf16 also writes the updated weights rounded to bf16, the copy that bf16
// compute reads.
//
// Elementwise: one thread per element in a grid-stride loop. Memory traffic per element: reads
// p, g, m, v and writes p, m, v (28 bytes), plus 2 bytes for the bf16 copy.
#include "common.cuh"

// p_bf16: the bf16 copy to write, or null.
__device__ void adamw_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                           float* __restrict__ v, bf16* __restrict__ p_bf16, long n, float decay, float b1,
                           float one_minus_b1, float b2, float one_minus_b2, float eps, float step_size,
                           float bc2_sqrt) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(one_minus_b1, gi));
        const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        const float pi = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(step_size, mi), denom));
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (p_bf16) store(p_bf16, i, pi);
    }
}

extern "C" __global__ void adamw_step_f32(float* p, const float* g, float* m, float* v, long n, float decay,
                                          float b1, float one_minus_b1, float b2, float one_minus_b2, float eps,
                                          float step_size, float bc2_sqrt) {
    adamw_step(p, g, m, v, nullptr, n, decay, b1, one_minus_b1, b2, one_minus_b2, eps, step_size, bc2_sqrt);
}
EMU_EXPORT(adamw_step_f32,
           (float* p, const float* g, float* m, float* v, long n, float decay, float b1, float one_minus_b1,
            float b2, float one_minus_b2, float eps, float step_size, float bc2_sqrt),
           (p, g, m, v, n, decay, b1, one_minus_b1, b2, one_minus_b2, eps, step_size, bc2_sqrt))

extern "C" __global__ void adamw_step_bf16(float* p, const float* g, float* m, float* v, bf16* p_bf16, long n,
                                           float decay, float b1, float one_minus_b1, float b2,
                                           float one_minus_b2, float eps, float step_size, float bc2_sqrt) {
    adamw_step(p, g, m, v, p_bf16, n, decay, b1, one_minus_b1, b2, one_minus_b2, eps, step_size, bc2_sqrt);
}
EMU_EXPORT(adamw_step_bf16,
           (float* p, const float* g, float* m, float* v, bf16* p_bf16, long n, float decay, float b1,
            float one_minus_b1, float b2, float one_minus_b2, float eps, float step_size, float bc2_sqrt),
           (p, g, m, v, p_bf16, n, decay, b1, one_minus_b1, b2, one_minus_b2, eps, step_size, bc2_sqrt))

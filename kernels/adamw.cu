// adamw.cu: one AdamW step, in place, on flat fp32 parameters (fp32 master weights p, grad g,
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
// one. Where a parameter keeps a bf16 copy (what bf16 compute reads), the updated weights are
// written there too, rounded to bf16.
//
// Elementwise. Memory traffic per element: reads p, g, m, v and writes p, m, v (28 bytes), plus
// 2 bytes for the bf16 copy.
#include "common.cuh"

// One step on the elements first, first + stride, ... < n. p_bf16: the bf16 copy to write, or null.
__device__ void adamw_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                           float* __restrict__ v, bf16* __restrict__ p_bf16, long n, long first, long stride,
                           float decay, float b1, float one_minus_b1, float b2, float one_minus_b2, float eps,
                           float step_size, float bc2_sqrt) {
    for (long i = first; i < n; i += stride) {
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

// Every parameter in one launch (a model's ~300 tensors, most of them small, were ~300 launches):
// the table has a row per parameter,
//   (address of p, of g, of m, of v, of its bf16 copy or 0, length n, decays 0/1, first block)
// and each block updates one chunk of `chunk` elements of one parameter. Where a row does not
// decay, its decay factor is 1 (what 1 - lr * 0 rounds to).
extern "C" __global__ void adamw_multi(const long* __restrict__ table, long rows, long chunk, float decay, float b1,
                                       float one_minus_b1, float b2, float one_minus_b2, float eps,
                                       float step_size, float bc2_sqrt) {
    const long* row = table_row(table, 8, rows, blockIdx.x);
    const long start = (blockIdx.x - row[7]) * chunk, n = min(chunk, row[5] - start);
    adamw_step((float*)row[0] + start, (const float*)row[1] + start, (float*)row[2] + start, (float*)row[3] + start,
               row[4] ? (bf16*)row[4] + start : nullptr, n, threadIdx.x, blockDim.x, row[6] ? decay : 1.0f, b1,
               one_minus_b1, b2, one_minus_b2, eps, step_size, bc2_sqrt);
}
EMU_EXPORT(adamw_multi,
           (const long* table, long rows, long chunk, float decay, float b1, float one_minus_b1, float b2,
            float one_minus_b2, float eps, float step_size, float bc2_sqrt),
           (table, rows, chunk, decay, b1, one_minus_b1, b2, one_minus_b2, eps, step_size, bc2_sqrt))

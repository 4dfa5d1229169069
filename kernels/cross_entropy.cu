// cross_entropy.cu: softmax cross-entropy of logits z (N, V) against targets t (N,), and its
// backward. The mean over rows is the caller's (it is a sum of N floats).
//
//   lse_n = log sum_v exp(z_nv) = m + log sum_v exp(z_nv - m)  for any m; m = max_v z_nv keeps
//           every exp <= 1 (no overflow at large logits)
//   loss_n = lse_n - z_n,t_n                                        (loss, lse: (N,) fp32)
// Backward: d lse_n / d z_nv = softmax_nv = exp(z_nv - lse_n), so with scale = (upstream
// gradient) / N:
//   dz_nv = (exp(z_nv - lse_n) - [v == t_n]) scale                  (in the logits' dtype)
//
// Forward: one block per row. Each thread runs an online max and sum over its columns
// j = threadIdx.x, + blockDim.x, ...: (m, s) with s = sum exp(z - m), rescaling s when m grows;
// then the (m, s) pairs merge, (m1, s1) + (m2, s2) = (M, s1 exp(m1 - M) + s2 exp(m2 - M)),
// M = max(m1, m2), across each warp by shuffles and across warps through shared memory. One
// pass over the row: reads N V logits once, writes 2 N floats.
// Backward: grid (N, column chunks), a grid-stride loop over the row's columns; the softmax is
// rebuilt from lse, never stored. Reads N V logits, writes N V gradients, in the logits' dtype or
// (f32_bf16) fp32 logits to bf16 gradients; dlogits of the logits' dtype may be the logits
// themselves (each element is read, then written, by one thread). Math in fp32.
#include "common.cuh"

#define LOWEST -3.402823466e38f  // -FLT_MAX: an empty (m, s) = (LOWEST, 0) merges without inf - inf

// (m, s) <- (m, s) + (m2, s2): two partial sums of exp(z - m) over disjoint sets of logits.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float top = fmaxf(m, m2);
    s = s * expf(m - top) + s2 * expf(m2 - top);
    m = top;
}

template <class T>
__device__ void cross_entropy_forward(const T* __restrict__ logits, const long* __restrict__ targets,
                                      float* __restrict__ loss, float* __restrict__ lse, long V) {
    __shared__ float warp_m[32], warp_s[32];
    const long row = blockIdx.x;
    const T* z = logits + row * V;
    float m = LOWEST, s = 0.0f;
    for (long j = threadIdx.x; j < V; j += blockDim.x) {
        const float zj = to_f32(z[j]);
        if (zj > m) {
            s = s * expf(m - zj) + 1.0f;
            m = zj;
        } else {
            s += expf(zj - m);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        merge(m, s, m2, s2);
    }
    if (threadIdx.x % 32 == 0) {
        warp_m[threadIdx.x / 32] = m;
        warp_s[threadIdx.x / 32] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); w++) merge(m, s, warp_m[w], warp_s[w]);
        const float l = m + logf(s);
        lse[row] = l;
        loss[row] = l - to_f32(z[targets[row]]);
    }
}

template <class T, class D>
__device__ void cross_entropy_backward(const T* logits, const long* __restrict__ targets,
                                       const float* __restrict__ lse, D* dlogits, long V, float scale) {
    const long row = blockIdx.x, t = targets[row];
    const float l = lse[row];
    for (long v = (long)blockIdx.y * blockDim.x + threadIdx.x; v < V; v += (long)gridDim.y * blockDim.x) {
        const float p = expf(to_f32(logits[row * V + v]) - l);
        store(dlogits, row * V + v, (v == t ? p - 1.0f : p) * scale);
    }
}

#define CROSS_ENTROPY_BACKWARD(T, D, suffix)                                                                  \
    extern "C" __global__ void cross_entropy_backward_##suffix(const T* logits, const long* targets,           \
                                                               const float* lse, D* dlogits, long V,          \
                                                               float scale) {                                 \
        cross_entropy_backward(logits, targets, lse, dlogits, V, scale);                                      \
    }                                                                                                         \
    EMU_EXPORT(cross_entropy_backward_##suffix,                                                               \
               (const T* logits, const long* targets, const float* lse, D* dlogits, long V, float scale),    \
               (logits, targets, lse, dlogits, V, scale))

#define CROSS_ENTROPY(T, suffix)                                                                              \
    extern "C" __global__ void cross_entropy_forward_##suffix(const T* logits, const long* targets,            \
                                                              float* loss, float* lse, long V) {              \
        cross_entropy_forward(logits, targets, loss, lse, V);                                                 \
    }                                                                                                         \
    EMU_EXPORT(cross_entropy_forward_##suffix,                                                                \
               (const T* logits, const long* targets, float* loss, float* lse, long V),                      \
               (logits, targets, loss, lse, V))                                                               \
    CROSS_ENTROPY_BACKWARD(T, T, suffix)

CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(bf16, bf16)
// The bf16 head: fp32 logits (the loss stays fp32), the gradient written straight in bf16 for the
// two bf16 GEMMs that take it (no fp32 gradient, then a cast: one pass of N V x 6 bytes fewer).
CROSS_ENTROPY_BACKWARD(float, bf16, f32_bf16)

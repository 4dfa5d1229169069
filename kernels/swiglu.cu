// swiglu.cu: the fused SwiGLU gate of the MLP, y = silu(a) * u, and its backward.
//
//   s = sigmoid(a) = 1 / (1 + exp(-a)),  silu(a) = a s
//   da = dy * u * s (1 + a (1 - s)),     du = dy * silu(a)
//
// Elementwise over n values: one thread per element in a grid-stride loop. Memory traffic is the
// whole cost: forward reads a, u and writes y (3 values per element); backward reads dy, a, u
// and writes da, du (5), recomputing s instead of storing it. Inputs fp32 or bf16; math in fp32.
#include "common.cuh"

// Element i of y sits in row i / cols, column i % cols; its a and u (and da, du) at that row times
// `stride` plus the column: stride = cols = n for separate arrays, and for a packed (rows, 2 I)
// gate|up array (one GEMM over the concatenated weights, minitrain/ops/concat.py) cols = I,
// stride = 2 I and u = a + I.
template <class T>
__device__ void swiglu_forward(const T* __restrict__ a, const T* __restrict__ u, T* __restrict__ y, long n,
                               long cols, long stride) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long j = i / cols * stride + i % cols;
        float av = to_f32(a[j]), s = 1.0f / (1.0f + expf(-av));
        store(y, i, av * s * to_f32(u[j]));
    }
}

template <class T>
__device__ void swiglu_backward(const T* __restrict__ dy, const T* __restrict__ a, const T* __restrict__ u,
                                T* __restrict__ da, T* __restrict__ du, long n, long cols, long stride) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long j = i / cols * stride + i % cols;
        float av = to_f32(a[j]), g = to_f32(dy[i]), s = 1.0f / (1.0f + expf(-av));
        store(da, j, g * to_f32(u[j]) * s * (1.0f + av * (1.0f - s)));
        store(du, j, g * av * s);
    }
}

#define SWIGLU(T, suffix)                                                                                     \
    extern "C" __global__ void swiglu_forward_##suffix(const T* a, const T* u, T* y, long n) {               \
        swiglu_forward(a, u, y, n, n, n);                                                                     \
    }                                                                                                         \
    EMU_EXPORT(swiglu_forward_##suffix, (const T* a, const T* u, T* y, long n), (a, u, y, n))                 \
    extern "C" __global__ void swiglu_backward_##suffix(const T* dy, const T* a, const T* u, T* da, T* du,    \
                                                        long n) {                                             \
        swiglu_backward(dy, a, u, da, du, n, n, n);                                                           \
    }                                                                                                         \
    EMU_EXPORT(swiglu_backward_##suffix, (const T* dy, const T* a, const T* u, T* da, T* du, long n),         \
               (dy, a, u, da, du, n))                                                                         \
    /* gu (rows, 2 I): a = gu[:, :I], u = gu[:, I:]; y (rows, I); dgu like gu */                              \
    extern "C" __global__ void swiglu_packed_forward_##suffix(const T* gu, T* y, long n, long I) {            \
        swiglu_forward(gu, gu + I, y, n, I, 2 * I);                                                           \
    }                                                                                                         \
    EMU_EXPORT(swiglu_packed_forward_##suffix, (const T* gu, T* y, long n, long I), (gu, y, n, I))            \
    extern "C" __global__ void swiglu_packed_backward_##suffix(const T* dy, const T* gu, T* dgu, long n,       \
                                                               long I) {                                      \
        swiglu_backward(dy, gu, gu + I, dgu, dgu + I, n, I, 2 * I);                                           \
    }                                                                                                         \
    EMU_EXPORT(swiglu_packed_backward_##suffix, (const T* dy, const T* gu, T* dgu, long n, long I),           \
               (dy, gu, dgu, n, I))

SWIGLU(float, f32)
SWIGLU(bf16, bf16)

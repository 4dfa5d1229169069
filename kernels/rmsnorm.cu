// rmsnorm.cu: RMSNorm over the last axis of x (rows, H), as in Llama and Qwen2, and its backward.
//
//   r = 1 / sqrt(mean_j(x_j^2) + eps),  xhat = x r,  y = xhat w         (r saved: (rows,) fp32)
//
// In bf16, xhat is rounded to bf16 before w multiplies it (what Hugging Face does). Backward,
// with dxhat = dy w: since dr/dx_j = -r^3 x_j / H,
//   dx_j = sum_i dxhat_i (r [i == j] - x_i r^3 x_j / H) = r (dxhat_j - xhat_j mean_i(dxhat_i xhat_i))
//   dw_j += sum over rows of dy_j xhat_j                            (dw fp32, ACCUMULATED into)
//
// Parallelization: one block per row (forward), blockDim a multiple of 32 with H <= COLS *
// blockDim (so H <= 8192); each thread keeps its columns j = threadIdx.x + k blockDim (k < COLS)
// in registers (loops of constant trip count, unrolled by nvcc), so the row is read once and the
// block-wide sum is one block_sum. The backward runs a grid of `parts` blocks, each looping over
// rows blockIdx.x, blockIdx.x + parts, ...: dx row by row as above, while each thread sums
// dy xhat for its own columns in registers over the block's rows, then writes that partial dw to
// partial (parts, H), every entry (the scratch need not be zeroed). rmsnorm_dw_reduce then sums
// the partials column by column in a fixed order (no float atomics: the result is deterministic)
// and adds them to dw. __launch_bounds__(1024) holds the backward to 64 registers (no spills),
// so a 1024-thread block fits an SM's register file. Math and every reduction in fp32.
//
// Memory traffic, per element of x: forward reads x and writes y; backward reads dy and x and
// writes dx (w, r: O(H + rows)); the partials add 2 parts H floats (written once, read once),
// parts <= 512, small beside rows H at training sizes.
#include "common.cuh"

#define COLS 8         // columns per thread at most: H <= COLS * blockDim.x
#define REDUCE_ROWS 8  // rmsnorm_dw_reduce's blockDim is (32, REDUCE_ROWS)

// v rounded to T's precision (bf16: to nearest even), back in fp32.
template <class T>
__device__ __forceinline__ float round_to(float v) {
    T t[1];
    store(t, 0, v);
    return to_f32(t[0]);
}

template <class T>
__device__ void rmsnorm_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                float* __restrict__ r, long H, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    float xv[COLS], ss = 0.0f;
    for (int k = 0; k < COLS; k++) {
        const int j = threadIdx.x + k * blockDim.x;
        xv[k] = j < H ? to_f32(x[row * H + j]) : 0.0f;
        ss += xv[k] * xv[k];
    }
    float rr = 1.0f / sqrtf(block_sum(ss, scratch) / (float)H + eps);
    if (threadIdx.x == 0) r[row] = rr;
    for (int k = 0; k < COLS; k++) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < H) store(y, row * H + j, round_to<T>(xv[k] * rr) * to_f32(w[j]));
    }
}

template <class T>
__device__ void rmsnorm_backward(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                 const float* __restrict__ r, T* __restrict__ dx, float* __restrict__ partial,
                                 long rows, long H) {
    __shared__ float scratch[32];
    float wv[COLS], acc[COLS];
    for (int k = 0; k < COLS; k++) {
        const int j = threadIdx.x + k * blockDim.x;
        wv[k] = j < H ? to_f32(w[j]) : 0.0f;
        acc[k] = 0.0f;
    }
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        const float rr = r[row];
        float xh[COLS], dxh[COLS], dot = 0.0f;
        for (int k = 0; k < COLS; k++) {
            const int j = threadIdx.x + k * blockDim.x;
            float g = j < H ? to_f32(dy[row * H + j]) : 0.0f;
            xh[k] = j < H ? to_f32(x[row * H + j]) * rr : 0.0f;
            dxh[k] = g * wv[k];
            acc[k] += g * xh[k];
            dot += dxh[k] * xh[k];
        }
        const float mean = block_sum(dot, scratch) / (float)H;
        for (int k = 0; k < COLS; k++) {
            const int j = threadIdx.x + k * blockDim.x;
            if (j < H) store(dx, row * H + j, rr * (dxh[k] - xh[k] * mean));
        }
    }
    for (int k = 0; k < COLS; k++) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < H) partial[blockIdx.x * H + j] = acc[k];
    }
}

#define RMSNORM(T, suffix)                                                                                    \
    extern "C" __global__ void __launch_bounds__(1024)                                                        \
        rmsnorm_forward_##suffix(const T* x, const T* w, T* y, float* r, long H, float eps) {                 \
        rmsnorm_forward(x, w, y, r, H, eps);                                                                  \
    }                                                                                                         \
    EMU_EXPORT(rmsnorm_forward_##suffix, (const T* x, const T* w, T* y, float* r, long H, float eps),         \
               (x, w, y, r, H, eps))                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) rmsnorm_backward_##suffix(                             \
        const T* dy, const T* x, const T* w, const float* r, T* dx, float* partial, long rows, long H) {      \
        rmsnorm_backward(dy, x, w, r, dx, partial, rows, H);                                                  \
    }                                                                                                         \
    EMU_EXPORT(rmsnorm_backward_##suffix,                                                                     \
               (const T* dy, const T* x, const T* w, const float* r, T* dx, float* partial, long rows,        \
                long H),                                                                                      \
               (dy, x, w, r, dx, partial, rows, H))

RMSNORM(float, f32)
RMSNORM(bf16, bf16)

// dw[j] += sum_b partial[b, j]: blockDim (32, REDUCE_ROWS), 32 columns per block; thread (c, q)
// sums rows q, q + REDUCE_ROWS, ... of column c, then row q == 0 adds the REDUCE_ROWS sums in order.
extern "C" __global__ void rmsnorm_dw_reduce(const float* __restrict__ partial, float* __restrict__ dw,
                                             long parts, long H) {
    __shared__ float sums[REDUCE_ROWS][32];
    const long j = (long)blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (j < H)
        for (long b = threadIdx.y; b < parts; b += REDUCE_ROWS) s += partial[b * H + j];
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < H) {
        float total = 0.0f;
        for (int q = 0; q < REDUCE_ROWS; q++) total += sums[q][threadIdx.x];
        dw[j] += total;
    }
}
EMU_EXPORT(rmsnorm_dw_reduce, (const float* partial, float* dw, long parts, long H), (partial, dw, parts, H))

// rope.cu: rotary position embedding on x (B, T, nH, hd), Hugging Face "rotate_half" layout, and
// its backward.
//
// Element i < hd/2 of a head pairs with element i + hd/2 (not with i + 1); the pair at time t is
// rotated by the angle a whose cos and sin are the fp32 tables cos[t, i], sin[t, i] of (T, hd/2)
// (seq = T), or cos[b*T + t, i] of (B*T, hd/2) when each row has its own positions (seq = B*T):
//   y1 = x1 cos a - x2 sin a,   y2 = x2 cos a + x1 sin a
// A rotation is orthogonal, so the backward is the inverse rotation (a -> -a, i.e. sin -> -sin):
//   dx1 = dy1 cos a + dy2 sin a,   dx2 = dy2 cos a - dy1 sin a
// Both are rope_rotate, with the sign of sin as a parameter.
//
// Elementwise: one thread per pair (n/2 pairs) in a grid-stride loop. Each pair is read and
// written by the same thread, so y may be x itself (in place). Memory traffic: read x, write y
// (2 values per element) plus the tables, T hd floats in all, which stay in cache. x fp32 or bf16;
// math in fp32.
#include "common.cuh"

template <class T>
__device__ void rope_rotate(const T* x, const float* __restrict__ cos, const float* __restrict__ sin, T* y,
                            long n, long seq, long heads, long hd, float sign) {
    const long half = hd / 2, pairs = n / 2;
    for (long p = (long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (long)gridDim.x * blockDim.x) {
        const long i = p % half, head = p / half;  // head: the flat (b, t, h) index
        const long at = head * hd + i, table = head / heads % seq * half + i;
        const float c = cos[table], s = sign * sin[table];
        const float x1 = to_f32(x[at]), x2 = to_f32(x[at + half]);
        store(y, at, x1 * c - x2 * s);
        store(y, at + half, x2 * c + x1 * s);
    }
}

#define ROPE(T, suffix)                                                                                       \
    extern "C" __global__ void rope_forward_##suffix(const T* x, const float* cos, const float* sin, T* y,     \
                                                     long n, long seq, long heads, long hd) {                 \
        rope_rotate(x, cos, sin, y, n, seq, heads, hd, 1.0f);                                                 \
    }                                                                                                         \
    EMU_EXPORT(rope_forward_##suffix,                                                                         \
               (const T* x, const float* cos, const float* sin, T* y, long n, long seq, long heads, long hd), \
               (x, cos, sin, y, n, seq, heads, hd))                                                           \
    extern "C" __global__ void rope_backward_##suffix(const T* dy, const float* cos, const float* sin, T* dx,  \
                                                      long n, long seq, long heads, long hd) {                \
        rope_rotate(dy, cos, sin, dx, n, seq, heads, hd, -1.0f);                                              \
    }                                                                                                         \
    EMU_EXPORT(rope_backward_##suffix,                                                                        \
               (const T* dy, const float* cos, const float* sin, T* dx, long n, long seq, long heads,        \
                long hd),                                                                                     \
               (dy, cos, sin, dx, n, seq, heads, hd))

ROPE(float, f32)
ROPE(bf16, bf16)

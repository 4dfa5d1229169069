// common.cuh: what every kernel shares: bf16 as raw bits, typed loads and stores, warp reductions.
// Plain CUDA C++ with no CUDA headers, so the same source compiles with nvcc, with NVRTC, and with
// g++ under cuda_emu.h (which is included first there, by -include).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define EMU_EXPORT(...)  // ctypes entry points exist only in the CPU emulation build
#define UNROLL _Pragma("unroll")  // fully unroll: micro-tiles and their operands stay in registers
#else
#define UNROLL  // g++ (the emulation) would warn about an unknown pragma
#endif

// bfloat16 kept as its 16 raw bits, the top half of an IEEE fp32: widening is a shift, and
// narrowing rounds to nearest even (NaN stays a quiet NaN). Arithmetic is always done in fp32.
typedef unsigned short bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float((unsigned)x << 16); }

// fp32 -> bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16 bf16_bits(float v) {
    unsigned u = __float_as_uint(v);
    return (u & 0x7fffffffu) > 0x7f800000u ? (bf16)((u >> 16) | 0x40u) : (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// Two values as the two bf16 halves of a 32-bit register (lo in the low half): an mma operand.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)bf16_bits(lo) | ((unsigned)bf16_bits(hi) << 16);
}

__device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, long i, float v) { p[i] = bf16_bits(v); }

// Packed windows (several conversations one after another in a window): the first key query qi
// of batch row b sees, starts[b * T + qi], the start of qi's conversation; non-decreasing along a
// row. starts is null (the launch passes 0) when nothing is packed: every query sees from key 0.
__device__ __forceinline__ long first_key(const long* starts, long b, long T, long qi) {
    return starts && qi < T ? starts[b * T + qi] : 0;
}

// Multi-tensor launches (adamw_multi, sum_squares_multi): a table with one row of `columns` longs
// per tensor, the last column the first block of that tensor (rows in block order, the first at
// 0). The row of block b: the last whose first block is <= b, by binary search.
__device__ __forceinline__ const long* table_row(const long* table, int columns, long rows, long b) {
    long lo = 0, hi = rows - 1;
    while (lo < hi) {
        const long mid = (lo + hi + 1) / 2;
        if (table[mid * columns + columns - 1] <= b) lo = mid;
        else hi = mid - 1;
    }
    return table + lo * columns;
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// D = A B + C on the tensor cores, m16n8k16, bf16 operands, fp32 accumulation (sm_80 and later);
// the fragments' layout is written out beside the CPU emulation of it, in cuda_emu.h.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                               const float (&c)[4]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
}
#endif

// Sum / max over the 32 lanes of a warp; every lane gets the result (butterfly exchange).
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over a whole block of blockDim.x threads (a multiple of 32, at most 1024); every thread
// gets the result. `scratch` is 32 floats of shared memory; the trailing barrier makes it
// reusable by the next call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

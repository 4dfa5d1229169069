// attention_mma.cu: the causal GQA attention forward of attention.cu on the tensor cores, for bf16
// inputs: the same outputs (o, and lse in natural-log units, which attention.cu's backward reads),
// the products by mma.sync m16n8k16 (bf16 operands, fp32 accumulation). attention.cu's fp32
// forward is its simple sibling; both are checked against the same float64 reference.
//
//   S = Q K^T c (causal),  m = rowmax, P = exp2((S - m) log2 e),  O = (P V) / rowsum(P)
//
// Block = (64 query rows, head, batch), 4 warps; warp w owns rows 16w .. 16w + 15 of the tile,
// last (longest) query tiles first. The warp's Q rows are loaded once from global memory straight
// into mma A-fragments (HD / 16 k-steps of 4 registers). Per key tile of 64 at or below the
// diagonal: the block loads the K and V tiles into shared memory (16-byte copies; rows padded by
// 8 bf16 so the fragment loads of 8 rows hit distinct banks), then each warp
//   S (16 x 64)  = 8 n-tiles x HD/16 k-steps of mma, Q from registers, K^T's fragments from smem,
//   masks, takes the row maxima across the quad of lanes holding a row (two shuffles), rescales
//   its running O and row sums (online softmax), and turns P into bf16 A-fragments in registers
//   (an m16n8 result fragment is laid out as half of an m16k16 A-fragment: no shared memory),
//   O (16 x HD) += P V: HD/8 n-tiles x 4 k-steps of mma, V's fragments from smem.
// The row sums use P in fp32; P V uses P rounded to bf16, as FlashAttention-2 does.
// Two barriers per key tile; 16 KB (HD 64) or 32 KB (HD 128) of shared memory.
// Per key tile and warp: 2 x 16 x 64 x HD FMAs in 8 HD/16 + HD/8 x 4 mma instructions, against
// the CUDA-core kernel's 1 FMA per thread-instruction.
#include "common.cuh"

namespace mma_attention {

constexpr int WARPS = 4, THREADS = 32 * WARPS, BQ = 16 * WARPS, BK = 64;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
constexpr float MASKED = -1e30f;  // a score that is not there: exp2f gives 0, and no inf - inf

struct alignas(16) chunk {  // 8 bf16: one 16-byte copy
    unsigned w[4];
};

// ROWS x HD bf16 rows [row0, row0 + ROWS) of one head -> tile (pitch HD + 8); rows >= T are zero.
template <int HD>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, long row0, long T, long stride) {
    constexpr int PER_ROW = HD / 8, PITCH = HD + 8;
    for (int e = threadIdx.x; e < BK * PER_ROW; e += THREADS) {
        int r = e / PER_ROW, c = e % PER_ROW;
        chunk value = {{0u, 0u, 0u, 0u}};
        if (row0 + r < T) value = *reinterpret_cast<const chunk*>(src + (row0 + r) * stride + 8 * c);
        *reinterpret_cast<chunk*>(tile + r * PITCH + 8 * c) = value;
    }
}

// The 32-bit word holding elements (r, c) and (r, c + 1) of a pitch-(HD + 8) tile (c even).
template <int HD>
__device__ __forceinline__ unsigned pair(const bf16* tile, int r, int c) {
    return *reinterpret_cast<const unsigned*>(tile + r * (HD + 8) + c);
}

template <int HD>
__device__ void forward(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                        bf16* __restrict__ o, float* __restrict__ lse, long T, long nH, long nKV) {
    constexpr int KS = HD / 16, NT = HD / 8, PITCH = HD + 8;
    alignas(16) __shared__ bf16 ks[BK * PITCH];
    alignas(16) __shared__ bf16 vs[BK * PITCH];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const long q0 = (long)(gridDim.x - 1 - blockIdx.x) * BQ, h = blockIdx.y, b = blockIdx.z;
    const long kvh = h / (nH / nKV), qstride = nH * HD, kstride = nKV * HD;
    const long row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};  // this lane's two query rows
    const bf16* qb = q + (b * T * nH + h) * HD;
    const bf16* kb = k + (b * T * nKV + kvh) * HD;
    const bf16* vb = v + (b * T * nKV + kvh) * HD;
    const float scale = LOG2E / sqrtf((float)HD);  // scores in log2 units, for exp2f

    unsigned qa[KS][4];  // this warp's Q rows as A-fragments
    UNROLL for (int s = 0; s < KS; s++)
        UNROLL for (int r = 0; r < 4; r++) {
            long i = row[r % 2];
            int c = 16 * s + 2 * t + 8 * (r / 2);
            qa[s][r] = i < T ? *reinterpret_cast<const unsigned*>(qb + i * qstride + c) : 0u;
        }
    float acc[NT][4] = {}, m[2] = {MASKED, MASKED}, l[2] = {0.0f, 0.0f};
    const long q_end = q0 + BQ < T ? q0 + BQ : T;  // one past this tile's last query row
    for (long k0 = 0; k0 < q_end; k0 += BK) {  // key tiles at or below the diagonal
        load_tile<HD>(ks, kb, k0, T, kstride);
        load_tile<HD>(vs, vb, k0, T, kstride);
        __syncthreads();  // the K and V tiles are loaded
        float s[8][4] = {};  // S: 8 n-tiles of 8 keys
        UNROLL for (int n = 0; n < 8; n++)
            UNROLL for (int kk = 0; kk < KS; kk++) {
                const unsigned kb2[2] = {pair<HD>(ks, 8 * n + g, 16 * kk + 2 * t), pair<HD>(ks, 8 * n + g, 16 * kk + 8 + 2 * t)};
                mma_bf16_16816(s[n], qa[kk], kb2, s[n]);
            }
        float mx[2] = {m[0], m[1]};
        UNROLL for (int n = 0; n < 8; n++)
            UNROLL for (int r = 0; r < 4; r++) {
                long j = k0 + 8 * n + 2 * t + r % 2;
                s[n][r] = j <= row[r / 2] ? s[n][r] * scale : MASKED;
                mx[r / 2] = fmaxf(mx[r / 2], s[n][r]);
            }
        float alpha[2];
        UNROLL for (int i = 0; i < 2; i++) {  // the row's maximum over the quad of lanes holding it
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            alpha[i] = exp2f(m[i] - mx[i]);
            m[i] = mx[i];
            l[i] *= alpha[i];
        }
        UNROLL for (int n = 0; n < NT; n++)
            UNROLL for (int r = 0; r < 4; r++) acc[n][r] *= alpha[r / 2];  // O back to the new row max
        unsigned pa[4][4];  // P as A-fragments: k-step kk covers n-tiles 2 kk and 2 kk + 1
        UNROLL for (int n = 0; n < 8; n++) {
            float p[4];
            UNROLL for (int r = 0; r < 4; r++) {
                p[r] = exp2f(s[n][r] - m[r / 2]);
                l[r / 2] += p[r];
            }
            pa[n / 2][2 * (n % 2)] = pack_bf16(p[0], p[1]);
            pa[n / 2][2 * (n % 2) + 1] = pack_bf16(p[2], p[3]);
        }
        UNROLL for (int n = 0; n < NT; n++)
            UNROLL for (int kk = 0; kk < 4; kk++) {
                const int key = 16 * kk + 2 * t, dim = 8 * n + g;
                const unsigned vb2[2] = {(unsigned)vs[key * PITCH + dim] | ((unsigned)vs[(key + 1) * PITCH + dim] << 16),
                                         (unsigned)vs[(key + 8) * PITCH + dim] | ((unsigned)vs[(key + 9) * PITCH + dim] << 16)};
                mma_bf16_16816(acc[n], pa[kk], vb2, acc[n]);
            }
        __syncthreads();  // every warp is done with the tiles: the next ones may overwrite them
    }
    UNROLL for (int i = 0; i < 2; i++) {  // the row sums across the quad, then O / l and lse
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        if (t == 0 && row[i] < T) lse[(b * nH + h) * T + row[i]] = (m[i] + log2f(l[i])) * LN2;
    }
    bf16* ob = o + (b * T * nH + h) * HD;
    UNROLL for (int n = 0; n < NT; n++)
        UNROLL for (int i = 0; i < 2; i++)
            if (row[i] < T)
                *reinterpret_cast<unsigned*>(ob + row[i] * qstride + 8 * n + 2 * t) =
                    pack_bf16(acc[n][2 * i] / l[i], acc[n][2 * i + 1] / l[i]);
}

}  // namespace mma_attention

#define MMA_ATTENTION_FORWARD(HD)                                                                             \
    extern "C" __global__ void __launch_bounds__(mma_attention::THREADS)                                      \
        attention_forward_mma_hd##HD##_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, \
                                            long B, long T, long nH, long nKV) {                              \
        mma_attention::forward<HD>(q, k, v, o, lse, T, nH, nKV);                                             \
    }                                                                                                         \
    EMU_EXPORT(attention_forward_mma_hd##HD##_bf16,                                                          \
               (const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, long B, long T, long nH, long nKV), \
               (q, k, v, o, lse, B, T, nH, nKV))

MMA_ATTENTION_FORWARD(64)
MMA_ATTENTION_FORWARD(128)

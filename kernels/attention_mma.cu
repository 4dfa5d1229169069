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

// The warp's 16 rows [row0, row0 + 16) of one head, HD wide, straight from global memory into mma
// A-fragments (rows >= T are zero): Q in the forward and dq, dO in dq, K and V in dkdv.
template <int HD>
__device__ __forceinline__ void load_fragments(unsigned (&frag)[HD / 16][4], const bf16* src, long row0, long T,
                                               long stride) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    UNROLL for (int s = 0; s < HD / 16; s++)
        UNROLL for (int r = 0; r < 4; r++) {
            long i = row0 + g + 8 * (r % 2);
            int c = 16 * s + 2 * t + 8 * (r / 2);
            frag[s][r] = i < T ? *reinterpret_cast<const unsigned*>(src + i * stride + c) : 0u;
        }
}

// acc (16 x 64 of a warp: 8 n-tiles) = A (the warp's 16 rows, HD wide, as fragments) times the
// transpose of a tile's 64 rows: acc[n] holds columns 8n .. 8n + 7 (tile rows).
template <int HD>
__device__ __forceinline__ void times_tile_t(float (&acc)[8][4], const unsigned (&a)[HD / 16][4], const bf16* tile) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    UNROLL for (int n = 0; n < 8; n++)
        UNROLL for (int kk = 0; kk < HD / 16; kk++) {
            const unsigned b[2] = {pair<HD>(tile, 8 * n + g, 16 * kk + 2 * t), pair<HD>(tile, 8 * n + g, 16 * kk + 8 + 2 * t)};
            mma_bf16_16816(acc[n], a[kk], b, acc[n]);
        }
}

// acc (16 x HD of a warp) += A (16 x 64, as 4 k-steps of fragments) times a tile's 64 rows (64 x HD).
template <int HD>
__device__ __forceinline__ void times_tile(float (&acc)[HD / 8][4], const unsigned (&a)[4][4], const bf16* tile) {
    constexpr int PITCH = HD + 8;
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    UNROLL for (int n = 0; n < HD / 8; n++)
        UNROLL for (int kk = 0; kk < 4; kk++) {
            const int row = 16 * kk + 2 * t, col = 8 * n + g;
            const unsigned b[2] = {
                (unsigned)tile[row * PITCH + col] | ((unsigned)tile[(row + 1) * PITCH + col] << 16),
                (unsigned)tile[(row + 8) * PITCH + col] | ((unsigned)tile[(row + 9) * PITCH + col] << 16)};
            mma_bf16_16816(acc[n], a[kk], b, acc[n]);
        }
}

// A warp's 16 x 64 fp32 result (8 n-tiles) as bf16 A-fragments of 4 k-steps: an m16n8 result
// fragment holds what an m16k16 A-fragment holds for half its columns, lane for lane.
__device__ __forceinline__ void as_fragments(unsigned (&frag)[4][4], const float (&x)[8][4]) {
    UNROLL for (int n = 0; n < 8; n++) {
        frag[n / 2][2 * (n % 2)] = pack_bf16(x[n][0], x[n][1]);
        frag[n / 2][2 * (n % 2) + 1] = pack_bf16(x[n][2], x[n][3]);
    }
}

// dst rows [row0, row0 + 16) of the warp (< T), HD wide, from acc times mul, as bf16 pairs.
template <int HD>
__device__ __forceinline__ void store_fragments(bf16* dst, const float (&acc)[HD / 8][4], float mul, long row0, long T,
                                                long stride) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    UNROLL for (int n = 0; n < HD / 8; n++)
        UNROLL for (int i = 0; i < 2; i++) {
            long r = row0 + g + 8 * i;
            if (r < T)
                *reinterpret_cast<unsigned*>(dst + r * stride + 8 * n + 2 * t) =
                    pack_bf16(acc[n][2 * i] * mul, acc[n][2 * i + 1] * mul);
        }
}

template <int HD>
__device__ void forward(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                        bf16* __restrict__ o, float* __restrict__ lse, long T, long nH, long nKV,
                        const long* __restrict__ starts) {
    constexpr int KS = HD / 16, NT = HD / 8, PITCH = HD + 8;
    alignas(16) __shared__ bf16 ks[BK * PITCH];
    alignas(16) __shared__ bf16 vs[BK * PITCH];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const long q0 = (long)(gridDim.x - 1 - blockIdx.x) * BQ, h = blockIdx.y, b = blockIdx.z;
    const long kvh = h / (nH / nKV), qstride = nH * HD, kstride = nKV * HD;
    const long row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};  // this lane's two query rows
    const long first[2] = {first_key(starts, b, T, row[0]), first_key(starts, b, T, row[1])};
    const bf16* qb = q + (b * T * nH + h) * HD;
    const bf16* kb = k + (b * T * nKV + kvh) * HD;
    const bf16* vb = v + (b * T * nKV + kvh) * HD;
    const float scale = LOG2E / sqrtf((float)HD);  // scores in log2 units, for exp2f

    unsigned qa[KS][4];  // this warp's Q rows as A-fragments
    load_fragments<HD>(qa, qb, q0 + 16 * warp, T, qstride);
    float acc[NT][4] = {}, m[2] = {MASKED, MASKED}, l[2] = {0.0f, 0.0f};
    const long q_end = q0 + BQ < T ? q0 + BQ : T;  // one past this tile's last query row
    for (long k0 = first_key(starts, b, T, q0) / BK * BK; k0 < q_end; k0 += BK) {  // visible key tiles
        load_tile<HD>(ks, kb, k0, T, kstride);
        load_tile<HD>(vs, vb, k0, T, kstride);
        __syncthreads();  // the K and V tiles are loaded
        float s[8][4] = {};  // S: 8 n-tiles of 8 keys
        times_tile_t<HD>(s, qa, ks);
        float mx[2] = {m[0], m[1]};
        UNROLL for (int n = 0; n < 8; n++)
            UNROLL for (int r = 0; r < 4; r++) {
                long j = k0 + 8 * n + 2 * t + r % 2;
                s[n][r] = j <= row[r / 2] && j >= first[r / 2] ? s[n][r] * scale : MASKED;
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
        UNROLL for (int n = 0; n < 8; n++)
            UNROLL for (int r = 0; r < 4; r++) {
                s[n][r] = exp2f(s[n][r] - m[r / 2]);  // P, in place of S (see attention.cu: a row not yet
                                                      // started is cleared by the first tile it sees)
                l[r / 2] += s[n][r];
            }
        unsigned pa[4][4];  // P as A-fragments: k-step kk covers n-tiles 2 kk and 2 kk + 1
        as_fragments(pa, s);
        times_tile<HD>(acc, pa, vs);
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

// dq: block = (64 query rows, head, batch), warp w owns rows 16w ..; per key tile at or below the
// diagonal: S = Q K^T and dP = dO V^T (Q, dO fragments in registers, K, V tiles in shared memory),
// P = exp2(S c log2 e - lse log2 e), dS = P (dP - D) as bf16 fragments, dQ += dS K. 2 barriers
// per key tile.
template <int HD>
__device__ void backward_dq(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ D,
                            bf16* __restrict__ dq, long T, long nH, long nKV, const long* __restrict__ starts) {
    constexpr int PITCH = HD + 8;
    alignas(16) __shared__ bf16 ks[BK * PITCH];
    alignas(16) __shared__ bf16 vs[BK * PITCH];
    const int warp = threadIdx.x / 32, t = threadIdx.x % 4, g = threadIdx.x % 32 / 4;
    const long q0 = (long)(gridDim.x - 1 - blockIdx.x) * BQ, h = blockIdx.y, b = blockIdx.z;
    const long kvh = h / (nH / nKV), qstride = nH * HD, kstride = nKV * HD, w0 = q0 + 16 * warp;
    const long row[2] = {w0 + g, w0 + g + 8};
    const long first[2] = {first_key(starts, b, T, row[0]), first_key(starts, b, T, row[1])};
    const float c = 1.0f / sqrtf((float)HD), scale = c * LOG2E;
    unsigned qa[HD / 16][4], da[HD / 16][4];
    load_fragments<HD>(qa, q + (b * T * nH + h) * HD, w0, T, qstride);
    load_fragments<HD>(da, dout + (b * T * nH + h) * HD, w0, T, qstride);
    float lse2[2], delta[2];
    UNROLL for (int i = 0; i < 2; i++) {
        lse2[i] = row[i] < T ? lse[(b * nH + h) * T + row[i]] * LOG2E : 0.0f;
        delta[i] = row[i] < T ? D[(b * nH + h) * T + row[i]] : 0.0f;
    }
    float acc[HD / 8][4] = {};  // dQ / c
    const long q_end = q0 + BQ < T ? q0 + BQ : T;
    for (long k0 = first_key(starts, b, T, q0) / BK * BK; k0 < q_end; k0 += BK) {
        load_tile<HD>(ks, k + (b * T * nKV + kvh) * HD, k0, T, kstride);
        load_tile<HD>(vs, v + (b * T * nKV + kvh) * HD, k0, T, kstride);
        __syncthreads();  // K and V loaded: S, dP and dQ may read them
        float s[8][4] = {}, dp[8][4] = {};
        times_tile_t<HD>(s, qa, ks);
        times_tile_t<HD>(dp, da, vs);
        UNROLL for (int n = 0; n < 8; n++)
            UNROLL for (int r = 0; r < 4; r++) {
                long j = k0 + 8 * n + 2 * t + r % 2, i = row[r / 2];
                float p = i < T && j <= i && j >= first[r / 2] ? exp2f(s[n][r] * scale - lse2[r / 2]) : 0.0f;
                s[n][r] = p * (dp[n][r] - delta[r / 2]);  // dS, in place of S
            }
        unsigned dsa[4][4];
        as_fragments(dsa, s);
        times_tile<HD>(acc, dsa, ks);
        __syncthreads();  // every warp's dQ has read the K tile: the next one may overwrite it
    }
    store_fragments<HD>(dq + (b * T * nH + h) * HD, acc, c, w0, T, qstride);
}

// dkdv: block = (64 key rows, kv head, batch), warp w owns keys 16w ..; for each query head of the
// group and each query tile at or below the diagonal: S^T = K Q^T and dP^T = V dO^T (K, V fragments
// in registers, Q, dO tiles in shared memory), P^T, dS^T = P^T (dP^T - D) as bf16 fragments,
// dV += P^T dO, dK += dS^T Q. The group's sum is this loop: dK and dV stay in registers and are
// written once, no atomics. 2 barriers per query tile.
template <int HD>
__device__ void backward_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const bf16* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ D, bf16* __restrict__ dk, bf16* __restrict__ dv, long T,
                              long nH, long nKV, const long* __restrict__ starts) {
    constexpr int PITCH = HD + 8;
    alignas(16) __shared__ bf16 qs[BQ * PITCH];
    alignas(16) __shared__ bf16 dos[BQ * PITCH];
    __shared__ float lse2[BQ], delta[BQ];
    __shared__ long firsts[BQ];  // the query tile's first visible keys
    const int warp = threadIdx.x / 32, t = threadIdx.x % 4, g = threadIdx.x % 32 / 4;
    const long k0 = (long)blockIdx.x * BK, kvh = blockIdx.y, b = blockIdx.z, w0 = k0 + 16 * warp;
    const long group = nH / nKV, qstride = nH * HD, kstride = nKV * HD;
    const long key[2] = {w0 + g, w0 + g + 8};
    const float c = 1.0f / sqrtf((float)HD), scale = c * LOG2E;
    unsigned ka[HD / 16][4], va[HD / 16][4];
    load_fragments<HD>(ka, k + (b * T * nKV + kvh) * HD, w0, T, kstride);
    load_fragments<HD>(va, v + (b * T * nKV + kvh) * HD, w0, T, kstride);
    float dka[HD / 8][4] = {}, dva[HD / 8][4] = {};  // dK / c, dV
    for (long h = kvh * group; h < (kvh + 1) * group; h++)  // the query heads that share this kv head
        for (long q0 = k0; q0 < T; q0 += BQ) {  // query tiles at or below the diagonal (BQ = BK)
            if (first_key(starts, b, T, q0) >= k0 + BK) break;  // (packed) this and later ones see none of these keys
            load_tile<HD>(qs, q + (b * T * nH + h) * HD, q0, T, qstride);
            load_tile<HD>(dos, dout + (b * T * nH + h) * HD, q0, T, qstride);
            for (int r = threadIdx.x; r < BQ; r += THREADS) {
                bool in = q0 + r < T;
                lse2[r] = in ? lse[(b * nH + h) * T + q0 + r] * LOG2E : 0.0f;
                delta[r] = in ? D[(b * nH + h) * T + q0 + r] : 0.0f;
                firsts[r] = first_key(starts, b, T, q0 + r);
            }
            __syncthreads();  // the Q and dO tiles and their lse, D are loaded
            float st[8][4] = {}, dpt[8][4] = {};
            times_tile_t<HD>(st, ka, qs);
            times_tile_t<HD>(dpt, va, dos);
            UNROLL for (int n = 0; n < 8; n++)
                UNROLL for (int r = 0; r < 4; r++) {
                    const int col = 8 * n + 2 * t + r % 2;
                    const long j = q0 + col;
                    float p = j < T && key[r / 2] <= j && key[r / 2] >= firsts[col]
                                  ? exp2f(st[n][r] * scale - lse2[col]) : 0.0f;
                    st[n][r] = p;                                // P^T
                    dpt[n][r] = p * (dpt[n][r] - delta[col]);  // dS^T, in place of dP^T
                }
            unsigned pa[4][4], dsa[4][4];
            as_fragments(pa, st);
            as_fragments(dsa, dpt);
            times_tile<HD>(dva, pa, dos);
            times_tile<HD>(dka, dsa, qs);
            __syncthreads();  // every warp is done with the Q and dO tiles
        }
    store_fragments<HD>(dk + (b * T * nKV + kvh) * HD, dka, c, w0, T, kstride);
    store_fragments<HD>(dv + (b * T * nKV + kvh) * HD, dva, 1.0f, w0, T, kstride);
}

}  // namespace mma_attention

#define MMA_ATTENTION_FORWARD(HD)                                                                             \
    extern "C" __global__ void __launch_bounds__(mma_attention::THREADS)                                      \
        attention_forward_mma_hd##HD##_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, \
                                            long B, long T, long nH, long nKV, const long* starts) {          \
        mma_attention::forward<HD>(q, k, v, o, lse, T, nH, nKV, starts);                                     \
    }                                                                                                         \
    EMU_EXPORT(attention_forward_mma_hd##HD##_bf16,                                                          \
               (const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, long B, long T, long nH, long nKV, \
                const long* starts),                                                                          \
               (q, k, v, o, lse, B, T, nH, nKV, starts))

MMA_ATTENTION_FORWARD(64)
MMA_ATTENTION_FORWARD(128)

// The backward on the tensor cores. At head_dim 128 dkdv holds 64 registers of K and V fragments
// and 128 of dK and dV accumulators per thread, about the 255 a thread may have: what spills, and
// whether it stays faster than attention.cu's backward, only a GPU can tell (tools/bench_gpu.py
// attention times both head dims).
#define MMA_ATTENTION_BACKWARD(HD)                                                                            \
    extern "C" __global__ void __launch_bounds__(mma_attention::THREADS)                                      \
        attention_backward_dq_mma_hd##HD##_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,  \
                                                const float* lse, const float* D, bf16* dq, long B, long T,    \
                                                long nH, long nKV, const long* starts) {                      \
        mma_attention::backward_dq<HD>(q, k, v, dout, lse, D, dq, T, nH, nKV, starts);                       \
    }                                                                                                         \
    EMU_EXPORT(attention_backward_dq_mma_hd##HD##_bf16,                                                      \
               (const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D, \
                bf16* dq, long B, long T, long nH, long nKV, const long* starts),                             \
               (q, k, v, dout, lse, D, dq, B, T, nH, nKV, starts))                                            \
    extern "C" __global__ void __launch_bounds__(mma_attention::THREADS)                                      \
        attention_backward_dkdv_mma_hd##HD##_bf16(const bf16* q, const bf16* k, const bf16* v,                 \
                                                  const bf16* dout, const float* lse, const float* D, bf16* dk, \
                                                  bf16* dv, long B, long T, long nH, long nKV,                \
                                                  const long* starts) {                                       \
        mma_attention::backward_dkdv<HD>(q, k, v, dout, lse, D, dk, dv, T, nH, nKV, starts);                 \
    }                                                                                                         \
    EMU_EXPORT(attention_backward_dkdv_mma_hd##HD##_bf16,                                                    \
               (const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D, \
                bf16* dk, bf16* dv, long B, long T, long nH, long nKV, const long* starts),                   \
               (q, k, v, dout, lse, D, dk, dv, B, T, nH, nKV, starts))

MMA_ATTENTION_BACKWARD(64)
MMA_ATTENTION_BACKWARD(128)

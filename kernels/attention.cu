// attention.cu: causal grouped-query attention, FlashAttention-2 style, forward and backward.
//
// Layouts (all C-contiguous): q, o, dq, do (B, T, nH, hd); k, v, dk, dv (B, T, nKV, hd);
// lse and D (B, nH, T) float32. Query head h reads kv head h / (nH / nKV). Elements fp32 or bf16
// (raw bits); all math and accumulation in fp32. c = 1/sqrt(hd); query i sees keys j <= i.
//
//   forward   S = Q K^T c (masked),  lse_i = log sum_j exp S_ij,  O = exp(S - lse) V
//   backward  P = exp(S - lse),  D_i = dO_i . O_i,  dP = dO V^T,  dS = P (dP - D)
//             dQ = dS K c,  dK = dS^T Q c,  dV = P^T dO   (dK, dV summed over the group's heads)
//
// Threads and registers. Every kernel but delta runs 128-thread blocks seen as TY = 16 row
// groups x TX = 8 column groups, and does its products on fp32 tiles in shared memory with
// "register tiles" (plain fp32 FMAs: no tensor cores, which would mean TF32 or bf16 math):
//   mma_abt, S = A B^T: thread (ty, tx) computes the RPT x CPT entries of rows ty + 16 i and
//     columns tx + 8 j, reading float4s of A (the 8 threads of a row group share A's rows: a
//     broadcast) and of B (rows padded by 4 floats, so the 8 rows a warp reads hit distinct banks).
//   mma_pv, O += P V: the same thread accumulates the RPT x DPT entries of the same rows and of the
//     dims 4 (tx + 8 c) .. +3, float4 chunks that are contiguous across the 8 threads.
// So accumulators stay in registers (32 floats per thread) and each float4 loaded from shared
// memory feeds 4 to 64 FMAs. Scores are in the log2 domain (Q or K pre-scaled by c log2 e), so
// softmax uses exp2f. No warp shuffles: the few row reductions go through shared memory.
//
// forward, block = (query tile of BQ rows, head, batch), last (longest) query tiles first.
//   Shared: Q tile BQ x hd (loaded once), one K-or-V tile 32 x (hd + 4), P 32 wide, the row
//   maxima of each thread. Per key tile at or below the diagonal (tiles above it are skipped):
//   load K; S = Q K^T in registers, mask j > i, partial row maxima to shared; m' = the new row
//   max, alpha = exp2(m - m'), P = exp2(S - m') to shared while V replaces K; O = alpha O + P V.
//   The row sum l = alpha l + sum P is kept per thread over its own keys and summed once at the
//   end; writes O / l and lse = (m + log2 l) ln 2. 4 barriers per key tile.
//   BQ = 64 (hd 64, 36.5 KB shared) or 32 (hd 128, 38.5 KB).
// backward (a) delta: D = rowsum(dO * O), 32 rows per block and step, grid-stride.
//   (b) dq, block = (query tile, head, batch): Q, dO tiles and the rows' lse, D in shared once;
//   per key tile at or below the diagonal: load K and V tiles; S = Q K^T and dP = dO V^T in
//   registers; P = exp2(S - lse) (no running max: lse is known), dS = P (dP - D) to shared;
//   dQ += dS K. 3 barriers per key tile.
//   (c) dkdv, block = (key tile, kv head, batch), first key tiles (the longest) first: K, V tiles
//   in shared once; for each of the g query heads of the group and each query tile at or below
//   the diagonal: load Q, dO tiles and their lse, D; S^T = K Q^T and dP^T = V dO^T in registers;
//   P^T and dS^T to shared; dV += P^T dO, dK += dS^T Q. The group's sum happens in this loop and
//   dK, dV stay in registers until one final write: no atomics, deterministic. 3 barriers per
//   query tile.
//   Tiles 32 x 32 (hd 64: 38 / 43 KB shared) or 16 x 16 (hd 128: 34 / 36 KB): both operands and
//   P, dS as fp32 must fit the 48 KB of static shared memory.
// Memory traffic: each tile pair reads its streamed tiles (K, V in forward and dq; Q, dO, lse, D
// in dkdv) once from global memory (L2: the blocks of a row of tiles and the heads of a group
// read the same ones) and does 2 x rows x cols x hd FMAs on them, i.e. `rows` (BQ or BK) FMAs per
// element loaded; the resident tiles and the outputs cost one pass. No T x T array exists.
#include "common.cuh"

constexpr int THREADS = 128, TX = 8, TY = THREADS / TX;  // a block: TY row groups x TX column groups
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
constexpr float MASKED = -1e30f;  // a score that is not there: exp2f gives 0, and no inf - inf

struct alignas(16) vec4 {
    float x[4];
};
__device__ __forceinline__ vec4 ld4(const float* p) { return *reinterpret_cast<const vec4*>(p); }

// Causal: key kj is visible from query qi, whose first visible key is `first` (0; or in a packed
// window the start of qi's own conversation).
__device__ __forceinline__ bool causal(long kj, long qi, long first) { return kj <= qi && kj >= first; }

// rows [row0, row0 + ROWS) of one head of a (B, T, heads, HD) tensor -> tile[r * PITCH + d] in
// fp32, times `mul`; rows past the end are zero. `src` points at (b, 0, head, 0) and consecutive
// rows are `stride` elements apart; consecutive threads read consecutive elements (coalesced).
template <int ROWS, int HD, int PITCH, class E>
__device__ __forceinline__ void load_tile(float* tile, const E* src, long row0, long T, long stride, float mul) {
    for (int e = threadIdx.x; e < ROWS * HD; e += THREADS) {
        int r = e / HD, d = e % HD;
        tile[r * PITCH + d] = row0 + r < T ? to_f32(src[(row0 + r) * stride + d]) * mul : 0.0f;
    }
}

// lse (times log2 e, for exp2f) and D of rows [row0, row0 + ROWS) of one (b, h) -> shared.
template <int ROWS>
__device__ __forceinline__ void load_row_stats(float* lse2, float* delta, const float* lse, const float* D,
                                               long row0, long T) {
    for (int r = threadIdx.x; r < ROWS; r += THREADS) {
        bool in = row0 + r < T;
        lse2[r] = in ? lse[row0 + r] * LOG2E : 0.0f;
        delta[r] = in ? D[row0 + r] : 0.0f;
    }
}

// acc[i][j] += sum_d A[ty + TY i][d] B[tx + TX j][d], d < HD: this thread's block of A B^T.
template <int RPT, int CPT, int HD, int PA, int PB>
__device__ __forceinline__ void mma_abt(float (&acc)[RPT][CPT], const float* A, const float* B, int ty, int tx) {
    for (int d = 0; d < HD; d += 4) {
        vec4 a[RPT], b[CPT];
        UNROLL for (int i = 0; i < RPT; i++) a[i] = ld4(A + (ty + TY * i) * PA + d);
        UNROLL for (int j = 0; j < CPT; j++) b[j] = ld4(B + (tx + TX * j) * PB + d);
        UNROLL for (int i = 0; i < RPT; i++)
            UNROLL for (int j = 0; j < CPT; j++)
                UNROLL for (int e = 0; e < 4; e++) acc[i][j] += a[i].x[e] * b[j].x[e];
    }
}

// The dim of a thread's accumulator column c: float4 chunks interleaved across the TX threads.
__device__ __forceinline__ int dim_of(int tx, int c) { return 4 * (tx + TX * (c / 4)) + c % 4; }

// acc[i][c] += sum_j P[ty + TY i][j] V[j][dim_of(tx, c)], j < N: this thread's block of P V.
template <int RPT, int DPT, int N, int PP, int PV>
__device__ __forceinline__ void mma_pv(float (&acc)[RPT][DPT], const float* P, const float* V, int ty, int tx) {
    for (int j = 0; j < N; j += 4) {
        vec4 p[RPT];
        UNROLL for (int i = 0; i < RPT; i++) p[i] = ld4(P + (ty + TY * i) * PP + j);
        UNROLL for (int jj = 0; jj < 4; jj++)
            UNROLL for (int c = 0; c < DPT / 4; c++) {
                vec4 w = ld4(V + (j + jj) * PV + 4 * (tx + TX * c));
                UNROLL for (int i = 0; i < RPT; i++)
                    UNROLL for (int e = 0; e < 4; e++) acc[i][4 * c + e] += p[i].x[jj] * w.x[e];
            }
    }
}

// dst[row0 + ty + TY i][dim_of(tx, c)] = acc[i][c] * mul[i] for rows < T; layout as in load_tile.
template <int RPT, int DPT, class E>
__device__ __forceinline__ void store_rows(E* dst, const float (&acc)[RPT][DPT], const float (&mul)[RPT],
                                           long row0, long T, long stride, int ty, int tx) {
    UNROLL for (int i = 0; i < RPT; i++) {
        long t = row0 + ty + TY * i;
        if (t < T)
            UNROLL for (int c = 0; c < DPT; c++) store(dst, t * stride + dim_of(tx, c), acc[i][c] * mul[i]);
    }
}

template <class E, int HD>
__device__ void attention_forward(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                                  E* __restrict__ o, float* __restrict__ lse, long B, long T, long nH, long nKV,
                                  const long* __restrict__ starts) {
    constexpr int BQ = HD == 64 ? 64 : 32, BK = 32;             // query rows, key rows of a tile
    constexpr int RPT = BQ / TY, CPT = BK / TX, DPT = HD / TX;  // a thread's rows, keys, dims
    constexpr int KP = HD + 4, PP = BK + 8;                     // padded pitches (bank conflicts)
    alignas(16) __shared__ float qs[BQ * HD];                   // Q tile, times c log2 e
    alignas(16) __shared__ float kv[BK * KP];                   // K tile, then V tile
    alignas(16) __shared__ float ps[BQ * PP];                   // P = exp2(S - m) of a key tile
    __shared__ float part[RPT * THREADS];                       // per-thread row maxima, then sums
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const long q0 = (long)(gridDim.x - 1 - blockIdx.x) * BQ, h = blockIdx.y, b = blockIdx.z;
    const long kvh = h / (nH / nKV), qstride = nH * HD, kstride = nKV * HD;
    const E* kb = k + (b * T * nKV + kvh) * HD;
    const E* vb = v + (b * T * nKV + kvh) * HD;

    load_tile<BQ, HD, HD>(qs, q + (b * T * nH + h) * HD, q0, T, qstride, LOG2E / sqrtf((float)HD));
    float m[RPT], l[RPT], acc[RPT][DPT] = {};  // running row max (log2 units), partial row sum, O
    long first[RPT];  // each row's first visible key
    UNROLL for (int i = 0; i < RPT; i++) m[i] = MASKED, l[i] = 0.0f, first[i] = first_key(starts, b, T, q0 + ty + TY * i);
    const long q_end = q0 + BQ < T ? q0 + BQ : T;  // one past this tile's last query row
    for (long k0 = first_key(starts, b, T, q0) / BK * BK; k0 < q_end; k0 += BK) {  // visible key tiles
        load_tile<BK, HD, KP>(kv, kb, k0, T, kstride, 1.0f);
        __syncthreads();  // the K tile is loaded (and the Q tile, the first time)
        float s[RPT][CPT] = {};
        mma_abt<RPT, CPT, HD, HD, KP>(s, qs, kv, ty, tx);
        UNROLL for (int i = 0; i < RPT; i++) {
            float mx = MASKED;
            UNROLL for (int j = 0; j < CPT; j++) {
                if (!causal(k0 + tx + TX * j, q0 + ty + TY * i, first[i])) s[i][j] = MASKED;
                mx = fmaxf(mx, s[i][j]);
            }
            part[i * THREADS + threadIdx.x] = mx;
        }
        __syncthreads();  // partial row maxima visible; nobody reads the K tile any more
        load_tile<BK, HD, KP>(kv, vb, k0, T, kstride, 1.0f);
        float alpha[RPT];
        UNROLL for (int i = 0; i < RPT; i++) {
            float mx = m[i];
            UNROLL for (int t = 0; t < TX; t++) mx = fmaxf(mx, part[i * THREADS + ty * TX + t]);
            alpha[i] = exp2f(m[i] - mx);
            m[i] = mx;
            l[i] *= alpha[i];
            UNROLL for (int j = 0; j < CPT; j++) {
                // a row whose conversation starts past this tile sums exp2(0) = 1 here; the first tile it
                // sees makes alpha = exp2(MASKED - m) = 0, which clears it
                float p = exp2f(s[i][j] - mx);
                l[i] += p;
                ps[(ty + TY * i) * PP + tx + TX * j] = p;
            }
        }
        __syncthreads();  // P and the V tile visible
        UNROLL for (int i = 0; i < RPT; i++)
            UNROLL for (int c = 0; c < DPT; c++) acc[i][c] *= alpha[i];  // O back to the new row max
        mma_pv<RPT, DPT, BK, PP, KP>(acc, ps, kv, ty, tx);
        __syncthreads();  // P and V consumed: the next key tile may overwrite them
    }
    UNROLL for (int i = 0; i < RPT; i++) part[i * THREADS + threadIdx.x] = l[i];
    __syncthreads();  // partial row sums visible
    float inv[RPT];
    UNROLL for (int i = 0; i < RPT; i++) {
        float sum = 0.0f;
        UNROLL for (int t = 0; t < TX; t++) sum += part[i * THREADS + ty * TX + t];
        inv[i] = 1.0f / sum;
        long row = q0 + ty + TY * i;
        if (tx == 0 && row < T) lse[(b * nH + h) * T + row] = (m[i] + log2f(sum)) * LN2;
    }
    store_rows(o + (b * T * nH + h) * HD, acc, inv, q0, T, qstride, ty, tx);
}

// D = rowsum(dO * O) for rows (b, t, h), which are contiguous in memory: a block reads 32 rows at
// a time, coalesced, as products into shared memory; then 32 threads sum one row each. hd <= 128.
template <class E>
__device__ void attention_backward_delta(const E* __restrict__ o, const E* __restrict__ dout, float* __restrict__ D,
                                         long B, long T, long nH, long hd) {
    constexpr int ROWS = 32, PITCH = 128 + 1;  // odd pitch: the 32 summing threads hit distinct banks
    __shared__ float prod[ROWS * PITCH];
    const long rows = B * T * nH;
    const int n = (int)hd;
    for (long r0 = (long)blockIdx.x * ROWS; r0 < rows; r0 += (long)gridDim.x * ROWS) {
        const int count = (int)(rows - r0 < ROWS ? rows - r0 : ROWS) * n;
        for (int e = threadIdx.x; e < count; e += THREADS)
            prod[e / n * PITCH + e % n] = to_f32(o[r0 * n + e]) * to_f32(dout[r0 * n + e]);
        __syncthreads();  // the products of this tile's rows visible
        long r = r0 + threadIdx.x;
        if (threadIdx.x < ROWS && r < rows) {
            float sum = 0.0f;
            for (int d = 0; d < n; d++) sum += prod[threadIdx.x * PITCH + d];
            D[(r / (nH * T) * nH + r % nH) * T + r / nH % T] = sum;  // r = (b, t, h) -> D[b, h, t]
        }
        __syncthreads();  // sums done before the next rows overwrite the products
    }
}

template <class E, int HD>
__device__ void attention_backward_dq(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                                      const E* __restrict__ dout, const float* __restrict__ lse,
                                      const float* __restrict__ D, E* __restrict__ dq, long B, long T, long nH,
                                      long nKV, const long* __restrict__ starts) {
    constexpr int BQ = HD == 64 ? 32 : 16, BK = BQ;             // query rows, key rows of a tile
    constexpr int RPT = BQ / TY, CPT = BK / TX, DPT = HD / TX;  // a thread's rows, keys, dims
    constexpr int KP = HD + 4, PP = BK + 8;
    alignas(16) __shared__ float qs[BQ * HD];  // Q tile, times c log2 e
    alignas(16) __shared__ float dos[BQ * HD];  // dO tile
    alignas(16) __shared__ float ks[BK * KP];
    alignas(16) __shared__ float vs[BK * KP];
    alignas(16) __shared__ float dss[BQ * PP];  // dS = P (dP - D) of a key tile
    __shared__ float lse2[BQ], delta[BQ];
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const long q0 = (long)(gridDim.x - 1 - blockIdx.x) * BQ, h = blockIdx.y, b = blockIdx.z;
    const long kvh = h / (nH / nKV), qstride = nH * HD, kstride = nKV * HD;
    const E* kb = k + (b * T * nKV + kvh) * HD;
    const E* vb = v + (b * T * nKV + kvh) * HD;
    const float c = 1.0f / sqrtf((float)HD);

    load_tile<BQ, HD, HD>(qs, q + (b * T * nH + h) * HD, q0, T, qstride, c * LOG2E);
    load_tile<BQ, HD, HD>(dos, dout + (b * T * nH + h) * HD, q0, T, qstride, 1.0f);
    load_row_stats<BQ>(lse2, delta, lse + (b * nH + h) * T, D + (b * nH + h) * T, q0, T);
    float acc[RPT][DPT] = {};  // dQ / c
    long first[RPT];  // each row's first visible key
    UNROLL for (int i = 0; i < RPT; i++) first[i] = first_key(starts, b, T, q0 + ty + TY * i);
    const long q_end = q0 + BQ < T ? q0 + BQ : T;
    for (long k0 = first_key(starts, b, T, q0) / BK * BK; k0 < q_end; k0 += BK) {
        load_tile<BK, HD, KP>(ks, kb, k0, T, kstride, 1.0f);
        load_tile<BK, HD, KP>(vs, vb, k0, T, kstride, 1.0f);
        __syncthreads();  // K, V tiles loaded (and Q, dO, lse, D the first time)
        float s[RPT][CPT] = {}, dp[RPT][CPT] = {};
        mma_abt<RPT, CPT, HD, HD, KP>(s, qs, ks, ty, tx);
        mma_abt<RPT, CPT, HD, HD, KP>(dp, dos, vs, ty, tx);
        UNROLL for (int i = 0; i < RPT; i++)
            UNROLL for (int j = 0; j < CPT; j++) {
                int r = ty + TY * i, col = tx + TX * j;
                float p = q0 + r < T && causal(k0 + col, q0 + r, first[i]) ? exp2f(s[i][j] - lse2[r]) : 0.0f;
                dss[r * PP + col] = p * (dp[i][j] - delta[r]);
            }
        __syncthreads();  // dS visible
        mma_pv<RPT, DPT, BK, PP, KP>(acc, dss, ks, ty, tx);
        __syncthreads();  // K, V and dS consumed
    }
    float mul[RPT];
    UNROLL for (int i = 0; i < RPT; i++) mul[i] = c;
    store_rows(dq + (b * T * nH + h) * HD, acc, mul, q0, T, qstride, ty, tx);
}

template <class E, int HD>
__device__ void attention_backward_dkdv(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                                        const E* __restrict__ dout, const float* __restrict__ lse,
                                        const float* __restrict__ D, E* __restrict__ dk, E* __restrict__ dv, long B,
                                        long T, long nH, long nKV, const long* __restrict__ starts) {
    constexpr int BK = HD == 64 ? 32 : 16, BQ = BK;             // key rows, query rows of a tile
    constexpr int RPT = BK / TY, CPT = BQ / TX, DPT = HD / TX;  // a thread's keys, queries, dims
    constexpr int QP = HD + 4, PP = BQ + 8;
    alignas(16) __shared__ float ks[BK * HD];  // K tile, times c log2 e
    alignas(16) __shared__ float vs[BK * HD];
    alignas(16) __shared__ float qs[BQ * QP];  // Q tile of one query head
    alignas(16) __shared__ float dos[BQ * QP];
    alignas(16) __shared__ float pts[BK * PP];  // P^T of a query tile
    alignas(16) __shared__ float dsts[BK * PP];  // dS^T
    __shared__ float lse2[BQ], delta[BQ];
    __shared__ long firsts[BQ];  // the query tile's first visible keys
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const long k0 = (long)blockIdx.x * BK, kvh = blockIdx.y, b = blockIdx.z;
    const long g = nH / nKV, qstride = nH * HD, kstride = nKV * HD;
    const float c = 1.0f / sqrtf((float)HD);

    load_tile<BK, HD, HD>(ks, k + (b * T * nKV + kvh) * HD, k0, T, kstride, c * LOG2E);
    load_tile<BK, HD, HD>(vs, v + (b * T * nKV + kvh) * HD, k0, T, kstride, 1.0f);
    float dka[RPT][DPT] = {}, dva[RPT][DPT] = {};  // dK / c, dV
    for (long h = kvh * g; h < kvh * g + g; h++)  // the query heads that share this kv head
        for (long q0 = k0 / BQ * BQ; q0 < T; q0 += BQ) {  // query tiles at or below the diagonal
            if (first_key(starts, b, T, q0) >= k0 + BK) break;  // (packed) this and later ones see none of these keys
            for (int r = threadIdx.x; r < BQ; r += THREADS) firsts[r] = first_key(starts, b, T, q0 + r);
            load_tile<BQ, HD, QP>(qs, q + (b * T * nH + h) * HD, q0, T, qstride, 1.0f);
            load_tile<BQ, HD, QP>(dos, dout + (b * T * nH + h) * HD, q0, T, qstride, 1.0f);
            load_row_stats<BQ>(lse2, delta, lse + (b * nH + h) * T, D + (b * nH + h) * T, q0, T);
            __syncthreads();  // Q, dO tiles and their lse, D loaded (and K, V the first time)
            float s[RPT][CPT] = {}, dp[RPT][CPT] = {};
            mma_abt<RPT, CPT, HD, HD, QP>(s, ks, qs, ty, tx);
            mma_abt<RPT, CPT, HD, HD, QP>(dp, vs, dos, ty, tx);
            UNROLL for (int i = 0; i < RPT; i++)
                UNROLL for (int j = 0; j < CPT; j++) {
                    int r = ty + TY * i, col = tx + TX * j;
                    float p = q0 + col < T && causal(k0 + r, q0 + col, firsts[col]) ? exp2f(s[i][j] - lse2[col]) : 0.0f;
                    pts[r * PP + col] = p;
                    dsts[r * PP + col] = p * (dp[i][j] - delta[col]);
                }
            __syncthreads();  // P^T, dS^T visible
            mma_pv<RPT, DPT, BQ, PP, QP>(dva, pts, dos, ty, tx);
            mma_pv<RPT, DPT, BQ, PP, QP>(dka, dsts, qs, ty, tx);
            __syncthreads();  // Q, dO, P^T, dS^T consumed before the next query tile overwrites them
        }
    float mulk[RPT], mulv[RPT];
    UNROLL for (int i = 0; i < RPT; i++) mulk[i] = c, mulv[i] = 1.0f;
    store_rows(dk + (b * T * nKV + kvh) * HD, dka, mulk, k0, T, kstride, ty, tx);
    store_rows(dv + (b * T * nKV + kvh) * HD, dva, mulv, k0, T, kstride, ty, tx);
}

// The extern "C" kernels: one per (head dim, element type); all take 128-thread blocks.
#define ATTENTION(E, suffix, HD)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        attention_forward_hd##HD##_##suffix(const E* q, const E* k, const E* v, E* o, float* lse, long B,     \
                                            long T, long nH, long nKV, const long* starts) {                  \
        attention_forward<E, HD>(q, k, v, o, lse, B, T, nH, nKV, starts);                                     \
    }                                                                                                         \
    EMU_EXPORT(attention_forward_hd##HD##_##suffix,                                                           \
               (const E* q, const E* k, const E* v, E* o, float* lse, long B, long T, long nH, long nKV,      \
                const long* starts),                                                                          \
               (q, k, v, o, lse, B, T, nH, nKV, starts))                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        attention_backward_dq_hd##HD##_##suffix(const E* q, const E* k, const E* v, const E* dout,            \
                                                const float* lse, const float* D, E* dq, long B, long T,      \
                                                long nH, long nKV, const long* starts) {                      \
        attention_backward_dq<E, HD>(q, k, v, dout, lse, D, dq, B, T, nH, nKV, starts);                       \
    }                                                                                                         \
    EMU_EXPORT(attention_backward_dq_hd##HD##_##suffix,                                                       \
               (const E* q, const E* k, const E* v, const E* dout, const float* lse, const float* D, E* dq,   \
                long B, long T, long nH, long nKV, const long* starts),                                       \
               (q, k, v, dout, lse, D, dq, B, T, nH, nKV, starts))                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        attention_backward_dkdv_hd##HD##_##suffix(const E* q, const E* k, const E* v, const E* dout,          \
                                                  const float* lse, const float* D, E* dk, E* dv, long B,     \
                                                  long T, long nH, long nKV, const long* starts) {            \
        attention_backward_dkdv<E, HD>(q, k, v, dout, lse, D, dk, dv, B, T, nH, nKV, starts);                 \
    }                                                                                                         \
    EMU_EXPORT(attention_backward_dkdv_hd##HD##_##suffix,                                                     \
               (const E* q, const E* k, const E* v, const E* dout, const float* lse, const float* D, E* dk,   \
                E* dv, long B, long T, long nH, long nKV, const long* starts),                                \
               (q, k, v, dout, lse, D, dk, dv, B, T, nH, nKV, starts))

#define ATTENTION_DELTA(E, suffix)                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        attention_backward_delta_##suffix(const E* o, const E* dout, float* D, long B, long T, long nH, long hd) { \
        attention_backward_delta(o, dout, D, B, T, nH, hd);                                                   \
    }                                                                                                         \
    EMU_EXPORT(attention_backward_delta_##suffix,                                                             \
               (const E* o, const E* dout, float* D, long B, long T, long nH, long hd),                       \
               (o, dout, D, B, T, nH, hd))

ATTENTION(float, f32, 64)
ATTENTION(float, f32, 128)
ATTENTION(bf16, bf16, 64)
ATTENTION(bf16, bf16, 128)
ATTENTION_DELTA(float, f32)
ATTENTION_DELTA(bf16, bf16)

// matmul_backward.cu: the backward of the linear layer y = x W^T + b (minitrain/ops/linear.py).
//
//   G = dY (N, out), X (N, in), W (out, in), row-major; N = tokens (leading dims flattened).
//   dX  = G W            (N, in)    written, in the input dtype
//   dW += G^T X          (out, in)  accumulated into fp32 (micro-batches, tied weights)
//   db += sum_n G[n]     (out,)     accumulated into fp32
// Inputs fp32 or bf16 (raw bits); all math and accumulation in fp32. No atomics: every output
// element has one owner thread and a fixed summation order, so results are bitwise reproducible.
//
// dX and dW are one tiled GEMM, C (M, P) = A (M, K) B (K, P), with B always row-major (a row of
// B is contiguous) and A either row-major (dX: A = G, K = out) or read transposed (dW: A = G^T,
// K = N, so a "column" of A, G's row, is contiguous):
//   dX: M = N,   P = in, K = out,  A[m][k] = G[m*out + k],  B[k][p] = W[k*in + p]
//   dW: M = out, P = in, K = N,    A[m][k] = G[k*out + m],  B[k][p] = X[k*in + p]
//
// Tiling. A block of 64 threads owns a 64 x 64 tile of C and walks K in slices of 16. Per slice
// the block loads A's 64 x 16 slice and B's 16 x 64 slice into shared memory, both stored
// k-major, As[k][m] and Bs[k][p] (fp32, bf16 widened on load), synchronises, and every thread
// adds the slice's 16 rank-1 updates to its 8 x 8 register micro-tile; a second barrier guards
// the tiles before the next slice overwrites them. Thread t = 8 ty + tx owns rows
// {4 ty .. 4 ty + 3} and {32 + 4 ty .. 32 + 4 ty + 3} and the same split of columns with tx:
// two 4-wide halves 32 apart, so each of its shared reads is a 16-byte quad, and the 8 lanes of
// a quarter-warp (same ty, tx = 0..7) read 8 consecutive quads of Bs (128 bytes, every bank
// once) and one broadcast quad of As: the inner loop is conflict-free, 4 LDS.128 per 64 FMA.
//
// Loads. A row-major operand slice whose rows run along m (B always, and A = G^T for dW: G's row
// k is contiguous in m) is copied straight: thread t loads element m = t of rows k = 0..15,
// coalesced 256-byte rows, conflict-free stores. A = G for dX is contiguous along k, so it is
// transposed on the way in: lane t loads k = t % 8 (+8), m = t / 8 (+8 i), eight consecutive
// elements (a 32-byte sector) per row; the shared rows are padded from 64 to 68 floats so that
// the warp's stores As[k][m] hit banks (4 k + m) % 32, all 32 distinct. The padding keeps rows
// 16-byte aligned for the quad reads. Shared memory: 2 x 16 x 68 x 4 = 8704 bytes per block.
// Out-of-range elements (m >= M, p >= P, k >= K: sizes need not be multiples of the tiles) load
// as zero and are never read from global memory; the epilogue writes only in-range elements.
//
// Traffic. Each element of A is read from global memory once per column tile, ceil(P / 64)
// times, each element of B once per row tile, ceil(M / 64) times: dX reads G ceil(in / 64) and W
// ceil(N / 64) times and writes dX once; dW reads G ceil(in / 64) and X ceil(out / 64) times and
// reads and writes dW once. Arithmetic intensity per block: a slice moves (64 + 64) x 16
// elements for 64 x 64 x 16 FMA, 32 FMA (64 flops) per element loaded, 16 flops per byte in
// fp32, 32 in bf16; the repeated reads of a panel by neighbouring blocks mostly hit L2. In
// registers: 64 accumulators and 8 + 8 operands per k step, and while a slice is fetched its 32
// loads in flight; __launch_bounds__(64, 8) holds that to 128 registers (8 blocks, 16 warps/SM).
//
// db: one block of 32 x 4 threads per 32 columns. Thread (tx, ty) sums column tx over rows
// ty, ty + 4, ... (each warp reads one 128-byte row segment per step); the 4 partial sums meet
// in shared memory and row group ty = 0 adds them in order. G is read once, db read and written
// once.
#include "common.cuh"


constexpr int TILE = 64;    // rows and columns of C per block
constexpr int TILE_K = 16;  // K per shared-memory slice
constexpr int PAD = 4;      // shared row padding: conflict-free transposing stores, 16-byte rows
constexpr int THREADS = 64; // 8 x 8 threads, each an 8 x 8 micro-tile
constexpr int BLOCKS_PER_SM = 8;  // caps registers at 65536 / (64 x 8) = 128 per thread
constexpr int BIAS_COLS = 32, BIAS_ROWS = 4;

typedef float Slice[TILE_K][TILE + PAD];

// Four consecutive floats of a shared row, read as one 16-byte access.
struct alignas(16) Quad {
    float v[4];
};

// One K slice of an operand into S[k][m], for tile rows m0.. and slice k0..: element (m, k) of the
// operand is src[m * ld + k] (K_CONTIGUOUS) or src[k * ld + m]; rows >= M and k >= K load zero.
// Each lane walks its elements with one pointer (a few registers, not one address per load).
template <bool K_CONTIGUOUS, class T>
__device__ __forceinline__ void load_slice(Slice& S, const T* __restrict__ src, long ld, long M, long K, long m0,
                                           long k0) {
    int t = threadIdx.x;
    long rows = M - m0, depth = K - k0;
    if constexpr (K_CONTIGUOUS) {  // lane t: k = t % 8 and t % 8 + 8 of rows m = t / 8 + 8 i
        int m = t / 8, k = t % 8;
        const T* p = src + (m0 + m) * ld + k0 + k;
        UNROLL for (int i = 0; i < TILE / 8; i++, m += 8, p += 8 * ld) {
            S[k][m] = m < rows && k < depth ? to_f32(p[0]) : 0.0f;
            S[k + 8][m] = m < rows && k + 8 < depth ? to_f32(p[8]) : 0.0f;
        }
    } else {  // lane t: m = t of rows k = 0..15
        const T* p = src + k0 * ld + m0 + t;
        UNROLL for (int k = 0; k < TILE_K; k++, p += ld) S[k][t] = t < rows && k < depth ? to_f32(*p) : 0.0f;
    }
}

// C (M, P) = A (M, K) B (K, P) for this block's 64 x 64 tile (blockIdx.x: rows, blockIdx.y:
// columns). B[k][p] = B[k * P + p]; A[m][k] = A[m * K + k], or A[k * M + m] if A_TRANSPOSED.
// ACCUMULATE: C (fp32) += the product; otherwise C = the product, stored in C's dtype.
template <bool A_TRANSPOSED, bool ACCUMULATE, class T, class Out>
__device__ void gemm(const T* __restrict__ A, const T* __restrict__ B, Out* __restrict__ C, long M, long P,
                     long K) {
    alignas(16) __shared__ Slice As, Bs;
    int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
    long m0 = (long)blockIdx.x * TILE, p0 = (long)blockIdx.y * TILE;
    float acc[8][8] = {};
    for (long k0 = 0; k0 < K; k0 += TILE_K) {
        load_slice<!A_TRANSPOSED>(As, A, A_TRANSPOSED ? M : K, M, K, m0, k0);
        load_slice<false>(Bs, B, P, P, K, p0, k0);
        __syncthreads();  // the slice is loaded
        UNROLL for (int k = 0; k < TILE_K; k++) {
            Quad a0 = *(const Quad*)&As[k][4 * ty], a1 = *(const Quad*)&As[k][32 + 4 * ty];
            Quad b0 = *(const Quad*)&Bs[k][4 * tx], b1 = *(const Quad*)&Bs[k][32 + 4 * tx];
            UNROLL for (int i = 0; i < 8; i++) {
                float a = i < 4 ? a0.v[i] : a1.v[i - 4];
                UNROLL for (int j = 0; j < 8; j++) acc[i][j] = fmaf(a, j < 4 ? b0.v[j] : b1.v[j - 4], acc[i][j]);
            }
        }
        __syncthreads();  // every thread is done with the slice before the next one overwrites it
    }
    UNROLL for (int i = 0; i < 8; i++) {
        long row = m0 + (i < 4 ? 4 * ty + i : 28 + 4 * ty + i);
        UNROLL for (int j = 0; j < 8; j++) {
            long col = p0 + (j < 4 ? 4 * tx + j : 28 + 4 * tx + j);
            if (row < M && col < P) {
                if constexpr (ACCUMULATE) C[row * P + col] += acc[i][j];
                else store(C, row * P + col, acc[i][j]);
            }
        }
    }
}

// db[c] += sum over the N rows of G[n][c], for this block's 32 columns.
template <class T>
__device__ void bias_grad(const T* __restrict__ G, float* __restrict__ db, long N, long out) {
    __shared__ float partial[BIAS_ROWS][BIAS_COLS];
    long c = (long)blockIdx.x * BIAS_COLS + threadIdx.x;
    float sum = 0.0f;
    if (c < out)
        for (long n = threadIdx.y; n < N; n += BIAS_ROWS) sum += to_f32(G[n * out + c]);
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();  // every row group's partial sum is in
    if (threadIdx.y == 0 && c < out) {
        for (int r = 1; r < BIAS_ROWS; r++) sum += partial[r][threadIdx.x];
        db[c] += sum;
    }
}

#define MATMUL_BACKWARD(T, suffix)                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)                                      \
        matmul_dx_##suffix(const T* G, const T* W, T* dX, long N, long in, long out) {                        \
        gemm<false, false>(G, W, dX, N, in, out);                                                             \
    }                                                                                                         \
    EMU_EXPORT(matmul_dx_##suffix, (const T* G, const T* W, T* dX, long N, long in, long out),                \
               (G, W, dX, N, in, out))                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)                                      \
        matmul_dw_##suffix(const T* G, const T* X, float* dW, long N, long in, long out) {                    \
        gemm<true, true>(G, X, dW, out, in, N);                                                               \
    }                                                                                                         \
    EMU_EXPORT(matmul_dw_##suffix, (const T* G, const T* X, float* dW, long N, long in, long out),            \
               (G, X, dW, N, in, out))                                                                        \
    extern "C" __global__ void __launch_bounds__(BIAS_COLS * BIAS_ROWS)                                       \
        bias_grad_##suffix(const T* G, float* db, long N, long out) {                                         \
        bias_grad(G, db, N, out);                                                                             \
    }                                                                                                         \
    EMU_EXPORT(bias_grad_##suffix, (const T* G, float* db, long N, long out), (G, db, N, out))

MATMUL_BACKWARD(float, f32)
MATMUL_BACKWARD(bf16, bf16)

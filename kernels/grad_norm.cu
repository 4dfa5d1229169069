// grad_norm.cu: the sums of squares behind the global gradient norm (minitrain/optim.py), on the
// device, so that a step moves one array of sums to the host instead of syncing once per slice.
//
//   sums[s] = sum of g[i]^2 over slice s (one slice of one gradient, from a table), in float64
//
// One block of THREADS threads per slice: thread t adds the squares of the slice's elements t,
// t + THREADS, ... in that order, then the block adds the THREADS partial sums by a fixed
// tree (halving strides). Every operation is a correctly rounded float64 one (_rn intrinsics: no
// fma contraction), so a slice's sum depends on its elements alone -- not on which array or rank
// holds it, nor on the GPU -- and the CPU emulation gives the same bits as the device. The host
// adds the slices exactly (math.fsum). Traffic: each element is read once.
#include "common.cuh"

#define THREADS 256

// Every slice of every gradient of a step in one launch: the table has a row per gradient,
// (address, length n, first block), and block b sums the squares of one `chunk`-element slice of
// one gradient into sums[b] (so the sums come in the order of the gradients, then of their slices).
extern "C" __global__ void sum_squares_multi(const long* __restrict__ table, long rows, long chunk,
                                             double* __restrict__ sums) {
    __shared__ double part[THREADS];
    const long* row = table_row(table, 3, rows, blockIdx.x);
    const long start = (blockIdx.x - row[2]) * chunk, n = min(chunk, row[1] - start);
    const float* g = (const float*)row[0] + start;
    double acc = 0.0;
    for (long i = threadIdx.x; i < n; i += THREADS) {
        const double x = (double)g[i];
        acc = __dadd_rn(acc, __dmul_rn(x, x));
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) part[threadIdx.x] = __dadd_rn(part[threadIdx.x], part[threadIdx.x + stride]);
        __syncthreads();
    }
    if (threadIdx.x == 0) sums[blockIdx.x] = part[0];
}
EMU_EXPORT(sum_squares_multi, (const long* table, long rows, long chunk, double* sums), (table, rows, chunk, sums))

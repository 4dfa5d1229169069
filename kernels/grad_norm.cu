// grad_norm.cu: the sums of squares behind the global gradient norm (minitrain/optim.py), on the
// device, so that a step moves one array of sums to the host instead of syncing once per slice.
//
//   sums[s] = sum of g[i]^2 over slice s = [s * chunk, min((s + 1) * chunk, n)), in float64
//
// One block of THREADS threads per slice: thread t adds the squares of elements start + t,
// start + t + THREADS, ... in that order, then the block adds the THREADS partial sums by a fixed
// tree (halving strides). Every operation is a correctly rounded float64 one (_rn intrinsics: no
// fma contraction), so a slice's sum depends on its elements alone -- not on which array or rank
// holds it, nor on the GPU -- and the CPU emulation gives the same bits as the device. The host
// adds the slices exactly (math.fsum). Traffic: each element is read once.
#include "common.cuh"

#define THREADS 256

// grid: one block per slice; block: THREADS threads.
extern "C" __global__ void sum_squares_f32(const float* __restrict__ g, double* __restrict__ sums, long n,
                                           long chunk) {
    __shared__ double part[THREADS];
    const long start = (long)blockIdx.x * chunk, stop = min(n, start + chunk);
    double acc = 0.0;
    for (long i = start + threadIdx.x; i < stop; i += THREADS) {
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
EMU_EXPORT(sum_squares_f32, (const float* g, double* sums, long n, long chunk), (g, sums, n, chunk))

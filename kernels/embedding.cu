// embedding.cu: the token embedding's backward (minitrain/ops/embedding.py), deterministic.
//
//   sums[u] = sum of dy[n] over the positions n whose token is used[u], in increasing n
//
// The host sorts the batch's positions by token (a stable sort: equal tokens keep their order)
// and gives `order` (the positions, grouped by token) and `starts` (U + 1 offsets into it). One
// block owns each used row u and adds its positions' gradients one after another, each add
// rounded once (__fadd_rn): no atomics, so two runs give the same bits, and the order is NumPy's
// add.at order (first occurrence first), so the GPU gives the CPU's bits. Threads stride over the
// H columns; each reads its column of every position of the row's segment (coalesced across the
// block). Traffic: each dy element read once, each sum written once.
#include "common.cuh"

// grid: U blocks (one per used token); block: any multiple of 32 threads.
extern "C" __global__ void embedding_backward_f32(const float* __restrict__ dy, const long* __restrict__ order,
                                                  const long* __restrict__ starts, float* __restrict__ sums,
                                                  long H) {
    const long u = blockIdx.x, first = starts[u], last = starts[u + 1];
    for (long h = threadIdx.x; h < H; h += blockDim.x) {
        float acc = 0.0f;
        for (long j = first; j < last; ++j) acc = __fadd_rn(acc, dy[order[j] * H + h]);
        sums[u * H + h] = acc;
    }
}
EMU_EXPORT(embedding_backward_f32, (const float* dy, const long* order, const long* starts, float* sums, long H),
           (dy, order, starts, sums, H))

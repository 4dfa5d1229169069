// cuda_emu.h: compile CUDA kernel source with g++ and run it on the CPU, for tests.
//
//   g++ -std=c++20 -pthread -shared -fPIC -include kernels/cuda_emu.h -x c++ kernels/foo.cu
//
// Every CUDA thread of a block is a fiber (a ucontext with its own stack) on the calling thread,
// and only one runs at a time: a thread runs until it reaches a sync point (__syncthreads, a warp
// shuffle or __syncwarp) or returns, then the next runnable thread takes over, in thread-index
// order (or reverse order). A sync point releases its waiters once every live participant (the
// block, or the warp's lanes) has arrived. Blocks run one after another. This schedule is
// deterministic and adversarial on purpose: a missing __syncthreads means a thread reads shared
// memory its neighbours have not written yet (or have already overwritten), every time, so the
// kernel's output is wrong and a test catches it. (Fibers rather than OS threads: a hand-over is
// a user-space context switch, not a wake-up through the kernel's scheduler; the schedule, and so
// every result, is the same.)
//
// __shared__ variables become function statics: one copy per kernel, which is one per block since
// blocks do not overlap. Shared memory must be static (no extern __shared__).
//
// ctypes entry points: after a kernel, `EMU_EXPORT(kernel, (params...), (args...))` defines
// extern "C" emu_<kernel>(gx, gy, gz, bx, by, bz, reverse, params...). Under nvcc/NVRTC
// (__CUDACC__ / __CUDACC_RTC__ defined) the header is not used and EMU_EXPORT is empty.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};

namespace emu {

constexpr int WARP = 32;

constexpr size_t STACK = 256 << 10;  // bytes of each thread's stack (untouched pages cost nothing)

inline uint3 thread_idx, block_idx;  // the running thread's: set at each hand-over
inline int linear_id;
inline dim3 block_dim, grid_dim;

// The cooperative scheduler of one block.
struct Block {
    enum State { RUNNABLE, AT_BLOCK_SYNC, AT_WARP_SYNC, DONE };
    int n = 0, turn = -1;
    bool reverse = false;
    std::vector<State> state;
    std::vector<uint64_t> lanes;  // shuffle exchange buffer, one slot per thread
    struct Fragments {            // one thread's operands of a warp's mma (mma_bf16_16816 below)
        unsigned a[4], b[2];
        float c[4];
    };
    std::vector<Fragments> mma;  // two slots per thread: a warp's consecutive mma alternate between them
    std::vector<unsigned> mma_calls;  // per thread, its mma so far: which of its two slots is next
    std::vector<ucontext_t> context;  // per thread
    ucontext_t launcher;  // the caller's, resumed when every thread is done
    const std::function<void()>* kernel = nullptr;

    void start(int threads, bool rev, const std::function<void()>& k, std::vector<std::unique_ptr<char[]>>& stacks) {
        n = threads;
        reverse = rev;
        kernel = &k;
        state.assign(n, RUNNABLE);
        lanes.assign(n, 0);
        mma.assign(2 * n, Fragments{});
        mma_calls.assign(n, 0);
        context.resize(n);
        while (int(stacks.size()) < n) stacks.emplace_back(new char[STACK]);
        for (int t = 0; t < n; t++) {
            getcontext(&context[t]);
            context[t].uc_stack.ss_sp = stacks[t].get();
            context[t].uc_stack.ss_size = STACK;
            context[t].uc_link = nullptr;  // a thread never returns: finish() hands over
            makecontext(&context[t], (void (*)())run, 0);
        }
        turn = reverse ? n - 1 : 0;
    }
    static void run();  // a thread's body: the kernel, then finish
    // Release completed sync points, then give the turn to the next runnable thread (-1: none left).
    void schedule() {
        bool all_at_block = true, any_alive = false;
        for (int i = 0; i < n; i++) {
            if (state[i] == DONE) continue;
            any_alive = true;
            if (state[i] != AT_BLOCK_SYNC) all_at_block = false;
        }
        if (!any_alive) { turn = -1; return; }
        if (all_at_block)
            for (int i = 0; i < n; i++)
                if (state[i] == AT_BLOCK_SYNC) state[i] = RUNNABLE;
        for (int w = 0; w < n; w += WARP) {
            bool all_at_warp = true, any = false;
            for (int i = w; i < w + WARP && i < n; i++) {
                if (state[i] == DONE) continue;
                any = true;
                if (state[i] != AT_WARP_SYNC) all_at_warp = false;
            }
            if (any && all_at_warp)
                for (int i = w; i < w + WARP && i < n; i++)
                    if (state[i] == AT_WARP_SYNC) state[i] = RUNNABLE;
        }
        for (int k = 0; k < n; k++) {
            int i = reverse ? n - 1 - k : k;
            if (state[i] == RUNNABLE) { turn = i; return; }
        }
        std::fprintf(stderr, "cuda_emu: deadlock: live threads wait at sync points that cannot complete "
                             "(a __syncthreads or shuffle inside divergent code?)\n");
        std::abort();
    }
    // Make thread `t` the running one (its ids), saving the caller's context into `from`.
    void hand_over(ucontext_t* from, int t) {
        linear_id = t;
        thread_idx = {unsigned(t % block_dim.x), unsigned(t / block_dim.x % block_dim.y),
                      unsigned(t / (block_dim.x * block_dim.y))};
        swapcontext(from, &context[t]);
    }
    void sync(int me, State kind) {
        state[me] = kind;
        schedule();
        if (turn != me) hand_over(&context[me], turn);  // returns when `me` has the turn again
    }
    void finish(int me) {
        state[me] = DONE;
        schedule();
        if (turn < 0) setcontext(&launcher);
        hand_over(&context[me], turn);  // never resumed
    }
};

inline Block* block = nullptr;

inline void Block::run() {
    int me = linear_id;
    (*block->kernel)();
    block->finish(me);
}

inline void launch(dim3 grid, dim3 blk, bool reverse, const std::function<void()>& kernel) {
    static std::vector<std::unique_ptr<char[]>> stacks;  // kept from launch to launch
    grid_dim = grid;
    block_dim = blk;
    int threads = int(blk.x * blk.y * blk.z);
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                Block b;
                b.start(threads, reverse, kernel, stacks);
                block = &b;
                block_idx = {bx, by, bz};
                b.hand_over(&b.launcher, b.turn);  // returns when every thread is done
                block = nullptr;
            }
}

// One warp-wide exchange: every live lane publishes `value`, then reads lane `src(lane)`.
template <class T, class F>
inline T exchange(T value, F src) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    int me = linear_id, lane = me % WARP, base = me - lane;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    block->lanes[me] = bits;
    block->sync(me, Block::AT_WARP_SYNC);  // every lane has published
    int from = src(lane);
    T out = value;
    if (from >= 0 && from < WARP && base + from < block->n) std::memcpy(&out, &block->lanes[base + from], sizeof(T));
    block->sync(me, Block::AT_WARP_SYNC);  // every lane has read before the buffer is reused
    return out;
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define warpSize 32

inline void __syncthreads() { emu::block->sync(emu::linear_id, emu::Block::AT_BLOCK_SYNC); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->sync(emu::linear_id, emu::Block::AT_WARP_SYNC); }
template <class T> inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return emu::exchange(v, [&](int) { return src; });
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return emu::exchange(v, [&](int lane) { return lane ^ mask; });
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return emu::exchange(v, [&](int lane) { return lane + int(delta) < 32 ? lane + int(delta) : lane; });
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
    return emu::exchange(v, [&](int lane) { return lane >= int(delta) ? lane - int(delta) : lane; });
}

// Only one emulated thread runs at a time, so a read-modify-write is atomic already.
inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
inline int atomicAdd(int* p, int v) { int old = *p; *p = old + v; return old; }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Correctly rounded single operations: x86-64 SSE arithmetic rounds each one (no fma without -mfma).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D (16 x 8) = A (16 x 16) B (16 x 8) + C, fp32
// accumulation, by the 32 lanes of a warp together, each holding its fragments as PTX lays them
// out (lane = 4 g + t): A in 4 registers of two bf16 (low half first), rows g and g + 8, columns
// 2t, 2t + 1 and 2t + 8, 2t + 9 -- a[0] (g, 2t..), a[1] (g + 8, 2t..), a[2] (g, 2t + 8..),
// a[3] (g + 8, 2t + 8..); B in 2 registers, rows (k) 2t, 2t + 1 and 2t + 8, 2t + 9 of column g;
// C and D: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1). Every lane publishes its fragments
// (a warp sync point), rebuilds A and B whole, and forms its four results: the products exact (a
// bf16 product fits fp32), summed in double and rounded once -- the tensor core's order of sums
// is its own, so tests compare with a tolerance, never bits. Consecutive mma of a warp publish into
// alternate slots: no lane can publish twice more before every lane has read (the next sync point
// waits for all of them), so one sync point per mma suffices.
inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    int me = emu::linear_id, lane = me % emu::WARP, base = me - lane;
    const int slots = (emu::block->mma_calls[me]++ % 2) * emu::block->n;  // this call's half of the slots
    auto& mine = emu::block->mma[slots + me];
    std::memcpy(mine.a, a, sizeof mine.a);
    std::memcpy(mine.b, b, sizeof mine.b);
    std::memcpy(mine.c, c, sizeof mine.c);
    emu::block->sync(me, emu::Block::AT_WARP_SYNC);  // every lane has published
    auto half = [](unsigned reg, int h) { return __uint_as_float(((reg >> (16 * h)) & 0xffffu) << 16); };
    float A[16][16], Bm[16][8];
    for (int l = 0; l < emu::WARP; l++) {
        const auto& f = emu::block->mma[slots + base + l];
        int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = half(f.a[0], h);
            A[g + 8][2 * t + h] = half(f.a[1], h);
            A[g][2 * t + 8 + h] = half(f.a[2], h);
            A[g + 8][2 * t + 8 + h] = half(f.a[3], h);
            Bm[2 * t + h][g] = half(f.b[0], h);
            Bm[2 * t + 8 + h][g] = half(f.b[1], h);
        }
    }
    int g = lane / 4, t = lane % 4;
    float out[4];
    for (int r = 0; r < 4; r++) {
        int row = g + 8 * (r / 2), col = 2 * t + r % 2;
        double sum = mine.c[r];
        for (int k = 0; k < 16; k++) sum += (double)A[row][k] * (double)Bm[k][col];
        out[r] = (float)sum;
    }
    std::memcpy(d, out, sizeof out);
}

using std::max;  // expf, logf, sqrtf, fmaxf ... come from <cmath> in the global namespace
using std::min;

#define EMU_UNPAREN(...) __VA_ARGS__
#define EMU_EXPORT(kernel, params, args)                                                                  \
    extern "C" void emu_##kernel(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,         \
                                 unsigned bz, int reverse, EMU_UNPAREN params) {                          \
        emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), reverse != 0, [&] { kernel args; });              \
    }

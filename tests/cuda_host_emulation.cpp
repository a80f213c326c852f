// The CUDA kernels of kernels/cuda/{prune,quant,distill,factored}.cu and optim.cu's storage
// format kernels run on the host, for
// test_cuda_emulated.py: one std::thread per CUDA thread, one block at a time, a barrier for
// __syncthreads, the compiler's atomics for atomicAdd/atomicMax. It checks the kernels'
// indexing, synchronization and arithmetic against the NumPy reference on machines without
// a GPU; it does not replace the GPU tests (device compiler, memory model, speed).
#include <barrier>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#define restrict __restrict__
#define __global__
#define __device__
#define __shared__ static  // one block runs at a time: its threads share the statics

struct fo_dim3 { unsigned x = 0, y = 0; };
thread_local fo_dim3 threadIdx;
fo_dim3 blockIdx, blockDim, gridDim;
static std::barrier<> *fo_block_barrier;

inline void __syncthreads() { fo_block_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }
template <class T> T atomicAdd(T *p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> T atomicMax(T *p, T v)
{
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                   __ATOMIC_SEQ_CST)) {
    }
    return old;
}

static void fo_launch(long grid, long block, const std::function<void()> &kernel,
                      long grid_y = 1)
{
    std::barrier<> barrier(block);
    fo_block_barrier = &barrier;
    gridDim.x = grid;
    gridDim.y = grid_y;
    blockDim.x = block;
    for (long by = 0; by < grid_y; by++)
        for (long b = 0; b < grid; b++) {
            blockIdx.x = b;
            blockIdx.y = by;
            std::vector<std::thread> threads;
            for (long t = 0; t < block; t++)
                threads.emplace_back([&kernel, t] { threadIdx.x = t; kernel(); });
            for (auto &t : threads) t.join();
        }
}

#include "../kernels/cuda/distill.cu"
#include "../kernels/cuda/factored.cu"
#include "../kernels/cuda/optim.cu"
#include "../kernels/cuda/prune.cu"
#include "../kernels/cuda/quant.cu"

// run_<kernel>(grid, block, the kernel's arguments...)
#define FO_RUN(NAME, PARAMS, ARGS)                                                        \
    extern "C" void run_##NAME(long grid, long block, PARAMS)                             \
    {                                                                                     \
        fo_launch(grid, block, [&] { fo_cuda_##NAME ARGS; });                             \
    }
#define FO_P(...) __VA_ARGS__
typedef unsigned long long u64;
#define FO_RUN_FOR(T, SFX, K)                                                             \
    FO_RUN(prune_hist_##SFX, FO_P(const fo_i64 *tab, fo_i64 nt, int shift, K pm, K pf,    \
                                  u64 *counts, K *maxkey),                                \
           (tab, nt, shift, pm, pf, counts, maxkey))                                      \
    FO_RUN(prune_ties_##SFX, FO_P(const fo_i64 *tab, fo_i64 nt, K thr, fo_i64 *out),      \
           (tab, nt, thr, out))                                                           \
    FO_RUN(prune_mask_##SFX, FO_P(const fo_i64 *tab, fo_i64 nt, K thr, const fo_i64 *m),  \
           (tab, nt, thr, m))                                                             \
    FO_RUN(quant_##SFX, FO_P(int kind, const T *x, void *out, const T *gy, fo_i64 n,      \
                             fo_i64 B, fo_i64 C, const T *inv, const T *zp, const T *sc,  \
                             T qmin, T qmax, int fused, u64 *nan),                        \
           (kind, x, out, gy, n, B, C, inv, zp, sc, qmin, qmax, fused, nan))              \
    FO_RUN(dequant_##SFX, FO_P(const unsigned char *q, T *y, fo_i64 n, fo_i64 B,          \
                               fo_i64 C, const int *zp, const double *sc, int is_signed), \
           (q, y, n, B, C, zp, sc, is_signed))                                            \
    FO_RUN(kd_rows_##SFX, FO_P(const T *s, const T *t, T *g, fo_i64 B, fo_i64 C,         \
                               const fo_i64 *lab, T temp, T wk, T wc, int squares,        \
                               double *rows),                                             \
           (s, t, g, B, C, lab, temp, wk, wc, squares, rows))
FO_RUN_FOR(float, f32, fo_key_f32)
FO_RUN_FOR(double, f64, fo_key_f64)

// the factors pass's launches have a second grid dimension
#define FO_RUN_GRID2(NAME, PARAMS, ARGS)                                                  \
    extern "C" void run_##NAME(long grid, long grid_y, long block, PARAMS)                \
    {                                                                                     \
        fo_launch(grid, block, [&] { fo_cuda_##NAME ARGS; }, grid_y);                     \
    }
#define FO_RUN_FACTORED(T, SFX)                                                           \
    FO_RUN_GRID2(adafactor_cols_##SFX, FO_P(const fo_i64 *tab, fo_i64 nt, fo_i64 at),     \
                 (tab, nt, at))                                                           \
    FO_RUN_GRID2(adafactor_rowparts_##SFX, FO_P(const fo_i64 *tab, fo_i64 nt, fo_i64 at), \
                 (tab, nt, at))                                                           \
    FO_RUN_GRID2(adafactor_rows_##SFX,                                                    \
                 FO_P(const fo_i64 *tab, fo_i64 nt, fo_i64 ni, fo_i64 ns, fo_i64 at),     \
                 (tab, nt, ni, ns, at))
FO_RUN_FACTORED(float, f32)
FO_RUN_FACTORED(double, f64)

// the storage format kernels of optim.cu: run_fmt_<NAME>(grid, block, table, n_tensors,
// args_at, fmt_at)
#define FO_RUN_FMT(T, SFX, NAME, ARGS, N)                                                 \
    FO_RUN(fmt_##NAME, FO_P(const fo_i64 *tab, fo_i64 nt, fo_i64 args_at, fo_i64 fmt_at),  \
           (tab, nt, args_at, fmt_at))
FO_ELEMENTWISE_KERNELS(FO_RUN_FMT, _, _)
FO_CAUTIOUS_KERNELS(FO_RUN_FMT, _, _)

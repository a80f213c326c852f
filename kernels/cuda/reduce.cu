/*
 * reduce.cu - the gradient-norm partials on NVIDIA GPUs, in fastopt/reduce.h's fixed order,
 * so they equal the CPU backends' bit for bit: one block of FO_NORM_LANES threads per chunk;
 * thread j accumulates the chunk's elements j, j + 16, ... in index order (coalesced: the
 * 16 threads read 16 neighbours at a time), then thread 0 adds the lanes in lane order.
 * `table`: the grads' addresses, then (tensor, offset, length) per chunk, as in optim.cu.
 */
#include "fastopt/reduce.h"

typedef long long fo_i64;

#define FO_DEFINE_CUDA_NORM(T, SFX, SQRT, FABS)                                                 \
    extern "C" __global__ void fo_cuda_norm_partials_##SFX(                               \
        const fo_i64 *table, fo_i64 n_tensors, int kind, double *out)                     \
    {                                                                                     \
        __shared__ double lane[FO_NORM_LANES];                                            \
        const fo_i64 *chunk = table + n_tensors + 3 * (fo_i64)blockIdx.x;                 \
        const T *g = (const T *)table[chunk[0]] + chunk[1];                               \
        const fo_i64 n = chunk[2];                                                        \
        double acc = 0;                                                                   \
        for (fo_i64 i = threadIdx.x; i < n; i += FO_NORM_LANES)                           \
            acc = fo_norm_acc(acc, fo_norm_term_##SFX(g[i], kind), kind);                 \
        lane[threadIdx.x] = acc;                                                          \
        __syncthreads();                                                                  \
        if (threadIdx.x == 0) {                                                           \
            double s = lane[0];                                                           \
            for (int j = 1; j < FO_NORM_LANES; j++) s = fo_norm_acc(s, lane[j], kind);    \
            out[blockIdx.x] = s;                                                          \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_NORM)
#undef FO_DEFINE_CUDA_NORM

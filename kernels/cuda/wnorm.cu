/*
 * wnorm.cu - weight normalization on NVIDIA GPUs (fastopt/wnorm.h has the math and the
 * summation order), compiled at run time by CuPy (NVRTC).
 *
 * fo_cuda_slice_dot: one block of FO_NORM_LANES threads per (slice b, chunk k); for each
 * row a in order, thread j sums lane j of the row's chunk (elements j, j + 16, ... in
 * index order), thread 0 adds the lanes in order and the sum to the partial P[k][b]. The
 * elementwise passes are grid-stride loops, element i in slice (i / C) % B.
 */
#include "fastopt/wnorm.h"

typedef long long fo_i64;

#define FO_DEFINE_CUDA_WNORM(T, SFX, SQRT, FABS)                                                \
    extern "C" __global__ void fo_cuda_slice_dot_##SFX(const T *x, const T *y, fo_i64 A,  \
                                                       fo_i64 B, fo_i64 C, double *P)     \
    {                                                                                     \
        __shared__ double lane[FO_NORM_LANES];                                            \
        const fo_i64 b = blockIdx.x, k = blockIdx.y, c0 = k * FO_CHUNK;                   \
        const fo_i64 len = C - c0 < FO_CHUNK ? C - c0 : FO_CHUNK;                         \
        double acc = 0;                                                                   \
        for (fo_i64 a = 0; a < A; a++) {                                                  \
            const fo_i64 base = (a * B + b) * C + c0;                                     \
            double s = 0;                                                                 \
            for (fo_i64 i = threadIdx.x; i < len; i += FO_NORM_LANES)                     \
                s += fo_dot_term_##SFX(x[base + i], y[base + i]);                         \
            lane[threadIdx.x] = s;                                                        \
            __syncthreads();                                                              \
            if (threadIdx.x == 0) {                                                       \
                double row = lane[0];                                                     \
                for (int j = 1; j < FO_NORM_LANES; j++) row += lane[j];                   \
                acc += row;                                                               \
            }                                                                             \
            __syncthreads();                                                              \
        }                                                                                 \
        if (threadIdx.x == 0) P[k * B + b] = acc;                                         \
    }                                                                                     \
    extern "C" __global__ void fo_cuda_wnorm_apply_##SFX(T *out, const T *v, const T *gw, \
                                                         const T *k1, const T *k3,        \
                                                         fo_i64 n, fo_i64 B, fo_i64 C)    \
    {                                                                                     \
        for (fo_i64 i = blockIdx.x * (fo_i64)blockDim.x + threadIdx.x; i < n;             \
             i += (fo_i64)gridDim.x * blockDim.x) {                                       \
            const fo_i64 b = (i / C) % B;                                                 \
            out[i] = gw ? fo_wnorm_grad_##SFX(v[i], gw[i], k1[b], k3[b])                  \
                        : fo_wnorm_scale_##SFX(v[i], k1[b]);                              \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_WNORM)
#undef FO_DEFINE_CUDA_WNORM

/*
 * optim.cu - optimizer update rules on NVIDIA GPUs, compiled at run time by CuPy (NVRTC).
 *
 * Many tensors, one launch: `table` is a device int64 array holding, for each tensor, its
 * operand addresses (n_ops of them: param in, param out, grad, state...) and then, for each
 * chunk, (tensor, offset, length). One thread block runs one chunk with a block-stride loop.
 * The element math is the shared header's, the same functions the CPU loops call.
 */
#include "fastopt/optim.h"

typedef long long fo_i64;

#define FO_CHUNK_BEGIN(N_OPS)                                                             \
    const fo_i64 *chunk_ = table + n_tensors * (N_OPS) + 3 * (fo_i64)blockIdx.x;         \
    const fo_i64 *ops_ = table + chunk_[0] * (N_OPS);                                    \
    const fo_i64 lo_ = chunk_[1], n_ = chunk_[2];                                         \
    for (fo_i64 i = threadIdx.x; i < n_; i += blockDim.x)

#define FO_OPERAND(T, K) (((T *)ops_[K]) + lo_)

#define FO_DEFINE_CUDA_OPTIM(T, SFX, SQRT)                                                \
    extern "C" __global__ void fo_cuda_sgd_##SFX(                                         \
        const fo_i64 *table, fo_i64 n_tensors, int has_buf, T clip, T gscale,             \
        T weight_decay, T momentum, T one_minus_dampening, T neg_lr, int first,           \
        int nesterov)                                                                     \
    {                                                                                     \
        const fo_sgd_args_##SFX a = {clip, gscale, weight_decay, momentum,                \
                                     one_minus_dampening, neg_lr, first, nesterov};       \
        const int n_ops = has_buf ? 4 : 3;                                                \
        FO_CHUNK_BEGIN(n_ops)                                                             \
        {                                                                                 \
            const T p = FO_OPERAND(const T, 0)[i];                                        \
            const T g = FO_OPERAND(const T, 2)[i];                                        \
            FO_OPERAND(T, 1)[i] = has_buf                                                 \
                ? fo_sgd_momentum_##SFX(p, g, FO_OPERAND(T, 3) + i, &a)                   \
                : fo_sgd_##SFX(p, g, &a);                                                 \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    extern "C" __global__ void fo_cuda_adam_##SFX(                                        \
        const fo_i64 *table, fo_i64 n_tensors, int amsgrad, T clip, T gscale,             \
        T weight_decay, T decay, T one_minus_beta1, T beta2, T one_minus_beta2,           \
        T bias_correction2_sqrt, T eps, T neg_step_size, int lerp_hi)                     \
    {                                                                                     \
        const fo_adam_args_##SFX a = {clip, gscale, weight_decay, decay, one_minus_beta1, \
                                      beta2, one_minus_beta2, bias_correction2_sqrt, eps, \
                                      neg_step_size, lerp_hi};                            \
        const int n_ops = amsgrad ? 6 : 5;                                                \
        FO_CHUNK_BEGIN(n_ops)                                                             \
        {                                                                                 \
            const T p = FO_OPERAND(const T, 0)[i];                                        \
            const T g = FO_OPERAND(const T, 2)[i];                                        \
            T *m = FO_OPERAND(T, 3) + i;                                                  \
            T *v = FO_OPERAND(T, 4) + i;                                                  \
            FO_OPERAND(T, 1)[i] = amsgrad                                                 \
                ? fo_adam_amsgrad_##SFX(p, g, m, v, FO_OPERAND(T, 5) + i, &a)             \
                : fo_adam_##SFX(p, g, m, v, &a);                                          \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_OPTIM)
#undef FO_DEFINE_CUDA_OPTIM

/*
 * optim_loops.h - chunk functions for the optimizer rules (see chunks.h).
 * Operands: 0 param in, 1 param out, 2 grad, then the rule's state in its own order.
 */
#ifndef FASTOPT_CPU_OPTIM_LOOPS_H
#define FASTOPT_CPU_OPTIM_LOOPS_H

#include "chunks.h"
#include "fastopt/optim.h"

#define FO_DEFINE_OPTIM_LOOPS(T, SFX, SQRT)                                               \
    /* operands: p, p_out, g */                                                           \
    FO_MULTIVERSION static void fo_cpu_sgd_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args) \
    {                                                                                     \
        const fo_sgd_args_##SFX a = *(const fo_sgd_args_##SFX *)args;                     \
        const T *restrict g = (const T *)ptr[2] + lo;                                     \
        FO_PARAM_LOOP(T, fo_sgd_##SFX, g[i], &a);                                         \
    }                                                                                     \
    /* operands: p, p_out, g, momentum_buffer */                                          \
    FO_MULTIVERSION static void fo_cpu_sgd_momentum_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n,          \
                                          const void *args)                               \
    {                                                                                     \
        const fo_sgd_args_##SFX a = *(const fo_sgd_args_##SFX *)args;                     \
        const T *restrict g = (const T *)ptr[2] + lo;                                     \
        T *restrict b = (T *)ptr[3] + lo;                                                 \
        FO_PARAM_LOOP(T, fo_sgd_momentum_##SFX, g[i], b + i, &a);                         \
    }                                                                                     \
    /* operands: p, p_out, g, exp_avg, exp_avg_sq */                                      \
    FO_MULTIVERSION static void fo_cpu_adam_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        const fo_adam_args_##SFX a = *(const fo_adam_args_##SFX *)args;                   \
        const T *restrict g = (const T *)ptr[2] + lo;                                     \
        T *restrict m = (T *)ptr[3] + lo;                                                 \
        T *restrict v = (T *)ptr[4] + lo;                                                 \
        FO_PARAM_LOOP(T, fo_adam_##SFX, g[i], m + i, v + i, &a);                          \
    }                                                                                     \
    /* operands: p, p_out, g, exp_avg, exp_avg_sq, max_exp_avg_sq */                      \
    FO_MULTIVERSION static void fo_cpu_adam_amsgrad_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n,          \
                                          const void *args)                               \
    {                                                                                     \
        const fo_adam_args_##SFX a = *(const fo_adam_args_##SFX *)args;                   \
        const T *restrict g = (const T *)ptr[2] + lo;                                     \
        T *restrict m = (T *)ptr[3] + lo;                                                 \
        T *restrict v = (T *)ptr[4] + lo;                                                 \
        T *restrict vmax = (T *)ptr[5] + lo;                                              \
        FO_PARAM_LOOP(T, fo_adam_amsgrad_##SFX, g[i], m + i, v + i, vmax + i, &a);        \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_OPTIM_LOOPS)
#undef FO_DEFINE_OPTIM_LOOPS

#endif /* FASTOPT_CPU_OPTIM_LOOPS_H */

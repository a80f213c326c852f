/*
 * quant_loops.h - quantization on the CPU (fastopt/quant.h has the math): one chunk
 * [lo, lo + n) of an array viewed as (A, B, C) around its quantization axis, B slices with
 * their own parameters (B = 1, C = size for per-tensor). The loops return how many
 * elements of x were NaN, so the caller can refuse them without another pass.
 */
#ifndef FASTOPT_CPU_QUANT_LOOPS_H
#define FASTOPT_CPU_QUANT_LOOPS_H

#include <stddef.h>
#include <stdint.h>
#include "chunks.h"
#include "fastopt/quant.h"

typedef struct {
    const void *inv, *zp, *scale; /* per slice, in the float dtype (zero points as floats) */
    const int32_t *zp_int;        /* per slice, for dequantize */
    const double *scale_f64;      /* per slice, for dequantize */
    ptrdiff_t B, C;
    double qmin, qmax;
    int fused;                    /* per-tensor float32 quantize: fma, as FBGEMM */
    int is_signed;                /* the 8-bit codes are int8 (else uint8) */
} fo_quant_args;

#define FO_QUANT_PARAMS(T)                                                                \
    const T *restrict inv = (const T *)a->inv, *restrict zp = (const T *)a->zp;           \
    const T qmin = (T)a->qmin, qmax = (T)a->qmax;                                         \
    ptrdiff_t nan = 0;

#define FO_DEFINE_QUANT_LOOPS(T, SFX, SQRT, FABS)                                         \
    FO_MULTIVERSION static ptrdiff_t fo_cpu_quantize_##SFX(                               \
        const T *restrict x, uint8_t *restrict q, ptrdiff_t lo, ptrdiff_t n,              \
        const fo_quant_args *a)                                                           \
    {                                                                                     \
        FO_QUANT_PARAMS(T)                                                                \
        if (a->fused)                                                                     \
            FO_SLICE_WALK(a->B, a->C, lo, n, {                                            \
                q[i_] = (uint8_t)(int)fo_quantize_##SFX(x[i_], inv[b_], zp[b_], qmin, qmax, 1); \
                nan += x[i_] != x[i_];                                                    \
            });                                                                           \
        else                                                                              \
            FO_SLICE_WALK(a->B, a->C, lo, n, {                                            \
                q[i_] = (uint8_t)(int)fo_quantize_##SFX(x[i_], inv[b_], zp[b_], qmin, qmax, 0); \
                nan += x[i_] != x[i_];                                                    \
            });                                                                           \
        return nan;                                                                       \
    }                                                                                     \
                                                                                          \
    FO_MULTIVERSION static ptrdiff_t fo_cpu_dequantize_##SFX(                             \
        const uint8_t *restrict q, T *restrict y, ptrdiff_t lo, ptrdiff_t n,              \
        const fo_quant_args *a)                                                           \
    {                                                                                     \
        const int32_t *restrict zp = a->zp_int;                                           \
        const double *restrict scale = a->scale_f64;                                      \
        const int8_t *restrict qs = (const int8_t *)q;                                    \
        if (a->is_signed)                                                                 \
            FO_SLICE_WALK(a->B, a->C, lo, n,                                              \
                          y[i_] = fo_dequantize_##SFX(qs[i_], zp[b_], scale[b_]));        \
        else                                                                              \
            FO_SLICE_WALK(a->B, a->C, lo, n,                                              \
                          y[i_] = fo_dequantize_##SFX(q[i_], zp[b_], scale[b_]));         \
        return 0;                                                                         \
    }                                                                                     \
                                                                                          \
    FO_MULTIVERSION static ptrdiff_t fo_cpu_fake_quantize_##SFX(                          \
        const T *restrict x, T *restrict y, ptrdiff_t lo, ptrdiff_t n,                    \
        const fo_quant_args *a)                                                           \
    {                                                                                     \
        FO_QUANT_PARAMS(T)                                                                \
        const T *restrict scale = (const T *)a->scale;                                    \
        FO_SLICE_WALK(a->B, a->C, lo, n, {                                                \
            y[i_] = fo_fake_quantize_##SFX(x[i_], inv[b_], zp[b_], scale[b_], qmin, qmax); \
            nan += x[i_] != x[i_];                                                        \
        });                                                                               \
        return nan;                                                                       \
    }                                                                                     \
                                                                                          \
    /* gx = gy where x's unclamped code is in [qmin, qmax], else 0; gy is ptr gy_ */      \
    FO_MULTIVERSION static ptrdiff_t fo_cpu_fake_quantize_grad_##SFX(                     \
        const T *restrict x, T *restrict gx, const T *restrict gy, ptrdiff_t lo,          \
        ptrdiff_t n, const fo_quant_args *a)                                              \
    {                                                                                     \
        FO_QUANT_PARAMS(T)                                                                \
        FO_SLICE_WALK(a->B, a->C, lo, n, {                                                \
            gx[i_] = fo_fake_quantize_grad_##SFX(gy[i_], x[i_], inv[b_], zp[b_], qmin, qmax); \
            nan += x[i_] != x[i_];                                                        \
        });                                                                               \
        return nan;                                                                       \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_QUANT_LOOPS)
#undef FO_DEFINE_QUANT_LOOPS
#undef FO_QUANT_PARAMS

#endif /* FASTOPT_CPU_QUANT_LOOPS_H */

/*
 * wnorm_loops.h - weight normalization on the CPU (fastopt/wnorm.h has the math and the
 * summation order). fo_cpu_slice_dot_<sfx> computes one work item of the slice sums;
 * fo_cpu_wnorm_<scale|grad>_<sfx> are chunk functions (chunks.h) of the elementwise passes,
 * operands out, v (, grad_w), walking each chunk by runs of equal factor.
 */
#ifndef FASTOPT_CPU_WNORM_LOOPS_H
#define FASTOPT_CPU_WNORM_LOOPS_H

#include <stddef.h>
#include "chunks.h"
#include "fastopt/wnorm.h"
#include "reduce_loops.h"

typedef struct {
    const void *k1, *k3; /* per-slice factors, B of them, in the weight's dtype */
    ptrdiff_t B, C;
} fo_wnorm_args;

#define FO_DEFINE_WNORM_LOOPS(T, SFX, SQRT, FABS)                                               \
    static inline __attribute__((always_inline)) double                                  \
    fo_dot_lanes_##SFX(const T *restrict x, const T *restrict y, ptrdiff_t n)             \
    {                                                                                     \
        double s;                                                                         \
        FO_LANE_SUM(s, n, FO_DOT_TERM_##SFX, FO_ADD);                                     \
        return s;                                                                         \
    }                                                                                     \
    /* partials P[b] (b0 <= b < b1) of chunk k of the (A, B, C) arrays x, y */            \
    FO_MULTIVERSION static void fo_cpu_slice_dot_##SFX(                                   \
        const T *x, const T *y, ptrdiff_t A, ptrdiff_t B, ptrdiff_t C, ptrdiff_t b0,      \
        ptrdiff_t b1, ptrdiff_t k, double *restrict P)                                    \
    {                                                                                     \
        const ptrdiff_t c0 = k * FO_CHUNK;                                                \
        const ptrdiff_t len = C - c0 < FO_CHUNK ? C - c0 : FO_CHUNK;                      \
        ptrdiff_t a, b;                                                                   \
        for (b = b0; b < b1; b++) P[b] = 0;                                               \
        for (a = 0; a < A; a++) {                                                         \
            const T *xa = x + (a * B) * C + c0, *ya = y + (a * B) * C + c0;               \
            if (C == 1) /* one element per row: its product is its chunk's sum */         \
                for (b = b0; b < b1; b++) P[b] += fo_dot_term_##SFX(xa[b], ya[b]);        \
            else                                                                          \
                for (b = b0; b < b1; b++)                                                 \
                    P[b] += fo_dot_lanes_##SFX(xa + b * C, ya + b * C, len);              \
        }                                                                                 \
    }                                                                                     \
    /* the elementwise passes: operands out, v (, grad_w) */                             \
    FO_MULTIVERSION static void fo_cpu_wnorm_scale_##SFX(char **ptr, ptrdiff_t lo,        \
                                                         ptrdiff_t n, const void *args)   \
    {                                                                                     \
        FO_WNORM_WALK(T, o[i_] = fo_wnorm_scale_##SFX(v[i_], k1[b_]))                        \
    }                                                                                     \
    FO_MULTIVERSION static void fo_cpu_wnorm_grad_##SFX(char **ptr, ptrdiff_t lo,         \
                                                        ptrdiff_t n, const void *args)    \
    {                                                                                     \
        const T *restrict gw = (const T *)ptr[2];                                         \
        FO_WNORM_WALK(T, o[i_] = fo_wnorm_grad_##SFX(v[i_], gw[i_], k1[b_], k3[b_]))           \
    }

/* BODY writes element i_ from the factors of slice b_ (FO_SLICE_WALK, chunks.h) */
#define FO_WNORM_WALK(T, BODY)                                                            \
    const fo_wnorm_args *a = (const fo_wnorm_args *)args;                                 \
    const T *restrict k1 = (const T *)a->k1, *restrict k3 = (const T *)a->k3;             \
    T *restrict o = (T *)ptr[0];                                                          \
    const T *restrict v = (const T *)ptr[1];                                              \
    (void)k3;                                                                             \
    FO_SLICE_WALK(a->B, a->C, lo, n, BODY);

#define FO_DOT_TERM_f32(i) fo_dot_term_f32(x[i], y[i])
#define FO_DOT_TERM_f64(i) fo_dot_term_f64(x[i], y[i])
#define FO_ADD(a, b) ((a) + (b))
FO_DEFINE_FOR_REALS(FO_DEFINE_WNORM_LOOPS)
#undef FO_DOT_TERM_f32
#undef FO_DOT_TERM_f64
#undef FO_ADD
#undef FO_DEFINE_WNORM_LOOPS

#endif /* FASTOPT_CPU_WNORM_LOOPS_H */

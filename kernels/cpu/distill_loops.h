/*
 * distill_loops.h - one row of the knowledge-distillation loss and its gradient on the CPU
 * (fastopt/distill.h has the math): a pass for the two maxima (16 lanes each, so it
 * vectorizes), one computing the exponentials into the caller's per-thread row buffer
 * `work` (3 C values) and their sums (16 float64 lanes, combined in lane order), and one
 * writing the gradient from the kept exponentials; the row is read from memory once and
 * stays in cache for the later passes.
 *
 * Two shortcuts that change no bit: z / T is z * (1 / T) when T is a power of two (both are
 * the one rounding of the same real number), and at T = 1 the cross entropy's
 * exponentials exp(s - ms) are the KL term's exp(zs - ms / T), so they are not computed
 * twice. At T = 2, 4 or 8 they are exp(zs - ms / T)^T, by squaring (fastopt/distill.h).
 */
#ifndef FASTOPT_CPU_DISTILL_LOOPS_H
#define FASTOPT_CPU_DISTILL_LOOPS_H

#include <math.h>
#include <stddef.h>
#include "chunks.h"
#include "fastopt/distill.h"
#include "fastopt/reduce.h"

#define FO_KD_BLOCK 512
/* the cross entropy's exponentials ec (the rows' CE argument): none (no labels), computed,
   equal to es (T = 1), or es^T by squaring es n times (FO_KD_CE_SQ(n) at T = 2^n, n = 1, 2,
   3; a compile-time count, so the loop vectorizes) */
#define FO_KD_CE_NONE 0
#define FO_KD_CE_EXP 1
#define FO_KD_CE_SAME 2
#define FO_KD_CE_SQ(n) (FO_KD_CE_SAME + (n))
#define FO_KD_CE_SQUARES(CE) ((CE) > FO_KD_CE_SAME ? (CE) - FO_KD_CE_SAME : 0)

/* element i of a block into lane j of the row's four float64 lane sums */
#define FO_KD_LANE(i, j)                                                                  \
    do {                                                                                  \
        ls[j] += (double)es[i];                                                           \
        lt[j] += (double)et[i];                                                           \
        la[j] += (double)et[i] * ((double)zt[i] - (double)zs[i]);                         \
        if (CE != FO_KD_CE_NONE && CE != FO_KD_CE_SAME) lc[j] += (double)ec[i];           \
    } while (0)
#define FO_DEFINE_KD_ROW(T, SFX, SQRT, FABS)                                              \
    /* max x[0:C], in lanes like fastopt/reduce.h's sums (the order does not change a     \
       maximum; a NaN is skipped here, and its exponential makes the row's sums NaN).     \
       Its own function: inlined into the row, gcc leaves this loop scalar */            \
    FO_MULTIVERSION static T fo_kd_max_##SFX(const T *restrict x, ptrdiff_t C)            \
    {                                                                                     \
        T v[FO_NORM_LANES], m;                                                            \
        ptrdiff_t i, j, full = C - C % FO_NORM_LANES;                                     \
        for (j = 0; j < FO_NORM_LANES; j++) v[j] = -(T)INFINITY;                          \
        for (i = 0; i < full; i += FO_NORM_LANES)                                         \
            for (j = 0; j < FO_NORM_LANES; j++) v[j] = x[i + j] > v[j] ? x[i + j] : v[j]; \
        for (j = 0; i + j < C; j++) v[j] = x[i + j] > v[j] ? x[i + j] : v[j];             \
        m = v[0];                                                                         \
        for (j = 1; j < FO_NORM_LANES; j++) m = v[j] > m ? v[j] : m;                      \
        return m;                                                                         \
    }                                                                                     \
    /* the exponentials of s[0:n], t[0:n] into es, et and ec (as CE says) and their lane  \
       sums; n a multiple of FO_NORM_LANES, or the row's end */                           \
    static inline __attribute__((always_inline)) void fo_kd_block_##SFX(                  \
        const T *restrict s, const T *restrict t, ptrdiff_t n, T temp, T rtemp, int pow2, \
        T ms, T mzs, T mzt, T *restrict es, T *restrict et, T *restrict ec, int CE,       \
        double *restrict ls, double *restrict lt, double *restrict la,                    \
        double *restrict lc)                                                              \
    {                                                                                     \
        T zs[FO_KD_BLOCK], zt[FO_KD_BLOCK];                                               \
        ptrdiff_t k, j;                                                                   \
        int q;                                                                            \
        if (pow2)                                                                         \
            for (k = 0; k < n; k++) zs[k] = s[k] * rtemp, zt[k] = t[k] * rtemp;           \
        else                                                                              \
            for (k = 0; k < n; k++) zs[k] = s[k] / temp, zt[k] = t[k] / temp;             \
        for (k = 0; k < n; k++) {                                                         \
            T e = fo_exp_neg_##SFX(zs[k] - mzs);                                          \
            es[k] = e;                                                                    \
            et[k] = fo_exp_neg_##SFX(zt[k] - mzt);                                        \
            if (CE == FO_KD_CE_EXP) ec[k] = fo_exp_neg_##SFX(s[k] - ms);                  \
            if (FO_KD_CE_SQUARES(CE)) {                                                   \
                for (q = 0; q < FO_KD_CE_SQUARES(CE); q++) e = e * e;                     \
                ec[k] = e;                                                                \
            }                                                                             \
        }                                                                                 \
        /* full groups (a fixed trip count, so it vectorizes), then the row's last few */ \
        for (k = 0; k + FO_NORM_LANES <= n; k += FO_NORM_LANES)                           \
            for (j = 0; j < FO_NORM_LANES; j++) FO_KD_LANE(k + j, j);                     \
        for (j = 0; k + j < n; j++) FO_KD_LANE(k + j, j);                                 \
    }                                                                                     \
    static inline __attribute__((always_inline)) void fo_kd_sums_##SFX(                   \
        const T *restrict s, const T *restrict t, ptrdiff_t C, T temp, T rtemp, int pow2, \
        T ms, T mzs, T mzt, T *restrict work, int CE, double *sums)                       \
    {                                                                                     \
        double ls[FO_NORM_LANES] = {0}, lt[FO_NORM_LANES] = {0};                          \
        double la[FO_NORM_LANES] = {0}, lc[FO_NORM_LANES] = {0};                          \
        ptrdiff_t b0, j;                                                                  \
        for (b0 = 0; b0 < C; b0 += FO_KD_BLOCK)                                           \
            fo_kd_block_##SFX(s + b0, t + b0, C - b0 < FO_KD_BLOCK ? C - b0 : FO_KD_BLOCK, \
                              temp, rtemp, pow2, ms, mzs, mzt, work + b0, work + C + b0,  \
                              work + 2 * C + b0, CE, ls, lt, la, lc);                     \
        sums[0] = ls[0], sums[1] = lt[0], sums[2] = la[0], sums[3] = lc[0];               \
        for (j = 1; j < FO_NORM_LANES; j++)                                               \
            sums[0] += ls[j], sums[1] += lt[j], sums[2] += la[j], sums[3] += lc[j];       \
    }                                                                                     \
    /* out[0] = KL_b, out[1] = CE_b (label < 0: no cross entropy, out[1] = 0); work: 3 C */ \
    FO_MULTIVERSION static void fo_cpu_kd_row_##SFX(                                      \
        const T *restrict s, const T *restrict t, T *restrict g, ptrdiff_t C,             \
        ptrdiff_t label, T temp, T wk, T wc, double *out, T *restrict work)               \
    {                                                                                     \
        double S[4];                                                                      \
        T ms, mt, mzs, mzt, rs, rt, rc;                                                   \
        const T *ec = work + 2 * C;                                                       \
        int e;                                                                            \
        const int pow2 = frexp((double)temp, &e) == 0.5;                                  \
        const T rtemp = (T)(1.0 / (double)temp);                                          \
        ptrdiff_t i;                                                                      \
        ms = fo_kd_max_##SFX(s, C);                                                       \
        mt = fo_kd_max_##SFX(t, C);                                                       \
        mzs = ms / temp;                                                                  \
        mzt = mt / temp;                                                                  \
        if (label < 0)                                                                    \
            fo_kd_sums_##SFX(s, t, C, temp, rtemp, pow2, ms, mzs, mzt, work,              \
                             FO_KD_CE_NONE, S);                                           \
        else if (temp == 1) {                                                             \
            fo_kd_sums_##SFX(s, t, C, temp, rtemp, pow2, ms, mzs, mzt, work,              \
                             FO_KD_CE_SAME, S);                                           \
            S[3] = S[0];                                                                  \
            ec = work;                                                                    \
        } else if (temp == 2)                                                             \
            fo_kd_sums_##SFX(s, t, C, temp, rtemp, pow2, ms, mzs, mzt, work,              \
                             FO_KD_CE_SQ(1), S);                                          \
        else if (temp == 4)                                                               \
            fo_kd_sums_##SFX(s, t, C, temp, rtemp, pow2, ms, mzs, mzt, work,              \
                             FO_KD_CE_SQ(2), S);                                          \
        else if (temp == 8)                                                               \
            fo_kd_sums_##SFX(s, t, C, temp, rtemp, pow2, ms, mzs, mzt, work,              \
                             FO_KD_CE_SQ(3), S);                                          \
        else                                                                              \
            fo_kd_sums_##SFX(s, t, C, temp, rtemp, pow2, ms, mzs, mzt, work,              \
                             FO_KD_CE_EXP, S);                                            \
        rs = (T)(1.0 / S[0]);                                                             \
        rt = (T)(1.0 / S[1]);                                                             \
        rc = label >= 0 ? (T)(1.0 / S[3]) : (T)0;                                         \
        if (label >= 0)                                                                   \
            for (i = 0; i < C; i++)                                                       \
                g[i] = wk * (work[i] * rs - work[C + i] * rt) + wc * (ec[i] * rc);        \
        else                                                                              \
            for (i = 0; i < C; i++) g[i] = wk * (work[i] * rs - work[C + i] * rt);        \
        out[0] = S[2] / S[1] + ((double)mzs + fo_log(S[0])) - ((double)mzt + fo_log(S[1])); \
        out[1] = 0;                                                                       \
        if (label >= 0) {                                                                 \
            g[label] = g[label] - wc;                                                     \
            out[1] = ((double)ms + fo_log(S[3])) - (double)s[label];                      \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_KD_ROW)
#undef FO_DEFINE_KD_ROW
#undef FO_KD_LANE
#undef FO_KD_CE_NONE
#undef FO_KD_CE_EXP
#undef FO_KD_CE_SAME
#undef FO_KD_CE_SQ
#undef FO_KD_CE_SQUARES

#endif /* FASTOPT_CPU_DISTILL_LOOPS_H */

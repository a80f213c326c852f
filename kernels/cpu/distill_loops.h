/*
 * distill_loops.h - one row of the knowledge-distillation loss and its gradient on the CPU
 * (fastopt/distill.h has the math): a pass for the maxima, one for the sums (in 16 float64
 * lanes, combined in lane order) and one writing the gradient; the row is read from memory
 * once and stays in cache for the later passes.
 */
#ifndef FASTOPT_CPU_DISTILL_LOOPS_H
#define FASTOPT_CPU_DISTILL_LOOPS_H

#include <stddef.h>
#include "chunks.h"
#include "fastopt/distill.h"
#include "fastopt/reduce.h"

/* The row's four lane sums, a block of FO_KD_BLOCK elements at a time: the exponentials
   go to small buffers in one loop, then into the float64 lanes in another (element i in
   lane i % FO_NORM_LANES); each loop is simple enough to vectorize. CE is a constant per
   call site. */
#define FO_KD_BLOCK 512
#define FO_KD_SUMS(T, SFX, CE)                                                            \
    do {                                                                                  \
        T es[FO_KD_BLOCK], et[FO_KD_BLOCK], ec[FO_KD_BLOCK];                              \
        ptrdiff_t b0, k, n;                                                               \
        for (b0 = 0; b0 < C; b0 += FO_KD_BLOCK) {                                         \
            const T *restrict sb = s + b0, *restrict tb = t + b0;                         \
            n = C - b0 < FO_KD_BLOCK ? C - b0 : FO_KD_BLOCK;                              \
            for (k = 0; k < n; k++) {                                                     \
                es[k] = fo_exp_neg_##SFX(sb[k] / temp - mzs);                             \
                et[k] = fo_exp_neg_##SFX(tb[k] / temp - mzt);                             \
                if (CE) ec[k] = fo_exp_neg_##SFX(sb[k] - ms);                             \
            }                                                                             \
            for (k = 0; k < n; k += FO_NORM_LANES) {                                      \
                const ptrdiff_t m = n - k < FO_NORM_LANES ? n - k : FO_NORM_LANES;        \
                if (m == FO_NORM_LANES)                                                   \
                    for (j = 0; j < FO_NORM_LANES; j++) FO_KD_LANE(CE, k + j, j);         \
                else                                                                      \
                    for (j = 0; j < m; j++) FO_KD_LANE(CE, k + j, j);                     \
            }                                                                             \
        }                                                                                 \
    } while (0)
#define FO_KD_LANE(CE, k, j)                                                              \
    do {                                                                                  \
        ls[j] += (double)es[k];                                                           \
        lt[j] += (double)et[k];                                                           \
        la[j] += (double)et[k] * ((double)(tb[k] / temp) - (double)(sb[k] / temp));       \
        if (CE) lc[j] += (double)ec[k];                                                   \
    } while (0)

#define FO_DEFINE_KD_ROW(T, SFX, SQRT, FABS)                                              \
    /* out[0] = KL_b, out[1] = CE_b (label < 0: no cross entropy, out[1] = 0) */          \
    FO_MULTIVERSION static void fo_cpu_kd_row_##SFX(                                      \
        const T *restrict s, const T *restrict t, T *restrict g, ptrdiff_t C,             \
        ptrdiff_t label, T temp, T wk, T wc, double *out)                                 \
    {                                                                                     \
        double ls[FO_NORM_LANES] = {0}, lt[FO_NORM_LANES] = {0};                          \
        double la[FO_NORM_LANES] = {0}, lc[FO_NORM_LANES] = {0};                          \
        double Ss, St, A, Sc;                                                             \
        T ms = s[0], mt = t[0], mzs, mzt, rs, rt, rc;                                     \
        const int ce = label >= 0;                                                        \
        ptrdiff_t i, j;                                                                   \
        for (i = 1; i < C; i++) {                                                         \
            ms = s[i] > ms ? s[i] : ms;                                                   \
            mt = t[i] > mt ? t[i] : mt;                                                   \
        }                                                                                 \
        mzs = ms / temp;                                                                  \
        mzt = mt / temp;                                                                  \
        if (ce) FO_KD_SUMS(T, SFX, 1);                                                    \
        else FO_KD_SUMS(T, SFX, 0);                                                       \
        Ss = ls[0], St = lt[0], A = la[0], Sc = lc[0];                                    \
        for (j = 1; j < FO_NORM_LANES; j++) {                                             \
            Ss += ls[j];                                                                  \
            St += lt[j];                                                                  \
            A += la[j];                                                                   \
            Sc += lc[j];                                                                  \
        }                                                                                 \
        rs = (T)(1.0 / Ss);                                                               \
        rt = (T)(1.0 / St);                                                               \
        rc = ce ? (T)(1.0 / Sc) : (T)0;                                                   \
        if (ce)                                                                           \
            for (i = 0; i < C; i++)                                                       \
                g[i] = wk * (fo_exp_neg_##SFX(s[i] / temp - mzs) * rs                     \
                             - fo_exp_neg_##SFX(t[i] / temp - mzt) * rt)                  \
                       + wc * (fo_exp_neg_##SFX(s[i] - ms) * rc);                         \
        else                                                                              \
            for (i = 0; i < C; i++)                                                       \
                g[i] = wk * (fo_exp_neg_##SFX(s[i] / temp - mzs) * rs                     \
                             - fo_exp_neg_##SFX(t[i] / temp - mzt) * rt);                 \
        out[0] = A / St + ((double)mzs + fo_log(Ss)) - ((double)mzt + fo_log(St));        \
        out[1] = 0;                                                                       \
        if (ce) {                                                                         \
            g[label] = g[label] - wc;                                                     \
            out[1] = ((double)ms + fo_log(Sc)) - (double)s[label];                        \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_KD_ROW)
#undef FO_DEFINE_KD_ROW
#undef FO_KD_SUMS
#undef FO_KD_LANE

#endif /* FASTOPT_CPU_DISTILL_LOOPS_H */

/*
 * distill_loops.h - one row of the knowledge-distillation loss and its gradient on the CPU
 * (fastopt/distill.h has the math): a pass for the two maxima (16 lanes each, so it
 * vectorizes); one computing the exponentials es and et into the caller's per-thread row
 * buffer `work` (and ec, where they are computed) and their sums, block by block; and one
 * writing the gradient from the kept exponentials. The row is read from memory once and
 * stays in cache for the later passes, and while the sums run, the next row's logits are
 * prefetched, so that its memory traffic overlaps this row's arithmetic. A large gradient
 * is written with streaming stores (fo_stream_copy): it would not stay in cache anyway,
 * and they skip reading each line before it is written.
 *
 * The cross entropy's exponentials at T = 1 are es; at T = 2, 4 or 8 they are es^T, by
 * squaring (fastopt/distill.h), computed again for the gradient rather than kept.
 */
#ifndef FASTOPT_CPU_DISTILL_LOOPS_H
#define FASTOPT_CPU_DISTILL_LOOPS_H

#include <math.h>
#include <stddef.h>
#include <string.h>
#include "chunks.h"
#include "fastopt/distill.h"
#include "fastopt/reduce.h"
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* the cross entropy's exponentials ec (the rows' CE argument): none (no labels), computed
   (and kept in work), equal to es (T = 1), or es^T by squaring es n times (FO_KD_CE_SQ(n)
   at T = 2^n, n = 1, 2, 3; a compile-time count, so the loop vectorizes) */
#define FO_KD_CE_NONE 0
#define FO_KD_CE_EXP 1
#define FO_KD_CE_SAME 2
#define FO_KD_CE_SQ(n) (FO_KD_CE_SAME + (n))
#define FO_KD_CE_SQUARES(CE) ((CE) > FO_KD_CE_SAME ? (CE) - FO_KD_CE_SAME : 0)

/* dst[0:n] = src[0:n] (floats or doubles, `bytes` in all) with non-temporal stores where
   the CPU has them (SSE2: every x86-64); fo_stream_fence() orders them before later
   stores */
static inline void fo_stream_copy(void *dst, const void *src, size_t bytes)
{
#if defined(__SSE2__)
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (size_t)(-(uintptr_t)d % 16), i;
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    for (i = head; i + 16 <= bytes; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    memcpy(d + i, s + i, bytes - i);
#else
    memcpy(dst, src, bytes);
#endif
}

static inline void fo_stream_fence(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* v = e squared FO_KD_CE_SQUARES(CE) times (e itself at T = 1), the cross entropy's
   exponential where it is not computed */
#define FO_KD_SQUARED(v, e)                                                               \
    do {                                                                                  \
        v = (e);                                                                          \
        for (q = 0; q < FO_KD_CE_SQUARES(CE); q++) v = v * v;                             \
    } while (0)
/* one element of a block: its exponentials (the KL term's kept in es, et), added to the
   block's lanes j */
#define FO_KD_TERMS(T, SFX, i, j)                                                         \
    do {                                                                                  \
        const T ds = s[i] - ms, us = ds * cs, ut = (t[i] - mt) * cs;                      \
        const T e = fo_exp2_neg_##SFX(us), f = fo_exp2_neg_##SFX(ut);                     \
        es[i] = e;                                                                        \
        et[i] = f;                                                                        \
        ps[j] += e;                                                                       \
        pt[j] += f;                                                                       \
        pa[j] += f * (ut - us);                                                           \
        if (CE == FO_KD_CE_EXP) {                                                         \
            const T c = fo_exp2_neg_##SFX(ds * cl);                                       \
            ec[i] = c;                                                                    \
            pc[j] += c;                                                                   \
        }                                                                                 \
        if (FO_KD_CE_SQUARES(CE)) {                                                       \
            T c;                                                                          \
            FO_KD_SQUARED(c, e);                                                          \
            pc[j] += c;                                                                   \
        }                                                                                 \
    } while (0)
/* the gradient of element i from the kept exponentials */
#define FO_KD_GRAD(T, i)                                                                  \
    do {                                                                                  \
        T v = es[i] * a - et[i] * b, x;                                                   \
        if (CE == FO_KD_CE_EXP)                                                           \
            v = v + ec[i] * c;                                                            \
        else if (CE != FO_KD_CE_NONE) {                                                   \
            FO_KD_SQUARED(x, es[i]);                                                      \
            v = v + x * c;                                                                \
        }                                                                                 \
        out[i] = v;                                                                       \
    } while (0)
/* the row's passes for the cross entropy's case CE */
#define FO_KD_PASSES(SFX, CE)                                                             \
    fo_kd_passes_##SFX(s, t, g, C, cs, cl, ms, mt, wk, wc, CE, stream, next_s, next_t,    \
                       work, S)
#define FO_DEFINE_KD_ROW(T, SFX, SQRT, FABS)                                              \
    /* max x[0:C], in lanes like fastopt/reduce.h's sums (the order does not change a     \
       maximum; a NaN is skipped here, and its exponential makes the row's sums NaN).     \
       gcc vectorizes the lanes' select (into vmaxps, which skips a NaN the same way)     \
       only when told to; it is also its own function, since inlined into the row it      \
       stays scalar */                                                                    \
    FO_MULTIVERSION static T fo_kd_max_##SFX(const T *restrict x, ptrdiff_t C)            \
    {                                                                                     \
        T v[FO_NORM_LANES], m;                                                            \
        ptrdiff_t i, j, full = C - C % FO_NORM_LANES;                                     \
        for (j = 0; j < FO_NORM_LANES; j++) v[j] = -(T)INFINITY;                          \
        for (i = 0; i < full; i += FO_NORM_LANES) {                                       \
            _Pragma("omp simd")                                                           \
            for (j = 0; j < FO_NORM_LANES; j++) v[j] = x[i + j] > v[j] ? x[i + j] : v[j]; \
        }                                                                                 \
        for (j = 0; i + j < C; j++) v[j] = x[i + j] > v[j] ? x[i + j] : v[j];             \
        m = v[0];                                                                         \
        for (j = 1; j < FO_NORM_LANES; j++) m = v[j] > m ? v[j] : m;                      \
        return m;                                                                         \
    }                                                                                     \
    /* block s[0:n], t[0:n] (n <= FO_KD_BLOCK): its exponentials into es, et (ec), their  \
       sums in lanes of T added to the row's float64 lanes ls, lt, la, lc; cs = L / T,    \
       cl = L; prefetches nx_s[0:n], nx_t[0:n] (the next row's, or NULL) */               \
    static inline __attribute__((always_inline)) void fo_kd_block_##SFX(                  \
        const T *restrict s, const T *restrict t, ptrdiff_t n, T cs, T cl, T ms, T mt,    \
        T *restrict es, T *restrict et, T *restrict ec, int CE, const T *nx_s,            \
        const T *nx_t, double *restrict ls, double *restrict lt, double *restrict la,     \
        double *restrict lc)                                                              \
    {                                                                                     \
        T ps[FO_NORM_LANES] = {0}, pt[FO_NORM_LANES] = {0};                               \
        T pa[FO_NORM_LANES] = {0}, pc[FO_NORM_LANES] = {0};                               \
        ptrdiff_t k, j;                                                                   \
        int q;                                                                            \
        /* full groups (a fixed trip count, so it vectorizes), then the row's last few;   \
           the next row is prefetched into L2 (locality 2: prefetcht1), not L1, which     \
           holds an eighth of s and t at 32000 classes: 7-9% faster than prefetcht0 */    \
        for (k = 0; k + FO_NORM_LANES <= n; k += FO_NORM_LANES) {                         \
            if (nx_s)                                                                     \
                for (j = 0; j < FO_NORM_LANES * (ptrdiff_t)sizeof(T); j += 64) {          \
                    __builtin_prefetch((const char *)(nx_s + k) + j, 0, 2);               \
                    __builtin_prefetch((const char *)(nx_t + k) + j, 0, 2);               \
                }                                                                         \
            for (j = 0; j < FO_NORM_LANES; j++) FO_KD_TERMS(T, SFX, k + j, j);            \
        }                                                                                 \
        for (j = 0; k + j < n; j++) FO_KD_TERMS(T, SFX, k + j, j);                        \
        for (j = 0; j < FO_NORM_LANES; j++) {                                             \
            ls[j] += (double)ps[j];                                                       \
            lt[j] += (double)pt[j];                                                       \
            la[j] += (double)pa[j];                                                       \
            lc[j] += (double)pc[j];                                                       \
        }                                                                                 \
    }                                                                                     \
    /* g[0:n] from the block's kept exponentials (es, et, ec as CE says) and the row's    \
       factors a, b, c, computed into `out` (FO_KD_BLOCK values); stream: write g with    \
       non-temporal stores (out then is a buffer of its own, else g itself) */            \
    static inline __attribute__((always_inline)) void fo_kd_grad_##SFX(                   \
        const T *restrict es, const T *restrict et, const T *restrict ec, T *restrict g,  \
        ptrdiff_t n, T a, T b, T c, int CE, int stream, T *restrict buf)                  \
    {                                                                                     \
        T *restrict out = stream ? buf : g;                                               \
        ptrdiff_t i;                                                                      \
        int q;                                                                            \
        for (i = 0; i < n; i++) FO_KD_GRAD(T, i);                                         \
        if (stream) fo_stream_copy(g, buf, (size_t)n * sizeof(T));                        \
    }                                                                                     \
    static inline __attribute__((always_inline)) void fo_kd_passes_##SFX(                 \
        const T *restrict s, const T *restrict t, T *restrict g, ptrdiff_t C, T cs, T cl, \
        T ms, T mt, T wk, T wc, int CE, int stream, const T *nx_s, const T *nx_t,         \
        T *restrict work, double *S)                                                      \
    {                                                                                     \
        double ls[FO_NORM_LANES] = {0}, lt[FO_NORM_LANES] = {0};                          \
        double la[FO_NORM_LANES] = {0}, lc[FO_NORM_LANES] = {0};                          \
        T buf[FO_KD_BLOCK], a, b, c;                                                      \
        ptrdiff_t b0, j, n;                                                               \
        for (b0 = 0; b0 < C; b0 += FO_KD_BLOCK) {                                         \
            n = C - b0 < FO_KD_BLOCK ? C - b0 : FO_KD_BLOCK;                              \
            fo_kd_block_##SFX(s + b0, t + b0, n, cs, cl, ms, mt, work + b0,               \
                              work + C + b0, work + 2 * C + b0, CE,                       \
                              nx_s ? nx_s + b0 : NULL, nx_t ? nx_t + b0 : NULL,           \
                              ls, lt, la, lc);                                            \
        }                                                                                 \
        S[0] = ls[0], S[1] = lt[0], S[2] = la[0], S[3] = lc[0];                           \
        for (j = 1; j < FO_NORM_LANES; j++)                                               \
            S[0] += ls[j], S[1] += lt[j], S[2] += la[j], S[3] += lc[j];                   \
        if (CE == FO_KD_CE_SAME) S[3] = S[0];                                             \
        a = wk * (T)(1.0 / S[0]);                                                         \
        b = wk * (T)(1.0 / S[1]);                                                         \
        c = CE == FO_KD_CE_NONE ? (T)0 : wc * (T)(1.0 / S[3]);                            \
        for (b0 = 0; b0 < C; b0 += FO_KD_BLOCK) {                                         \
            n = C - b0 < FO_KD_BLOCK ? C - b0 : FO_KD_BLOCK;                              \
            fo_kd_grad_##SFX(work + b0, work + C + b0, work + 2 * C + b0, g + b0, n, a,   \
                             b, c, CE, stream, buf);                                      \
        }                                                                                 \
        if (stream) fo_stream_fence();                                                    \
    }                                                                                     \
    /* out[0] = KL_b, out[1] = CE_b (label < 0: no cross entropy, out[1] = 0); work: 3 C; \
       next_s, next_t: the next row this thread takes (prefetched), or NULL; stream:      \
       write g with non-temporal stores */                                                \
    FO_MULTIVERSION static void fo_cpu_kd_row_##SFX(                                      \
        const T *restrict s, const T *restrict t, T *restrict g, ptrdiff_t C,             \
        ptrdiff_t label, T temp, T wk, T wc, double *out, T *restrict work,               \
        const T *next_s, const T *next_t, int stream)                                     \
    {                                                                                     \
        double S[4];                                                                      \
        const T cs = (T)(FO_LOG2E / (double)temp), cl = (T)FO_LOG2E;                      \
        const T ms = fo_kd_max_##SFX(s, C), mt = fo_kd_max_##SFX(t, C);                   \
        if (label < 0)                                                                    \
            FO_KD_PASSES(SFX, FO_KD_CE_NONE);                                             \
        else if (temp == 1)                                                               \
            FO_KD_PASSES(SFX, FO_KD_CE_SAME);                                             \
        else if (temp == 2)                                                               \
            FO_KD_PASSES(SFX, FO_KD_CE_SQ(1));                                            \
        else if (temp == 4)                                                               \
            FO_KD_PASSES(SFX, FO_KD_CE_SQ(2));                                            \
        else if (temp == 8)                                                               \
            FO_KD_PASSES(SFX, FO_KD_CE_SQ(3));                                            \
        else                                                                              \
            FO_KD_PASSES(SFX, FO_KD_CE_EXP);                                              \
        out[0] = FO_LN2 * (S[2] / S[1]) + fo_log(S[0]) - fo_log(S[1]);                    \
        out[1] = 0;                                                                       \
        if (label >= 0) {                                                                 \
            g[label] = g[label] - wc;                                                     \
            out[1] = ((double)ms + fo_log(S[3])) - (double)s[label];                      \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_KD_ROW)
#undef FO_DEFINE_KD_ROW
#undef FO_KD_PASSES
#undef FO_KD_SQUARED
#undef FO_KD_TERMS
#undef FO_KD_GRAD
#undef FO_KD_CE_NONE
#undef FO_KD_CE_EXP
#undef FO_KD_CE_SAME
#undef FO_KD_CE_SQ
#undef FO_KD_CE_SQUARES

#endif /* FASTOPT_CPU_DISTILL_LOOPS_H */

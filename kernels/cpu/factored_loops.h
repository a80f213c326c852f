/*
 * factored_loops.h - Adafactor's factors pass on the CPU (the summation order is
 * fastopt/reduce.h's factored order; the element math is fastopt/optim.h's).
 *
 * Three steps over one R x C slice, row-major:
 * fo_cpu_adafactor_band: one work item, a band of FO_BAND rows over the column blocks
 *   k0 .. k1 - 1 (at most FO_SEGMENT), read row by row (each row's run of blocks
 *   contiguous): each row's partial over each block, at rowpart[r * n_blocks + k], and the
 *   band's column partials: the column factors if the slice has one band, else stored at
 *   colpart[band * C + c].
 * fo_cpu_adafactor_cols (slices of several bands): one work item, a block of FO_COLS
 *   columns: the bands' partials added in band order, then the column factors.
 * fo_cpu_adafactor_rows: per slice, each row's partials added in block order, the row
 *   factors, and their clamped mean.
 */
#ifndef FASTOPT_CPU_FACTORED_LOOPS_H
#define FASTOPT_CPU_FACTORED_LOOPS_H

#include <stddef.h>
#include "chunks.h"
#include "fastopt/optim.h"
#include "fastopt/reduce.h"
#include "reduce_loops.h"

/* the most column blocks one band item may take (its column partials live on its stack) */
#define FO_SEGMENT 16

#define FO_DEFINE_FACTORED_LOOPS(T, SFX, SQRT, FABS)                                      \
    FO_MULTIVERSION static void fo_cpu_adafactor_band_##SFX(                              \
        const T *g, T *col, double *rowpart, double *colpart, ptrdiff_t R, ptrdiff_t C,   \
        ptrdiff_t band, ptrdiff_t k0, ptrdiff_t k1, const fo_adafactor_args_##SFX *a)     \
    {                                                                                     \
        const ptrdiff_t n_blocks = FO_N_BLOCKS(C), r0 = band * FO_BAND;                   \
        const ptrdiff_t r1 = R - r0 < FO_BAND ? R : r0 + FO_BAND;                         \
        const ptrdiff_t lo = k0 * FO_COLS, hi = C < k1 * FO_COLS ? C : k1 * FO_COLS;      \
        double acc[FO_SEGMENT * FO_COLS], x[FO_COLS];                                     \
        ptrdiff_t r, k, j;                                                                \
        for (j = 0; j < hi - lo; j++) acc[j] = 0;                                         \
        for (r = r0; r < r1; r++)                                                         \
            for (k = k0; k < k1; k++) {                                                   \
                const ptrdiff_t c0 = k * FO_COLS, w = C - c0 < FO_COLS ? C - c0 : FO_COLS; \
                const T *restrict gr = g + r * C + c0;                                    \
                double *restrict ac = acc + (c0 - lo);                                    \
                double s;                                                                 \
                /* three simple loops, each vectorized: the terms, the column partials,   \
                   and the lanes */                                                       \
                for (j = 0; j < w; j++) x[j] = fo_adafactor_sq_##SFX(gr[j], a);           \
                for (j = 0; j < w; j++) ac[j] += x[j];                                    \
                FO_LANE_SUM(s, w, FO_BLOCK_TERM, FO_BLOCK_ADD);                           \
                rowpart[r * n_blocks + k] = s;                                            \
            }                                                                             \
        if (R <= FO_BAND) /* one band: its partials are the column sums */                \
            for (j = lo; j < hi; j++)                                                     \
                col[j] = fo_adafactor_factor_##SFX(col[j], acc[j - lo], (double)R, a);    \
        else                                                                              \
            for (j = lo; j < hi; j++) colpart[band * C + j] = acc[j - lo];                \
    }                                                                                     \
                                                                                          \
    static void fo_cpu_adafactor_cols_##SFX(T *col, const double *colpart, ptrdiff_t R,   \
                                            ptrdiff_t C, ptrdiff_t k,                     \
                                            const fo_adafactor_args_##SFX *a)             \
    {                                                                                     \
        const ptrdiff_t c0 = k * FO_COLS, w = C - c0 < FO_COLS ? C - c0 : FO_COLS;        \
        const ptrdiff_t n_bands = FO_N_BANDS(R);                                          \
        double acc[FO_COLS];                                                              \
        ptrdiff_t band, j;                                                                \
        for (j = 0; j < w; j++) acc[j] = colpart[c0 + j];                                 \
        for (band = 1; band < n_bands; band++)                                            \
            for (j = 0; j < w; j++) acc[j] += colpart[band * C + c0 + j];                 \
        for (j = 0; j < w; j++)                                                           \
            col[c0 + j] = fo_adafactor_factor_##SFX(col[c0 + j], acc[j], (double)R, a);   \
    }                                                                                     \
                                                                                          \
    static void fo_cpu_adafactor_rows_##SFX(T *row, T *rmean, const double *rowpart,      \
                                            ptrdiff_t R, ptrdiff_t C,                     \
                                            const fo_adafactor_args_##SFX *a)             \
    {                                                                                     \
        const ptrdiff_t n_blocks = FO_N_BLOCKS(C);                                        \
        double total = 0;                                                                 \
        ptrdiff_t r, k;                                                                   \
        for (r = 0; r < R; r++) {                                                         \
            double s = rowpart[r * n_blocks];                                             \
            for (k = 1; k < n_blocks; k++) s += rowpart[r * n_blocks + k];                \
            row[r] = fo_adafactor_factor_##SFX(row[r], s, (double)C, a);                  \
            total += (double)row[r];                                                      \
        }                                                                                 \
        *rmean = fo_adafactor_rmean_##SFX(total, (double)R, a);                           \
    }
#define FO_BLOCK_TERM(i) x[i]
#define FO_BLOCK_ADD(a, b) ((a) + (b))
FO_DEFINE_FOR_REALS(FO_DEFINE_FACTORED_LOOPS)
#undef FO_BLOCK_TERM
#undef FO_BLOCK_ADD
#undef FO_DEFINE_FACTORED_LOOPS

#endif /* FASTOPT_CPU_FACTORED_LOOPS_H */

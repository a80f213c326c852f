/*
 * factored_loops.h - Adafactor's factors pass on the CPU (the summation order is
 * fastopt/reduce.h's factored order; the element math is fastopt/optim.h's).
 *
 * fo_cpu_adafactor_cols: one work item, a block of FO_COLS columns of one R x C slice.
 * One read of the block over all R rows completes its column sums (so its column factors
 * move at once) and gives each row's partial over the block, stored at
 * rowpart[r * n_blocks + k]. fo_cpu_adafactor_rows then, per slice, adds each row's
 * partials in block order, moves the row factors and takes their clamped mean.
 */
#ifndef FASTOPT_CPU_FACTORED_LOOPS_H
#define FASTOPT_CPU_FACTORED_LOOPS_H

#include <stddef.h>
#include "chunks.h"
#include "fastopt/optim.h"
#include "fastopt/reduce.h"
#include "reduce_loops.h"

#define FO_DEFINE_FACTORED_LOOPS(T, SFX, SQRT, FABS)                                      \
    FO_MULTIVERSION static void fo_cpu_adafactor_cols_##SFX(                              \
        const T *g, T *col, double *rowpart, ptrdiff_t R, ptrdiff_t C, ptrdiff_t k,       \
        const fo_adafactor_args_##SFX *a)                                                 \
    {                                                                                     \
        const ptrdiff_t c0 = k * FO_COLS, w = C - c0 < FO_COLS ? C - c0 : FO_COLS;        \
        const ptrdiff_t n_blocks = FO_N_BLOCKS(C);                                        \
        double acc[FO_COLS], x[FO_COLS];                                                  \
        ptrdiff_t r, j;                                                                   \
        for (j = 0; j < w; j++) acc[j] = 0;                                               \
        for (r = 0; r < R; r++) {                                                         \
            const T *restrict gr = g + r * C + c0;                                        \
            double s;                                                                     \
            /* three simple loops, each vectorized: the terms, the column sums, and the   \
               lanes */                                                                   \
            for (j = 0; j < w; j++) x[j] = fo_adafactor_sq_##SFX(gr[j], a);               \
            for (j = 0; j < w; j++) acc[j] += x[j];                                       \
            FO_LANE_SUM(s, w, FO_BLOCK_TERM, FO_BLOCK_ADD);                               \
            rowpart[r * n_blocks + k] = s;                                                \
        }                                                                                 \
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

/*
 * fastopt/reduce.h - the gradient-norm reduction, shared by the CPU loops and CUDA.
 *
 * The result must not depend on the backend, the thread count or the SIMD width, so the
 * summation order is fixed: tensors are cut into chunks of FO_CHUNK elements; inside a
 * chunk, element i is accumulated (in float64, in index order) into lane i % FO_NORM_LANES;
 * the lanes are added in lane order; the chunks' partials are added in chunk order by the
 * host. Norm kinds: 1 (sum |g|), 2 (sum g^2), 0 (max |g|, NaN propagating), 3 (sum g:
 * Prodigy's dot products, whose terms its update pass writes out).
 *
 * Factored sums (Adafactor's row and column statistics of a slice of R x C, row-major):
 * a row is cut into blocks of FO_COLS columns, each block summed like a norm chunk (16
 * lanes, then the lanes in order), and the blocks' partials are added in block order; the
 * rows are cut into bands of FO_BAND, a column's sum over each band adds the band's rows in
 * index order (from 0), and the bands' partials are added in band order. All in float64.
 * The bands let a pass read whole rows, contiguous, and still sum the columns in an order
 * that does not depend on the threads.
 */
#ifndef FASTOPT_REDUCE_H
#define FASTOPT_REDUCE_H

#include "fastopt/common.h"

#define FO_CHUNK 16384
#define FO_NORM_LANES 16
#define FO_COLS 512
/* the blocks of FO_COLS columns of a row of C */
#define FO_N_BLOCKS(C) (((C) + FO_COLS - 1) / FO_COLS)
#define FO_BAND 64
/* the bands of FO_BAND rows of a slice of R rows */
#define FO_N_BANDS(R) (((R) + FO_BAND - 1) / FO_BAND)

#define FO_DEFINE_NORM_TERM(T, SFX, SQRT, FABS)                                                 \
    FO_HD double fo_norm_term_##SFX(T g, int kind)                                        \
    {                                                                                     \
        double x = (double)g;                                                             \
        return kind == 2 ? x * x : (kind == 3 ? x : (x < 0 ? -x : x));                                      \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_NORM_TERM)
#undef FO_DEFINE_NORM_TERM

FO_HD double fo_norm_acc(double acc, double term, int kind)
{
    if (kind == 0) { /* NaN sticks once in; two selects, which vectorize (an || did not) */
        const double larger = term > acc ? term : acc;
        return term != term ? term : larger;
    }
    return acc + term;
}

#endif /* FASTOPT_REDUCE_H */

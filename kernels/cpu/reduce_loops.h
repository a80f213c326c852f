/*
 * reduce_loops.h - one chunk's partial of the gradient norm (see fastopt/reduce.h for the
 * fixed summation order). The 16 lanes are independent accumulators, so the loop vectorizes
 * without reassociating anything.
 */
#ifndef FASTOPT_CPU_REDUCE_LOOPS_H
#define FASTOPT_CPU_REDUCE_LOOPS_H

#include <stddef.h>
#include "chunks.h"
#include "fastopt/reduce.h"

#define FO_DEFINE_NORM_CHUNK(T, SFX, SQRT, FABS)                                                \
    static inline __attribute__((always_inline)) double                                  \
    fo_norm_lanes_##SFX(const T *restrict g, ptrdiff_t n, int kind)                       \
    {                                                                                     \
        double lane[FO_NORM_LANES] = {0};                                                 \
        ptrdiff_t i = 0, j, full = n - n % FO_NORM_LANES;                                 \
        double s;                                                                         \
        for (; i < full; i += FO_NORM_LANES)                                              \
            for (j = 0; j < FO_NORM_LANES; j++)                                           \
                lane[j] = fo_norm_acc(lane[j], fo_norm_term_##SFX(g[i + j], kind), kind); \
        for (j = 0; i + j < n; j++)                                                       \
            lane[j] = fo_norm_acc(lane[j], fo_norm_term_##SFX(g[i + j], kind), kind);     \
        s = lane[0];                                                                      \
        for (j = 1; j < FO_NORM_LANES; j++) s = fo_norm_acc(s, lane[j], kind);            \
        return s;                                                                         \
    }                                                                                     \
    /* the kind as a constant in each call, so its branches fold away */                  \
    FO_MULTIVERSION static double fo_norm_chunk_##SFX(const T *g, ptrdiff_t n, int kind)  \
    {                                                                                     \
        if (kind == 2) return fo_norm_lanes_##SFX(g, n, 2);                               \
        if (kind == 1) return fo_norm_lanes_##SFX(g, n, 1);                               \
        return fo_norm_lanes_##SFX(g, n, 0);                                              \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_NORM_CHUNK)
#undef FO_DEFINE_NORM_CHUNK

#endif /* FASTOPT_CPU_REDUCE_LOOPS_H */

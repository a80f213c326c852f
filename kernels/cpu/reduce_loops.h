/*
 * reduce_loops.h - one chunk's partial of the gradient norm (see fastopt/reduce.h for the
 * fixed summation order), and the lane sum it is made of, shared with wnorm_loops.h.
 */
#ifndef FASTOPT_CPU_REDUCE_LOOPS_H
#define FASTOPT_CPU_REDUCE_LOOPS_H

#include <stddef.h>
#include "chunks.h"
#include "fastopt/reduce.h"

/* The fixed-order lane sum of fastopt/reduce.h over a run of n elements: element i goes to
   lane i % FO_NORM_LANES as lane = ACC(lane, TERM(i)), then S = the lanes combined in lane
   order with ACC. The lanes are independent accumulators, so the loop vectorizes. */
#define FO_LANE_SUM(S, N, TERM, ACC)                                                      \
    do {                                                                                  \
        double lane_[FO_NORM_LANES] = {0};                                                \
        ptrdiff_t i_ = 0, j_, full_ = (N) - (N) % FO_NORM_LANES;                          \
        for (; i_ < full_; i_ += FO_NORM_LANES)                                           \
            for (j_ = 0; j_ < FO_NORM_LANES; j_++)                                        \
                lane_[j_] = ACC(lane_[j_], TERM(i_ + j_));                                \
        for (j_ = 0; i_ + j_ < (N); j_++) lane_[j_] = ACC(lane_[j_], TERM(i_ + j_));      \
        S = lane_[0];                                                                     \
        for (j_ = 1; j_ < FO_NORM_LANES; j_++) S = ACC(S, lane_[j_]);                     \
    } while (0)

#define FO_DEFINE_NORM_CHUNK(T, SFX, SQRT, FABS)                                                \
    static inline __attribute__((always_inline)) double                                  \
    fo_norm_lanes_##SFX(const T *restrict g, ptrdiff_t n, int kind)                       \
    {                                                                                     \
        double s;                                                                         \
        FO_LANE_SUM(s, n, FO_NORM_TERM_##SFX, FO_NORM_ACC);                               \
        return s;                                                                         \
    }                                                                                     \
    /* the kind as a constant in each call, so its branches fold away */                  \
    FO_MULTIVERSION static double fo_norm_chunk_##SFX(const T *g, ptrdiff_t n, int kind)  \
    {                                                                                     \
        if (kind == 2) return fo_norm_lanes_##SFX(g, n, 2);                               \
        if (kind == 1) return fo_norm_lanes_##SFX(g, n, 1);                               \
        if (kind == 3) return fo_norm_lanes_##SFX(g, n, 3);                               \
        return fo_norm_lanes_##SFX(g, n, 0);                                              \
    }
#define FO_NORM_TERM_f32(i) fo_norm_term_f32(g[i], kind)
#define FO_NORM_TERM_f64(i) fo_norm_term_f64(g[i], kind)
#define FO_NORM_ACC(acc, term) fo_norm_acc(acc, term, kind)
FO_DEFINE_FOR_REALS(FO_DEFINE_NORM_CHUNK)
#undef FO_NORM_TERM_f32
#undef FO_NORM_TERM_f64
#undef FO_NORM_ACC
#undef FO_DEFINE_NORM_CHUNK

#endif /* FASTOPT_CPU_REDUCE_LOOPS_H */

/*
 * stream.h - the streaming-bandwidth yardstick for the benchmark harness.
 *
 * An optimizer step reads the gradient and k buffers (param and state) and writes the k
 * buffers back in place: (k + 1) reads and k writes per element. These kernels make the same
 * accesses with almost no arithmetic (x_j += c * g), so their bandwidth is what this machine
 * can stream for that pattern: the ceiling an optimizer kernel can reach.
 * Operands: 0 the read-only stream, 1..k the read-write streams (fo_stream_w: one written
 * stream, the pattern of an initializer).
 */
#ifndef FASTOPT_CPU_STREAM_H
#define FASTOPT_CPU_STREAM_H

#include "chunks.h"
#include "fastopt/common.h"

#define FO_STREAM_RW(T, K, BODY)                                                          \
    do {                                                                                  \
        const T c = *(const T *)args;                                                     \
        const T *restrict g = (const T *)ptr[0] + lo;                                     \
        T *restrict x1 = (T *)ptr[1] + lo;                                                \
        T *restrict x2 = (T *)ptr[K >= 2 ? 2 : 1] + lo;                                   \
        T *restrict x3 = (T *)ptr[K >= 3 ? 3 : 1] + lo;                                   \
        T *restrict x4 = (T *)ptr[K >= 4 ? 4 : 1] + lo;                                   \
        T *restrict x5 = (T *)ptr[K >= 5 ? 5 : 1] + lo;                                   \
        ptrdiff_t i;                                                                      \
        (void)x2; (void)x3; (void)x4; (void)x5;                                           \
        for (i = 0; i < n; i++) { BODY }                                                  \
    } while (0)

#define FO_DEFINE_STREAM(T, SFX, SQRT, FABS)                                                    \
    FO_MULTIVERSION static void fo_stream_w_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        const T c = *(const T *)args;                                                     \
        T *restrict x = (T *)ptr[0] + lo;                                                 \
        ptrdiff_t i;                                                                      \
        for (i = 0; i < n; i++) x[i] = c;                                                 \
    }                                                                                     \
    FO_MULTIVERSION static void fo_stream_rw1_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        FO_STREAM_RW(T, 1, x1[i] += c * g[i];);                                           \
    }                                                                                     \
    FO_MULTIVERSION static void fo_stream_rw2_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        FO_STREAM_RW(T, 2, x1[i] += c * g[i]; x2[i] += c * g[i];);                        \
    }                                                                                     \
    FO_MULTIVERSION static void fo_stream_rw3_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        FO_STREAM_RW(T, 3, x1[i] += c * g[i]; x2[i] += c * g[i]; x3[i] += c * g[i];);     \
    }                                                                                     \
    FO_MULTIVERSION static void fo_stream_rw4_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        FO_STREAM_RW(T, 4, x1[i] += c * g[i]; x2[i] += c * g[i]; x3[i] += c * g[i];       \
                           x4[i] += c * g[i];);                                           \
    }                                                                                     \
    FO_MULTIVERSION static void fo_stream_rw5_##SFX(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args)\
    {                                                                                     \
        FO_STREAM_RW(T, 5, x1[i] += c * g[i]; x2[i] += c * g[i]; x3[i] += c * g[i];       \
                           x4[i] += c * g[i]; x5[i] += c * g[i];);                        \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_STREAM)
#undef FO_DEFINE_STREAM

#endif /* FASTOPT_CPU_STREAM_H */

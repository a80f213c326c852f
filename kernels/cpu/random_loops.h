/*
 * random_loops.h - chunk functions of fastopt.init's fills (see chunks.h; operand 0 is the
 * array). Elements come in tiles of FO_TILE groups (fastopt/random.h); a chunk starts at a
 * multiple of FO_CHUNK, hence of every tile size, so values depend on the element index
 * only. Word l of the tile's groups fills a contiguous run of FO_TILE elements, so each
 * run is one vector store and the group loop vectorizes.
 */
#ifndef FASTOPT_CPU_RANDOM_LOOPS_H
#define FASTOPT_CPU_RANDOM_LOOPS_H

#include <string.h>
#include "chunks.h"
#include "fastopt/random.h"

/* fo_cpu_<NAME>_<SFX>: PER elements of type T per group; BODY(j) stores element l of
   group j of the tile at o[FO_TILE * l + j], from that group's words w */
#define FO_RANDOM_CHUNK(NAME, SFX, T, PER, BODY)                                          \
    static inline __attribute__((always_inline)) void                                     \
    fo_tile_##NAME##_##SFX(T *restrict o, fo_u64 g0, const fo_random_args *a)             \
    {                                                                                     \
        int j;                                                                            \
        _Pragma("omp simd")                                                               \
        for (j = 0; j < FO_TILE; j++) {                                                   \
            const fo_words w = fo_philox(g0 + (fo_u64)j, a->stream, a->key0, a->key1);    \
            BODY                                                                          \
        }                                                                                 \
    }                                                                                     \
    FO_MULTIVERSION static void fo_cpu_##NAME##_##SFX(char **ptr, ptrdiff_t lo,           \
                                                      ptrdiff_t n, const void *args)      \
    {                                                                                     \
        const fo_random_args a = *(const fo_random_args *)args;                           \
        T *out = (T *)ptr[0] + lo;                                                        \
        const ptrdiff_t tile = FO_TILE * PER, full = n / tile;                            \
        ptrdiff_t t;                                                                      \
        for (t = 0; t < full; t++)                                                        \
            fo_tile_##NAME##_##SFX(out + tile * t, (fo_u64)(lo / PER + FO_TILE * t), &a); \
        if (n % tile) {                                                                   \
            T last[FO_TILE * PER];                                                        \
            fo_tile_##NAME##_##SFX(last, (fo_u64)(lo / PER + FO_TILE * full), &a);        \
            memcpy(out + tile * full, last, (size_t)(n % tile) * sizeof(T));              \
        }                                                                                 \
    }

#define FO_STORE(L, X) o[FO_TILE * (L) + j] = (X);

FO_RANDOM_CHUNK(uniform, f32, float, 4, FO_RANDOM_BODY_UNIFORM32)
FO_RANDOM_CHUNK(uniform, f64, double, 2, FO_RANDOM_BODY_UNIFORM64)
FO_RANDOM_CHUNK(normal, f32, float, 4, FO_RANDOM_BODY_NORMAL32)
FO_RANDOM_CHUNK(normal, f64, double, 2, FO_RANDOM_BODY_NORMAL64)
FO_RANDOM_CHUNK(trunc_normal, f32, float, 4, FO_RANDOM_BODY_TRUNC_NORMAL32)
FO_RANDOM_CHUNK(trunc_normal, f64, double, 2, FO_RANDOM_BODY_TRUNC_NORMAL64)
FO_RANDOM_CHUNK(bits, u32, fo_u32, 4, FO_RANDOM_BODY_BITS)

/* indexed by FO_RANDOM_<KIND> * 2 + (float64 ? 1 : 0); bits are uint32 (slot 6) */
static const fo_chunk_fn fo_cpu_random_fills[8] = {
    fo_cpu_uniform_f32, fo_cpu_uniform_f64, fo_cpu_normal_f32, fo_cpu_normal_f64,
    fo_cpu_trunc_normal_f32, fo_cpu_trunc_normal_f64, fo_cpu_bits_u32, fo_cpu_bits_u32};

#endif /* FASTOPT_CPU_RANDOM_LOOPS_H */

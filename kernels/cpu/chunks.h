/*
 * chunks.h - the contract between the Cython driver (_plan.pxi) and the C loops.
 *
 * A step over many tensors is cut into chunks; each chunk is one contiguous range of one
 * tensor, and the driver hands it to a chunk function together with that tensor's operand
 * pointers (in the order the rule defines) and the rule's scalar arguments. The driver runs
 * the chunks in an OpenMP parallel loop; chunk functions never allocate or fail.
 */
#ifndef FASTOPT_CPU_CHUNKS_H
#define FASTOPT_CPU_CHUNKS_H

#include <stddef.h>

typedef void (*fo_chunk_fn)(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args);

/*
 * Function multi-versioning: each chunk function is compiled for AVX-512, AVX2 and the
 * x86-64 baseline, and the loader picks the best one the CPU has (GCC's ifunc). The build
 * runs on any x86-64; with SSE2 alone Adam is compute-bound (sqrt and divide) on 2 cores.
 * Results are identical on every path: sqrt and divide are correctly rounded and the build
 * forbids contracting a*b+c into an FMA (-ffp-contract=off).
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FO_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#define FO_CLONES "AVX-512, AVX2, x86-64 baseline"
#else
#define FO_MULTIVERSION
#define FO_CLONES "baseline only"
#endif

/*
 * The parameter is operand 0 (read) and operand 1 (written): the same buffer for arrays
 * updated in place, two buffers for immutable frameworks (JAX, TensorFlow). Each case gets
 * its own loop so that every pointer can be `restrict` and the loop vectorizes.
 * FN(p, ...) is the element update; the extra arguments may use the index `i`.
 */
#define FO_PARAM_LOOP(T, FN, ...)                                                         \
    do {                                                                                  \
        ptrdiff_t i;                                                                      \
        if (ptr[0] == ptr[1]) {                                                           \
            T *restrict p_ = (T *)ptr[0] + lo;                                            \
            for (i = 0; i < n; i++) p_[i] = FN(p_[i], __VA_ARGS__);                       \
        } else {                                                                          \
            const T *restrict pin_ = (const T *)ptr[0] + lo;                              \
            T *restrict pout_ = (T *)ptr[1] + lo;                                         \
            for (i = 0; i < n; i++) pout_[i] = FN(pin_[i], __VA_ARGS__);                  \
        }                                                                                 \
    } while (0)

#endif /* FASTOPT_CPU_CHUNKS_H */

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
#include <stdint.h>

typedef void (*fo_chunk_fn)(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args);

/*
 * Function multi-versioning: each chunk function is compiled for the x86-64 levels v4
 * (AVX-512), v3 (AVX2 with FMA) and the baseline, and the loader picks the best one the CPU
 * has (GCC's ifunc). The build runs on any x86-64; with SSE2 alone Adam is compute-bound
 * (sqrt and divide) on 2 cores. Results are identical on every path: sqrt and divide are
 * correctly rounded, the build forbids contracting a*b+c into an FMA (-ffp-contract=off),
 * and the one explicit fma (torch's per-tensor quantize) is correctly rounded too; the
 * levels, rather than single features, give the vector paths FMA instructions for it.
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FO_MULTIVERSION \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FO_CLONES "x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA), x86-64 baseline"
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

/*
 * Elements lo .. lo + n - 1 of an array viewed as (A, B, C) around one of its dims, with a
 * factor per slice b of that dim (weight norm's per-slice factors, per-channel quantization
 * parameters): element i_ belongs to slice b_ = (i_ / C) % B. With C == 1 consecutive
 * elements are consecutive slices, otherwise runs of C share one; BODY handles element i_
 * of slice b_, and each run's loop is contiguous, so it vectorizes.
 */
#define FO_SLICE_WALK(B_, C_, LO, N, BODY)                                                \
    do {                                                                                  \
        const ptrdiff_t B = (B_), C = (C_), end = (LO) + (N);                             \
        ptrdiff_t i = (LO), i_;                                                           \
        while (i < end) {                                                                 \
            const ptrdiff_t row = i / C, b = row % B;                                     \
            const ptrdiff_t run = C == 1 ? B - b : (row + 1) * C - i;                     \
            const ptrdiff_t stop = i + run < end ? i + run : end;                         \
            if (C == 1)                                                                   \
                for (i_ = i; i_ < stop; i_++) {                                           \
                    const ptrdiff_t b_ = b + (i_ - i);                                    \
                    BODY;                                                                 \
                }                                                                         \
            else                                                                          \
                for (i_ = i; i_ < stop; i_++) {                                           \
                    const ptrdiff_t b_ = b;                                               \
                    BODY;                                                                 \
                }                                                                         \
            i = stop;                                                                     \
        }                                                                                 \
    } while (0)

/*
 * Pruning masks in an optimizer step (fastopt.prune): after a chunk's update, every entry
 * whose mask byte is 0 gets +0 in the written parameter (operand 1) and in the n_state
 * state operands after the gradient, while the chunk is still in cache: no extra pass
 * over memory, and the rules' loops stay as they are. Zeroed as integers of the item's
 * width, so NaN or inf in a pruned entry's update cannot leak through.
 */
#define FO_MASK_WIDTH(U)                                                                  \
    do {                                                                                  \
        ptrdiff_t i_, s_;                                                                 \
        U *restrict q_ = (U *)ptr[1] + lo;                                                \
        for (i_ = 0; i_ < n; i_++) q_[i_] = mask[i_] ? q_[i_] : 0;                        \
        for (s_ = 0; s_ < n_state; s_++) {                                                \
            q_ = (U *)ptr[3 + s_] + lo;                                                   \
            for (i_ = 0; i_ < n; i_++) q_[i_] = mask[i_] ? q_[i_] : 0;                    \
        }                                                                                 \
    } while (0)
FO_MULTIVERSION static void fo_cpu_mask_chunk(char **ptr, ptrdiff_t lo, ptrdiff_t n,
                                              ptrdiff_t itemsize, ptrdiff_t n_state,
                                              const uint8_t *restrict mask)
{
    if (itemsize == 8) FO_MASK_WIDTH(uint64_t);
    else FO_MASK_WIDTH(uint32_t);
}
#undef FO_MASK_WIDTH

#endif /* FASTOPT_CPU_CHUNKS_H */

/*
 * optim_loops.h - chunk functions for the optimizer rules (see chunks.h).
 * Operands: 0 param in, 1 param out, 2 grad, then the rule's state in its own order.
 */
#ifndef FASTOPT_CPU_OPTIM_LOOPS_H
#define FASTOPT_CPU_OPTIM_LOOPS_H

#include "chunks.h"
#include "fastopt/optim.h"

/* fo_cpu_<NAME>_<SFX>: element function fo_<FN>_<SFX> with args fo_<ARGS>_args_<SFX> and
   K = 0..3 state operands after the gradient */
#define FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                 \
    FO_MULTIVERSION static void fo_cpu_##NAME##_##SFX(char **ptr, ptrdiff_t lo,           \
                                                      ptrdiff_t n, const void *args)      \
    {                                                                                     \
        const fo_##ARGS##_args_##SFX a = *(const fo_##ARGS##_args_##SFX *)args;           \
        const T *restrict g = (const T *)ptr[2] + lo;
#define FO_STATE(T, K) T *restrict s##K = (T *)ptr[2 + K] + lo;

#define FO_CHUNK0(T, SFX, NAME, FN, ARGS)                                                 \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_PARAM_LOOP(T, fo_##FN##_##SFX, g[i], &a);                                      \
    }
#define FO_CHUNK1(T, SFX, NAME, FN, ARGS)                                                 \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1)                                                                    \
        FO_PARAM_LOOP(T, fo_##FN##_##SFX, g[i], s1 + i, &a);                              \
    }
#define FO_CHUNK2(T, SFX, NAME, FN, ARGS)                                                 \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_STATE(T, 2)                                                     \
        FO_PARAM_LOOP(T, fo_##FN##_##SFX, g[i], s1 + i, s2 + i, &a);                      \
    }
#define FO_CHUNK3(T, SFX, NAME, FN, ARGS)                                                 \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_STATE(T, 2) FO_STATE(T, 3)                                      \
        FO_PARAM_LOOP(T, fo_##FN##_##SFX, g[i], s1 + i, s2 + i, s3 + i, &a);              \
    }
#define FO_CHUNK4(T, SFX, NAME, FN, ARGS)                                                 \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_STATE(T, 2) FO_STATE(T, 3) FO_STATE(T, 4)                       \
        FO_PARAM_LOOP(T, fo_##FN##_##SFX, g[i], s1 + i, s2 + i, s3 + i, s4 + i, &a);      \
    }

/* The cautious steps (fastopt/optim.h's FO_CAUTIOUS_KERNELS): N state operands, then the
   tensor's factor k (operand 3 + N, one element) */
#define FO_FACTOR(T, N) const T k = *(const T *)ptr[3 + N];
#define FO_CAUTIOUS1(T, SFX, NAME, ARGS)                                                  \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_FACTOR(T, 1)                                                    \
        FO_PARAM_LOOP(T, fo_##NAME##_##SFX, g[i], s1 + i, k, &a);                         \
    }
#define FO_CAUTIOUS2(T, SFX, NAME, ARGS)                                                  \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_STATE(T, 2) FO_FACTOR(T, 2)                                     \
        FO_PARAM_LOOP(T, fo_##NAME##_##SFX, g[i], s1 + i, s2 + i, k, &a);                 \
    }
#define FO_CAUTIOUS3(T, SFX, NAME, ARGS)                                                  \
    FO_CHUNK_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_STATE(T, 2) FO_STATE(T, 3) FO_FACTOR(T, 3)                      \
        FO_PARAM_LOOP(T, fo_##NAME##_##SFX, g[i], s1 + i, s2 + i, s3 + i, k, &a);         \
    }

/* The cautious count kernels (FO_CAUTION_COUNTS) summed in the pass: how many of the chunk's
   elements agree (the element function's K is 1) and are not pruned (`mask`, at the chunk's
   first element: byte 0 prunes; NULL, no mask), nothing written; an int per chunk (at most
   FO_CHUNK), so that the sum vectorizes */
typedef int (*fo_count_fn)(char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args,
                           const unsigned char *mask);
#define FO_COUNT_HEAD(T, SFX, NAME, ARGS)                                                 \
    FO_MULTIVERSION static int fo_cpu_count_##NAME##_##SFX(                               \
        char **ptr, ptrdiff_t lo, ptrdiff_t n, const void *args,                          \
        const unsigned char *restrict mask)                                               \
    {                                                                                     \
        const fo_##ARGS##_args_##SFX a = *(const fo_##ARGS##_args_##SFX *)args;           \
        const T *restrict p = (const T *)ptr[0] + lo;                                     \
        const T *restrict g = (const T *)ptr[2] + lo;                                     \
        int c = 0;                                                                        \
        ptrdiff_t i;
/* the count of elements whose K (the expression AGREE of i) is 1, unmasked or masked */
#define FO_COUNT_LOOP(T, AGREE)                                                           \
    if (mask == NULL)                                                                     \
        for (i = 0; i < n; i++) c += (AGREE) != (T)0;                                     \
    else                                                                                  \
        for (i = 0; i < n; i++) c += ((AGREE) != (T)0) & (mask[i] != 0);                  \
    return c;                                                                             \
    }
#define FO_COUNT1(T, SFX, NAME, ARGS)                                                     \
    FO_COUNT_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1)                                                                    \
        FO_COUNT_LOOP(T, fo_##NAME##_##SFX(p[i], g[i], s1 + i, &a))
#define FO_COUNT2(T, SFX, NAME, ARGS)                                                     \
    FO_COUNT_HEAD(T, SFX, NAME, ARGS)                                                     \
        FO_STATE(T, 1) FO_STATE(T, 2)                                                     \
        FO_COUNT_LOOP(T, fo_##NAME##_##SFX(p[i], g[i], s1 + i, s2 + i, &a))

/* Two-pass rules (Lamb, Adafactor): the update pass writes u to the "param out" slot (a
   scratch buffer; operand 0, the parameter, is read by Lamb only). The apply pass reads u
   in the gradient slot and the tensor's factor from operand 3, one element per tensor. */
#define FO_CHUNK_SCALED_APPLY(T, SFX)                                                     \
    FO_CHUNK_HEAD(T, SFX, scaled_apply, scaled_apply)                                     \
        const T k = *(const T *)ptr[3];                                                   \
        FO_PARAM_LOOP(T, fo_scaled_apply_##SFX, g[i], k, &a);                             \
    }

/* Adafactor's update pass for vectors: u (operand 1) from g and the variance (operand 3) */
#define FO_CHUNK_ADAFACTOR_VECTOR(T, SFX)                                                 \
    FO_CHUNK_HEAD(T, SFX, adafactor_vector, adafactor)                                    \
        T *restrict u = (T *)ptr[1] + lo;                                                 \
        FO_STATE(T, 1)                                                                    \
        ptrdiff_t i;                                                                      \
        for (i = 0; i < n; i++) u[i] = fo_adafactor_vector_##SFX(g[i], s1 + i, &a);       \
    }

/* Adafactor's update pass for factored tensors, viewed as rows of C elements: operands 3-6
   are per tensor: the row factors (B R), column factors (B C), each slice's clamped row
   mean (B), and the int64 shape (R, C). The chunk is walked row segment by row segment
   (row, column and slice counters, no division per segment), so the inner loop is
   contiguous in u, g and the column factors. */
#define FO_CHUNK_ADAFACTOR_FACTORED(T, SFX)                                               \
    FO_CHUNK_HEAD(T, SFX, adafactor_factored, adafactor)                                  \
        T *restrict u = (T *)ptr[1] + lo;                                                 \
        const T *row = (const T *)ptr[3], *col = (const T *)ptr[4];                       \
        const T *rmean = (const T *)ptr[5];                                               \
        const ptrdiff_t R = ((const long long *)ptr[6])[0];                               \
        const ptrdiff_t C = ((const long long *)ptr[6])[1];                               \
        ptrdiff_t i = 0, j, r = lo / C, c0 = lo % C, b = r / R, rb = r % R;               \
        while (i < n) {                                                                   \
            const ptrdiff_t len = C - c0 < n - i ? C - c0 : n - i;                        \
            const T rv = row[r], rm = rmean[b];                                           \
            const T *restrict cv = col + b * C + c0;                                      \
            T *restrict us = u + i;                                                       \
            const T *restrict gs = g + i;                                                 \
            for (j = 0; j < len; j++)                                                     \
                us[j] = fo_adafactor_factored_##SFX(gs[j], rv, cv[j], rm, &a);            \
            i += len;                                                                     \
            c0 = 0;                                                                       \
            r++;                                                                          \
            if (++rb == R) {                                                              \
                rb = 0;                                                                   \
                b++;                                                                      \
            }                                                                             \
        }                                                                                 \
    }

/* one chunk function per kernel of fastopt/optim.h's list, N state operands each */
#define FO_CPU_ELEMENTWISE(T, SFX, NAME, ARGS, N) FO_CHUNK##N(T, SFX, NAME, NAME, ARGS)
#define FO_CPU_CAUTIOUS(T, SFX, NAME, ARGS, N) FO_CAUTIOUS##N(T, SFX, NAME, ARGS)
#define FO_CPU_COUNT(T, SFX, NAME, ARGS, N) FO_COUNT##N(T, SFX, NAME, ARGS)

#define FO_DEFINE_OPTIM_LOOPS(T, SFX, SQRT, FABS)                                         \
    FO_ELEMENTWISE_KERNELS(FO_CPU_ELEMENTWISE, T, SFX)                                    \
    FO_CAUTIOUS_KERNELS(FO_CPU_CAUTIOUS, T, SFX)                 /* ..., state, k */      \
    FO_CAUTION_COUNTS(FO_CPU_COUNT, T, SFX)                                               \
    FO_CHUNK_ADAFACTOR_VECTOR(T, SFX)                      /* p, u, g, variance */        \
    FO_CHUNK_ADAFACTOR_FACTORED(T, SFX)           /* p, u, g, row, col, rmean, shape */   \
    FO_CHUNK_SCALED_APPLY(T, SFX)                          /* p, p_out, u, factor */
FO_DEFINE_FOR_REALS(FO_DEFINE_OPTIM_LOOPS)
#undef FO_DEFINE_OPTIM_LOOPS
#undef FO_CPU_ELEMENTWISE
#undef FO_CPU_CAUTIOUS
#undef FO_CPU_COUNT

/* every chunk function by name, with its number of state (and auxiliary) operands after the
   gradient, for the Cython driver; ends with a NULL name */
typedef struct { const char *name; fo_chunk_fn f32, f64; int n_state; } fo_cpu_kernel;
#define FO_KERNEL(NAME, N) {#NAME, fo_cpu_##NAME##_f32, fo_cpu_##NAME##_f64, N}
#define FO_CPU_ENTRY(T, SFX, NAME, ARGS, N) FO_KERNEL(NAME, N),
#define FO_CPU_CAUTIOUS_ENTRY(T, SFX, NAME, ARGS, N) FO_KERNEL(NAME, N + 1),
static const fo_cpu_kernel fo_cpu_kernels[] = {
    FO_ELEMENTWISE_KERNELS(FO_CPU_ENTRY, _, _)
    FO_CAUTIOUS_KERNELS(FO_CPU_CAUTIOUS_ENTRY, _, _)
    FO_KERNEL(adafactor_vector, 1), FO_KERNEL(adafactor_factored, 4), FO_KERNEL(scaled_apply, 1),
    {NULL, NULL, NULL, 0},
};
#undef FO_CPU_ENTRY
#undef FO_CPU_CAUTIOUS_ENTRY

/* the counting functions by kernel name, for the Cython driver; ends with a NULL name */
typedef struct { const char *name; fo_count_fn f32, f64; int n_state; } fo_cpu_count;
#define FO_CPU_COUNT_ENTRY(T, SFX, NAME, ARGS, N)                                         \
    {#NAME, fo_cpu_count_##NAME##_f32, fo_cpu_count_##NAME##_f64, N},
static const fo_cpu_count fo_cpu_counts[] = {
    FO_CAUTION_COUNTS(FO_CPU_COUNT_ENTRY, _, _)
    {NULL, NULL, NULL, 0},
};
#undef FO_CPU_COUNT_ENTRY
#undef FO_KERNEL

#endif /* FASTOPT_CPU_OPTIM_LOOPS_H */

/*
 * optim.cu - optimizer update rules on NVIDIA GPUs, compiled at run time by CuPy (NVRTC).
 *
 * Many tensors, one launch: `table` is a device int64 array holding, for each tensor, its
 * operand addresses (N_OPS of them: param in, param out, grad, state...), then, for each
 * chunk, (tensor, offset, length), then at `args_at` the rule's fo_<rule>_args struct (the
 * same bytes the CPU loops get). One thread block runs one chunk with a block-stride loop.
 * The element math is the shared header's, the same functions the CPU loops call.
 */
#include "fastopt/optim.h"

typedef long long fo_i64;

/* fo_cuda_<NAME>_<SFX>: element function fo_<FN>_<SFX>, args fo_<ARGS>_args_<SFX> */
#define FO_CUDA_HEAD(T, SFX, NAME, ARGS)                                                  \
    extern "C" __global__ void fo_cuda_##NAME##_##SFX(const fo_i64 *table,                \
                                                       fo_i64 n_tensors, fo_i64 args_at)  \
    {                                                                                     \
        const fo_##ARGS##_args_##SFX a = *(const fo_##ARGS##_args_##SFX *)(table + args_at);

#define FO_CUDA_CHUNK(N_OPS)                                                              \
        const fo_i64 *chunk = table + n_tensors * (N_OPS) + 3 * (fo_i64)blockIdx.x;      \
        const fo_i64 *ops = table + chunk[0] * (N_OPS);                                   \
        const fo_i64 lo = chunk[1], n = chunk[2];

#define FO_OP(T, K) ((T *)ops[K] + lo)

#define FO_CUDA_LOOP(T, CALL)                                                             \
        for (fo_i64 i = threadIdx.x; i < n; i += blockDim.x) {                            \
            const T p = FO_OP(const T, 0)[i];                                             \
            const T g = FO_OP(const T, 2)[i];                                             \
            FO_OP(T, 1)[i] = CALL;                                                        \
        }                                                                                 \
    }

#define FO_CUDA0(T, SFX, NAME, FN, ARGS)                                                  \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(3)                                     \
    FO_CUDA_LOOP(T, fo_##FN##_##SFX(p, g, &a))
#define FO_CUDA1(T, SFX, NAME, FN, ARGS)                                                  \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(4)                                     \
    FO_CUDA_LOOP(T, fo_##FN##_##SFX(p, g, FO_OP(T, 3) + i, &a))
#define FO_CUDA2(T, SFX, NAME, FN, ARGS)                                                  \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(5)                                     \
    FO_CUDA_LOOP(T, fo_##FN##_##SFX(p, g, FO_OP(T, 3) + i, FO_OP(T, 4) + i, &a))
#define FO_CUDA3(T, SFX, NAME, FN, ARGS)                                                  \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(6)                                     \
    FO_CUDA_LOOP(T, fo_##FN##_##SFX(p, g, FO_OP(T, 3) + i, FO_OP(T, 4) + i,               \
                                    FO_OP(T, 5) + i, &a))
#define FO_CUDA4(T, SFX, NAME, FN, ARGS)                                                  \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(7)                                     \
    FO_CUDA_LOOP(T, fo_##FN##_##SFX(p, g, FO_OP(T, 3) + i, FO_OP(T, 4) + i,               \
                                    FO_OP(T, 5) + i, FO_OP(T, 6) + i, &a))

/* The cautious steps (FO_CAUTIOUS_KERNELS): N state operands, then the tensor's factor k
   (operand 3 + N, one element) */
#define FO_CUDA_FACTOR(T, N) const T k = *(const T *)ops[3 + N];
#define FO_CUDA_CAUTIOUS1(T, SFX, NAME, ARGS)                                             \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(5) FO_CUDA_FACTOR(T, 1)                \
    FO_CUDA_LOOP(T, fo_##NAME##_##SFX(p, g, FO_OP(T, 3) + i, k, &a))
#define FO_CUDA_CAUTIOUS2(T, SFX, NAME, ARGS)                                             \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(6) FO_CUDA_FACTOR(T, 2)                \
    FO_CUDA_LOOP(T, fo_##NAME##_##SFX(p, g, FO_OP(T, 3) + i, FO_OP(T, 4) + i, k, &a))
#define FO_CUDA_CAUTIOUS3(T, SFX, NAME, ARGS)                                             \
    FO_CUDA_HEAD(T, SFX, NAME, ARGS) FO_CUDA_CHUNK(7) FO_CUDA_FACTOR(T, 3)                \
    FO_CUDA_LOOP(T, fo_##NAME##_##SFX(p, g, FO_OP(T, 3) + i, FO_OP(T, 4) + i,             \
                                      FO_OP(T, 5) + i, k, &a))

/* Two-pass rules (Lamb, Adafactor): the update pass writes u to operand 1; the apply pass
   reads u as operand 2 and the tensor's factor from operand 3 (one element) */
#define FO_CUDA_SCALED_APPLY(T, SFX)                                                      \
    FO_CUDA_HEAD(T, SFX, scaled_apply, scaled_apply) FO_CUDA_CHUNK(4)                     \
        const T k = *(const T *)ops[3];                                                   \
    FO_CUDA_LOOP(T, fo_scaled_apply_##SFX(p, g, k, &a))

/* Adafactor's update pass for vectors: u from g and the variance (operand 3) */
#define FO_CUDA_ADAFACTOR_VECTOR(T, SFX)                                                  \
    FO_CUDA_HEAD(T, SFX, adafactor_vector, adafactor) FO_CUDA_CHUNK(4)                    \
        for (fo_i64 i = threadIdx.x; i < n; i += blockDim.x)                              \
            FO_OP(T, 1)[i] = fo_adafactor_vector_##SFX(FO_OP(const T, 2)[i],              \
                                                       FO_OP(T, 3) + i, &a);              \
    }

/* ... for factored tensors: operands 3-6 per tensor: row factors (B R), column factors
   (B C), clamped row means (B), the int64 shape (R, C) */
#define FO_CUDA_ADAFACTOR_FACTORED(T, SFX)                                                \
    FO_CUDA_HEAD(T, SFX, adafactor_factored, adafactor) FO_CUDA_CHUNK(7)                  \
        const T *row = (const T *)ops[3], *col = (const T *)ops[4];                       \
        const T *rmean = (const T *)ops[5];                                               \
        const fo_i64 R = ((const fo_i64 *)ops[6])[0], C = ((const fo_i64 *)ops[6])[1];    \
        for (fo_i64 i = threadIdx.x; i < n; i += blockDim.x) {                            \
            const fo_i64 r = (lo + i) / C, b = r / R;                                     \
            FO_OP(T, 1)[i] = fo_adafactor_factored_##SFX(                                 \
                FO_OP(const T, 2)[i], row[r], col[b * C + (lo + i) % C], rmean[b], &a);   \
        }                                                                                 \
    }

/* one kernel per entry of fastopt/optim.h's list, N state operands each */
#define FO_CUDA_ELEMENTWISE(T, SFX, NAME, ARGS, N) FO_CUDA##N(T, SFX, NAME, NAME, ARGS)
#define FO_CUDA_CAUTIOUS(T, SFX, NAME, ARGS, N) FO_CUDA_CAUTIOUS##N(T, SFX, NAME, ARGS)

#define FO_DEFINE_CUDA_OPTIM(T, SFX, SQRT, FABS)                                          \
    FO_ELEMENTWISE_KERNELS(FO_CUDA_ELEMENTWISE, T, SFX)                                   \
    FO_CAUTIOUS_KERNELS(FO_CUDA_CAUTIOUS, T, SFX)                                         \
    FO_CUDA_ADAFACTOR_VECTOR(T, SFX)                                                      \
    FO_CUDA_ADAFACTOR_FACTORED(T, SFX)                                                    \
    FO_CUDA_SCALED_APPLY(T, SFX)
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_OPTIM)
#undef FO_DEFINE_CUDA_OPTIM

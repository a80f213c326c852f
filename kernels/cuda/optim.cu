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
#include "fastopt/lowp.h"

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

/*
 * Storage formats (fastopt/lowp.h, as kernels/cpu/format_loops.h on the CPU): the float32
 * kernel of each entry of fastopt/optim.h's lists on operands stored as float32, bfloat16
 * or float16, and state also as blockwise 8-bit codes, each element loaded, updated, its
 * pruned entries +0 and the written operands rounded back (stochastically with the
 * element's Philox bits, or to nearest even) or quantized, so that the bits are the CPU's
 * for any launch shape. fo_cuda_fmt_<NAME>(table, n_tensors, args_at, fmt_at): per tensor
 * 5 + 2 N (+ 1, a cautious step's factor) operand addresses: param in, param out, grad,
 * the N state arrays (the factor: float32, one element), the shadow (master weights: the
 * bfloat16 or float16 parameter, which receives the new float32 parameter rounded), the
 * mask (a byte per element, 0 prunes) and the N state arrays' block scales (float32, one
 * per FO_Q8_BLOCK elements, for 8-bit state), each 0 where there is none; then the chunks
 * and, at args_at, the fo_<ARGS>_args_f32 struct as above; at fmt_at FO_CUDA_FMT_SLOTS
 * format codes (FO_FMT_F32, _BF16, _F16, or for state _Q8S, _Q8U: the 3 + N operands', the
 * last slot the shadow's), stochastic, the step, the address of the two 8-bit maps (the
 * signed map's 256 float32 values, then the unsigned one's; 0 without 8-bit state), then
 * each tensor's Philox key (key0, key1). The launch needs at least one chunk; with 8-bit
 * state its blocks have FO_Q8_BLOCK threads (one 8-bit block at a time, its absmax reduced
 * in shared memory) and its chunks start at multiples of FO_Q8_BLOCK in their tensor.
 */
#define FO_CUDA_FMT_SLOTS 8

FO_HD float fo_cuda_fmt_load(fo_i64 addr, fo_i64 code, fo_i64 at)
{
    if (code == FO_FMT_F32) return ((const float *)addr)[at];
    return code == FO_FMT_BF16 ? fo_bf16_load(((const fo_u16 *)addr)[at])
                               : fo_f16_load(((const fo_u16 *)addr)[at]);
}

/* x into element `at` of an operand of format `code`, with the random bits of `stream`
   (0 the parameter, k the k-th state array) where the rounding is stochastic */
FO_HD void fo_cuda_fmt_store(fo_i64 addr, fo_i64 code, fo_i64 at, float x, fo_u32 stream,
                             const fo_i64 *f, fo_u32 key0, fo_u32 key1)
{
    const int stochastic = f[FO_CUDA_FMT_SLOTS] != 0;
    fo_u32 r = 0;
    if (code == FO_FMT_F32) {
        ((float *)addr)[at] = x;
        return;
    }
    if (stochastic)
        r = fo_round_bits(fo_round_words((fo_u64)at >> 3, stream,
                                         (fo_u64)f[FO_CUDA_FMT_SLOTS + 1], key0, key1),
                          (fo_u64)at);
    ((fo_u16 *)addr)[at] = code == FO_FMT_BF16
                               ? (stochastic ? fo_bf16_sr(x, r) : fo_bf16_rne(x))
                               : fo_f16_round(x, r, stochastic);
}

/* x, element `at` of an 8-bit state array, into its codes and its block's absmax
   (fo_q8_scale of the largest magnitude of the block's elements, as fo_q8_store on the
   CPU). Every thread of a block of FO_Q8_BLOCK threads calls it, `active` those that hold
   an element. */
static __device__ void fo_cuda_q8_store(fo_i64 codes, fo_i64 absmax, const float *map,
                                        fo_i64 at, float x, int active)
{
    __shared__ fo_u32 top[FO_Q8_BLOCK];
    const unsigned t = threadIdx.x;
    float scale;
    top[t] = active ? fo_float_bits(x) & 0x7FFFFFFFu : 0u;
    __syncthreads();
    for (unsigned w = FO_Q8_BLOCK / 2; w; w >>= 1) {
        if (t < w && top[t + w] > top[t]) top[t] = top[t + w];
        __syncthreads();
    }
    scale = fo_q8_scale(top[0]);
    __syncthreads(); /* every thread has read top[0] before the next call writes top */
    if (!active) return;
    ((unsigned char *)codes)[at] = (unsigned char)fo_q8_search(map, x / scale);
    if (t == 0) ((float *)absmax)[at / FO_Q8_BLOCK] = scale;
}

#define FO_CUDA_FMT_KERNEL(NAME, ARGS, N, AUX, CALL)                                      \
    extern "C" __global__ void fo_cuda_fmt_##NAME(const fo_i64 *table, fo_i64 n_tensors,  \
                                                  fo_i64 args_at, fo_i64 fmt_at)          \
    {                                                                                     \
        const fo_##ARGS##_args_f32 a = *(const fo_##ARGS##_args_f32 *)(table + args_at);  \
        const fo_i64 W = 5 + 2 * (N) + (AUX), SH = 3 + (N) + (AUX), *f = table + fmt_at;  \
        const fo_i64 *chunk = table + n_tensors * W + 3 * (fo_i64)blockIdx.x;             \
        const fo_i64 *ops = table + chunk[0] * W;                                         \
        const fo_i64 lo = chunk[1], n = chunk[2];                                         \
        const fo_u32 key0 = (fo_u32)f[FO_CUDA_FMT_SLOTS + 3 + 2 * chunk[0]];              \
        const fo_u32 key1 = (fo_u32)f[FO_CUDA_FMT_SLOTS + 4 + 2 * chunk[0]];              \
        const float *maps = (const float *)f[FO_CUDA_FMT_SLOTS + 2];                      \
        int q8 = 0;                                                                       \
        for (int k = 0; k < (N); k++) q8 |= f[3 + k] >= FO_FMT_Q8S;                       \
        if (q8 && blockDim.x != FO_Q8_BLOCK) __trap(); /* the launch breaks the contract */ \
        /* every thread runs every round: 8-bit state reduces each round's block */        \
        for (fo_i64 base = 0; base < n; base += blockDim.x) {                             \
            const fo_i64 at = lo + base + threadIdx.x;                                    \
            const int active = base + threadIdx.x < n;                                    \
            float s[(N) + 1] = {0.0f}, q;                                                 \
            if (active) {                                                                 \
                const float p = fo_cuda_fmt_load(ops[0], f[0], at);                       \
                const float g = fo_cuda_fmt_load(ops[2], f[2], at);                       \
                for (int k = 0; k < (N); k++)                                             \
                    s[k] = f[3 + k] >= FO_FMT_Q8S                                         \
                               ? maps[256 * (f[3 + k] - FO_FMT_Q8S)                       \
                                      + ((const unsigned char *)ops[3 + k])[at]]          \
                                     * ((const float *)ops[SH + 2 + k])[at / FO_Q8_BLOCK] \
                               : fo_cuda_fmt_load(ops[3 + k], f[3 + k], at);              \
                q = CALL;                                                                 \
                if (ops[SH + 1] != 0 && ((const unsigned char *)ops[SH + 1])[at] == 0) {  \
                    q = 0.0f;                                                             \
                    for (int k = 0; k < (N); k++) s[k] = 0.0f;                            \
                }                                                                         \
                fo_cuda_fmt_store(ops[1], f[1], at, q, 0, f, key0, key1);                 \
                for (int k = 0; k < (N); k++)                                             \
                    if (f[3 + k] < FO_FMT_Q8S)                                            \
                        fo_cuda_fmt_store(ops[3 + k], f[3 + k], at, s[k], (fo_u32)(k + 1), \
                                          f, key0, key1);                                 \
                if (ops[SH] != 0)                                                         \
                    fo_cuda_fmt_store(ops[SH], f[FO_CUDA_FMT_SLOTS - 1], at, q, 0, f,     \
                                      key0, key1);                                        \
            }                                                                             \
            if (q8)                                                                       \
                for (int k = 0; k < (N); k++)                                             \
                    if (f[3 + k] >= FO_FMT_Q8S)                                           \
                        fo_cuda_q8_store(ops[3 + k], ops[SH + 2 + k],                     \
                                         maps + 256 * (f[3 + k] - FO_FMT_Q8S), at, s[k],  \
                                         active);                                         \
        }                                                                                 \
    }

/* the state pointers of an element function with N state arrays */
#define FO_CUDA_FMT_STATE0
#define FO_CUDA_FMT_STATE1 s,
#define FO_CUDA_FMT_STATE2 s, s + 1,
#define FO_CUDA_FMT_STATE3 s, s + 1, s + 2,
#define FO_CUDA_FMT_STATE4 s, s + 1, s + 2, s + 3,
#define FO_CUDA_FMT(T, SFX, NAME, ARGS, N)                                                \
    FO_CUDA_FMT_KERNEL(NAME, ARGS, N, 0, fo_##NAME##_f32(p, g, FO_CUDA_FMT_STATE##N &a))
#define FO_CUDA_FMT_CAUTIOUS(T, SFX, NAME, ARGS, N)                                       \
    FO_CUDA_FMT_KERNEL(NAME, ARGS, N, 1,                                                  \
                       fo_##NAME##_f32(p, g, FO_CUDA_FMT_STATE##N *(const float *)ops[3 + (N)], \
                                       &a))
FO_ELEMENTWISE_KERNELS(FO_CUDA_FMT, _, _)
FO_CAUTIOUS_KERNELS(FO_CUDA_FMT_CAUTIOUS, _, _)

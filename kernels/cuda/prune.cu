/*
 * prune.cu - the counting passes of fastopt.prune's magnitude select on NVIDIA GPUs,
 * compiled at run time by CuPy (NVRTC); fastopt._backends._select drives them, as it does
 * the CPU loops, so the masks equal the CPU backends' bit for bit.
 *
 * `table`: for each tensor its operand addresses (the weights; then the masks, for the mask
 * pass), then (tensor, offset, length) per FO_CHUNK chunk in the tensors' order, as in
 * optim.cu. One block of FO_PRUNE_THREADS threads per chunk.
 */
#include "fastopt/prune.h"

typedef long long fo_i64;

#define FO_PRUNE_THREADS 256 /* the launch's block size: the shared arrays are this long */

#define FO_PRUNE_CHUNK(N_OPS)                                                             \
    const fo_i64 *chunk = table + n_tensors * (N_OPS) + 3 * (fo_i64)blockIdx.x;          \
    const fo_i64 *ops = table + chunk[0] * (N_OPS);                                       \
    const fo_i64 lo = chunk[1], n = chunk[2];

#define FO_DEFINE_CUDA_PRUNE(T, SFX, SQRT, FABS)                                          \
    /* counts[d] += the keys matching `prefix` under `pmask` whose digit at `shift` is d; \
       maxkey: the largest key (NaN's are above inf's) */                                 \
    extern "C" __global__ void fo_cuda_prune_hist_##SFX(                                  \
        const fo_i64 *table, fo_i64 n_tensors, int shift, fo_key_##SFX pmask,             \
        fo_key_##SFX prefix, unsigned long long *counts, fo_key_##SFX *maxkey)            \
    {                                                                                     \
        __shared__ fo_key_##SFX top[FO_PRUNE_THREADS];                                    \
        FO_PRUNE_CHUNK(1)                                                                 \
        const T *x = (const T *)ops[0] + lo;                                              \
        fo_key_##SFX m = 0;                                                               \
        for (fo_i64 i = threadIdx.x; i < n; i += blockDim.x) {                            \
            const fo_key_##SFX k = fo_mag_key_##SFX(x[i]);                                \
            if ((k & pmask) == prefix)                                                    \
                atomicAdd(counts + (int)((k >> shift) & (FO_DIGIT_BINS - 1)), 1ull);      \
            m = k > m ? k : m;                                                            \
        }                                                                                 \
        top[threadIdx.x] = m;                                                             \
        __syncthreads();                                                                  \
        for (int h = FO_PRUNE_THREADS / 2; h > 0; h >>= 1) {                              \
            if (threadIdx.x < h && top[threadIdx.x + h] > top[threadIdx.x])               \
                top[threadIdx.x] = top[threadIdx.x + h];                                  \
            __syncthreads();                                                              \
        }                                                                                 \
        if (threadIdx.x == 0) atomicMax(maxkey, top[0]);                                  \
    }                                                                                     \
                                                                                          \
    /* out[chunk] = how many of the chunk's keys equal thr */                             \
    extern "C" __global__ void fo_cuda_prune_ties_##SFX(                                  \
        const fo_i64 *table, fo_i64 n_tensors, fo_key_##SFX thr, fo_i64 *out)             \
    {                                                                                     \
        __shared__ fo_i64 part[FO_PRUNE_THREADS];                                         \
        FO_PRUNE_CHUNK(1)                                                                 \
        const T *x = (const T *)ops[0] + lo;                                              \
        fo_i64 c = 0;                                                                     \
        for (fo_i64 i = threadIdx.x; i < n; i += blockDim.x)                              \
            c += fo_mag_key_##SFX(x[i]) == thr;                                           \
        part[threadIdx.x] = c;                                                            \
        __syncthreads();                                                                  \
        for (int h = FO_PRUNE_THREADS / 2; h > 0; h >>= 1) {                              \
            if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];              \
            __syncthreads();                                                              \
        }                                                                                 \
        if (threadIdx.x == 0) out[blockIdx.x] = part[0];                                  \
    }                                                                                     \
                                                                                          \
    /* keep-masks (1 byte each): a key above thr is kept, below it pruned; of the chunk's \
       keys equal to thr, mode -1 prunes all, 0 keeps all, m > 0 prunes the first m (in   \
       index order: each thread takes a contiguous run, its ties ranked after the runs    \
       before it) */                                                                      \
    extern "C" __global__ void fo_cuda_prune_mask_##SFX(                                  \
        const fo_i64 *table, fo_i64 n_tensors, fo_key_##SFX thr, const fo_i64 *modes)     \
    {                                                                                     \
        __shared__ fo_i64 before[FO_PRUNE_THREADS];                                       \
        FO_PRUNE_CHUNK(2)                                                                 \
        const T *x = (const T *)ops[0] + lo;                                              \
        unsigned char *mask = (unsigned char *)ops[1] + lo;                               \
        const fo_i64 mode = modes[blockIdx.x];                                            \
        if (mode <= 0) { /* the same for the whole block */                               \
            for (fo_i64 i = threadIdx.x; i < n; i += blockDim.x) {                        \
                const fo_key_##SFX k = fo_mag_key_##SFX(x[i]);                            \
                mask[i] = k > thr || (mode == 0 && k == thr);                             \
            }                                                                             \
            return;                                                                       \
        }                                                                                 \
        const fo_i64 per = (n + FO_PRUNE_THREADS - 1) / FO_PRUNE_THREADS;                 \
        const fo_i64 a = threadIdx.x * per < n ? threadIdx.x * per : n;                   \
        const fo_i64 b = a + per < n ? a + per : n;                                       \
        fo_i64 c = 0, r;                                                                  \
        for (fo_i64 i = a; i < b; i++) c += fo_mag_key_##SFX(x[i]) == thr;                \
        before[threadIdx.x] = c;                                                          \
        __syncthreads();                                                                  \
        if (threadIdx.x == 0) {                                                           \
            fo_i64 sum = 0;                                                               \
            for (int j = 0; j < FO_PRUNE_THREADS; j++) {                                  \
                const fo_i64 here = before[j];                                            \
                before[j] = sum;                                                          \
                sum += here;                                                              \
            }                                                                             \
        }                                                                                 \
        __syncthreads();                                                                  \
        r = before[threadIdx.x];                                                          \
        for (fo_i64 i = a; i < b; i++) {                                                  \
            const fo_key_##SFX k = fo_mag_key_##SFX(x[i]);                                \
            const int tie = k == thr;                                                     \
            mask[i] = k > thr || (tie && r >= mode);                                      \
            r += tie;                                                                     \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_PRUNE)
#undef FO_DEFINE_CUDA_PRUNE
#undef FO_PRUNE_CHUNK

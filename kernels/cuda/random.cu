/*
 * random.cu - fastopt.init's Philox fills on NVIDIA GPUs, compiled at run time by CuPy
 * (NVRTC). One thread per group in a grid-stride loop; the group's outputs go where
 * fastopt/random.h's tile layout puts them, so the values equal the CPU backends' bit for
 * bit. `args` is a device copy of the fo_random_args struct.
 */
#include "fastopt/random.h"

typedef long long fo_i64;

#define FO_STORE(L, X)                                                                    \
    if (base + FO_TILE * (L) + j < n) o[FO_TILE * (L) + j] = (X);

#define FO_CUDA_FILL(NAME, SFX, T, PER, BODY)                                             \
    extern "C" __global__ void fo_cuda_##NAME##_##SFX(T *out, fo_i64 n,                   \
                                                      const fo_random_args *args)         \
    {                                                                                     \
        const fo_random_args a_ = *args, *a = &a_;                                        \
        const fo_i64 groups = (n + PER - 1) / PER;                                        \
        for (fo_i64 g = blockIdx.x * (fo_i64)blockDim.x + threadIdx.x; g < groups;        \
             g += (fo_i64)gridDim.x * blockDim.x) {                                       \
            const fo_i64 j = g % FO_TILE, base = (g - j) * PER;                           \
            T *o = out + base;                                                            \
            const fo_words w = fo_philox((fo_u64)g, a->stream, a->key0, a->key1);         \
            BODY                                                                          \
        }                                                                                 \
    }

FO_CUDA_FILL(uniform, f32, float, 4, FO_RANDOM_BODY_UNIFORM32)
FO_CUDA_FILL(uniform, f64, double, 2, FO_RANDOM_BODY_UNIFORM64)
FO_CUDA_FILL(normal, f32, float, 4, FO_RANDOM_BODY_NORMAL32)
FO_CUDA_FILL(normal, f64, double, 2, FO_RANDOM_BODY_NORMAL64)
FO_CUDA_FILL(trunc_normal, f32, float, 4, FO_RANDOM_BODY_TRUNC_NORMAL32)
FO_CUDA_FILL(trunc_normal, f64, double, 2, FO_RANDOM_BODY_TRUNC_NORMAL64)
FO_CUDA_FILL(bits, u32, fo_u32, 4, FO_RANDOM_BODY_BITS)

/*
 * quant.cu - fastopt.quant's loops on NVIDIA GPUs, compiled at run time by CuPy (NVRTC):
 * the element math is fastopt/quant.h's, as in the CPU loops, over a flat array viewed as
 * (A, B, C) around the quantization axis (element i in slice (i / C) % B, whose parameters
 * are inv[b], zp[b], scale[b]). Grid-stride loops; the quantizing loops add the NaN count
 * of x to *nan, so the caller can refuse them without another pass.
 */
#include "fastopt/quant.h"

typedef long long fo_i64;

/* kind: FO_CUDA_QUANTIZE (out: 1-byte codes), FO_CUDA_FAKE (out: floats), FO_CUDA_FAKE_GRAD
   (out: the gradient, gy the incoming one) */
#define FO_CUDA_QUANTIZE 0
#define FO_CUDA_FAKE 2
#define FO_CUDA_FAKE_GRAD 3

#define FO_DEFINE_CUDA_QUANT(T, SFX, SQRT, FABS)                                          \
    extern "C" __global__ void fo_cuda_quant_##SFX(                                       \
        int kind, const T *x, void *out, const T *gy, fo_i64 n, fo_i64 B, fo_i64 C,       \
        const T *inv, const T *zp, const T *scale, T qmin, T qmax, int fused,             \
        unsigned long long *nan)                                                          \
    {                                                                                     \
        unsigned long long bad = 0;                                                       \
        for (fo_i64 i = blockIdx.x * (fo_i64)blockDim.x + threadIdx.x; i < n;             \
             i += (fo_i64)gridDim.x * blockDim.x) {                                       \
            const fo_i64 b = (i / C) % B;                                                 \
            const T v = x[i];                                                             \
            if (kind == FO_CUDA_QUANTIZE)                                                 \
                ((unsigned char *)out)[i] = (unsigned char)(int)fo_quantize_##SFX(        \
                    v, inv[b], zp[b], qmin, qmax, fused);                                 \
            else if (kind == FO_CUDA_FAKE)                                                \
                ((T *)out)[i] = fo_fake_quantize_##SFX(v, inv[b], zp[b], scale[b], qmin,  \
                                                       qmax);                             \
            else                                                                          \
                ((T *)out)[i] = fo_fake_quantize_grad_##SFX(gy[i], v, inv[b], zp[b],      \
                                                            qmin, qmax);                  \
            bad += v != v;                                                                \
        }                                                                                 \
        if (bad) atomicAdd(nan, bad);                                                     \
    }                                                                                     \
                                                                                          \
    /* codes q (int8 if is_signed, else uint8) to floats: (q - zp) * scale in double */   \
    extern "C" __global__ void fo_cuda_dequant_##SFX(                                     \
        const unsigned char *q, T *y, fo_i64 n, fo_i64 B, fo_i64 C, const int *zp,        \
        const double *scale, int is_signed)                                               \
    {                                                                                     \
        for (fo_i64 i = blockIdx.x * (fo_i64)blockDim.x + threadIdx.x; i < n;             \
             i += (fo_i64)gridDim.x * blockDim.x) {                                       \
            const fo_i64 b = (i / C) % B;                                                 \
            const int code = is_signed ? (int)(signed char)q[i] : (int)q[i];              \
            y[i] = fo_dequantize_##SFX(code, zp[b], scale[b]);                            \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_QUANT)
#undef FO_DEFINE_CUDA_QUANT

/*
 * fastopt/quant.h - one element of affine quantization, shared by the CPU loops and CUDA.
 *
 * Rounding and order of operations are torch's (x86 CPU build), so int8/uint8 results are
 * bit-exact against torch.quantize_per_tensor / quantize_per_channel and the fake-quantize
 * ops (inv = 1 / scale, rounded to the dtype first, as torch does):
 *   quantize, per tensor, float32:  q = clamp(rint(fma(x, inv, zp)), qmin, qmax)   (FBGEMM)
 *   quantize, otherwise:            q = clamp(rint(x * inv + zp), qmin, qmax)
 *   dequantize:                     x = (q - zp) * scale, in double, rounded once
 *   fake quantize:                  q = rint(x * inv) + zp;  y = (clamp(q) - zp) * scale
 *                                   (and dy/dx = 1 where qmin <= q <= qmax, else 0)
 * rint rounds half to even. NaN inputs are counted by the loops (and refused by the
 * Python layer); the clamps map NaN to qmin so no conversion is undefined.
 */
#ifndef FASTOPT_QUANT_H
#define FASTOPT_QUANT_H

#include "fastopt/common.h"

#define FO_DEFINE_QUANT(T, SFX, RINT, FMA)                                    \
    FO_HD T fo_qclamp_##SFX(T v, T qmin, T qmax)                                          \
    {                                                                                     \
        v = v > qmin ? v : qmin; /* NaN -> qmin */                                        \
        return v < qmax ? v : qmax;                                                       \
    }                                                                                     \
    /* the quantized value, as a float holding an integer in [qmin, qmax] */              \
    FO_HD T fo_quantize_##SFX(T x, T inv, T zp, T qmin, T qmax, int fused)                \
    {                                                                                     \
        return fo_qclamp_##SFX(RINT(fused ? FMA(x, inv, zp) : x * inv + zp), qmin, qmax); \
    }                                                                                     \
    FO_HD T fo_dequantize_##SFX(int q, int zp, double scale)                              \
    {                                                                                     \
        return (T)((double)(q - zp) * scale);                                             \
    }                                                                                     \
    /* unclamped q of the fake quantizer */                                              \
    FO_HD T fo_fake_q_##SFX(T x, T inv, T zp) { return RINT(x * inv) + zp; }              \
    FO_HD T fo_fake_quantize_##SFX(T x, T inv, T zp, T scale, T qmin, T qmax)             \
    {                                                                                     \
        return (fo_qclamp_##SFX(fo_fake_q_##SFX(x, inv, zp), qmin, qmax) - zp) * scale;   \
    }                                                                                     \
    FO_HD T fo_fake_quantize_grad_##SFX(T gy, T x, T inv, T zp, T qmin, T qmax)           \
    {                                                                                     \
        const T q = fo_fake_q_##SFX(x, inv, zp);                                          \
        return (q >= qmin && q <= qmax) ? gy : (T)0;                                      \
    }
FO_DEFINE_QUANT(float, f32, rintf, fmaf)
FO_DEFINE_QUANT(double, f64, rint, fma)
#undef FO_DEFINE_QUANT

#endif /* FASTOPT_QUANT_H */

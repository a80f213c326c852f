/*
 * fastopt/common.h - what every per-element header needs, for C and CUDA alike.
 *
 * FO_HD marks a function that the Cython (C) loops and the CUDA kernels both call.
 * FO_DEFINE_FOR_REALS(M) expands M(T, SFX, SQRT, FABS) for float (f32) and double (f64), so each
 * rule is written once and instantiated per dtype: float math stays float, double stays
 * double.
 */
#ifndef FASTOPT_COMMON_H
#define FASTOPT_COMMON_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FO_HD static __host__ __device__ __forceinline__
#else
#include <math.h>
#define FO_HD static inline
#endif

#define FO_DEFINE_FOR_REALS(M) M(float, f32, sqrtf, fabsf) M(double, f64, sqrt, fabs)

/* torch's lerp: start + w * (end - start) for |w| < 0.5, else end - (end - start) * (1 - w).
   `w_hi` is the host's answer to "is |w| >= 0.5". */
#define FO_DEFINE_LERP(T, SFX, SQRT, FABS)                                                      \
    FO_HD T fo_lerp_##SFX(T start, T end, T w, int w_hi)                                  \
    {                                                                                     \
        return w_hi ? end - (end - start) * ((T)1 - w) : start + w * (end - start);       \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_LERP)
#undef FO_DEFINE_LERP

#endif /* FASTOPT_COMMON_H */

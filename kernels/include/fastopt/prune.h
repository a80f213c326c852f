/*
 * fastopt/prune.h - magnitude keys for pruning's threshold selection, shared by the CPU
 * loops and CUDA.
 *
 * A float's bits with the sign cleared, read as an unsigned integer, order non-negative
 * magnitudes exactly as the values do (|-0.0| = 0, inf above every finite value, NaN above
 * inf), so the k smallest magnitudes are the k smallest keys, and a radix select over the
 * keys' digits (most significant first) finds the k-th one in a few counting passes.
 * Ties are broken by position: among equal keys, the one earlier in the tensors' order
 * (tensor by tensor, C order inside each) ranks lower and is pruned first.
 */
#ifndef FASTOPT_PRUNE_H
#define FASTOPT_PRUNE_H

#include "fastopt/common.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
typedef unsigned int fo_key_f32;
typedef unsigned long long fo_key_f64;
FO_HD fo_key_f32 fo_mag_key_f32(float x) { return __float_as_uint(x) & 0x7fffffffu; }
FO_HD fo_key_f64 fo_mag_key_f64(double x)
{
    return (fo_key_f64)__double_as_longlong(x) & 0x7fffffffffffffffull;
}
#else
#include <stdint.h>
#include <string.h>
typedef uint32_t fo_key_f32;
typedef uint64_t fo_key_f64;
FO_HD fo_key_f32 fo_mag_key_f32(float x)
{
    fo_key_f32 u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;
}
FO_HD fo_key_f64 fo_mag_key_f64(double x)
{
    fo_key_f64 u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffffffffffull;
}
#endif

/* the radix select's digits: FO_DIGIT_BITS bits each, from the top of the key (float32's
   31-bit keys take two digits, float64's 63-bit keys four) */
#define FO_DIGIT_BITS 16
#define FO_DIGIT_BINS (1 << FO_DIGIT_BITS)

#endif /* FASTOPT_PRUNE_H */

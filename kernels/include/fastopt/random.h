/*
 * fastopt/random.h - the counter-based generator behind fastopt.init, for C and CUDA alike.
 *
 * Philox-4x32-10 (Salmon et al., SC'11): 4 x 32 random bits from a 128-bit counter and a
 * 64-bit key. The key is the user's seed; the counter is (group index, 0, stream), so a
 * value depends only on (seed, stream, element index): the same on every backend, device
 * and thread count. An array is cut into tiles of FO_TILE groups; output l of group g
 * (g = FO_TILE * tile + j) is element FO_TILE * (PER * tile + l) + j, PER outputs per group:
 *
 *   uniform float32   4 per group: output l of the group gets u = (w_l >> 8) * 2^-24
 *   uniform float64   2 per group: u from the 53 bits of (w_0, w_1), resp. (w_2, w_3)
 *   normal float64    2 per group: Box-Muller on u1 in (0, 1] from (w_0, w_1) and u2 in
 *                     [0, 1) from (w_2, w_3): r = sqrt(-2 ln u1), (r cos 2 pi u2, r sin 2 pi u2)
 *   normal float32    4 per group: Box-Muller on 32-bit uniforms (w_0, w_1), (w_2, w_3)
 *   truncated normal  inverse CDF of a uniform in [Phi(a), Phi(b)]: 2 per group from 53-bit
 *                     uniforms (float64), 4 per group from 32-bit ones (float32)
 *   bits              4 per group: the raw words (fastopt.init.sparse_'s sort keys)
 *
 * Transcendentals are written here from +, -, *, / and sqrt only (correctly rounded on
 * every IEEE machine; the builds forbid FMA contraction), because libm's and CUDA's log,
 * sin and cos differ in the last bit. Values are computed in float64 and rounded once to
 * the array's dtype. Every other backend (NumPy reference, Numba) spells out the same
 * operations in the same order; the parity tests compare them bit for bit.
 */
#ifndef FASTOPT_RANDOM_H
#define FASTOPT_RANDOM_H

#include "fastopt/common.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
typedef unsigned int fo_u32;
typedef unsigned long long fo_u64;
FO_HD fo_u64 fo_bits_of(double x) { return (fo_u64)__double_as_longlong(x); }
FO_HD double fo_double_of(fo_u64 b) { return __longlong_as_double((long long)b); }
FO_HD fo_u32 fo_float_bits(float x) { return __float_as_uint(x); }
FO_HD float fo_float_of(fo_u32 b) { return __uint_as_float(b); }
#else
#include <stdint.h>
#include <string.h>
typedef uint32_t fo_u32;
typedef uint64_t fo_u64;
FO_HD fo_u64 fo_bits_of(double x) { fo_u64 b; memcpy(&b, &x, 8); return b; }
FO_HD double fo_double_of(fo_u64 b) { double x; memcpy(&x, &b, 8); return x; }
FO_HD fo_u32 fo_float_bits(float x) { fo_u32 b; memcpy(&b, &x, 4); return b; }
FO_HD float fo_float_of(fo_u32 b) { float x; memcpy(&x, &b, 4); return x; }
#endif

/* kinds of fill, shared with the Python side (fastopt._backends._random) */
#define FO_RANDOM_UNIFORM 0
#define FO_RANDOM_NORMAL 1
#define FO_RANDOM_TRUNC_NORMAL 2
#define FO_RANDOM_BITS 3

/* groups per tile: word (or pair) l of group g0 + j fills element FO_TILE * l + j of the
   tile, so each word's values are contiguous in memory */
#define FO_TILE 16

/* Arguments of one fill. uniform: r0 low, r1 high - low; normal: r0 mean, r1 std;
   truncated normal: r0 mean, r1 std, r2 a, r3 b, r4 Phi((a - mean) / std),
   r5 1 - r4 (computed without cancellation), r6 Phi((b - mean) / std) - r4. */
typedef struct {
    double r0, r1, r2, r3, r4, r5, r6;
    fo_u32 key0, key1, stream, pad;
} fo_random_args;

typedef struct {
    fo_u32 w0, w1, w2, w3;
} fo_words;

/* Philox-4x32-10 of the counter (c0, c1, c2, c3) and the key (key0, key1) */
FO_HD fo_words fo_philox4(fo_u32 w0, fo_u32 w1, fo_u32 w2, fo_u32 w3, fo_u32 key0,
                          fo_u32 key1)
{
    /* 32-bit words kept in 64-bit variables: the products are then 32 x 32 -> 64-bit
       multiplies of the low halves, which vectorize as such (vpmuludq) */
    const fo_u64 lo = 0xFFFFFFFFull;
    fo_u64 c0 = w0, c1 = w1, c2 = w2, c3 = w3, k0 = key0, k1 = key1;
    for (int r = 0; r < 10; r++) {
        const fo_u64 p0 = (c0 & lo) * 0xD2511F53ull, p1 = (c2 & lo) * 0xCD9E8D57ull;
        c0 = (p1 >> 32) ^ c1 ^ k0;
        c2 = (p0 >> 32) ^ c3 ^ k1;
        c1 = p1 & lo;
        c3 = p0 & lo;
        k0 = (k0 + 0x9E3779B9ull) & lo;
        k1 = (k1 + 0xBB67AE85ull) & lo;
    }
    fo_words w = {(fo_u32)c0, (fo_u32)c1, (fo_u32)c2, (fo_u32)c3};
    return w;
}

/* the fills' counter: (group, 0, stream) */
FO_HD fo_words fo_philox(fo_u64 group, fo_u32 stream, fo_u32 key0, fo_u32 key1)
{
    return fo_philox4((fo_u32)group, (fo_u32)(group >> 32), 0, stream, key0, key1);
}

/* k * 2^-53 in [0, 1) from the top 27 bits of hi and 26 bits of lo */
FO_HD double fo_unit53(fo_u32 hi, fo_u32 lo)
{
    return ((double)(hi >> 5) * 67108864.0 + (double)(lo >> 6)) * 1.1102230246251565e-16;
}

/* natural log of a positive normal double: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
   ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.1716, series to s^21 */
FO_HD double fo_log(double x)
{
    const fo_u64 bits = fo_bits_of(x);
    double e = (double)((int)(bits >> 52) - 1022);
    double m = fo_double_of((bits & 0x000FFFFFFFFFFFFFull) | 0x3FE0000000000000ull);
    if (m < 0.7071067811865476) {
        m = m + m;
        e = e - 1.0;
    }
    const double s = (m - 1.0) / (m + 1.0), z = s * s;
    const double poly =
        0.3333333333333333 + z * (0.2 + z * (0.14285714285714285 + z * (0.1111111111111111
        + z * (0.09090909090909091 + z * (0.07692307692307693 + z * (0.06666666666666667
        + z * (0.058823529411764705 + z * (0.05263157894736842 + z * 0.047619047619047616))))))));
    const double t = s + s;
    return e * 0.6931471803691238 + ((t + t * (z * poly)) + e * 1.9082149292705877e-10);
}

/* cos and sin of 2 pi u for u in [0, 1): 4u = k + f exactly, |f| <= 1/2, a = f pi / 2;
   Taylor series of sin a (to a^17) and cos a (to a^16), rotated by k quadrants */
FO_HD void fo_cos_sin_2pi(double u, double *c, double *s)
{
    const double t = 4.0 * u;
    const int k = (int)(t + 0.5);
    const double a = (t - (double)k) * 1.5707963267948966, z = a * a;
    const double sa = a + a * (z * (-0.16666666666666666 + z * (0.008333333333333333
        + z * (-0.0001984126984126984 + z * (2.7557319223985893e-06 + z * (-2.505210838544172e-08
        + z * (1.6059043836821613e-10 + z * (-7.647163731819816e-13
        + z * 2.8114572543455206e-15))))))));
    const double ca = 1.0 + z * (-0.5 + z * (0.041666666666666664 + z * (-0.001388888888888889
        + z * (2.48015873015873e-05 + z * (-2.755731922398589e-07 + z * (2.08767569878681e-09
        + z * (-1.1470745597729725e-11 + z * 4.779477332387385e-14)))))));
    const int q = k & 3;
    *c = q == 0 ? ca : q == 1 ? -sa : q == 2 ? -ca : sa;
    *s = q == 0 ? sa : q == 1 ? ca : q == 2 ? -sa : -ca;
}

/* Phi^-1 in a tail, p < 0.02425 (Acklam's rational approximation; relative error below
   1.2e-9, far below a float32 ulp and invisible in any sample). Adding 1e-300 keeps
   log's argument a normal number (p = 0 gives a 37-sigma value, clamped to the bounds)
   and changes no p above 1e-284; unlike a comparison, it leaves the loop vectorizable. */
FO_HD double fo_ndtri_tail(double p)
{
    const double t = sqrt(-2.0 * fo_log(p + 1e-300));
    return (((((-7.784894002430293e-03 * t - 3.223964580411365e-01) * t - 2.400758277161838e+00)
              * t - 2.549732539343734e+00) * t + 4.374664141464968e+00) * t + 2.938163982698783e+00)
           / ((((7.784695709041462e-03 * t + 3.224671290700398e-01) * t + 2.445134137142996e+00)
               * t + 3.754408661907416e+00) * t + 1.0);
}

/* Phi^-1(p), given p and q = 1 - p each without cancellation. Branch-free (the tail
   form on the nearer tail and the central form are both evaluated, one is kept) so that
   the CPU loops vectorize. */
FO_HD double fo_ndtri(double p, double q)
{
    const double near = p < q ? p : q, tail = fo_ndtri_tail(near);
    const double r = p - 0.5, z = r * r;
    const double central =
        (((((-3.969683028665376e+01 * z + 2.209460984245205e+02) * z - 2.759285104469687e+02)
           * z + 1.383577518672690e+02) * z - 3.066479806614716e+01) * z + 2.506628277459239e+00)
        * r / (((((-5.447609879822406e+01 * z + 1.615858368580409e+02) * z
                 - 1.556989798598866e+02) * z + 6.680131188771972e+01) * z
                - 1.328068155288572e+01) * z + 1.0);
    const double signed_tail = p < q ? tail : -tail;
    return near < 0.02425 ? signed_tail : central;
}

/* one standard-normal pair (Box-Muller) from u1 in (0, 1] and u2 in [0, 1) */
FO_HD void fo_normal_pair(double u1, double u2, double *z0, double *z1)
{
    const double r = sqrt(-2.0 * fo_log(u1));
    double c, s;
    fo_cos_sin_2pi(u2, &c, &s);
    *z0 = r * c;
    *z1 = r * s;
}

/* uniforms for Box-Muller: 53 bits from two words (float64), 32 bits from one (float32) */
#define FO_U53_OPEN0(HI, LO)                                                              \
    (((double)((HI) >> 5) * 67108864.0 + (double)((LO) >> 6) + 1.0) * 1.1102230246251565e-16)
#define FO_U32_OPEN0(W) (((double)(W) + 1.0) * 2.3283064365386963e-10)
#define FO_U32(W) ((double)(W) * 2.3283064365386963e-10)

/* one truncated-normal value from a uniform u in [0, 1) */
FO_HD double fo_trunc_normal(double u, const fo_random_args *a)
{
    const double t = a->r6 * u;
    const double x = a->r0 + a->r1 * fo_ndtri(a->r4 + t, a->r5 - t);
    const double low = x < a->r2 ? a->r2 : x;
    return low > a->r3 ? a->r3 : low;
}

/* What group j of a tile stores, from its words w and the fill's arguments a (a pointer):
   FO_STORE(l, x) is the includer's "output l of group j is x" (fastopt/random.h's layout). */
#define FO_UNIFORM24(X) (float)(a->r0 + a->r1 * ((double)((X) >> 8) * 5.9604644775390625e-08))
#define FO_RANDOM_BODY_UNIFORM32                                                          \
    FO_STORE(0, FO_UNIFORM24(w.w0)) FO_STORE(1, FO_UNIFORM24(w.w1))                       \
    FO_STORE(2, FO_UNIFORM24(w.w2)) FO_STORE(3, FO_UNIFORM24(w.w3))
#define FO_RANDOM_BODY_UNIFORM64                                                          \
    FO_STORE(0, a->r0 + a->r1 * fo_unit53(w.w0, w.w1))                                    \
    FO_STORE(1, a->r0 + a->r1 * fo_unit53(w.w2, w.w3))
#define FO_RANDOM_BODY_NORMAL64                                                           \
    double z0, z1;                                                                        \
    fo_normal_pair(FO_U53_OPEN0(w.w0, w.w1), fo_unit53(w.w2, w.w3), &z0, &z1);            \
    FO_STORE(0, a->r0 + a->r1 * z0) FO_STORE(1, a->r0 + a->r1 * z1)
#define FO_RANDOM_BODY_NORMAL32                                                           \
    double z0, z1, z2, z3;                                                                \
    fo_normal_pair(FO_U32_OPEN0(w.w0), FO_U32(w.w1), &z0, &z1);                           \
    fo_normal_pair(FO_U32_OPEN0(w.w2), FO_U32(w.w3), &z2, &z3);                           \
    FO_STORE(0, (float)(a->r0 + a->r1 * z0)) FO_STORE(1, (float)(a->r0 + a->r1 * z1))     \
    FO_STORE(2, (float)(a->r0 + a->r1 * z2)) FO_STORE(3, (float)(a->r0 + a->r1 * z3))
#define FO_RANDOM_BODY_TRUNC_NORMAL64                                                     \
    FO_STORE(0, fo_trunc_normal(fo_unit53(w.w0, w.w1), a))                                \
    FO_STORE(1, fo_trunc_normal(fo_unit53(w.w2, w.w3), a))
#define FO_RANDOM_BODY_TRUNC_NORMAL32                                                     \
    FO_STORE(0, (float)fo_trunc_normal(FO_U32(w.w0), a))                                  \
    FO_STORE(1, (float)fo_trunc_normal(FO_U32(w.w1), a))                                  \
    FO_STORE(2, (float)fo_trunc_normal(FO_U32(w.w2), a))                                  \
    FO_STORE(3, (float)fo_trunc_normal(FO_U32(w.w3), a))
#define FO_RANDOM_BODY_BITS                                                               \
    FO_STORE(0, w.w0) FO_STORE(1, w.w1) FO_STORE(2, w.w2) FO_STORE(3, w.w3)

#endif /* FASTOPT_RANDOM_H */

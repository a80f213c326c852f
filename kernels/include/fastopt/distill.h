/*
 * fastopt/distill.h - the knowledge-distillation loss of one row of logits, shared by the
 * CPU loops and CUDA: exp and log written from + - * /, fma and bit moves only (log is
 * fastopt/random.h's), so the NumPy reference spells out the same operations.
 *
 * Row b of student logits s and teacher logits t (C classes), temperature T:
 *   ms = max s, mt = max t, zs = s / T, zt = t / T (divided, as torch's s / T),
 *   xs = zs - ms / T, xt = zt - mt / T (max zs = ms / T: rounding is monotonic)
 *   es = exp(xs), et = exp(xt), ec = exp(s - ms)                       (the logits' dtype)
 *   Ss = sum es, St = sum et, A = sum et (xt - xs), Sc = sum ec
 *   KL_b = A / St + ln Ss - ln St                            = KL(softmax zt || softmax zs)
 *   CE_b = ms + ln Sc - s[label]
 *   dL/ds_j = (es_j a - et_j b) + ec_j c - wc [j == label],
 *     a = wk (1 / Ss), b = wk (1 / St), c = wc (1 / Sc)                 (the logits' dtype)
 * with wk = (the KL term's weight) / T and wc the cross entropy's. (A / St is the KL's
 * sum pt (zt - zs) shifted by mt / T - ms / T, which the log-sum-exps' shifts cancel.)
 * Every exponent is <= 0: nothing overflows, whatever the logits' size.
 * The sums' order: a row is cut into blocks of FO_KD_BLOCK elements; inside a block,
 * element i goes into lane i % FO_NORM_LANES, in the logits' dtype, in index order; at the
 * block's end each lane is added to the row's float64 lane; the float64 lanes are added in
 * lane order. (32 terms per lane and block keep float32's rounding at torch's level, and
 * the float64 lanes carry the rest; converting every term cost a third of the row.)
 * At T = 2, 4 or 8, exp(s - ms) is taken as exp(xs)^T, by squaring (xs is exactly
 * (s - ms) / T there: scaling by a power of two commutes with rounding), so each logit
 * costs two exponentials, not three; the squarings multiply the exponential's error by T
 * (at most ~8 ulp).
 */
#ifndef FASTOPT_DISTILL_H
#define FASTOPT_DISTILL_H

#include "fastopt/random.h"

#define FO_KD_BLOCK 512

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
FO_HD float fo_float_of(unsigned int b) { return __uint_as_float(b); }
#else
FO_HD float fo_float_of(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }
#endif

/* exp(x) for x <= 0: x = k ln2 + r, |r| <= ln2 / 2, times 2^k from its bits; 0 below the
   smallest normal result.
   float32: r from two fmas (ln2 in two parts), then a degree-6 minimax polynomial of exp r
   (relative error 1.9e-9 on [-ln2/2, ln2/2], fitted for fastopt) in Horner form with fma:
   at most 1.03 ulp from exp over [-87, 0].
   float64: ln2 in two parts with k*ln2_hi exact, Taylor series of exp r to r^13, no fma. */
FO_HD float fo_exp_neg_f32(float x)
{
    const float k = rintf(x * 1.44269504f);
    const float r = fmaf(-k, -1.904654212e-09f, fmaf(-k, 6.931471825e-01f, x));
    float p = fmaf(1.383684576e-03f, r, 8.374815807e-03f);
    p = fmaf(p, r, 4.166822508e-02f);
    p = fmaf(p, r, 1.666641980e-01f);
    p = fmaf(p, r, 4.999999106e-01f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const float scale = fo_float_of((unsigned int)((int)k + 127) << 23);
    return x < -87.0f ? 0.0f : p * scale;
}

FO_HD double fo_exp_neg_f64(double x)
{
    const double k = rint(x * 1.4426950408889634);
    const double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    const double p = 1.0 + r * (1.0 + r * (0.5 + r * (0.16666666666666666
        + r * (0.041666666666666664 + r * (0.008333333333333333 + r * (0.001388888888888889
        + r * (0.0001984126984126984 + r * (2.48015873015873e-05 + r * (2.7557319223985893e-06
        + r * (2.755731922398589e-07 + r * (2.505210838544172e-08 + r * (2.08767569878681e-09
        + r * 1.6059043836821613e-10))))))))))));
    const double scale = fo_double_of((fo_u64)((long long)k + 1023) << 52);
    return x < -708.0 ? 0.0 : p * scale;
}

/* the cross entropy's exponential exp(s - ms): computed, or, at T = 2^squares (squares 1 to
   3), the KL term's es = exp(zs - ms / T) squared `squares` times (used by CUDA; the CPU
   loops square with the count known at compile time, which vectorizes) */
#define FO_DEFINE_KD_CE_EXP(T, SFX, SQRT, FABS)                                           \
    FO_HD T fo_kd_ce_exp_##SFX(T s, T ms, T es, int squares)                              \
    {                                                                                     \
        if (!squares) return fo_exp_neg_##SFX(s - ms);                                    \
        for (int q = 0; q < squares; q++) es = es * es;                                   \
        return es;                                                                        \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_KD_CE_EXP)
#undef FO_DEFINE_KD_CE_EXP

#endif /* FASTOPT_DISTILL_H */

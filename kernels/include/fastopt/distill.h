/*
 * fastopt/distill.h - the knowledge-distillation loss of one row of logits, shared by the
 * CPU loops and CUDA: 2^u written from + - * /, fma and bit moves only (log is
 * fastopt/random.h's), so the NumPy reference spells out the same operations.
 *
 * Row b of student logits s and teacher logits t (C classes), temperature T, and the
 * exponents in base 2 (the logits' dtype; L = log2 e and L / T rounded to it from double):
 *   ms = max s, mt = max t,
 *   us = (s - ms) (L / T), ut = (t - mt) (L / T), uc = (s - ms) L,
 *   es = 2^us, et = 2^ut, ec = 2^uc                 (es = exp((s - ms) / T), and so on)
 *   Ss = sum es, St = sum et, A = sum et (ut - us), Sc = sum ec
 *   KL_b = ln2 (A / St) + ln Ss - ln St                    = KL(softmax t/T || softmax s/T)
 *   CE_b = ms + ln Sc - s[label]
 *   dL/ds_j = (es_j a - et_j b) + ec_j c - wc [j == label],
 *     a = wk (1 / Ss), b = wk (1 / St), c = wc (1 / Sc)                 (the logits' dtype)
 * with wk = (the KL term's weight) / T and wc the cross entropy's. (ln2 A / St is the KL's
 * sum pt (t - s) / T shifted by (mt - ms) / T, which the log-sum-exps' shifts cancel.)
 * The maximum is subtracted before anything is scaled: s - ms is exact when s is near
 * ms, at any magnitude (1e4 logits keep their differences), and every exponent is <= 0,
 * so nothing overflows. No division per element, and 2^u needs no range reduction error.
 * The sums' order: a row is cut into blocks of FO_KD_BLOCK elements; inside a block,
 * element i goes into lane i % FO_NORM_LANES, in the logits' dtype, in index order; at the
 * block's end each lane is added to the row's float64 lane; the float64 lanes are added in
 * lane order. (32 terms per lane and block keep float32's rounding at torch's level, and
 * the float64 lanes carry the rest; converting every term cost a third of the row.)
 * At T = 2, 4 or 8, ec is taken as es^T, by squaring (uc is exactly T us there: scaling by
 * a power of two commutes with rounding), so each logit costs two exponentials, not
 * three; the squarings multiply the exponential's error by T (at most ~8 ulp). At T = 1,
 * ec is es.
 */
#ifndef FASTOPT_DISTILL_H
#define FASTOPT_DISTILL_H

#include "fastopt/random.h"

#define FO_KD_BLOCK 512

#define FO_LOG2E 1.4426950408889634 /* log2 e, the double nearest */
#define FO_LN2 0.6931471805599453    /* ln 2, the double nearest */

/* 2^u for u <= 0 (or a little above): k = u rounded to an integer by adding and
   subtracting 1.5 2^(mantissa bits), which leaves k in the low bits of u + that; f = u - k,
   exact, |f| <= 1/2; 2^f by a polynomial p; 2^u = p 2^k, by adding k to p's exponent field
   (p is within [0.7, 1.5), so its exponent stays normal down to k = 2 - bias); 0 where u is
   below that (results under 2^-125 or 2^-1021 count for nothing in a row whose largest
   term is 1), -inf included.
   float32: a degree-6 minimax polynomial of 2^f (relative error 2.0e-9 on [-1/2, 1/2],
   fitted for fastopt) in Horner form with fma: at most 0.96 ulp from 2^u.
   float64: Taylor's series of 2^f = exp(f ln2) to f^13 (coefficients ln2^n / n!), no
   fma. */
FO_HD float fo_exp2_neg_f32(float u)
{
    const float t = u + 12582912.0f, k = t - 12582912.0f, f = u - k;
    float p = fmaf(1.535336196e-04f, f, 1.339887502e-03f);
    p = fmaf(p, f, 9.618436918e-03f);
    p = fmaf(p, f, 5.550332367e-02f);
    p = fmaf(p, f, 2.402264774e-01f);
    p = fmaf(p, f, 6.931471825e-01f);
    p = fmaf(p, f, 1.0f);
    const fo_u32 r = fo_float_bits(p) + (fo_float_bits(t) << 23);
    return fo_float_of(r & (u < -125.0f ? 0u : ~0u));
}

FO_HD double fo_exp2_neg_f64(double u)
{
    const double t = u + 6755399441055744.0, k = t - 6755399441055744.0, f = u - k;
    const double p = 1.0 + f * (0.6931471805599453 + f * (0.24022650695910072
        + f * (0.05550410866482158 + f * (0.009618129107628477 + f * (0.0013333558146428443
        + f * (0.0001540353039338161 + f * (1.5252733804059841e-05
        + f * (1.321548679014431e-06 + f * (1.01780860092397e-07
        + f * (7.054911620801123e-09 + f * (4.4455382718708116e-10
        + f * (2.5678435993488206e-11 + f * 1.3691488853904128e-12))))))))))));
    const fo_u64 r = fo_bits_of(p) + (fo_bits_of(t) << 52);
    return fo_double_of(r & (u < -1021.0 ? 0ull : ~0ull));
}

/* the cross entropy's exponential ec = 2^uc from ds = s - ms: computed (cl = L), or, at
   T = 2^squares (squares 1 to 3), the KL term's es squared `squares` times (used by CUDA;
   the CPU loops square with the count known at compile time, which vectorizes) */
#define FO_DEFINE_KD_CE_EXP(T, SFX, SQRT, FABS)                                           \
    FO_HD T fo_kd_ce_exp_##SFX(T ds, T cl, T es, int squares)                             \
    {                                                                                     \
        if (!squares) return fo_exp2_neg_##SFX(ds * cl);                                  \
        for (int q = 0; q < squares; q++) es = es * es;                                   \
        return es;                                                                        \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_KD_CE_EXP)
#undef FO_DEFINE_KD_CE_EXP

#endif /* FASTOPT_DISTILL_H */

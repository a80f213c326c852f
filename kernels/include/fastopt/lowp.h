/*
 * fastopt/lowp.h - storage formats: bfloat16 and float16 values in and out of float32
 * arithmetic, and the quantizer of blockwise 8-bit state, for C and CUDA alike.
 *
 * A rule's kernel computes in float32 for low-precision parameters; its operands are loaded
 * from their storage format and the written ones stored back, rounded either to nearest
 * even or stochastically. Every backend spells out these bit operations the same way
 * (fastopt._backends._refmath: the NumPy reference and Numba), so the results are
 * identical everywhere.
 *
 * Stochastic rounding rounds x away from zero with probability equal to the discarded
 * fraction of its magnitude, taken to 16 bits: 16 random bits r are added at the top of the
 * discarded bits (bfloat16: the low 16 bits of the float32; float16: 13 bits in its normal
 * range, more below it), and the sum truncated. NaN stays NaN (quiet, sign kept), inf stays
 * inf; a finite value may round up to inf only from beyond the largest finite value.
 *
 * The random bits of element i of a tensor come from Philox-4x32-10 (fastopt/random.h):
 * counter (b, (b >> 32) | stream << 24, step, step >> 32) with b = i >> 3, and the tensor's
 * key (from the seed and the parameter's index, on the host); element i takes 16 bits of
 * word (i >> 1) & 3, the high half when i is odd. `stream` tells the rounded arrays of one
 * element apart: 0 the parameter, k the k-th state operand. The bits depend on
 * (seed, parameter, step, array, element) only: not on threads, chunks or the backend.
 */
#ifndef FASTOPT_LOWP_H
#define FASTOPT_LOWP_H

#include "fastopt/random.h"

/* storage formats of an operand (fastopt._backends._formats.CODES) */
#define FO_FMT_F32 0
#define FO_FMT_F64 1
#define FO_FMT_BF16 2
#define FO_FMT_F16 3

/* Blockwise 8-bit state (fastopt._backends._formats: Q8S, Q8U; torchao's and bitsandbytes'
   8-bit optimizers): element i of a tensor is map[code_i] * absmax[i / FO_Q8_BLOCK], with
   one of two dynamic maps of 256 increasing values in [-1, 1] (signed, for first moments)
   or [0, 1] (unsigned). */
#define FO_FMT_Q8S 4
#define FO_FMT_Q8U 5
#define FO_Q8_BLOCK 256

typedef unsigned short fo_u16;

FO_HD float fo_bf16_load(fo_u16 h) { return fo_float_of((fo_u32)h << 16); }

/* branch-free (selects by masks), so that the loops over it vectorize */
FO_HD float fo_f16_load(fo_u16 h)
{
    const fo_u32 sign = (fo_u32)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    /* zero or subnormal: m 2^-24, exact in float32; inf and NaN; normal */
    const fo_u32 sub = fo_float_bits((float)m * 5.9604644775390625e-08f);
    const fo_u32 big = (e == 31 ? 0x7F800000u : (e + 112u) << 23) | (m << 13);
    const fo_u32 zero = 0u - (fo_u32)(e == 0);
    return fo_float_of((sub & zero) | (big & ~zero) | sign);
}

/* bfloat16 of x: `add` is r (stochastic) or 0x7FFF + the kept bits' parity (nearest even) */
FO_HD fo_u16 fo_bf16_add(fo_u32 bits, fo_u32 add)
{
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (fo_u16)((bits >> 16) | 0x40u); /* NaN */
    return (fo_u16)((bits + add) >> 16);
}

FO_HD fo_u16 fo_bf16_rne(float x)
{
    const fo_u32 bits = fo_float_bits(x);
    return fo_bf16_add(bits, 0x7FFFu + ((bits >> 16) & 1u));
}

FO_HD fo_u16 fo_bf16_sr(float x, fo_u32 r) { return fo_bf16_add(fo_float_bits(x), r); }

/* float16 of x; stochastic with 16 random bits r, else to nearest even */
FO_HD fo_u16 fo_f16_round(float x, fo_u32 r, int stochastic)
{
    const fo_u32 bits = fo_float_bits(x), a = bits & 0x7FFFFFFFu;
    const fo_u16 sign = (fo_u16)((bits >> 16) & 0x8000u);
    const fo_u32 e = a >> 23;
    if (a > 0x7F800000u) return (fo_u16)(sign | 0x7E00u); /* NaN */
    if (e >= 113u) { /* float16's normal range and above: 13 bits go */
        const fo_u32 h = a - (112u << 23);
        const fo_u32 add = stochastic ? r >> 3 : 0xFFFu + ((h >> 13) & 1u);
        const fo_u32 q = e >= 143u ? 0x7C00u : (h + add) >> 13; /* 2^16 and above: inf */
        return (fo_u16)(sign | (q > 0x7C00u ? 0x7C00u : q));
    }
    {   /* below float16's normal range: in units of 2^-24, s >= 14 bits go */
        const fo_u64 m = e ? (fo_u64)((a & 0x7FFFFFu) | 0x800000u) : (fo_u64)a;
        const fo_u64 s = e ? 126u - e : 125u;
        if (s > 40u) return sign; /* below 2^-64: rounds to zero either way */
        if (stochastic) {
            const fo_u64 add = s >= 16u ? (fo_u64)r << (s - 16u) : (fo_u64)(r >> (16u - s));
            return (fo_u16)(sign | (fo_u16)((m + add) >> s));
        }
        {   /* nearest even: up past half, or at half to an even result (no variable shift
               of a constant, which GCC's vectorizer does not take) */
            const fo_u64 q = m >> s, half = (m >> (s - 1u)) & 1u;
            const fo_u64 rest = (m << (65u - s)) != 0;
            return (fo_u16)(sign | (fo_u16)(q + (half & (rest | (q & 1u)))));
        }
    }
}

/* the Philox words of elements 8 b .. 8 b + 7 of array `stream` at `step` */
FO_HD fo_words fo_round_words(fo_u64 b, fo_u32 stream, fo_u64 step, fo_u32 key0,
                              fo_u32 key1)
{
    return fo_philox4((fo_u32)b, (fo_u32)(b >> 32) | (stream << 24), (fo_u32)step,
                      (fo_u32)(step >> 32), key0, key1);
}

/* element i's 16 random bits from the words of its block */
FO_HD fo_u32 fo_round_bits(fo_words w, fo_u64 i)
{
    const fo_u32 k = (fo_u32)(i >> 1) & 3u;
    const fo_u32 word = k == 0 ? w.w0 : (k == 1 ? w.w1 : (k == 2 ? w.w2 : w.w3));
    return (i & 1u) ? word >> 16 : word & 0xFFFFu;
}

/* A block's absmax from the largest magnitude's bits `top` (compared as integers, where NaN
   comes above inf: then NaN), at least 1e-12 */
FO_HD float fo_q8_scale(fo_u32 top)
{
    return top > 0x7F800000u ? fo_float_of(0x7FC00000u)
                             : (fo_float_of(top) > 1e-12f ? fo_float_of(top) : 1e-12f);
}

/* The code of q = x / absmax (a float32 division) in the increasing map `m`
   (_formats.q8_store, torchao's quantize_8bit_with_qmap), by a binary search:
   c = q >= m[128] ? 128 : 0, then for step 64, 32 .. 1, c += q >= m[c + step] ? step : 0;
   then the upper code from half the gap up: c + 1 (at most 255) where
   q - m[c] >= (m[c + 1] - m[c]) * 0.5f. NaN: 0. */
FO_HD int fo_q8_search(const float *m, float q)
{
    int c = q >= m[128] ? 128 : 0, step, up;
    for (step = 64; step; step >>= 1) c += q >= m[c + step] ? step : 0;
    up = c < 255 ? c + 1 : 255;
    return q - m[c] >= (m[up] - m[c]) * 0.5f ? up : c;
}

#endif /* FASTOPT_LOWP_H */

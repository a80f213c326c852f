/*
 * format_loops.h - storage formats inside an elementwise kernel's chunks (see chunks.h,
 * fastopt/lowp.h and fastopt._backends._formats).
 *
 * The operands (0 param in, 1 param out, 2 grad, then the state) may be stored as float32,
 * bfloat16 or float16, and the state also as blockwise 8-bit codes, while the kernel
 * computes in float32. A chunk is cut into blocks of FO_FORMAT_BLOCK elements; per block,
 * every operand stored in a low format and read by the kernel is loaded into float32
 * scratch on the stack (float32 operands are used where they are, but for an operand 1 in
 * the grad's memory, which is written from scratch), the kernel's float32 chunk function
 * runs on a pointer table of the block, the pruned entries of the written operands become
 * +0 (masks), and every written operand in a low format (1 and the state; the grad is
 * never written, but through an operand 1 in its memory) is rounded or quantized back, as
 * is operand 1's value into the shadow with master weights. A parameter updated in place
 * (operand 1 the same memory as operand 0, in the same format) is loaded once and stored
 * once; else operand 0 is read and operand 1 written. The result is the same, bit for bit,
 * as loading whole arrays, running the kernel and storing them (_formats.around): the
 * kernel is elementwise, the random bits of stochastic rounding depend on the element's
 * index in its tensor only, and
 * each block of 8-bit state (with its absmax) lies inside one block here.
 */
#ifndef FASTOPT_CPU_FORMAT_LOOPS_H
#define FASTOPT_CPU_FORMAT_LOOPS_H

#include "chunks.h"
#include "fastopt/lowp.h"
#include "fastopt/reduce.h"

/* the most operands of a kernel: param in, param out, grad and 4 state operands (Adan) */
#define FO_FORMAT_OPS 7
/* elements per block: a block's scratch (7 x 1 KiB at most) and the low-precision lines it
   converts stay in L1, and the hardware prefetchers keep ahead of blocks this small (a 10M
   element Adam step in bfloat16 took 1.3 to 2 times as long with blocks of 1024, as long
   with 128).
   A multiple of 8, and chunks start at multiples of FO_CHUNK: a block starts a group of 8
   elements, which share a Philox call per rounded array. */
#define FO_FORMAT_BLOCK 256

/* Blockwise 8-bit state: fastopt/lowp.h (FO_FMT_Q8S, _Q8U). Chunks (_plan.pxi) start at
   multiples of FO_CHUNK in their tensor, and blocks here at multiples of FO_FORMAT_BLOCK in
   their chunk: each block of 8-bit state lies inside one block here, which loads and
   stores it whole */
_Static_assert(FO_CHUNK % FO_FORMAT_BLOCK == 0 && FO_FORMAT_BLOCK % FO_Q8_BLOCK == 0,
               "a block of 8-bit state must lie inside one block of a chunk");

/* One call's formats: operand op of a tensor is stored as code[op] (FO_FMT_F32, _BF16,
   _F16, or for state FO_FMT_Q8S, _Q8U: codes, with their block scales in operand
   scales[op], float32); operands n_ops .. n_ops + n_aux - 1 are the kernel's per-tensor
   factors (a cautious step's), float32, read where they are; with `shadow`, operand
   n_ops + n_aux (code[n_ops]) receives operand 1 rounded; with `mask` (else 0), that
   operand holds one byte per element, 0 for a pruned entry. */
typedef struct {
    fo_chunk_fn fn;          /* the kernel's float32 chunk function */
    const void *args;        /* its fo_<rule>_args_f32 */
    const fo_u32 *keys;      /* each tensor's Philox key (key0, key1) */
    fo_u64 step;             /* the step count in the random bits */
    const float *qmaps;      /* the maps of FO_FMT_Q8S and _Q8U, 256 values each */
    const fo_u32 *qtables;   /* their fo_q8_table tables, FO_Q8_TABLE each */
    int n_ops;               /* the kernel's operands: 3 + its state */
    int n_aux;               /* its per-tensor factors after them (n_ops + n_aux at most
                                FO_FORMAT_OPS) */
    int shadow, mask, stochastic;
    int vbmi;                /* 8-bit state with AVX-512 (fo_q8_vbmi()): loaded with
                                fo_q8_load_vbmi, its codes from fo_q8_codes_avx512 */
    int code[FO_FORMAT_OPS + 1];
    int scales[FO_FORMAT_OPS];
    uint8_t qplanes[2][4][256]; /* byte k of value c of map j: qplanes[j][k][c] */
} fo_format_args;

/* `#pragma omp simd` (the build has -fopenmp) on a conversion loop: it lets GCC if-convert
   the branches of lowp.h's float16 functions (their merges have more values than it
   converts otherwise) */
#define FO_SIMD _Pragma("omp simd")

/* the helpers of fo_cpu_format_chunk, inlined into each of its clones (FO_MULTIVERSION):
   GCC's heuristics left fo_format_store out of line in one extension and not in another,
   and out of line it is the baseline's code (SSE2): the XLA handler's bfloat16 Adam step
   with stochastic rounding took 2x the Cython driver's time, all of it in that copy */
#define FO_FORMAT_INLINE static inline __attribute__((always_inline))

typedef fo_u16 __attribute__((may_alias)) fo_u16_view;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define FO_HALVES(W) ((W) << 16 | (W) >> 16)
#else
#define FO_HALVES(W) (W)
#endif

/* The 16 random bits of elements i0 .. i0 + n - 1 (i0 a multiple of 8; n up to a block,
   rounded up to 8): element i takes half i & 1 of word (i >> 1) & 3 of group i >> 3, so
   with the words of the groups in order, its bits are 16-bit item i of them (little-endian
   halves: the words are stored with their halves swapped on a big-endian machine). */
FO_FORMAT_INLINE void fo_format_bits(fo_u32 *restrict w, fo_u64 i0, ptrdiff_t n,
                                     fo_u32 stream, fo_u64 step, fo_u32 key0, fo_u32 key1)
{
    const fo_u64 b0 = i0 >> 3;
    ptrdiff_t b;
    for (b = 0; b < (n + 7) >> 3; b++) {
        const fo_words g = fo_round_words(b0 + (fo_u64)b, stream, step, key0, key1);
        w[4 * b] = FO_HALVES(g.w0);
        w[4 * b + 1] = FO_HALVES(g.w1);
        w[4 * b + 2] = FO_HALVES(g.w2);
        w[4 * b + 3] = FO_HALVES(g.w3);
    }
}

FO_FORMAT_INLINE void fo_format_load(float *restrict x, const fo_u16 *restrict h, int code,
                                     ptrdiff_t n)
{
    ptrdiff_t i;
    if (code == FO_FMT_BF16) {
        FO_SIMD for (i = 0; i < n; i++) x[i] = fo_bf16_load(h[i]);
    } else {
        FO_SIMD for (i = 0; i < n; i++) x[i] = fo_f16_load(h[i]);
    }
}

/* x[0 .. n) into elements i0 .. i0 + n - 1 of `base` (format `code`: bfloat16 or float16),
   rounded with the random bits of `stream` (stochastic) or to nearest even; `w` is scratch
   for the bits */
FO_FORMAT_INLINE void fo_format_store(char *base, const float *restrict x, int code,
                                      const fo_format_args *fa, fo_u32 key0, fo_u32 key1,
                                      fo_u32 stream, fo_u64 i0, ptrdiff_t n,
                                      fo_u32 *restrict w)
{
    fo_u16 *restrict h = (fo_u16 *)base + i0;
    const fo_u16_view *restrict r = (const fo_u16_view *)w;
    ptrdiff_t i;
    if (fa->stochastic) {
        fo_format_bits(w, i0, n, stream, fa->step, key0, key1);
        if (code == FO_FMT_BF16) {
            FO_SIMD for (i = 0; i < n; i++) h[i] = fo_bf16_sr(x[i], r[i]);
        } else {
            FO_SIMD for (i = 0; i < n; i++) h[i] = fo_f16_round(x[i], r[i], 1);
        }
    } else if (code == FO_FMT_BF16) {
        FO_SIMD for (i = 0; i < n; i++) h[i] = fo_bf16_rne(x[i]);
    } else {
        FO_SIMD for (i = 0; i < n; i++) h[i] = fo_f16_round(x[i], 0, 0);
    }
}

/* -- 8-bit state: the quantizer. fo_q8_search (fastopt/lowp.h) takes 10 dependent lookups
   an element; the code is a function of q alone, non-decreasing in q for an increasing map
   (NaN: 0), so one lookup on q's bits does: magnitudes are clamped to [FO_Q8_LO,
   FO_Q8_HI] (2^-23 and 1: the code is the same below and above them), cut into buckets
   of 2^FO_Q8_SHIFT float32 values (a binade's 128th), and
   table[sign * FO_Q8_BUCKETS + bucket] holds the code at the bucket's start (bits 24 and
   up) and the offset in the bucket from which it is one more (q >= 0) or one less
   (q < 0), or 2^FO_Q8_SHIFT where it does not change. */
#define FO_Q8_LO 0x34000000u
#define FO_Q8_HI 0x3F800000u
#define FO_Q8_SHIFT 16
#define FO_Q8_BUCKETS (((FO_Q8_HI - FO_Q8_LO) >> FO_Q8_SHIFT) + 1)
#define FO_Q8_TABLE (2 * FO_Q8_BUCKETS)

/* The table of map `m` from the search itself; -1 (and the table undefined) unless the map
   increases and every bucket holds at most one step of the code, as in both dynamic maps
   (where the whole float32 range gives the search's codes). */
static int fo_q8_table(const float *m, fo_u32 *table)
{
    const fo_u32 width = 1u << FO_Q8_SHIFT;
    fo_u32 s, j;
    int k;
    for (k = 0; k < 255; k++)
        if (!(m[k] < m[k + 1])) return -1;
    for (s = 0; s < 2; s++) {
        const fo_u32 sign = s << 31;
        const float zero = fo_float_of(sign), inf = fo_float_of(sign | 0x7F800000u);
        /* the clamps keep the codes: 0 and inf have those of FO_Q8_LO and FO_Q8_HI */
        if (fo_q8_search(m, zero) != fo_q8_search(m, fo_float_of(sign | FO_Q8_LO))
            || fo_q8_search(m, inf) != fo_q8_search(m, fo_float_of(sign | FO_Q8_HI)))
            return -1;
        for (j = 0; j < FO_Q8_BUCKETS; j++) {
            const fo_u32 start = sign | (FO_Q8_LO + (j << FO_Q8_SHIFT));
            const fo_u32 last = j + 1 < FO_Q8_BUCKETS ? width - 1 : 0; /* the top: 1 only */
            const int c0 = fo_q8_search(m, fo_float_of(start));
            const int c1 = fo_q8_search(m, fo_float_of(start + last));
            fo_u32 lo = 0, hi = last;
            if (c1 == c0)
                hi = width;
            else if (c1 != (s ? c0 - 1 : c0 + 1))
                return -1;
            while (hi < width && hi - lo > 1) { /* the first offset with another code */
                const fo_u32 mid = lo + (hi - lo) / 2;
                if (fo_q8_search(m, fo_float_of(start + mid)) == c0) lo = mid;
                else hi = mid;
            }
            table[s * FO_Q8_BUCKETS + j] = (fo_u32)c0 << 24 | hi;
        }
    }
    return 0;
}

FO_FORMAT_INLINE uint8_t fo_q8_code(float q, const fo_u32 *restrict table)
{
    const fo_u32 bits = fo_float_bits(q), a = bits & 0x7FFFFFFFu;
    const fo_u32 neg = 0u - (bits >> 31); /* all ones for q < 0 */
    const fo_u32 d = (a < FO_Q8_LO ? FO_Q8_LO : (a > FO_Q8_HI ? FO_Q8_HI : a)) - FO_Q8_LO;
    const fo_u32 e = table[(neg & FO_Q8_BUCKETS) + (d >> FO_Q8_SHIFT)];
    const fo_u32 step = (d & ((1u << FO_Q8_SHIFT) - 1)) >= (e & 0xFFFFFFu);
    return a > 0x7F800000u ? 0 : (uint8_t)((e >> 24) + ((step ^ neg) - neg));
}

/* x[0 .. n) (n up to a block, a multiple of FO_Q8_BLOCK but for a tensor's last) from its
   codes and absmax; `m` the map */
FO_FORMAT_INLINE void fo_q8_load(float *restrict x, const uint8_t *restrict codes,
                                 const float *restrict absmax, const float *restrict m,
                                 ptrdiff_t n)
{
    ptrdiff_t b, i;
    for (b = 0; b < n; b += FO_Q8_BLOCK) {
        const ptrdiff_t k = n - b < FO_Q8_BLOCK ? n - b : FO_Q8_BLOCK;
        const float scale = absmax[b / FO_Q8_BLOCK];
        for (i = 0; i < k; i++) x[b + i] = m[codes[b + i]] * scale;
    }
}

/* the maps' byte planes (fo_format_args.qplanes) */
static void fo_q8_planes(fo_format_args *fa)
{
    int j, k, c;
    for (j = 0; j < 2; j++)
        for (c = 0; c < 256; c++) {
            const fo_u32 bits = fo_float_bits(fa->qmaps[256 * j + c]);
            for (k = 0; k < 4; k++) fa->qplanes[j][k][c] = (uint8_t)(bits >> 8 * k);
        }
}

/* With AVX-512 VBMI (Ice Lake, Zen 4 and later), fo_q8_load's lookups are byte permutes:
   the map's 4 byte planes sit in 16 registers, and 64 codes at a time pick their values'
   bytes from them (vpermi2b: 128 entries, the code's top bit choosing the half), which
   interleave into floats again (3 times as fast as GCC's gathers on Zen 4). The unpacks
   interleave within 128-bit lanes, so the codes are permuted first: the 4 values that lane
   L of float vector j receives, elements 16 j + 4 L + 0 .. 3, come from bytes 16 L + 4 j +
   0 .. 3. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define FO_Q8_VBMI 1

static int fo_q8_vbmi(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vbmi");
}

__attribute__((target("avx512f,avx512bw,avx512vbmi")))
static void fo_q8_load_vbmi(float *restrict x, const uint8_t *restrict codes,
                            const float *restrict absmax, const uint8_t (*planes)[256],
                            ptrdiff_t n)
{
    static const uint8_t order[64] = {
        0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
        4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
        8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
        12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
    const __m512i perm = _mm512_loadu_si512(order);
    __m512i table[4][4];
    ptrdiff_t i;
    int k;
    for (k = 0; k < 16; k++)
        table[k / 4][k % 4] = _mm512_loadu_si512(planes[k / 4] + 64 * (k % 4));
    for (i = 0; i < n; i += 64) {
        const __mmask64 valid = n - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (n - i)) - 1;
        const __m512 scale = _mm512_set1_ps(absmax[i / FO_Q8_BLOCK]);
        const __m512i c =
            _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(valid, codes + i));
        const __mmask64 top = _mm512_movepi8_mask(c);
        __m512i b[4], w[4];
        for (k = 0; k < 4; k++)
            b[k] = _mm512_mask_blend_epi8(
                top, _mm512_permutex2var_epi8(table[k][0], c, table[k][1]),
                _mm512_permutex2var_epi8(table[k][2], c, table[k][3]));
        w[0] = _mm512_unpacklo_epi8(b[0], b[1]);
        w[1] = _mm512_unpacklo_epi8(b[2], b[3]);
        w[2] = _mm512_unpackhi_epi8(b[0], b[1]);
        w[3] = _mm512_unpackhi_epi8(b[2], b[3]);
        b[0] = _mm512_unpacklo_epi16(w[0], w[1]);
        b[1] = _mm512_unpackhi_epi16(w[0], w[1]);
        b[2] = _mm512_unpacklo_epi16(w[2], w[3]);
        b[3] = _mm512_unpackhi_epi16(w[2], w[3]);
        for (k = 0; k < 4; k++)
            _mm512_mask_storeu_ps(x + i + 16 * k, (__mmask16)(valid >> 16 * k),
                                  _mm512_mul_ps(_mm512_castsi512_ps(b[k]), scale));
    }
}

/* fo_q8_store's codes of x[0 .. k) / scale with AVX-512: the division and fo_q8_code's
   lookup, 16 elements at a time, the table read with one gather (GCC's vector loops read it
   an element at a time: 2.5 times as long on an Intel Xeon) */
__attribute__((target("avx512f")))
static void fo_q8_codes_avx512(uint8_t *restrict codes, const float *restrict x, float scale,
                               const fo_u32 *restrict table, ptrdiff_t k)
{
    const __m512 s = _mm512_set1_ps(scale);
    const __m512i lo = _mm512_set1_epi32((int)FO_Q8_LO);
    const __m512i hi = _mm512_set1_epi32((int)FO_Q8_HI);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i inf = _mm512_set1_epi32(0x7F800000);
    const __m512i buckets = _mm512_set1_epi32(FO_Q8_BUCKETS), one = _mm512_set1_epi32(1);
    const __m512i in_bucket = _mm512_set1_epi32((1 << FO_Q8_SHIFT) - 1);
    const __m512i offset = _mm512_set1_epi32(0xFFFFFF);
    ptrdiff_t i;
    for (i = 0; i < k; i += 16) {
        const __mmask16 valid = k - i >= 16 ? (__mmask16)0xFFFF
                                            : (__mmask16)((1u << (k - i)) - 1);
        const __m512i bits =
            _mm512_castps_si512(_mm512_div_ps(_mm512_maskz_loadu_ps(valid, x + i), s));
        const __m512i a = _mm512_and_si512(bits, magnitude);
        const __m512i neg = _mm512_srai_epi32(bits, 31);
        const __m512i d = _mm512_sub_epi32(_mm512_min_epu32(_mm512_max_epu32(a, lo), hi), lo);
        const __m512i bucket =
            _mm512_add_epi32(_mm512_and_si512(neg, buckets), _mm512_srli_epi32(d, FO_Q8_SHIFT));
        const __m512i e = _mm512_i32gather_epi32(bucket, (const void *)table, 4);
        const __m512i step = _mm512_maskz_mov_epi32(
            _mm512_cmpge_epu32_mask(_mm512_and_si512(d, in_bucket), _mm512_and_si512(e, offset)),
            one);
        const __m512i code = _mm512_add_epi32(
            _mm512_srli_epi32(e, 24), _mm512_sub_epi32(_mm512_xor_si512(step, neg), neg));
        _mm512_mask_cvtepi32_storeu_epi8(codes + i, valid, _mm512_maskz_mov_epi32(
            _mm512_cmple_epu32_mask(a, inf), code));
    }
}
#else
static int fo_q8_vbmi(void) { return 0; }
#endif

/* x[0 .. n) into codes and absmax: per block, the absmax is fo_q8_scale of the largest
   |x|'s bits; the codes with fo_q8_codes_avx512 where `avx512`, else through `q` on the
   stack: GCC vectorizes the lookups only where no store may alias the table. */
FO_FORMAT_INLINE void fo_q8_store(uint8_t *restrict codes, float *restrict absmax,
                                  const float *restrict x, const fo_u32 *restrict table,
                                  ptrdiff_t n, int avx512)
{
    uint8_t q[FO_Q8_BLOCK];
    ptrdiff_t b, i;
    for (b = 0; b < n; b += FO_Q8_BLOCK) {
        const ptrdiff_t k = n - b < FO_Q8_BLOCK ? n - b : FO_Q8_BLOCK;
        fo_u32 top = 0;
        float scale;
        for (i = 0; i < k; i++) {
            const fo_u32 a = fo_float_bits(x[b + i]) & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
        scale = fo_q8_scale(top);
        absmax[b / FO_Q8_BLOCK] = scale;
#ifdef FO_Q8_VBMI
        if (avx512) {
            fo_q8_codes_avx512(codes + b, x + b, scale, table, k);
            continue;
        }
#endif
        (void)avx512;
        for (i = 0; i < k; i++) q[i] = fo_q8_code(x[b + i] / scale, table);
        memcpy(codes + b, q, (size_t)k);
    }
}

/* The kernel's operand table `local` for elements i0 .. i0 + m - 1 (a block): a float32
   operand read where it is (but operand 1 over the grad: `over_grad`), operand 1 as operand
   0 when the param is updated in place, the others loaded into `scratch` (operand 1, which
   is written only, left unloaded; NULL, as when counting, stays NULL). */
FO_FORMAT_INLINE void fo_format_load_ops(char **local, float (*scratch)[FO_FORMAT_BLOCK],
                                         char *const *ptr, fo_u64 i0, ptrdiff_t m,
                                         const fo_format_args *fa, int in_place,
                                         int over_grad)
{
    const int *code = fa->code;
    int op;
    for (op = 0; op < fa->n_ops; op++) {
        if (op == 1 && (in_place || ptr[1] == NULL)) {
            local[1] = ptr[1] == NULL ? NULL : local[0];
        } else if (code[op] == FO_FMT_F32 && !(op == 1 && over_grad)) {
            local[op] = (char *)((float *)ptr[op] + i0);
        } else {
            local[op] = (char *)scratch[op];
            if (code[op] >= FO_FMT_Q8S) {
                const int map = code[op] - FO_FMT_Q8S;
                const uint8_t *codes = (const uint8_t *)ptr[op] + i0;
                const float *absmax = (const float *)ptr[fa->scales[op]] + i0 / FO_Q8_BLOCK;
#ifdef FO_Q8_VBMI
                if (fa->vbmi)
                    fo_q8_load_vbmi(scratch[op], codes, absmax, fa->qplanes[map], m);
                else
#endif
                    fo_q8_load(scratch[op], codes, absmax, fa->qmaps + 256 * map, m);
            } else if (op != 1) { /* param out is written only */
                fo_format_load(scratch[op], (const fo_u16 *)ptr[op] + i0, code[op], m);
            }
        }
    }
}

/* elements lo .. lo + n - 1 of tensor t, whose operand pointers are ptr[0 ..] */
FO_MULTIVERSION static void fo_cpu_format_chunk(char **ptr, ptrdiff_t t, ptrdiff_t lo,
                                                ptrdiff_t n, const fo_format_args *fa)
{
    float scratch[FO_FORMAT_OPS][FO_FORMAT_BLOCK];
    fo_u32 w[FO_FORMAT_BLOCK / 2];
    char *local[FO_FORMAT_OPS];
    const int n_ops = fa->n_ops;
    const int *code = fa->code;
    const int in_place = ptr[0] == ptr[1] && code[0] == code[1];
    /* operand 1 in the grad's memory (XLA's updates over a dead grad): float32 too goes
       through scratch, stored after the kernel, whose operands are restrict */
    const int over_grad = ptr[1] == ptr[2];
    const fo_u32 key0 = fa->keys[2 * t], key1 = fa->keys[2 * t + 1];
    ptrdiff_t off;
    int op;
    for (op = n_ops; op < n_ops + fa->n_aux; op++) local[op] = ptr[op]; /* one element */
    for (off = 0; off < n; off += FO_FORMAT_BLOCK) {
        const ptrdiff_t m = n - off < FO_FORMAT_BLOCK ? n - off : FO_FORMAT_BLOCK;
        const fo_u64 i0 = (fo_u64)(lo + off);
        fo_format_load_ops(local, scratch, ptr, i0, m, fa, in_place, over_grad);
        fa->fn(local, 0, m, fa->args);
        if (fa->mask)
            fo_cpu_mask_chunk(local, 0, m, 4, n_ops - 3,
                              (const uint8_t *)ptr[fa->mask] + i0);
        for (op = 1; op < n_ops; op++) {
            if (op == 2 || (code[op] == FO_FMT_F32 && !(op == 1 && over_grad)))
                continue;
            if (code[op] == FO_FMT_F32)
                memcpy((float *)ptr[1] + i0, local[1], (size_t)m * sizeof(float));
            else if (code[op] >= FO_FMT_Q8S)
                fo_q8_store((uint8_t *)ptr[op] + i0,
                            (float *)ptr[fa->scales[op]] + i0 / FO_Q8_BLOCK,
                            (const float *)local[op],
                            fa->qtables + FO_Q8_TABLE * (code[op] - FO_FMT_Q8S), m,
                            fa->vbmi);
            else
                fo_format_store(ptr[op], (const float *)local[op], code[op], fa, key0, key1,
                                op == 1 ? 0 : (fo_u32)(op - 2), i0, m, w);
        }
        if (fa->shadow)
            fo_format_store(ptr[n_ops + fa->n_aux], (const float *)local[1], code[n_ops], fa,
                            key0, key1, 0, i0, m, w);
    }
}

#endif /* FASTOPT_CPU_FORMAT_LOOPS_H */

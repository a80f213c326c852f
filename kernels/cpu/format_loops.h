/*
 * format_loops.h - storage formats inside an elementwise kernel's chunks (see chunks.h,
 * fastopt/lowp.h and fastopt._backends._formats).
 *
 * The operands (0 param in, 1 param out, 2 grad, then the state) may be stored as float32,
 * bfloat16 or float16 while the kernel computes in float32. A chunk is cut into blocks of
 * FO_FORMAT_BLOCK elements; per block, every operand stored in a low format and read by the
 * kernel is loaded into float32 scratch on the stack (float32 operands are used where they
 * are), the kernel's float32 chunk function runs on a pointer table of the block, the
 * pruned entries of the written operands become +0 (masks), and every written operand in a
 * low format (1 and the state; the grad is never written) is rounded back, as is operand
 * 1's value into the shadow with master weights. A parameter updated in place (operand 1
 * the same memory as operand 0, in the same format) is loaded once and stored once; else
 * operand 0 is read and operand 1 written. The result is the same, bit for bit, as
 * loading whole arrays, running the kernel and storing them (_formats.around): the kernel
 * is elementwise, and the random bits of stochastic rounding depend on the element's index
 * in its tensor only.
 */
#ifndef FASTOPT_CPU_FORMAT_LOOPS_H
#define FASTOPT_CPU_FORMAT_LOOPS_H

#include "chunks.h"
#include "fastopt/lowp.h"

/* the most operands of a kernel: param in, param out, grad and 3 state operands */
#define FO_FORMAT_OPS 6
/* elements per block: a block's scratch (6 x 1 KiB at most) and the low-precision lines it
   converts stay in L1, and the hardware prefetchers keep ahead of blocks this small (a 10M
   element Adam step in bfloat16 took 1.3 to 2 times as long with blocks of 1024, as long
   with 128).
   A multiple of 8, and chunks start at multiples of FO_CHUNK: a block starts a group of 8
   elements, which share a Philox call per rounded array. */
#define FO_FORMAT_BLOCK 256

/* One call's formats: operand op of a tensor is stored as code[op] (FO_FMT_F32, _BF16 or
   _F16); with `shadow`, operand n_ops (code[n_ops]) receives operand 1 rounded; with
   `mask`, the next operand holds one byte per element, 0 for a pruned entry. */
typedef struct {
    fo_chunk_fn fn;          /* the kernel's float32 chunk function */
    const void *args;        /* its fo_<rule>_args_f32 */
    const fo_u32 *keys;      /* each tensor's Philox key (key0, key1) */
    fo_u64 step;             /* the step count in the random bits */
    int n_ops;               /* the kernel's operands: 3 + its state */
    int shadow, mask, stochastic;
    int code[FO_FORMAT_OPS + 1];
} fo_format_args;

/* `#pragma omp simd` (the build has -fopenmp) on a conversion loop: it lets GCC if-convert
   the branches of lowp.h's float16 functions (their merges have more values than it
   converts otherwise) */
#define FO_SIMD _Pragma("omp simd")

/* The 16 random bits of elements i0 .. i0 + n - 1 (i0 a multiple of 8; n up to a block,
   rounded up to 8): element i takes half i & 1 of word (i >> 1) & 3 of group i >> 3, so
   with the words of the groups in order, its bits are 16-bit item i of them (little-endian
   halves: the words are stored with their halves swapped on a big-endian machine). */
typedef fo_u16 __attribute__((may_alias)) fo_u16_view;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define FO_HALVES(W) ((W) << 16 | (W) >> 16)
#else
#define FO_HALVES(W) (W)
#endif
static inline void fo_format_bits(fo_u32 *restrict w, fo_u64 i0, ptrdiff_t n, fo_u32 stream,
                                  fo_u64 step, fo_u32 key0, fo_u32 key1)
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

static inline void fo_format_load(float *restrict x, const fo_u16 *restrict h, int code,
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
static inline void fo_format_store(char *base, const float *restrict x, int code,
                                   const fo_format_args *fa, fo_u32 key0, fo_u32 key1,
                                   fo_u32 stream, fo_u64 i0, ptrdiff_t n, fo_u32 *restrict w)
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
    const fo_u32 key0 = fa->keys[2 * t], key1 = fa->keys[2 * t + 1];
    ptrdiff_t off;
    int op;
    for (off = 0; off < n; off += FO_FORMAT_BLOCK) {
        const ptrdiff_t m = n - off < FO_FORMAT_BLOCK ? n - off : FO_FORMAT_BLOCK;
        const fo_u64 i0 = (fo_u64)(lo + off);
        for (op = 0; op < n_ops; op++) {
            if (op == 1 && in_place) {
                local[1] = local[0];
            } else if (code[op] == FO_FMT_F32) {
                local[op] = (char *)((float *)ptr[op] + i0);
            } else {
                local[op] = (char *)scratch[op];
                if (op != 1) /* param out is written only */
                    fo_format_load(scratch[op], (const fo_u16 *)ptr[op] + i0, code[op], m);
            }
        }
        fa->fn(local, 0, m, fa->args);
        if (fa->mask)
            fo_cpu_mask_chunk(local, 0, m, 4, n_ops - 3,
                              (const uint8_t *)ptr[n_ops + fa->shadow] + i0);
        for (op = 1; op < n_ops; op++)
            if (op != 2 && code[op] != FO_FMT_F32)
                fo_format_store(ptr[op], (const float *)local[op], code[op], fa, key0, key1,
                                op == 1 ? 0 : (fo_u32)(op - 2), i0, m, w);
        if (fa->shadow)
            fo_format_store(ptr[n_ops], (const float *)local[1], code[n_ops], fa, key0, key1,
                            0, i0, m, w);
    }
}

#endif /* FASTOPT_CPU_FORMAT_LOOPS_H */

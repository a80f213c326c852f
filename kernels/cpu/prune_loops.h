/*
 * prune_loops.h - the passes of the magnitude select (fastopt/prune.h) over one chunk of
 * one tensor: a digit histogram, the count of keys equal to the threshold, the mask, and
 * the split pass (the mask of the keys outside the threshold's first-digit bin, and those
 * inside it collected into a buffer that grows: the one pass here that allocates, and may
 * fail, driven by _prune.split rather than the chunk plan).
 */
#ifndef FASTOPT_CPU_PRUNE_LOOPS_H
#define FASTOPT_CPU_PRUNE_LOOPS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include "chunks.h"
#include "fastopt/prune.h"

/*
 * fo_cpu_mag_hist: count the digit (key >> shift) & (FO_DIGIT_BINS - 1) of every key with
 * (key & pmask) == prefix into h: FO_HIST_TABLES interleaved histograms of FO_DIGIT_BINS
 * counts, key j of a block of FO_HIST_BLOCK into h[FO_HIST_AT(j, digit)]. *maxkey takes
 * the largest key seen (NaN shows as a key above inf's). The increments bound the pass
 * (a load and a store per key, at random), so nothing else may stall them:
 * - Weights cluster in few bins (the zeros of pruned weights in one), and an increment of
 *   the bin just incremented waits for that store to be forwarded: separate counters break
 *   the chain. Two, as the hot bins of two tables still fit L1 and those of four do not
 *   (four: a third slower on normal weights, and no faster on mostly zero ones).
 * - A maximum taken key by key beside the increment is a chain of compare-and-selects, a
 *   cycle per key; so a block's counter indices and maximum are computed first, in a loop
 *   that vectorizes, and the increments then run alone. Its vector loads must not straddle
 *   cache lines (numpy's buffers start 16 bytes past one; uniform keys took 1.8 times as
 *   long): the blocks start on a 64-byte boundary.
 * - After the first digit, the keys that count (those matching the prefix) are rare, so a
 *   block's keys are first tested all at once and only blocks with a match are counted,
 *   or common (the threshold's bin holds many keys, such as the zeros of pruned weights),
 *   where a branch per key mispredicts: every key of a block with a match is counted,
 *   those that do not match into the sink, FO_HIST_BLOCK counters never read, one per
 *   position in the block so that they form no chain either.
 */
#define FO_HIST_TABLES 2
#define FO_HIST_BLOCK 64
#define FO_HIST_SINK (FO_HIST_TABLES * FO_DIGIT_BINS)
#define FO_HIST_AT(j, digit) ((uint32_t)((j) % FO_HIST_TABLES * FO_DIGIT_BINS + (digit)))
#define FO_SPLIT_BLOCK 16

/* The calling thread's counting buffers: FO_HIST_TABLES uint32 histograms of FO_DIGIT_BINS
   counts and the sink, then (at fo_cpu_hist_totals) one uint64 histogram they are flushed
   into, the histograms zero between passes (who empties one zeroes it). Allocated on the
   thread's first pass and kept for its life (OpenMP pools its threads): fresh buffers per
   pass cost page faults and TLB shootdowns that outweigh the pass. NULL: out of memory. */
static uint32_t *fo_cpu_hist_tables(void)
{
    static __thread uint32_t *tables = NULL;
    if (tables == NULL)
        tables = (uint32_t *)calloc(FO_HIST_SINK + FO_HIST_BLOCK + 2 * FO_DIGIT_BINS,
                                    sizeof(uint32_t));
    return tables;
}
static uint64_t *fo_cpu_hist_totals(uint32_t *tables)
{
    return (uint64_t *)(tables + FO_HIST_SINK + FO_HIST_BLOCK);
}

/* A thread's candidates of the split pass (fo_cpu_mag_split): their keys (fo_key_f32 or
   fo_key_f64) and flat positions, in the order found, in buffers that grow by doubling. */
typedef struct {
    void *keys;
    int64_t *pos;
    ptrdiff_t n, cap;
} fo_cands;

/* room for `more` candidates in c; -1 if out of memory (c unchanged, still valid) */
static int fo_cands_reserve(fo_cands *c, ptrdiff_t more, size_t keysize)
{
    ptrdiff_t cap = c->cap ? c->cap : 4096;
    void *keys;
    int64_t *pos;
    if (c->n + more <= c->cap) return 0;
    while (cap < c->n + more) cap *= 2;
    keys = realloc(c->keys, (size_t)cap * keysize);
    if (keys == NULL) return -1;
    c->keys = keys;
    pos = (int64_t *)realloc(c->pos, (size_t)cap * sizeof(int64_t));
    if (pos == NULL) return -1;
    c->pos = pos;
    c->cap = cap;
    return 0;
}

#define FO_DEFINE_MAG_LOOPS(T, SFX, SQRT, FABS)                                           \
    /* fo_cpu_mag_hist key by key over x[a:b), into the first table */                    \
    static inline void fo_cpu_mag_hist_keys_##SFX(                                        \
        const T *restrict x, ptrdiff_t a, ptrdiff_t b, int shift, fo_key_##SFX pmask,     \
        fo_key_##SFX prefix, uint32_t *restrict h, fo_key_##SFX *maxkey)                  \
    {                                                                                     \
        fo_key_##SFX mx = *maxkey;                                                        \
        for (; a < b; a++) {                                                              \
            const fo_key_##SFX k = fo_mag_key_##SFX(x[a]);                                \
            if ((k & pmask) == prefix) h[(k >> shift) & (FO_DIGIT_BINS - 1)]++;           \
            mx = k > mx ? k : mx;                                                         \
        }                                                                                 \
        *maxkey = mx;                                                                     \
    }                                                                                     \
                                                                                          \
    FO_MULTIVERSION static void fo_cpu_mag_hist_##SFX(                                    \
        const T *restrict x, ptrdiff_t n, int shift, fo_key_##SFX pmask,                  \
        fo_key_##SFX prefix, uint32_t *restrict h, fo_key_##SFX *maxkey)                  \
    {                                                                                     \
        const fo_key_##SFX dmask = FO_DIGIT_BINS - 1;                                     \
        const ptrdiff_t skip = (ptrdiff_t)(-(uintptr_t)x % 64 / sizeof(T));               \
        const ptrdiff_t lo = skip < n ? skip : n;                                         \
        const ptrdiff_t hi = lo + (n - lo) / FO_HIST_BLOCK * FO_HIST_BLOCK;               \
        uint32_t at[FO_HIST_BLOCK];                                                       \
        fo_key_##SFX mx = *maxkey;                                                        \
        ptrdiff_t i, j;                                                                   \
        fo_cpu_mag_hist_keys_##SFX(x, 0, lo, shift, pmask, prefix, h, &mx);               \
        if (pmask == 0) {                                                                 \
            for (i = lo; i < hi; i += FO_HIST_BLOCK) {                                    \
                for (j = 0; j < FO_HIST_BLOCK; j++) {                                     \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    at[j] = FO_HIST_AT(j, (k >> shift) & dmask);                          \
                    mx = k > mx ? k : mx;                                                 \
                }                                                                         \
                for (j = 0; j < FO_HIST_BLOCK; j++) h[at[j]]++;                           \
            }                                                                             \
        } else {                                                                          \
            for (i = lo; i < hi; i += FO_HIST_BLOCK) {                                    \
                int any = 0;                                                              \
                for (j = 0; j < FO_HIST_BLOCK; j++)                                       \
                    any |= (fo_mag_key_##SFX(x[i + j]) & pmask) == prefix;                \
                if (!any) continue;                                                       \
                for (j = 0; j < FO_HIST_BLOCK; j++) {                                     \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    at[j] = (k & pmask) == prefix ? FO_HIST_AT(j, (k >> shift) & dmask)   \
                                                  : (uint32_t)(FO_HIST_SINK + j);         \
                }                                                                         \
                for (j = 0; j < FO_HIST_BLOCK; j++) h[at[j]]++;                           \
            }                                                                             \
        }                                                                                 \
        fo_cpu_mag_hist_keys_##SFX(x, hi, n, shift, pmask, prefix, h, &mx);               \
        *maxkey = mx;                                                                     \
    }                                                                                     \
                                                                                          \
    /* how many keys equal thr */                                                         \
    FO_MULTIVERSION static ptrdiff_t fo_cpu_mag_ties_##SFX(const T *restrict x,           \
                                                           ptrdiff_t n, fo_key_##SFX thr) \
    {                                                                                     \
        ptrdiff_t i, c = 0;                                                               \
        for (i = 0; i < n; i++) c += fo_mag_key_##SFX(x[i]) == thr;                       \
        return c;                                                                         \
    }                                                                                     \
                                                                                          \
    /* The split pass, when the first digit has left few keys undecided: m[i] = 1 for    \
       keys above the bin [lo, hi] (kept), 0 for the others, and the keys in the bin     \
       are appended to c with their positions pos0 + i (to be settled by a select over   \
       them alone). Blocks of FO_SPLIT_BLOCK keys are tested in a loop that vectorizes;  \
       a block with a key in the bin is copied out without branches (short blocks keep   \
       those rare). -1 if c could not grow (the chunk is then incomplete). */            \
    FO_MULTIVERSION static int fo_cpu_mag_split_##SFX(                                    \
        const T *restrict x, ptrdiff_t n, fo_key_##SFX lo, fo_key_##SFX hi,              \
        uint8_t *restrict m, int64_t pos0, fo_cands *c)                                   \
    {                                                                                     \
        ptrdiff_t i = 0, j, b;                                                            \
        while (i < n) {                                                                   \
            int any = 0;                                                                  \
            b = n - i < FO_SPLIT_BLOCK ? n - i : FO_SPLIT_BLOCK;                          \
            if (b == FO_SPLIT_BLOCK)                                                      \
                for (j = 0; j < FO_SPLIT_BLOCK; j++) {                                    \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    m[i + j] = k > hi;                                                    \
                    any |= k - lo <= hi - lo;                                             \
                }                                                                         \
            else                                                                          \
                for (j = 0; j < b; j++) {                                                 \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    m[i + j] = k > hi;                                                    \
                    any |= k - lo <= hi - lo;                                             \
                }                                                                         \
            if (any) {                                                                    \
                fo_key_##SFX *restrict keys;                                              \
                int64_t *restrict pos;                                                    \
                ptrdiff_t got;                                                            \
                if (fo_cands_reserve(c, b, sizeof(fo_key_##SFX))) return -1;              \
                keys = (fo_key_##SFX *)c->keys;                                           \
                pos = c->pos;                                                             \
                got = c->n;                                                               \
                for (j = 0; j < b; j++) { /* branch-free: write always, advance if in */  \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    keys[got] = k;                                                        \
                    pos[got] = pos0 + i + j;                                              \
                    got += k - lo <= hi - lo;                                             \
                }                                                                         \
                c->n = got;                                                               \
            }                                                                             \
            i += b;                                                                       \
        }                                                                                 \
        return 0;                                                                         \
    }                                                                                     \
                                                                                          \
    /* m[i] = 1 to keep x[i], 0 to prune it: keys below thr are pruned, keys above kept;  \
       of the keys equal to thr, ties < 0 prunes all, 0 keeps all, ties > 0 prunes the    \
       first `ties` of this chunk and keeps the rest */                                   \
    FO_MULTIVERSION static void fo_cpu_mag_mask_##SFX(const T *restrict x, ptrdiff_t n,   \
                                                      fo_key_##SFX thr, ptrdiff_t ties,   \
                                                      uint8_t *restrict m)                \
    {                                                                                     \
        ptrdiff_t i;                                                                      \
        if (ties < 0) {                                                                   \
            for (i = 0; i < n; i++) m[i] = fo_mag_key_##SFX(x[i]) > thr;                  \
        } else if (ties == 0) {                                                           \
            for (i = 0; i < n; i++) m[i] = fo_mag_key_##SFX(x[i]) >= thr;                 \
        } else {                                                                          \
            for (i = 0; i < n; i++) {                                                     \
                const fo_key_##SFX k = fo_mag_key_##SFX(x[i]);                            \
                const int tie = k == thr;                                                 \
                m[i] = k > thr || (tie && ties <= 0);                                     \
                ties -= tie;                                                              \
            }                                                                             \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_MAG_LOOPS)
#undef FO_DEFINE_MAG_LOOPS

#endif /* FASTOPT_CPU_PRUNE_LOOPS_H */

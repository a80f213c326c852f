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
#include <string.h>
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
#define FO_SPLIT_BLOCK 64

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

/* prefetch the line at p to write it (it may lie past an array: a prefetch does not fault) */
static inline void fo_prefetch_w(const void *p) { __builtin_prefetch(p, 1); }

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
    /* The split pass, when few keys are left undecided in [lo, hi]: m[i] = 1 for keys    \
       above hi (kept), 0 for the others, and the keys in [lo, hi] are appended to c with  \
       their positions pos0 + i (to be settled by a select over them alone); *below     \
       counts the keys under lo and *maxkey takes the largest key. A block of            \
       FO_SPLIT_BLOCK keys is tested in a loop that vectorizes (its sums and maximum     \
       reduced once a block), its in-bracket flags left as bytes; eight at a time, read  \
       as a word, they name the keys to copy out (lowest set bit first), so the copying  \
       costs a step per candidate, not per key. -1 if c could not grow (the chunk is then \
       incomplete). */                                                                    \
    FO_MULTIVERSION static int fo_cpu_mag_split_##SFX(                                    \
        const T *restrict x, ptrdiff_t n, fo_key_##SFX lo, fo_key_##SFX hi,              \
        uint8_t *restrict m, int64_t pos0, fo_cands *c, int64_t *below,                  \
        fo_key_##SFX *maxkey)                                                             \
    {                                                                                     \
        const fo_key_##SFX width = hi - lo;                                               \
        uint8_t in[FO_SPLIT_BLOCK];                                                       \
        uint64_t w[FO_SPLIT_BLOCK / 8];                                                   \
        ptrdiff_t b;                                                                      \
        fo_key_##SFX mx = *maxkey;                                                        \
        int64_t under = 0;                                                                \
        ptrdiff_t i, j, t;                                                                \
        for (i = 0; i < n; i += FO_SPLIT_BLOCK) {                                         \
            fo_key_##SFX bmx = 0;                                                         \
            uint32_t bunder = 0;                                                          \
            uint64_t anyw = 0;                                                            \
            if (n - i < FO_SPLIT_BLOCK) { /* the last keys: as a full block would */      \
                memset(in, 0, sizeof in);                                                 \
                for (j = 0; j < n - i; j++) {                                             \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    m[i + j] = k > hi;                                                    \
                    in[j] = k - lo <= width;                                              \
                    bunder += k < lo;                                                     \
                    bmx = k > bmx ? k : bmx;                                              \
                }                                                                         \
            } else {                                                                      \
                for (j = 0; j < FO_SPLIT_BLOCK; j++) {                                    \
                    const fo_key_##SFX k = fo_mag_key_##SFX(x[i + j]);                    \
                    m[i + j] = k > hi;                                                    \
                    in[j] = k - lo <= width;                                              \
                    bunder += k < lo;                                                     \
                    bmx = k > bmx ? k : bmx;                                              \
                }                                                                         \
            }                                                                             \
            under += bunder;                                                              \
            mx = bmx > mx ? bmx : mx;                                                     \
            for (t = 0; t < FO_SPLIT_BLOCK / 8; t++) { /* byte b of in: bit 8 b of w */   \
                w[t] = 0;                                                                 \
                for (b = 0; b < 8; b++) w[t] |= (uint64_t)in[8 * t + b] << 8 * b;         \
                anyw |= w[t];                                                             \
            }                                                                             \
            if (anyw) {                                                                   \
                fo_key_##SFX *restrict keys;                                              \
                int64_t *restrict pos;                                                    \
                ptrdiff_t got;                                                            \
                if (fo_cands_reserve(c, FO_SPLIT_BLOCK, sizeof(fo_key_##SFX))) return -1; \
                keys = (fo_key_##SFX *)c->keys;                                           \
                pos = c->pos;                                                             \
                got = c->n;                                                               \
                for (t = 0; t < FO_SPLIT_BLOCK / 8; t++)                                  \
                    for (; w[t]; w[t] &= w[t] - 1) {                                      \
                        j = 8 * t + (__builtin_ctzll(w[t]) >> 3);                         \
                        keys[got] = fo_mag_key_##SFX(x[i + j]);                           \
                        pos[got++] = pos0 + i + j;                                        \
                    }                                                                     \
                c->n = got;                                                               \
            }                                                                             \
        }                                                                                 \
        *below += under;                                                                  \
        *maxkey = mx;                                                                     \
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

/*
 * N:M masks (fastopt.prune.nm_mask): the weight, flat, as groups of m rows of C elements
 * (group u's row i at (u m + i) C; C = 1 where the grouped dim is the last). Of a group's m
 * keys at one column, the n largest are kept; an element's rank counts the keys below it
 * and the equal keys of earlier rows; the largest key is returned too (the caller refuses
 * NaN and inf from it, with no pass of its own). Up to FO_NM_MAX rows, a block of FO_NM_BLOCK columns
 * (or, for C = 1, of groups, transposed on the way in) is ranked by m x m compares that
 * vectorize along the block; larger groups are sorted column by column.
 */
#define FO_NM_BLOCK 64
#define FO_NM_MAX 64

typedef struct {
    uint64_t key;
    ptrdiff_t row;
} fo_nm_item;

static int fo_nm_order(const void *a, const void *b)
{
    const fo_nm_item *x = (const fo_nm_item *)a, *y = (const fo_nm_item *)b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

#define FO_DEFINE_NM_LOOPS(T, SFX, SQRT, FABS)                                            \
    /* keep[i][b] = 1 for the n largest of the m keys K[0 .. m)[b], b < nb; *maxkey      \
       takes the largest key */                                                           \
    static inline __attribute__((always_inline)) void fo_nm_rank_##SFX(                   \
        fo_key_##SFX (*K)[FO_NM_BLOCK], int m, int n, ptrdiff_t nb,                       \
        uint8_t (*keep)[FO_NM_BLOCK], fo_key_##SFX *maxkey)                               \
    {                                                                                     \
        fo_key_##SFX mx = *maxkey;                                                        \
        int i, j;                                                                         \
        ptrdiff_t b;                                                                      \
        for (i = 0; i < m; i++)                                                           \
            for (b = 0; b < nb; b++) mx = K[i][b] > mx ? K[i][b] : mx;                    \
        *maxkey = mx;                                                                     \
        for (i = 0; i < m; i++) {                                                         \
            uint8_t r[FO_NM_BLOCK] = {0};                                                 \
            for (j = 0; j < i; j++)                                                       \
                for (b = 0; b < nb; b++) r[b] += K[j][b] <= K[i][b];                      \
            for (j = i + 1; j < m; j++)                                                   \
                for (b = 0; b < nb; b++) r[b] += K[j][b] < K[i][b];                       \
            for (b = 0; b < nb; b++) keep[i][b] = r[b] >= m - n;                          \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* fo_cpu_nm for C = 1: blocks of groups, transposed in and out (m a constant where   \
       the caller can make it one, so that the strided loads and stores vectorize) */     \
    static inline __attribute__((always_inline)) void fo_nm_rows_##SFX(                   \
        const T *restrict x, uint8_t *restrict keep, int m, int n, ptrdiff_t u0,          \
        ptrdiff_t u1, fo_key_##SFX (*K)[FO_NM_BLOCK], uint8_t (*R)[FO_NM_BLOCK],          \
        fo_key_##SFX *maxkey)                                                             \
    {                                                                                     \
        ptrdiff_t u, b, nb;                                                               \
        int i;                                                                            \
        for (u = u0; u < u1; u += FO_NM_BLOCK) {                                          \
            nb = u1 - u < FO_NM_BLOCK ? u1 - u : FO_NM_BLOCK;                             \
            for (i = 0; i < m; i++)                                                       \
                for (b = 0; b < nb; b++) K[i][b] = fo_mag_key_##SFX(x[(u + b) * m + i]);  \
            fo_nm_rank_##SFX(K, m, n, nb, R, maxkey);                                     \
            for (i = 0; i < m; i++)                                                       \
                for (b = 0; b < nb; b++) keep[(u + b) * m + i] = R[i][b];                 \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* groups u0 .. u1 - 1 of x (m <= FO_NM_MAX) into keep; the largest key into *maxkey */ \
    FO_MULTIVERSION static void fo_cpu_nm_##SFX(const T *restrict x,                      \
                                                uint8_t *restrict keep, ptrdiff_t C,      \
                                                int m, int n, ptrdiff_t u0, ptrdiff_t u1, \
                                                fo_key_##SFX *maxkey)                     \
    {                                                                                     \
        fo_key_##SFX K[FO_NM_MAX][FO_NM_BLOCK];                                           \
        uint8_t R[FO_NM_MAX][FO_NM_BLOCK];                                                \
        ptrdiff_t u, c, b, nb;                                                            \
        int i;                                                                            \
        if (C == 1) {                                                                     \
            switch (m) {                                                                  \
            case 2: fo_nm_rows_##SFX(x, keep, 2, n, u0, u1, K, R, maxkey); break;                 \
            case 4: fo_nm_rows_##SFX(x, keep, 4, n, u0, u1, K, R, maxkey); break;                 \
            case 8: fo_nm_rows_##SFX(x, keep, 8, n, u0, u1, K, R, maxkey); break;                 \
            case 16: fo_nm_rows_##SFX(x, keep, 16, n, u0, u1, K, R, maxkey); break;               \
            default: fo_nm_rows_##SFX(x, keep, m, n, u0, u1, K, R, maxkey);               \
            }                                                                             \
            return;                                                                       \
        }                                                                                 \
        for (u = u0; u < u1; u++)                                                         \
            for (c = 0; c < C; c += FO_NM_BLOCK) {                                        \
                const ptrdiff_t at = u * m * C + c;                                       \
                nb = C - c < FO_NM_BLOCK ? C - c : FO_NM_BLOCK;                           \
                for (i = 0; i < m; i++)                                                   \
                    for (b = 0; b < nb; b++) K[i][b] = fo_mag_key_##SFX(x[at + i * C + b]); \
                fo_nm_rank_##SFX(K, m, n, nb, R, maxkey);                                 \
                for (i = 0; i < m; i++)                                                   \
                    for (b = 0; b < nb; b++) keep[at + i * C + b] = R[i][b];              \
            }                                                                             \
    }                                                                                     \
                                                                                          \
    /* groups u0 .. u1 - 1 of x for any m: each column's m keys sorted (by key, then row) \
       in `items` (room for m); the last n kept */                                        \
    static void fo_cpu_nm_sorted_##SFX(const T *restrict x, uint8_t *restrict keep,      \
                                       ptrdiff_t C, int m, int n, ptrdiff_t u0,           \
                                       ptrdiff_t u1, fo_nm_item *items,                   \
                                       fo_key_##SFX *maxkey)                              \
    {                                                                                     \
        fo_key_##SFX mx = *maxkey;                                                        \
        ptrdiff_t u, c;                                                                   \
        int i;                                                                            \
        for (u = u0; u < u1; u++)                                                         \
            for (c = 0; c < C; c++) {                                                     \
                const ptrdiff_t at = u * m * C + c;                                       \
                for (i = 0; i < m; i++) {                                                 \
                    items[i].key = fo_mag_key_##SFX(x[at + i * C]);                       \
                    items[i].row = i;                                                     \
                    mx = items[i].key > mx ? (fo_key_##SFX)items[i].key : mx;             \
                }                                                                         \
                qsort(items, (size_t)m, sizeof *items, fo_nm_order);                      \
                for (i = 0; i < m; i++) keep[at + items[i].row * C] = i >= m - n;         \
            }                                                                             \
        *maxkey = mx;                                                                     \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_NM_LOOPS)
#undef FO_DEFINE_NM_LOOPS

/*
 * The split pass with AVX-512 (Skylake-SP, Zen 4 and later), to the same masks, candidates
 * and counts: the portable pass copies each candidate out behind a branch, which
 * mispredicts (about 20 ns a candidate on a Xeon, so a bracket holding 1% of the keys cost
 * the pass 60%); here each vector's compares are mask registers, and its candidates and
 * their positions are packed into registers (vpcompress) and stored whole, the pointer
 * then advancing by their count, every vector alike. (A compress straight to memory is
 * microcoded on Zen 4.) The stores run up to a vector past the candidates: the buffers are
 * reserved for the chunk's keys and one vector more.
 */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

static int fo_cpu_split_simd(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl");
}

#define FO_SPLIT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))
/* Each vector prefetches the line FO_SPLIT_AHEAD bytes on: the hardware prefetcher alone
   left the pass 25-35% slower than the mask pass on a Xeon (one thread, 4096x4096 float32
   out of cache); 4-16 KiB ahead all matched it. (A prefetch past the end is harmless.) */
#define FO_SPLIT_AHEAD 8192

/* One vector of 16 float32 keys at x (lanes in `valid`, offsets `at` from the chunk's
   start), their candidates stored at keys + *got and their offsets at off + *got, *got
   advanced; adds the keys below lo to *under, takes their maximum into *mx. The full
   vectors' loop passes a constant `valid`: a mask computed in the loop made a chain
   through the load and the compares (sbb depends on its own register on Intel), 15 cycles
   a vector. Compares into mask registers and compresses run on one port (5 on Intel), so
   the offsets are packed as 32-bit, one compress, not two of 64-bit positions. */
FO_SPLIT_TARGET static inline __attribute__((always_inline)) void fo_split_vec_f32(
    const float *restrict x, __mmask16 valid, __m512i vlo, __m512i vhi, __m512i width,
    __m512i at, uint8_t *restrict m, uint32_t *restrict keys, uint32_t *restrict off,
    ptrdiff_t *got, int64_t *under, __m512i *mx)
{
    const __m512i k =
        _mm512_and_si512(_mm512_maskz_loadu_epi32(valid, x), _mm512_set1_epi32(0x7fffffff));
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(valid, _mm512_sub_epi32(k, vlo), width);
    const __mmask16 above = _mm512_mask_cmpgt_epu32_mask(valid, k, vhi);
    _mm_mask_storeu_epi8(m, valid, _mm_maskz_mov_epi8(above, _mm_set1_epi8(1)));
    *under += __builtin_popcount(valid) - __builtin_popcount(in) - __builtin_popcount(above);
    *mx = _mm512_max_epu32(*mx, k);
    _mm512_storeu_si512(keys + *got, _mm512_maskz_compress_epi32(in, k));
    _mm512_storeu_si512(off + *got, _mm512_maskz_compress_epi32(in, at));
    *got += __builtin_popcount(in);
}

/* The chunk's candidates' offsets, packed as uint32 at the start of its positions'
   space, become positions pos0 + offset in place: from the last, as position j covers
   offsets 2 j and 2 j + 1, which are not before j. */
static void fo_split_widen(int64_t *pos, ptrdiff_t n, int64_t pos0)
{
    char *at = (char *)pos; /* bytes: the two types share the memory */
    ptrdiff_t j;
    for (j = n - 1; j >= 0; j--) {
        uint32_t o;
        int64_t p;
        memcpy(&o, at + sizeof o * j, sizeof o);
        p = pos0 + o;
        memcpy(at + sizeof p * j, &p, sizeof p);
    }
}

FO_SPLIT_TARGET static int fo_cpu_mag_split_simd_f32(const float *restrict x, ptrdiff_t n,
                                                     uint32_t lo, uint32_t hi,
                                                     uint8_t *restrict m, int64_t pos0,
                                                     fo_cands *c, int64_t *below,
                                                     uint32_t *maxkey)
{
    const __m512i vlo = _mm512_set1_epi32((int)lo), vhi = _mm512_set1_epi32((int)hi);
    const __m512i width = _mm512_set1_epi32((int)(hi - lo));
    __m512i at = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i mx = _mm512_set1_epi32((int)*maxkey);
    uint32_t *restrict keys;
    uint32_t *restrict off;
    int64_t under = 0;
    ptrdiff_t i, got = 0;
    if (n > UINT32_MAX) return -1;
    if (fo_cands_reserve(c, n + 16, sizeof(uint32_t))) return -1;
    keys = (uint32_t *)c->keys + c->n;
    off = (uint32_t *)(void *)(c->pos + c->n);
    for (i = 0; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(x + i) + FO_SPLIT_AHEAD, _MM_HINT_T0);
        fo_split_vec_f32(x + i, 0xffff, vlo, vhi, width, at, m + i, keys, off, &got, &under,
                         &mx);
        at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
    }
    if (i < n)
        fo_split_vec_f32(x + i, (__mmask16)((1u << (n - i)) - 1), vlo, vhi, width, at, m + i,
                         keys, off, &got, &under, &mx);
    fo_split_widen(c->pos + c->n, got, pos0);
    c->n += got;
    *below += under;
    *maxkey = _mm512_reduce_max_epu32(mx);
    return 0;
}

/* fo_split_vec_f32 for 8 float64 keys, their positions packed as they are (one compress
   of 64-bit lanes either way) */
FO_SPLIT_TARGET static inline __attribute__((always_inline)) void fo_split_vec_f64(
    const double *restrict x, __mmask8 valid, __m512i vlo, __m512i vhi, __m512i width,
    __m512i at, uint8_t *restrict m, uint64_t *restrict keys, int64_t *restrict pos,
    ptrdiff_t *got, int64_t *under, __m512i *mx)
{
    const __m512i k = _mm512_and_si512(_mm512_maskz_loadu_epi64(valid, x),
                                       _mm512_set1_epi64(0x7fffffffffffffffLL));
    const __mmask8 in = _mm512_mask_cmple_epu64_mask(valid, _mm512_sub_epi64(k, vlo), width);
    const __mmask8 above = _mm512_mask_cmpgt_epu64_mask(valid, k, vhi);
    _mm_mask_storeu_epi8(m, valid, _mm_maskz_mov_epi8(above, _mm_set1_epi8(1)));
    *under += __builtin_popcount(valid) - __builtin_popcount(in) - __builtin_popcount(above);
    *mx = _mm512_max_epu64(*mx, k);
    _mm512_storeu_si512(keys + *got, _mm512_maskz_compress_epi64(in, k));
    _mm512_storeu_si512(pos + *got, _mm512_maskz_compress_epi64(in, at));
    *got += __builtin_popcount(in);
}

FO_SPLIT_TARGET static int fo_cpu_mag_split_simd_f64(const double *restrict x, ptrdiff_t n,
                                                     uint64_t lo, uint64_t hi,
                                                     uint8_t *restrict m, int64_t pos0,
                                                     fo_cands *c, int64_t *below,
                                                     uint64_t *maxkey)
{
    const __m512i vlo = _mm512_set1_epi64((long long)lo);
    const __m512i vhi = _mm512_set1_epi64((long long)hi);
    const __m512i width = _mm512_set1_epi64((long long)(hi - lo));
    __m512i at = _mm512_add_epi64(_mm512_set1_epi64(pos0),
                                  _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    __m512i mx = _mm512_set1_epi64((long long)*maxkey);
    uint64_t *restrict keys;
    int64_t *restrict pos;
    int64_t under = 0;
    ptrdiff_t i, got;
    if (fo_cands_reserve(c, n + 8, sizeof(uint64_t))) return -1;
    keys = (uint64_t *)c->keys;
    pos = c->pos;
    got = c->n;
    for (i = 0; i + 8 <= n; i += 8) {
        _mm_prefetch((const char *)(x + i) + FO_SPLIT_AHEAD, _MM_HINT_T0);
        fo_split_vec_f64(x + i, 0xff, vlo, vhi, width, at, m + i, keys, pos, &got, &under,
                         &mx);
        at = _mm512_add_epi64(at, _mm512_set1_epi64(8));
    }
    if (i < n)
        fo_split_vec_f64(x + i, (__mmask8)((1u << (n - i)) - 1), vlo, vhi, width, at, m + i,
                         keys, pos, &got, &under, &mx);
    c->n = got;
    *below += under;
    *maxkey = _mm512_reduce_max_epu64(mx);
    return 0;
}
#else
static int fo_cpu_split_simd(void) { return 0; }
#define fo_cpu_mag_split_simd_f32 fo_cpu_mag_split_f32
#define fo_cpu_mag_split_simd_f64 fo_cpu_mag_split_f64
#endif

#endif /* FASTOPT_CPU_PRUNE_LOOPS_H */

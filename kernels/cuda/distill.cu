/*
 * distill.cu - fastopt.distill's rows on NVIDIA GPUs, compiled at run time by CuPy (NVRTC),
 * equal to the CPU loops bit for bit (fastopt/distill.h has the math): FO_NORM_LANES threads
 * per row, FO_KD_ROWS rows per block (launch FO_KD_ROWS * FO_NORM_LANES threads, and
 * ceil(B / FO_KD_ROWS) blocks). Thread j of a row takes its elements j, j + 16, ... in index
 * order, summing each FO_KD_BLOCK of the row in the logits' dtype before adding it to its
 * float64 sums, so that they are the CPU loops' lane j; the row's thread 0 adds the lanes in
 * lane order. The exponentials are computed again for the gradient rather than kept.
 *
 * Several rows per block fill whole warps (a 16-thread block leaves half of its warp idle)
 * and lift the resident threads per SM above the 32 blocks x 16 threads that the
 * per-SM block limit would allow; the threads of a last block past row B - 1 take part in
 * the barriers only.
 *
 * squares: at T = 2, 4, 8 (1, 2, 3) the cross entropy's exponentials are the KL term's
 * squared that many times; 0: computed (T = 1: they are the KL term's).
 */
#include "fastopt/distill.h"
#include "fastopt/reduce.h"

typedef long long fo_i64;

#define FO_KD_ROWS 8 /* rows per block: KD_ROWS in fastopt/_backends/_cupy.py */

#define FO_DEFINE_CUDA_KD(T, SFX, SQRT, FABS)                                             \
    extern "C" __global__ void fo_cuda_kd_rows_##SFX(                                     \
        const T *s_all, const T *t_all, T *g_all, fo_i64 B, fo_i64 C,                     \
        const fo_i64 *labels, T temp, T wk, T wc, int squares, double *rows)              \
    {                                                                                     \
        __shared__ T tops[FO_KD_ROWS][2][FO_NORM_LANES];                                  \
        __shared__ double lanes[FO_KD_ROWS][4][FO_NORM_LANES];                            \
        __shared__ double sums[FO_KD_ROWS][4];                                            \
        const int r = threadIdx.x / FO_NORM_LANES, j = threadIdx.x % FO_NORM_LANES;       \
        const fo_i64 row = (fo_i64)blockIdx.x * FO_KD_ROWS + r;                           \
        const int live = row < B, same = temp == (T)1;                                    \
        const fo_i64 n = live ? C : 0; /* a thread past the last row loops over nothing */\
        T(*top)[FO_NORM_LANES] = tops[r];                                                 \
        double(*lane)[FO_NORM_LANES] = lanes[r], *S = sums[r];                            \
        const fo_i64 at = (live ? row : 0) * C;                                           \
        const T *s = s_all + at, *t = t_all + at;                                         \
        T *g = g_all + at;                                                                \
        const fo_i64 label = labels && live ? labels[row] : -1;                           \
        const T ninf = (T)-fo_double_of(0x7ff0000000000000ull); /* no INFINITY in NVRTC */\
        const T cs = (T)(FO_LOG2E / (double)temp), cl = (T)FO_LOG2E;                      \
        T ms = ninf, mt = ninf, a, b, c;                                                  \
        double ls = 0, lt = 0, la = 0, lc = 0;                                            \
        fo_i64 i, b0;                                                                     \
        /* the maxima (a NaN is skipped, as in the CPU loops; order does not matter) */   \
        for (i = j; i < n; i += FO_NORM_LANES) {                                          \
            ms = s[i] > ms ? s[i] : ms;                                                   \
            mt = t[i] > mt ? t[i] : mt;                                                   \
        }                                                                                 \
        top[0][j] = ms;                                                                   \
        top[1][j] = mt;                                                                   \
        __syncthreads();                                                                  \
        ms = mt = ninf; /* every thread folds the lanes in one order: the same maxima */  \
        for (int k = 0; k < FO_NORM_LANES; k++) {                                         \
            ms = top[0][k] > ms ? top[0][k] : ms;                                         \
            mt = top[1][k] > mt ? top[1][k] : mt;                                         \
        }                                                                                 \
        for (b0 = 0; b0 < n; b0 += FO_KD_BLOCK) {                                         \
            const fo_i64 end = n - b0 < FO_KD_BLOCK ? n : b0 + FO_KD_BLOCK;               \
            T ps = 0, pt = 0, pa = 0, pc = 0;                                             \
            for (i = b0 + j; i < end; i += FO_NORM_LANES) {                               \
                const T ds = s[i] - ms, us = ds * cs, ut = (t[i] - mt) * cs;              \
                const T es = fo_exp2_neg_##SFX(us), et = fo_exp2_neg_##SFX(ut);           \
                ps += es;                                                                 \
                pt += et;                                                                 \
                pa += et * (ut - us);                                                     \
                if (label >= 0 && !same) pc += fo_kd_ce_exp_##SFX(ds, cl, es, squares);   \
            }                                                                             \
            ls += (double)ps;                                                             \
            lt += (double)pt;                                                             \
            la += (double)pa;                                                             \
            lc += (double)pc;                                                             \
        }                                                                                 \
        lane[0][j] = ls;                                                                  \
        lane[1][j] = lt;                                                                  \
        lane[2][j] = la;                                                                  \
        lane[3][j] = lc;                                                                  \
        __syncthreads();                                                                  \
        if (j == 0) {                                                                     \
            for (int q = 0; q < 4; q++) {                                                 \
                double sum = lane[q][0];                                                  \
                for (int k = 1; k < FO_NORM_LANES; k++) sum += lane[q][k];                \
                S[q] = sum;                                                               \
            }                                                                             \
            if (same) S[3] = S[0];                                                        \
        }                                                                                 \
        __syncthreads();                                                                  \
        a = wk * (T)(1.0 / S[0]);                                                         \
        b = wk * (T)(1.0 / S[1]);                                                         \
        c = label >= 0 ? wc * (T)(1.0 / S[3]) : (T)0;                                     \
        for (i = j; i < n; i += FO_NORM_LANES) {                                          \
            const T ds = s[i] - ms;                                                       \
            const T es = fo_exp2_neg_##SFX(ds * cs);                                      \
            const T et = fo_exp2_neg_##SFX((t[i] - mt) * cs);                             \
            if (label >= 0) {                                                             \
                const T ec = same ? es : fo_kd_ce_exp_##SFX(ds, cl, es, squares);         \
                g[i] = (es * a - et * b) + ec * c;                                        \
            } else                                                                        \
                g[i] = es * a - et * b;                                                   \
        }                                                                                 \
        __syncthreads();                                                                  \
        if (j == 0 && live) {                                                             \
            rows[2 * row] = FO_LN2 * (S[2] / S[1]) + fo_log(S[0]) - fo_log(S[1]);         \
            rows[2 * row + 1] = 0;                                                        \
            if (label >= 0) {                                                             \
                g[label] = g[label] - wc;                                                 \
                rows[2 * row + 1] = ((double)ms + fo_log(S[3])) - (double)s[label];       \
            }                                                                             \
        }                                                                                 \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_KD)
#undef FO_DEFINE_CUDA_KD

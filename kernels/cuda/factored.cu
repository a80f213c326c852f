/*
 * factored.cu - Adafactor's factors pass on NVIDIA GPUs, in fastopt/reduce.h's factored
 * order, so the factors equal the CPU backends' bit for bit (element math: fastopt/optim.h).
 *
 * `table` (device int64): per tensor FO_META values (addresses of g, row factors, column
 * factors, clamped row means, float64 row partials; then B, R, C), then `n_items` work items
 * (tensor, slice, column block of FO_COLS), then the slices (tensor, slice); the
 * fo_adafactor_args struct sits at `args_at`.
 *   fo_cuda_adafactor_cols:     one block per item, a thread per column: the column's sum
 *                               over each band of FO_BAND rows in order, the bands in
 *                               order, then its factor.
 *   fo_cuda_adafactor_rowparts: one block of FO_NORM_LANES threads per (item, row): the
 *                               row's partial over the block, lanes as in reduce.cu.
 *   fo_cuda_adafactor_rows:     a thread per slice: row sums (partials in block order), row
 *                               factors, their clamped mean.
 */
#include "fastopt/optim.h"
#include "fastopt/reduce.h"

typedef long long fo_i64;

#define FO_META 8

#define FO_ITEM(T, SFX)                                                                   \
    const fo_adafactor_args_##SFX a = *(const fo_adafactor_args_##SFX *)(table + args_at);\
    const fo_i64 *item = table + n_tensors * FO_META + 3 * (fo_i64)blockIdx.x;            \
    const fo_i64 *meta = table + item[0] * FO_META;                                       \
    const fo_i64 b = item[1], k = item[2], R = meta[6], C = meta[7];                      \
    const fo_i64 c0 = k * FO_COLS, width = C - c0 < FO_COLS ? C - c0 : FO_COLS;           \
    const T *g = (const T *)meta[0] + b * R * C + c0;

#define FO_DEFINE_CUDA_FACTORED(T, SFX, SQRT, FABS)                                       \
    extern "C" __global__ void fo_cuda_adafactor_cols_##SFX(                              \
        const fo_i64 *table, fo_i64 n_tensors, fo_i64 args_at)                            \
    {                                                                                     \
        FO_ITEM(T, SFX)                                                                   \
        T *col = (T *)meta[2] + b * C + c0;                                               \
        for (fo_i64 j = threadIdx.x; j < width; j += blockDim.x) {                        \
            double acc = 0;                                                               \
            for (fo_i64 r0 = 0; r0 < R; r0 += FO_BAND) {                                  \
                const fo_i64 r1 = R - r0 < FO_BAND ? R : r0 + FO_BAND;                    \
                double band = 0;                                                          \
                for (fo_i64 r = r0; r < r1; r++)                                          \
                    band += fo_adafactor_sq_##SFX(g[r * C + j], &a);                      \
                acc = r0 == 0 ? band : acc + band;                                        \
            }                                                                             \
            col[j] = fo_adafactor_factor_##SFX(col[j], acc, (double)R, &a);               \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    extern "C" __global__ void fo_cuda_adafactor_rowparts_##SFX(                          \
        const fo_i64 *table, fo_i64 n_tensors, fo_i64 args_at)                            \
    {                                                                                     \
        __shared__ double lane[FO_NORM_LANES];                                            \
        FO_ITEM(T, SFX)                                                                   \
        double *part = (double *)meta[4] + b * R * FO_N_BLOCKS(C) + k;                    \
        for (fo_i64 r = blockIdx.y; r < R; r += gridDim.y) {                              \
            double acc = 0;                                                               \
            for (fo_i64 j = threadIdx.x; j < width; j += FO_NORM_LANES)                   \
                acc += fo_adafactor_sq_##SFX(g[r * C + j], &a);                           \
            lane[threadIdx.x] = acc;                                                      \
            __syncthreads();                                                              \
            if (threadIdx.x == 0) {                                                       \
                double s = lane[0];                                                       \
                for (int l = 1; l < FO_NORM_LANES; l++) s += lane[l];                     \
                part[r * FO_N_BLOCKS(C)] = s;                                             \
            }                                                                             \
            __syncthreads();                                                              \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    extern "C" __global__ void fo_cuda_adafactor_rows_##SFX(                              \
        const fo_i64 *table, fo_i64 n_tensors, fo_i64 n_items, fo_i64 n_slices,           \
        fo_i64 args_at)                                                                   \
    {                                                                                     \
        const fo_adafactor_args_##SFX a =                                                 \
            *(const fo_adafactor_args_##SFX *)(table + args_at);                          \
        const fo_i64 s = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x;                   \
        if (s >= n_slices) return;                                                        \
        const fo_i64 *slice = table + n_tensors * FO_META + 3 * n_items + 2 * s;          \
        const fo_i64 *meta = table + slice[0] * FO_META;                                  \
        const fo_i64 b = slice[1], R = meta[6], C = meta[7], nb = FO_N_BLOCKS(C);         \
        T *row = (T *)meta[1] + b * R;                                                    \
        const double *part = (const double *)meta[4] + b * R * nb;                        \
        double total = 0;                                                                 \
        for (fo_i64 r = 0; r < R; r++) {                                                  \
            double sum = part[r * nb];                                                    \
            for (fo_i64 k = 1; k < nb; k++) sum += part[r * nb + k];                      \
            row[r] = fo_adafactor_factor_##SFX(row[r], sum, (double)C, &a);               \
            total += (double)row[r];                                                      \
        }                                                                                 \
        ((T *)meta[3])[b] = fo_adafactor_rmean_##SFX(total, (double)R, &a);               \
    }
FO_DEFINE_FOR_REALS(FO_DEFINE_CUDA_FACTORED)
#undef FO_DEFINE_CUDA_FACTORED

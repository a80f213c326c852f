/*
 * xla_factored.h - optax's Adafactor (optax.adafactor: scale_by_factored_rms, then the
 * block-RMS clip, the learning rate, the parameter scale, the momentum and the weight decay)
 * as an XLA FFI custom call on the CPU, for fastopt.jax.adafactor (fastopt/_jax_ffi.py
 * stages it). Three phases, each one call over every tensor (the int64 attribute phase),
 * with the per-tensor reductions between them done by XLA on small arrays.
 *
 * A tensor is factored, B slices of R x C (fastopt.jax moves optax's two factored dimensions
 * last), with row statistics (B R: each row's mean over its C elements) and column
 * statistics (B C); or a vector, its second moment v kept whole. Per tensor an int32 info
 * operand of 4: B, R, C and the mode: 0 a vector (B = R = 1, C its size), 1 factored with a
 * (below) the row statistics and b the column statistics, 2 the other way round.
 * Argument 0, the scalars: the parameters' dtype T (float32 or float64), 1-D of 5: clip and
 * gscale (the gradient prologue, d = gscale clamp(g, clip)), decay, 1 - decay (optax's
 * decay_rate_t and its complement, computed as optax computes them: in float32 unless the
 * decay rate is a float64 array), eps.
 *   phase 0 (factored tensors only): per tensor g, a, b, info; results a, b:
 *     rows <- decay rows + (1 - decay) mean_c(d d + eps), cols likewise over the rows (each
 *     term rounded to T; summed in float64 in fastopt/reduce.h's factored order; the
 *     gradient read once, row by row)
 *   phase 1: per tensor p, g, a, b, info; results a per tensor (fastopt.jax aliases a
 *     vector's; a factored tensor's gets a copied), then the means: T of (n_tensors, 2), the
 *     mean of u u and of p p per tensor (float64 sums, in a fixed order):
 *     a vector: v (a) <- decay v + (1 - decay) (d d + eps), u = d (1 / sqrt(v)) (b: empty);
 *     factored: u = (d a) b, a the factors of optax's first factored dimension (its row
 *     factor), b those of the second, each (B R) or (B C) by the mode (a is not written)
 *   phase 2: argument 1 the coefficients, T of (n_tensors, 6): per tensor the clip
 *     denominator, the learning rate, the parameter scale, the weight decay, 1 - momentum and
 *     the momentum; then per tensor p, g, a, b, info and (attribute momentum) m; results per
 *     tensor the new p (attribute delta: optax's update -w instead) and m:
 *     u as in phase 1, w = ((u / clip) lr) scale; with momentum m <- (1 - mu) w + mu m and
 *     w = m; with the attribute decay w <- w + wd p; p <- p + (-w)
 * With the attribute guarded one more argument comes last, a 0-d int32 guard: where it is 0
 * the phase is skipped after every check (skip_nonfinite, as the elementwise handler's
 * guard): each result gets its input (none where they share a buffer), with delta the
 * updates are +0, the means 0.
 * Results alias their inputs where fastopt.jax asks (the new p: the param, or with delta
 * the gradient); a result with a buffer of its own gets the input copied first. The handler
 * is stateless, checks everything before writing, and returns INVALID_ARGUMENT errors naming
 * the problem. Sums are per FO_CHUNK chunk, then in chunk order: the same for any threads.
 */
#ifndef FASTOPT_CPU_XLA_FACTORED_H
#define FASTOPT_CPU_XLA_FACTORED_H

#include "xla_loops.h"
#include "reduce_loops.h"

#define FO_XLA_FACTORED_TARGET "fastopt_factored_v1"
#define FO_XF FO_XLA_FACTORED_TARGET
#define FO_XF_INVALID(api, ...) FO_XLA_INVALID_AT(FO_XF, api, __VA_ARGS__)
/* phase 0 reads the gradient in bands of FO_BAND rows (contiguous), each with its columns'
   partial sums (float64, C per band: 1/32 of a float32 gradient's bytes, written and read
   back) */

/* one tensor's operands (NULL where the phase has none) and its view */
typedef struct {
    const char *p, *g, *a_in, *b, *b_in, *m_in; /* b_in: phase 0's input (b its result) */
    char *p_out, *a_out, *m_out;
    ptrdiff_t B, R, C, n;
    int mode;
} fo_xf_tensor;

typedef struct {
    int phase, momentum, decay, delta;
    const void *scalars, *coefs; /* T[5]; T[n_tensors][6] */
    fo_xf_tensor *tensor;
    /* phases 1, 2: (tensor, lo, n); phase 0: (tensor, slice, band), then (tensor, slice,
       column block) */
    const ptrdiff_t *chunk;
    double *part;                /* phase 0: column partials; phase 1: 2 sums per chunk */
    const ptrdiff_t *part_at;    /* phase 0: each tensor's first column partial */
} fo_xf_pass;

#define FO_DEFINE_XLA_FACTORED(T, SFX, SQRT, FABS)                                        \
    /* phase 0, one item: rows band FO_BAND .. of slice s of tensor t, read once: their \
       statistics, complete (each row's blocks of FO_COLS summed in order), and the band's \
       partial column sums */                                                             \
    FO_MULTIVERSION static void fo_xf_band_##SFX(const fo_xf_pass *pass, ptrdiff_t item)  \
    {                                                                                     \
        const T *sc = (const T *)pass->scalars;                                           \
        const ptrdiff_t t = pass->chunk[3 * item], s = pass->chunk[3 * item + 1];         \
        const ptrdiff_t band = pass->chunk[3 * item + 2];                                 \
        const fo_xf_tensor *x = pass->tensor + t;                                         \
        const ptrdiff_t R = x->R, C = x->C, bands = FO_N_BANDS(R);                       \
        const ptrdiff_t r0 = band * FO_BAND;                                           \
        const ptrdiff_t r1 = R - r0 < FO_BAND ? R : r0 + FO_BAND;                   \
        /* the row statistics: a in mode 1, b in mode 2 */                                \
        T *row = (T *)(x->mode == 1 ? x->a_out : (char *)x->b) + s * R;                   \
        double *restrict acc = pass->part + pass->part_at[t] + (s * bands + band) * C;    \
        double y[FO_COLS];                                                                \
        ptrdiff_t r, c0, j;                                                               \
        for (j = 0; j < C; j++) acc[j] = 0;                                               \
        for (r = r0; r < r1; r++) {                                                       \
            const T *restrict gr = (const T *)x->g + (s * R + r) * C;                     \
            double total = 0, sum;                                                        \
            for (c0 = 0; c0 < C; c0 += FO_COLS) {                                         \
                const ptrdiff_t w = C - c0 < FO_COLS ? C - c0 : FO_COLS;                  \
                for (j = 0; j < w; j++) {                                                 \
                    const T d = fo_grad_##SFX(gr[c0 + j], sc[0], sc[1]);                  \
                    y[j] = (double)(d * d + sc[4]);                                       \
                }                                                                         \
                for (j = 0; j < w; j++) acc[c0 + j] += y[j];                              \
                FO_LANE_SUM(sum, w, FO_XF_TERM, FO_XF_ADD);                               \
                total += sum;                                                             \
            }                                                                             \
            row[r] = sc[2] * row[r] + sc[3] * (T)(total / (double)C);                     \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* phase 0, then one item: columns k FO_COLS .. of slice s of tensor t, their bands'   \
       partial sums added in band order */                                                \
    FO_MULTIVERSION static void fo_xf_cols_##SFX(const fo_xf_pass *pass, ptrdiff_t item)  \
    {                                                                                     \
        const T *sc = (const T *)pass->scalars;                                           \
        const ptrdiff_t t = pass->chunk[3 * item], s = pass->chunk[3 * item + 1];         \
        const ptrdiff_t k = pass->chunk[3 * item + 2];                                    \
        const fo_xf_tensor *x = pass->tensor + t;                                         \
        const ptrdiff_t R = x->R, C = x->C, bands = FO_N_BANDS(R), c0 = k * FO_COLS;     \
        const ptrdiff_t w = C - c0 < FO_COLS ? C - c0 : FO_COLS;                          \
        /* the column statistics: b in mode 1, a in mode 2 */                             \
        T *col = (T *)(x->mode == 1 ? (char *)x->b : x->a_out) + s * C + c0;              \
        const double *part = pass->part + pass->part_at[t] + s * bands * C + c0;          \
        double acc[FO_COLS];                                                              \
        ptrdiff_t band, j;                                                                \
        for (j = 0; j < w; j++) acc[j] = part[j];                                         \
        for (band = 1; band < bands; band++)                                              \
            for (j = 0; j < w; j++) acc[j] += part[band * C + j];                         \
        for (j = 0; j < w; j++)                                                           \
            col[j] = sc[2] * col[j] + sc[3] * (T)(acc[j] / (double)R);                    \
    }                                                                                     \
                                                                                          \
    /* the update direction of elements i .. i + len - 1 of tensor x, one run of a row     \
       (factored) or of the vector, into u */                                             \
    static inline void fo_xf_u_##SFX(const fo_xf_tensor *x, const T *sc, ptrdiff_t i,     \
                                     ptrdiff_t len, ptrdiff_t row, ptrdiff_t col,         \
                                     int update_v, T *restrict u)                         \
    {                                                                                     \
        const T *restrict g = (const T *)x->g + i;                                        \
        ptrdiff_t j;                                                                      \
        if (x->mode == 0 && update_v) { /* v in place, or into its own result */          \
            T *vo = (T *)x->a_out + i;                                                    \
            const T *v = (const T *)x->a_in + i;                                          \
            if (vo == v)                                                                  \
                for (j = 0; j < len; j++) {                                               \
                    const T d = fo_grad_##SFX(g[j], sc[0], sc[1]);                        \
                    const T vj = sc[2] * vo[j] + sc[3] * (d * d + sc[4]);                 \
                    vo[j] = vj;                                                           \
                    u[j] = d * ((T)1 / SQRT(vj));                                         \
                }                                                                         \
            else                                                                          \
                for (j = 0; j < len; j++) {                                               \
                    const T d = fo_grad_##SFX(g[j], sc[0], sc[1]);                        \
                    const T vj = sc[2] * v[j] + sc[3] * (d * d + sc[4]);                  \
                    vo[j] = vj;                                                           \
                    u[j] = d * ((T)1 / SQRT(vj));                                         \
                }                                                                         \
        } else if (x->mode == 0) {                                                        \
            const T *restrict v = (const T *)x->a_in + i;                                 \
            for (j = 0; j < len; j++)                                                     \
                u[j] = fo_grad_##SFX(g[j], sc[0], sc[1]) * ((T)1 / SQRT(v[j]));           \
        } else if (x->mode == 1) { /* a by row, b by column */                            \
            const T a = ((const T *)x->a_in)[row];                                        \
            const T *restrict b = (const T *)x->b + col;                                  \
            for (j = 0; j < len; j++) u[j] = fo_grad_##SFX(g[j], sc[0], sc[1]) * a * b[j];\
        } else {                                                                          \
            const T *restrict a = (const T *)x->a_in + col;                               \
            const T b = ((const T *)x->b)[row];                                           \
            for (j = 0; j < len; j++) u[j] = fo_grad_##SFX(g[j], sc[0], sc[1]) * a[j] * b;\
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* phases 1 and 2, chunk c: its runs of FO_XLA_BLOCK elements at most, none across a   \
       row of a factored tensor */                                                        \
    FO_MULTIVERSION static void fo_xf_chunk_##SFX(const fo_xf_pass *pass, ptrdiff_t c)    \
    {                                                                                     \
        const T *sc = (const T *)pass->scalars;                                           \
        const ptrdiff_t t = pass->chunk[3 * c], lo = pass->chunk[3 * c + 1];              \
        const ptrdiff_t end = lo + pass->chunk[3 * c + 2];                                \
        const fo_xf_tensor *x = pass->tensor + t;                                         \
        const T *k = pass->phase == 2 ? (const T *)pass->coefs + 6 * t : NULL;            \
        double su = 0, sp = 0;                                                            \
        ptrdiff_t i = lo, j;                                                              \
        T u[FO_XLA_BLOCK];                                                                \
        while (i < end) {                                                                 \
            ptrdiff_t len = end - i, row = 0, col = 0;                                    \
            if (x->mode != 0) { /* the rest of the row */                                 \
                const ptrdiff_t slice = i / (x->R * x->C), r = (i / x->C) % x->R;         \
                const ptrdiff_t cc = i % x->C;                                            \
                if (len > x->C - cc) len = x->C - cc;                                     \
                row = slice * x->R + r;                                                   \
                col = slice * x->C + cc;                                                  \
            }                                                                             \
            if (len > FO_XLA_BLOCK) len = FO_XLA_BLOCK;                                   \
            fo_xf_u_##SFX(x, sc, i, len, row, col, pass->phase == 1, u);                  \
            if (pass->phase == 1) { /* each run's lane sums (reduce_loops.h), in order */  \
                const T *restrict p = (const T *)x->p + i;                                \
                double run;                                                               \
                FO_LANE_SUM(run, len, FO_XF_USQ, FO_XF_ADD);                              \
                su += run;                                                                \
                FO_LANE_SUM(run, len, FO_XF_PSQ, FO_XF_ADD);                              \
                sp += run;                                                                \
            } else {                                                                      \
                const T *p = (const T *)x->p + i, *m = x->m_in ? (const T *)x->m_in + i   \
                                                                : NULL;                   \
                T *mo = x->m_out ? (T *)x->m_out + i : NULL;                              \
                for (j = 0; j < len; j++) {                                               \
                    T w = u[j] / k[0] * k[1] * k[2];                                      \
                    if (pass->momentum) {                                                 \
                        w = k[4] * w + k[5] * m[j];                                       \
                        mo[j] = w;                                                        \
                    }                                                                     \
                    if (pass->decay) w = w + k[3] * p[j];                                 \
                    u[j] = pass->delta ? -w : p[j] + (-w);                                \
                }                                                                         \
                memcpy((T *)x->p_out + i, u, (size_t)len * sizeof(T));                    \
            }                                                                             \
            i += len;                                                                     \
        }                                                                                 \
        if (pass->phase == 1) {                                                           \
            pass->part[2 * c] = su;                                                       \
            pass->part[2 * c + 1] = sp;                                                   \
        }                                                                                 \
    }
#define FO_XF_TERM(i) y[i]
#define FO_XF_USQ(i) (double)(u[i] * u[i])
#define FO_XF_PSQ(i) (double)(p[i] * p[i])
#define FO_XF_ADD(a, b) ((a) + (b))
FO_DEFINE_FOR_REALS(FO_DEFINE_XLA_FACTORED)
#undef FO_XF_TERM
#undef FO_XF_USQ
#undef FO_XF_PSQ
#undef FO_XF_ADD
#undef FO_DEFINE_XLA_FACTORED

/* the attributes: phase, n_tensors, n_threads and the 0/1 flags momentum, decay, delta,
   guarded */
static fo_xla_error *fo_xf_attributes(const fo_xla_call_frame *call, int64_t *v)
{
    static const char *const names[] = {"phase", "n_tensors", "n_threads", "momentum",
                                        "decay", "delta", "guarded"};
    int64_t i;
    int j;
    fo_xla_error *err;
    v[0] = v[1] = v[2] = -1;
    v[3] = v[4] = v[5] = v[6] = 0;
    for (i = 0; i < call->attrs.size; i++) {
        const fo_xla_bytespan *name = call->attrs.names[i];
        for (j = 0; j < 7 && !fo_xla_name_is(name, names[j]); j++) continue;
        if (j == 7)
            return FO_XF_INVALID(call->api, "unexpected attribute '%.*s' (it takes phase, "
                                 "n_tensors, n_threads, momentum, decay, delta and guarded)",
                                 (int)(name->len < 64 ? name->len : 64), name->ptr);
        if ((err = (j < 3 ? fo_xla_int_attr : fo_xla_flag_attr)(FO_XF, call, i, v + j)) != NULL)
            return err;
    }
    if (v[0] < 0 || v[0] > 2 || v[1] < 0 || v[2] < 1 || v[2] > INT_MAX)
        return FO_XF_INVALID(call->api, "expected the attributes phase (0, 1 or 2), n_tensors "
                             ">= 0 and n_threads in [1, %d]", INT_MAX);
    if ((v[3] || v[4] || v[5]) && v[0] != 2)
        return FO_XF_INVALID(call->api, "momentum, decay and delta: phase 2 only");
    return NULL;
}

/* `in`'s elements into `out` where XLA gave them separate buffers */
static void fo_xf_copy(char *out, const char *in, ptrdiff_t n, size_t size)
{
    if (out != in && n > 0) memcpy(out, in, (size_t)n * size);
}

/* the FFI handler of target FO_XLA_FACTORED_TARGET */
static fo_xla_error *fo_xla_factored(fo_xla_call_frame *call)
{
    fo_xla_error *err = NULL;
    int64_t attr[7], phase, n_tensors, t, per, first, n_args, n_rets, per_ret;
    fo_xla_dtype dtype;
    fo_xf_pass pass;
    fo_xf_tensor *tensor = NULL;
    ptrdiff_t *chunk = NULL, *part_at = NULL, n_items = 0, n_cols = 0, n_parts = 0, total = 0;
    ptrdiff_t c, c2, lo, one;
    double *part = NULL;
    size_t size;
    int nt, f64, go = 1; /* go: the guard's verdict, run the phase */

    if (fo_xla_preamble(call, FO_XF, &err))
        return err;
    if ((err = fo_xf_attributes(call, attr)) != NULL)
        return err;
    phase = attr[0];
    n_tensors = attr[1];
    first = phase == 2 ? 2 : 1;                        /* the scalars, the coefficients */
    per = (phase == 0 ? 4 : 5) + (phase == 2 && attr[3]); /* arguments per tensor */
    per_ret = phase == 0 ? 2 : phase == 1 ? 1 : 1 + (int)attr[3];
    if (n_tensors > call->args.size)
        return FO_XF_INVALID(call->api, "n_tensors is %lld, but the call has %lld arguments",
                             (long long)n_tensors, (long long)call->args.size);
    n_args = first + n_tensors * per + attr[6];
    n_rets = n_tensors * per_ret + (phase == 1);
    if (call->args.size != n_args || call->rets.size != n_rets)
        return FO_XF_INVALID(call->api, "phase %lld over %lld tensors takes %lld arguments%s and "
                             "gives %lld results, got %lld and %lld", (long long)phase,
                             (long long)n_tensors, (long long)n_args,
                             attr[6] ? " (the last the guard)" : "", (long long)n_rets,
                             (long long)call->args.size, (long long)call->rets.size);
    for (t = 0; t < n_args; t++)
        if (call->args.types[t] != FO_XLA_ARG_BUFFER)
            return FO_XF_INVALID(call->api, "argument %lld: expected a buffer", (long long)t);
    for (t = 0; t < n_rets; t++)
        if (call->rets.types[t] != FO_XLA_RET_BUFFER)
            return FO_XF_INVALID(call->api, "result %lld: expected a buffer", (long long)t);
    if (attr[6] && (err = fo_xla_guard(FO_XF, call, n_args - 1, &go)) != NULL)
        return err;
    if (n_tensors == 0)
        return NULL;
    dtype = ((const fo_xla_buffer *)call->args.args[first])->dtype;
    if (dtype != FO_XLA_F32 && dtype != FO_XLA_F64)
        return FO_XF_INVALID(call->api, "tensor 0: expected float32 or float64, got %s",
                             fo_xla_dtype_name(dtype));
    f64 = dtype == FO_XLA_F64;
    size = f64 ? 8 : 4;
    memset(&pass, 0, sizeof pass);
    pass.phase = (int)phase;
    pass.momentum = (int)attr[3];
    pass.decay = (int)attr[4];
    pass.delta = (int)attr[5];
    {
        const fo_xla_buffer *sc = (const fo_xla_buffer *)call->args.args[0];
        if ((err = fo_xla_check(FO_XF, call, sc, dtype, 5, -1, "scalars", -1, &one)) != NULL)
            return err;
        pass.scalars = sc->data;
        if (phase == 2) {
            const fo_xla_buffer *k = (const fo_xla_buffer *)call->args.args[1];
            if ((err = fo_xla_check(FO_XF, call, k, dtype, 6 * n_tensors, -1, "coefficients",
                                    -1, &one)) != NULL)
                return err;
            pass.coefs = k->data;
        }
    }

    /* every tensor: its view, its operands' dtypes and sizes, then their pointers */
    tensor = (fo_xf_tensor *)calloc((size_t)n_tensors, sizeof *tensor);
    part_at = (ptrdiff_t *)calloc((size_t)n_tensors, sizeof *part_at);
    if (tensor == NULL || part_at == NULL) {
        err = fo_xla_fail(call->api, FO_XLA_ERROR_RESOURCE_EXHAUSTED, FO_XF, "out of memory");
        goto done;
    }
    for (t = 0; t < n_tensors; t++) {
        fo_xla_buffer *const *a = (fo_xla_buffer *const *)call->args.args + first + t * per;
        fo_xla_buffer *const *r = (fo_xla_buffer *const *)call->rets.rets + t * per_ret;
        fo_xla_buffer *const *op = phase == 0 ? a - 1 : a; /* phase 0 has no param */
        fo_xf_tensor *x = tensor + t;
        const fo_xla_buffer *info = op[4];
        const int32_t *d;
        ptrdiff_t n, na, nb, m;
        if ((err = fo_xla_check(FO_XF, call, info, FO_XLA_S32, 4, t, "info", -1, &m)) != NULL)
            goto done;
        d = (const int32_t *)info->data;
        if (d[0] < 0 || d[1] < 0 || d[2] < 0 || d[3] < 0 || d[3] > 2 || (phase == 0 && !d[3])
            || (d[3] == 0 && (d[0] != 1 || d[1] != 1))
            || (d[1] > 0 && d[2] > 0 && (ptrdiff_t)d[0] > PTRDIFF_MAX / 8 / d[1] / d[2])) {
            err = FO_XF_INVALID(call->api, "tensor %lld, info: expected B, R, C >= 0 and the "
                                "mode (0 a vector, B = R = 1; 1 or 2 factored, not a vector in "
                                "phase 0), got %lld %lld %lld %lld", (long long)t,
                                (long long)d[0], (long long)d[1], (long long)d[2],
                                (long long)d[3]);
            goto done;
        }
        x->B = (ptrdiff_t)d[0];
        x->R = (ptrdiff_t)d[1];
        x->C = (ptrdiff_t)d[2];
        x->mode = (int)d[3];
        x->n = x->B * x->R * x->C;
        /* a: v (a vector) or the statistics of the first factored dimension, b the other */
        na = x->mode == 0 ? x->n : x->B * (x->mode == 1 ? x->R : x->C);
        nb = x->mode == 0 ? 0 : x->B * (x->mode == 1 ? x->C : x->R);
        if ((phase > 0 && (err = fo_xla_check(FO_XF, call, op[0], dtype, x->n, t, "param", -1,
                                              &n)) != NULL)
            || (err = fo_xla_check(FO_XF, call, op[1], dtype, x->n, t, "grad", -1, &n)) != NULL
            || (err = fo_xla_check(FO_XF, call, op[2], dtype, na, t, "a", -1, &n)) != NULL
            || (err = fo_xla_check(FO_XF, call, op[3], dtype, nb, t, "b", -1, &n)) != NULL)
            goto done;
        x->g = (const char *)op[1]->data;
        x->a_in = (const char *)op[2]->data;
        x->b = (const char *)op[3]->data;
        if (phase == 0) {
            if ((err = fo_xla_check(FO_XF, call, r[0], dtype, na, t, "new a", -1, &n)) != NULL
                || (err = fo_xla_check(FO_XF, call, r[1], dtype, nb, t, "new b", -1, &n))
                       != NULL)
                goto done;
            x->a_out = (char *)r[0]->data;
            x->b_in = x->b;
            x->b = (const char *)r[1]->data;
            part_at[t] = n_parts;
            n_parts += x->B * FO_N_BANDS(x->R) * x->C;
            n_items += x->B * FO_N_BANDS(x->R);
            n_cols += x->B * FO_N_BLOCKS(x->C);
            continue;
        }
        x->p = (const char *)op[0]->data;
        if (phase == 1) {
            if ((err = fo_xla_check(FO_XF, call, r[0], dtype, na, t, "new a", -1, &n)) != NULL)
                goto done;
            x->a_out = (char *)r[0]->data;
        } else {
            if ((err = fo_xla_check(FO_XF, call, r[0], dtype, x->n, t, "new param", -1, &n))
                != NULL)
                goto done;
            x->p_out = (char *)r[0]->data;
            if (pass.momentum) {
                if ((err = fo_xla_check(FO_XF, call, op[5], dtype, x->n, t, "momentum", -1,
                                        &n)) != NULL
                    || (err = fo_xla_check(FO_XF, call, r[1], dtype, x->n, t, "new momentum",
                                           -1, &n)) != NULL)
                    goto done;
                x->m_in = (const char *)op[5]->data;
                x->m_out = (char *)r[1]->data;
            }
        }
        n_items += (x->n + FO_CHUNK - 1) / FO_CHUNK;
        total += x->n;
    }
    if (phase == 1) {
        const fo_xla_buffer *means = (const fo_xla_buffer *)call->rets.rets[n_tensors];
        if ((err = fo_xla_check(FO_XF, call, means, dtype, 2 * n_tensors, -1, "means", -1,
                                &one)) != NULL)
            goto done;
    }
    if (!go) { /* skipped: the results their inputs, the updates +0, the means 0 */
        for (t = 0; t < n_tensors; t++) {
            fo_xf_tensor *x = tensor + t;
            const ptrdiff_t na = x->mode == 0 ? x->n : x->B * (x->mode == 1 ? x->R : x->C);
            if (phase == 0) {
                fo_xf_copy(x->a_out, x->a_in, na, size);
                fo_xf_copy((char *)x->b, x->b_in, x->B * (x->mode == 1 ? x->C : x->R), size);
            } else if (phase == 1) {
                fo_xf_copy(x->a_out, x->a_in, na, size);
            } else {
                if (pass.delta && x->n > 0) memset(x->p_out, 0, (size_t)x->n * size);
                else if (!pass.delta) fo_xf_copy(x->p_out, x->p, x->n, size);
                if (pass.momentum) fo_xf_copy(x->m_out, x->m_in, x->n, size);
            }
        }
        if (phase == 1)
            memset(((const fo_xla_buffer *)call->rets.rets[n_tensors])->data, 0,
                   (size_t)(2 * n_tensors) * size);
        goto done;
    }

    /* the work: phase 0, (tensor, slice, column block) items, then (tensor, slice) rows;
       phases 1 and 2, (tensor, lo, n) chunks */
    chunk = (ptrdiff_t *)malloc((size_t)(n_items + n_cols > 0 ? n_items + n_cols : 1) * 3
                                * sizeof(ptrdiff_t));
    if (phase != 2)
        part = (double *)malloc((size_t)(phase == 0 ? (n_parts > 0 ? n_parts : 1)
                                         : 2 * (n_items > 0 ? n_items : 1)) * sizeof(double));
    if (chunk == NULL || (phase != 2 && part == NULL)) {
        err = fo_xla_fail(call->api, FO_XLA_ERROR_RESOURCE_EXHAUSTED, FO_XF, "out of memory");
        goto done;
    }
    for (t = 0, c = 0, c2 = n_items; t < n_tensors; t++) {
        fo_xf_tensor *x = tensor + t;
        if (phase == 0) {
            const ptrdiff_t bands = FO_N_BANDS(x->R), blocks = FO_N_BLOCKS(x->C);
            ptrdiff_t s, k, at = c2;
            /* the statistics are updated in their results: the inputs copied there first */
            fo_xf_copy(x->a_out, x->a_in, x->B * (x->mode == 1 ? x->R : x->C), size);
            fo_xf_copy((char *)x->b, x->b_in, x->B * (x->mode == 1 ? x->C : x->R), size);
            total += x->n;
            for (s = 0; s < x->B; s++) {
                for (k = 0; k < bands; k++, c++) {
                    chunk[3 * c] = t;
                    chunk[3 * c + 1] = s;
                    chunk[3 * c + 2] = k;
                }
                for (k = 0; k < blocks; k++, at++) {
                    chunk[3 * at] = t;
                    chunk[3 * at + 1] = s;
                    chunk[3 * at + 2] = k;
                }
            }
            c2 = at;
            continue;
        }
        if (phase == 1 && x->mode != 0) /* a is not written: its result gets its values */
            fo_xf_copy(x->a_out, x->a_in, x->B * (x->mode == 1 ? x->R : x->C), size);
        if (phase == 2 && pass.momentum)
            fo_xf_copy(x->m_out, x->m_in, x->n, size);
        for (lo = 0; lo < x->n; lo += FO_CHUNK, c++) {
            chunk[3 * c] = t;
            chunk[3 * c + 1] = lo;
            chunk[3 * c + 2] = x->n - lo < FO_CHUNK ? x->n - lo : FO_CHUNK;
        }
    }
    pass.tensor = tensor;
    pass.chunk = chunk;
    pass.part = part;
    pass.part_at = part_at;
    nt = total / FO_XLA_MIN_PER_THREAD < attr[2] ? (int)(total / FO_XLA_MIN_PER_THREAD)
                                                 : (int)attr[2];
    {
        const ptrdiff_t ni = n_items, nc = n_cols;
#pragma omp parallel num_threads(nt > 1 ? nt : 1) if (nt > 1 && ni > 1)
        {
            ptrdiff_t i;
            FO_XLA_IEEE_BEGIN
            if (phase == 0) {
#pragma omp for schedule(static)
                for (i = 0; i < ni; i++) {
                    if (f64) fo_xf_band_f64(&pass, i);
                    else fo_xf_band_f32(&pass, i);
                }
                /* then the columns (after the implicit barrier above) */
#pragma omp for schedule(static)
                for (i = ni; i < ni + nc; i++) {
                    if (f64) fo_xf_cols_f64(&pass, i);
                    else fo_xf_cols_f32(&pass, i);
                }
            } else {
#pragma omp for schedule(static)
                for (i = 0; i < ni; i++) {
                    if (f64) fo_xf_chunk_f64(&pass, i);
                    else fo_xf_chunk_f32(&pass, i);
                }
            }
            FO_XLA_IEEE_END
        }
    }
    if (phase == 1) { /* each tensor's chunks in order, then the means */
        char *means = (char *)((const fo_xla_buffer *)call->rets.rets[n_tensors])->data;
        for (t = 0, c = 0; t < n_tensors; t++) {
            const fo_xf_tensor *x = tensor + t;
            double su = 0, sp = 0, count = x->n > 0 ? (double)x->n : 1.0;
            for (lo = 0; lo < x->n; lo += FO_CHUNK, c++) {
                su += part[2 * c];
                sp += part[2 * c + 1];
            }
            if (f64) {
                ((double *)means)[2 * t] = su / count;
                ((double *)means)[2 * t + 1] = sp / count;
            } else {
                ((float *)means)[2 * t] = (float)(su / count);
                ((float *)means)[2 * t + 1] = (float)(sp / count);
            }
        }
    }

done:
    free(part);
    free(chunk);
    free(part_at);
    free(tensor);
    return err;
}

#endif /* FASTOPT_CPU_XLA_FACTORED_H */

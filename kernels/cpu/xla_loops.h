/*
 * xla_loops.h - fastopt's elementwise optimizer kernels as an XLA FFI custom call on the
 * CPU, so that a step runs inside jax.jit (fastopt/_jax_ffi.py stages the call).
 *
 * One call updates many tensors with one kernel of FO_ELEMENTWISE_KERNELS or
 * FO_CAUTIOUS_KERNELS (fastopt/optim.h), or with scaled_apply (the apply pass of Lamb: the
 * update in the grad slot, the tensor's factor as a cautious step's):
 *   attributes  kernel (string, its name), n_tensors (int64), n_threads (int64: OpenMP
 *               threads at most; small steps take fewer, as the Cython driver does), and
 *               optionally delta, into_grad, count, masked, formats, stochastic,
 *               shadow, discard and guarded (int64, 0 or 1; default 0), q8_unsigned (int64, a bit
 *               mask of state indices; default 0) and sums (int64; default 0, none)
 *   arguments   0: the kernel's fo_<args>_args_<f32|f64> struct as bytes (1-D uint8,
 *               zero-padded to a multiple of 8: fastopt._rules.pack), then per tensor:
 *               param, grad, then its n_state state arrays, then (a cautious step) its
 *               factor: one element of the param's dtype (float32 with formats), then
 *               (shadow) the low-precision
 *               parameter, then the block scales of each 8-bit state array, then (masked)
 *               its pruning mask: uint8 of the param's element count (0 prunes an entry:
 *               the new param and the new state are +0 there), or of none (no mask)
 *   results     per tensor: the new param (with delta: the new param minus the param, in
 *               the param's dtype, as optax's updates; with into_grad: the new param, which
 *               may share the grad's buffer), then its n_state new state arrays, then
 *               (shadow) the new low-precision parameter, then the new block scales of
 *               each 8-bit state array
 * With formats the kernel computes in float32 on operands stored as float32, bfloat16 or
 * float16 (format_loops.h, as the Cython driver's storage formats): the param bfloat16,
 * float16 or float32, the grad the param's dtype or float32, each state array any of the
 * three (the same for every tensor); the written ones are rounded to their format,
 * stochastically (stochastic) with the Philox bits of each tensor's key and the step, or to
 * nearest even. Two more arguments follow the tensors': the keys (int32 of shape
 * (n_tensors, 2), the uint32 bits of fastopt._backends._formats.tensor_key) and the step (a
 * 0-d int32). A cautious step's factors are float32 then.
 * With shadow (formats only, not with delta) the param is the float32 master copy of a
 * bfloat16 or float16 parameter (master weights, as the Cython driver's): the kernel updates
 * it in float32, and the shadow result receives the new master rounded to the parameter's
 * format (stochastically with the param's random bits, or to nearest even); the shadow
 * argument is not read (it is there to be aliased to its result), and the grad may be of
 * the shadow's dtype or float32.
 * With formats a state array may also be blockwise 8-bit (uint8 codes, as the Cython
 * driver's state_dtype "int8"): its block scales (float32, one per FO_Q8_BLOCK elements)
 * follow the tensor's other arguments and results, and two more arguments follow the keys
 * and the step: the two dynamic maps (float32 of shape (2, 256), signed then unsigned) and
 * their fo_q8_table tables (the uint32 bits as int32, of shape (2, FO_Q8_TABLE)). State s takes the unsigned
 * map where bit s of q8_unsigned is set, else the signed one.
 * With sums (not with delta, count or formats) the pass also sums operands of
 * the kernel as each chunk leaves them, while it is in cache (as the Cython driver's
 * step_sums): up to FO_XLA_SUMS (operand, kind) pairs, pair j in bits 8j .. 8j + 7 of the
 * attribute as 1 + 4 operand + kind, the operand one of the kernel's element operands (0
 * the param (the new one where the call aliases them), 1 the new param, 2 the grad (not
 * with into_grad, whose new param may share its buffer), 3 + s the new state s), the kind
 * 1 (sum |x|), 2
 * (sum x x) or 3 (sum x) of fastopt/reduce.h, the written operands' pruned entries zeroed
 * first. One more result
 * follows the others: float32 or float64 of shape (n_tensors, pairs), each tensor's sums
 * (per chunk in fastopt/reduce.h's fixed order, the chunks added in order in float64,
 * then rounded once). With discard too (a kernel without factors), the new param is not
 * stored and has no result: each thread writes a chunk's into a scratch chunk of its own,
 * where it is summed (Prodigy's terms, whose sum is their one use).
 * With count the kernel is a cautious count kernel (FO_CAUTION_COUNTS): nothing is written
 * but the one result, an int32 array holding per tensor how many of its elements agree and
 * are not pruned (the cautious option's K summed, as the Cython driver's caution_counts);
 * with formats it reads
 * the operands as the step loads them (8-bit state with its block scales, no results).
 * With guarded one more argument comes last: a 0-d int32, the guard. Where it is 0 the step
 * is skipped (skip_nonfinite's step on gradients holding NaN or inf), after every check:
 * each result gets its input's bytes (nothing is written where XLA aliased the two), with
 * delta the differences are +0, the counts and the sums are 0. A traced guard spares the
 * caller a lax.cond around the call, whose branch result XLA copies (a fresh buffer per
 * result every step, where the aliased call writes in place).
 * All tensors float32 or float64 (the struct's dtype); a tensor's operands and results hold
 * equally many elements, in any shapes (the update is elementwise, and XLA hands over
 * row-major buffers). The caller aliases each param and state input to its result, so a
 * donated buffer is updated in place (without donation XLA copies the inputs into the
 * results before the call); with delta or into_grad, the param result to the grad instead
 * (where their dtypes agree). A call made without the aliases gets separate result
 * buffers: the state is then copied into its result chunk by chunk before the kernel
 * updates it. With delta or into_grad the result may share the param's or the grad's
 * buffer: the kernel writes each block's new params to scratch, or the format chunk keeps
 * each block's params, before the result's block is stored.
 *
 * XLA runs the handler on its own threads, with subnormal numbers flushed to zero (MXCSR's
 * FTZ and DAZ); the kernels run with IEEE subnormals, as everywhere else, so that the results
 * are the Cython driver's bits: each thread of the pass clears both flags, and the calling
 * thread sets them back at the end. The OpenMP workers, which were created by (and inherited
 * the flags of) an XLA thread, keep them cleared: the OpenMP runtime hands the same threads
 * to other teams of the process (fastopt's, torch's), which would otherwise flush too.
 *
 * The handler is stateless (XLA may run several calls at once, from any thread) and checks
 * everything before touching memory: a bad call returns an INVALID_ARGUMENT error naming the
 * problem, which jax raises as a Python exception. Results are bit-identical to the Cython
 * driver's for any chunking and thread count, since every kernel is elementwise.
 */
#ifndef FASTOPT_CPU_XLA_LOOPS_H
#define FASTOPT_CPU_XLA_LOOPS_H

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
/* MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) */
#define FO_XLA_FLUSH_BITS 0x8040u
#endif

/* Inside a handler's parallel region (its first and last statements): each thread computes
   with IEEE subnormals, and the calling thread (XLA's) gets its mode back (see above) */
#ifdef _OPENMP
#define FO_XLA_THREAD omp_get_thread_num()
#else
#define FO_XLA_THREAD 0
#endif
#ifdef FO_XLA_FLUSH_BITS
#ifdef _OPENMP
#define FO_XLA_IS_CALLER (omp_get_thread_num() == 0)
#else
#define FO_XLA_IS_CALLER 1
#endif
#define FO_XLA_IEEE_BEGIN                                                                 \
    const unsigned int fo_mxcsr_ = _mm_getcsr();                                          \
    _mm_setcsr(fo_mxcsr_ & ~FO_XLA_FLUSH_BITS);
#define FO_XLA_IEEE_END                                                                   \
    if (FO_XLA_IS_CALLER) _mm_setcsr(fo_mxcsr_);
#else
#define FO_XLA_IEEE_BEGIN
#define FO_XLA_IEEE_END
#endif

#include "chunks.h"
#include "fastopt/reduce.h" /* FO_CHUNK, the Cython driver's chunk length */
#include "fastopt/xla_ffi.h"
#include "optim_loops.h"
#include "format_loops.h"
#include "reduce_loops.h"

#define FO_XLA_ELEMENTWISE_TARGET "fastopt_elementwise_v1"
/* as the Cython driver (_plan.pxi): a thread costs about as much as ~30K elements */
#define FO_XLA_MIN_PER_THREAD 32768
/* the largest packed struct, rounded up to 8 (checked per kernel below) */
#define FO_XLA_ARGS_MAX 256

/* the kernels: chunk functions, counting functions (count kernels only), struct size per
   dtype, state arrays, one-element operands after them (a cautious step's factor) */
typedef struct {
    const char *name;
    fo_chunk_fn fn[2];     /* f32, f64 */
    fo_count_fn count[2];  /* FO_CAUTION_COUNTS' (the count attribute); NULL otherwise */
    size_t args_size[2];   /* sizeof fo_<args>_args_<f32|f64> */
    int n_state, n_aux;
} fo_xla_kernel;

#define FO_XLA_ENTRY(T, SFX, NAME, ARGS, N)                                               \
    {#NAME, {fo_cpu_##NAME##_f32, fo_cpu_##NAME##_f64}, {NULL, NULL},                     \
     {sizeof(fo_##ARGS##_args_f32), sizeof(fo_##ARGS##_args_f64)}, N, 0},
#define FO_XLA_CAUTIOUS_ENTRY(T, SFX, NAME, ARGS, N)                                      \
    {#NAME, {fo_cpu_##NAME##_f32, fo_cpu_##NAME##_f64}, {NULL, NULL},                     \
     {sizeof(fo_##ARGS##_args_f32), sizeof(fo_##ARGS##_args_f64)}, N, 1},
static const fo_xla_kernel fo_xla_kernels[] = {
    FO_ELEMENTWISE_KERNELS(FO_XLA_ENTRY, _, _)
    FO_CAUTIOUS_KERNELS(FO_XLA_CAUTIOUS_ENTRY, _, _)
    /* the apply pass of the rules that scale an update per tensor (Lamb): the update in the
       gradient slot, the tensor's factor after it, as a cautious step's */
    FO_XLA_CAUTIOUS_ENTRY(_, _, scaled_apply, scaled_apply, 0)
    {NULL, {NULL, NULL}, {NULL, NULL}, {0, 0}, 0, 0},
};
#undef FO_XLA_ENTRY
#undef FO_XLA_CAUTIOUS_ENTRY

#define FO_XLA_COUNT_ENTRY(T, SFX, NAME, ARGS, N)                                         \
    {#NAME, {fo_cpu_##NAME##_f32, fo_cpu_##NAME##_f64},                                   \
     {fo_cpu_count_##NAME##_f32, fo_cpu_count_##NAME##_f64},                              \
     {sizeof(fo_##ARGS##_args_f32), sizeof(fo_##ARGS##_args_f64)}, N, 0},
static const fo_xla_kernel fo_xla_counts[] = {
    FO_CAUTION_COUNTS(FO_XLA_COUNT_ENTRY, _, _)
    {NULL, {NULL, NULL}, {NULL, NULL}, {0, 0}, 0, 0},
};
#undef FO_XLA_COUNT_ENTRY

/* the most operands a kernel takes (param in, param out, grad, state, factors) */
#define FO_XLA_OPS_MAX 8

/* every struct fits the handler's aligned copy, and every kernel's operands the delta
   blocks' pointer array (C99 has no static assert: a negative array size fails the build) */
#define FO_XLA_FITS(T, SFX, NAME, ARGS, N)                                                \
    typedef char fo_xla_fits_##NAME[sizeof(fo_##ARGS##_args_f64) <= FO_XLA_ARGS_MAX       \
                                    && 3 + (N) <= FO_XLA_OPS_MAX ? 1 : -1];
FO_ELEMENTWISE_KERNELS(FO_XLA_FITS, _, _)
#undef FO_XLA_FITS
#define FO_XLA_FITS(T, SFX, NAME, ARGS, N)                                                \
    typedef char fo_xla_fits_##NAME[3 + (N) + 1 <= FO_XLA_OPS_MAX ? 1 : -1];
FO_CAUTIOUS_KERNELS(FO_XLA_FITS, _, _)
FO_XLA_FITS(_, _, scaled_apply, scaled_apply, 0)
#undef FO_XLA_FITS

/* the struct's length as fastopt._rules.pack lays it out */
static size_t fo_xla_packed_size(size_t size) { return (size + 7) / 8 * 8; }

static const char *fo_xla_dtype_name(fo_xla_dtype dtype)
{
    switch (dtype) {
    case FO_XLA_S32: return "int32";
    case FO_XLA_S64: return "int64";
    case FO_XLA_U8: return "uint8";
    case FO_XLA_F16: return "float16";
    case FO_XLA_F32: return "float32";
    case FO_XLA_F64: return "float64";
    case FO_XLA_BF16: return "bfloat16";
    }
    return "another type";
}

/* an error for XLA to raise, its message printf-formatted and prefixed with the target */
static fo_xla_error *fo_xla_fail(const fo_xla_api *api, fo_xla_error_code code,
                                 const char *target, const char *fmt, ...)
{
    char msg[512];
    int len;
    va_list ap;
    fo_xla_error_create_args e;
    len = snprintf(msg, sizeof msg, "%s: ", target);
    va_start(ap, fmt);
    vsnprintf(msg + len, sizeof msg - (size_t)len, fmt, ap);
    va_end(ap);
    e.struct_size = FO_XLA_STRUCT_SIZE(fo_xla_error_create_args, errc);
    e.extension_start = NULL;
    e.message = msg;
    e.errc = code;
    return api->error_create(&e);
}
#define FO_XLA_INVALID_AT(target, api, ...)                                               \
    fo_xla_fail(api, FO_XLA_ERROR_INVALID_ARGUMENT, target, __VA_ARGS__)
#define FO_XLA_EW FO_XLA_ELEMENTWISE_TARGET /* the elementwise handler, in its errors */
#define FO_XLA_INVALID(api, ...) FO_XLA_INVALID_AT(FO_XLA_EW, api, __VA_ARGS__)

/* the registration-time call: report the API version and no traits. When XLA's structs are
   too small to hold them (an incompatible XLA), they stay unset and XLA refuses the handler
   for its version; the frame has no API to report an error through. */
static void fo_xla_metadata_fill(fo_xla_metadata_extension *ext)
{
    fo_xla_metadata *m = ext->metadata;
    if (ext->extension_base.struct_size < FO_XLA_STRUCT_SIZE(fo_xla_metadata_extension, metadata)
        || m == NULL || m->struct_size < FO_XLA_STRUCT_SIZE(fo_xla_metadata, traits))
        return;
    m->api_version.struct_size = FO_XLA_STRUCT_SIZE(fo_xla_api_version, minor_version);
    m->api_version.extension_start = NULL;
    m->api_version.major_version = FO_XLA_API_MAJOR;
    m->api_version.minor_version = FO_XLA_API_MINOR;
    m->traits = 0;
}

/* The start every handler shares: XLA's registration-time metadata call answered, a call
   frame too small for the members read refused, and the stages before execution passed
   over. Returns 1 when the handler is done, with its result in *err; 0 to go on. */
static int fo_xla_preamble(fo_xla_call_frame *call, const char *target, fo_xla_error **err)
{
    const fo_xla_extension_base *ext;
    *err = NULL;
    for (ext = call->extension_start; ext != NULL; ext = ext->next)
        if (ext->type == FO_XLA_EXTENSION_METADATA) {
            fo_xla_metadata_fill((fo_xla_metadata_extension *)ext);
            return 1;
        }
    if (call->struct_size < FO_XLA_STRUCT_SIZE(fo_xla_call_frame, attrs)) {
        *err = FO_XLA_INVALID_AT(target, call->api, "call frame of %zu bytes, expected %zu or "
                                 "more (an incompatible XLA)", call->struct_size,
                                 FO_XLA_STRUCT_SIZE(fo_xla_call_frame, attrs));
        return 1;
    }
    return call->stage != FO_XLA_STAGE_EXECUTE;
}

static int fo_xla_name_is(const fo_xla_bytespan *s, const char *name)
{
    return s->len == strlen(name) && memcmp(s->ptr, name, s->len) == 0;
}

/* an int64 scalar attribute into *out, or an error (of handler `target`, as the helpers
   below) */
static fo_xla_error *fo_xla_int_attr(const char *target, const fo_xla_call_frame *call,
                                     int64_t i, int64_t *out)
{
    const fo_xla_scalar *s = (const fo_xla_scalar *)call->attrs.attrs[i];
    const fo_xla_bytespan *name = call->attrs.names[i];
    if (call->attrs.types[i] != FO_XLA_ATTR_SCALAR || s->dtype != FO_XLA_S64)
        return FO_XLA_INVALID_AT(target, call->api,
                                 "attribute %.*s: expected an int64 scalar", (int)name->len,
                                 name->ptr);
    *out = *(const int64_t *)s->value;
    return NULL;
}

/* operand `role` (param, grad, state k, ...) of tensor t, for messages */
static const char *fo_xla_role(char *buf, size_t size, int64_t t, const char *role, int k)
{
    if (t < 0) snprintf(buf, size, "%s", role); /* an operand of no tensor */
    else if (k < 0) snprintf(buf, size, "tensor %lld, %s", (long long)t, role);
    else snprintf(buf, size, "tensor %lld, %s %d", (long long)t, role, k);
    return buf;
}

/*
 * Checks a buffer: of `dtype`, well formed, and holding `want` elements (any count when
 * want < 0). Its element count goes to *n; returns NULL or the error naming `role`.
 */
static fo_xla_error *fo_xla_check(const char *target, const fo_xla_call_frame *call,
                                     const fo_xla_buffer *b, fo_xla_dtype dtype, ptrdiff_t want,
                                     int64_t t, const char *role, int k, ptrdiff_t *n)
{
    char name[64];
    int64_t d, count = 1;
    if (b->dtype != dtype)
        return FO_XLA_INVALID_AT(target, call->api, "%s: expected %s, got %s",
                                 fo_xla_role(name, sizeof name, t, role, k),
                                 fo_xla_dtype_name(dtype), fo_xla_dtype_name(b->dtype));
    if (b->rank < 0 || (b->rank > 0 && b->dims == NULL))
        return FO_XLA_INVALID_AT(target, call->api, "%s: malformed buffer of rank %lld",
                                 fo_xla_role(name, sizeof name, t, role, k), (long long)b->rank);
    for (d = 0; d < b->rank; d++) {
        if (b->dims[d] < 0 || (b->dims[d] > 0 && count > (PTRDIFF_MAX / 8) / b->dims[d]))
            return FO_XLA_INVALID_AT(target, call->api, "%s: bad dimension %lld",
                                     fo_xla_role(name, sizeof name, t, role, k),
                                     (long long)b->dims[d]);
        count *= b->dims[d];
    }
    if (want >= 0 && count != want)
        return FO_XLA_INVALID_AT(target, call->api, "%s: expected %lld elements%s, got %lld",
                                 fo_xla_role(name, sizeof name, t, role, k), (long long)want,
                                 /* the elementwise handler's operands are the param's size */
                                 strcmp(target, FO_XLA_EW) == 0 ? ", as the param" : "",
                                 (long long)count);
    if (count > 0 && b->data == NULL)
        return FO_XLA_INVALID_AT(target, call->api, "%s: no data",
                                 fo_xla_role(name, sizeof name, t, role, k));
    *n = (ptrdiff_t)count;
    return NULL;
}

/* a 0/1 int64 attribute */
static fo_xla_error *fo_xla_flag_attr(const char *target, const fo_xla_call_frame *call,
                                      int64_t i, int64_t *out)
{
    fo_xla_error *err;
    const fo_xla_bytespan *name = call->attrs.names[i];
    if ((err = fo_xla_int_attr(target, call, i, out)) != NULL) return err;
    if (*out != 0 && *out != 1)
        return FO_XLA_INVALID_AT(target, call->api,
                                 "attribute %.*s: expected 0 or 1, got %lld", (int)name->len,
                                 name->ptr, (long long)*out);
    return NULL;
}

/* the helpers above as the elementwise handler calls them */
#define FO_EW_CHECK(...) fo_xla_check(FO_XLA_EW, __VA_ARGS__)
#define FO_EW_INT_ATTR(...) fo_xla_int_attr(FO_XLA_EW, __VA_ARGS__)
#define FO_EW_FLAG_ATTR(...) fo_xla_flag_attr(FO_XLA_EW, __VA_ARGS__)

/* the attributes: the kernel, the two counts and the optional flags, nothing
   else (XLA passes a dictionary: each name once, sorted; so the kernel, found in the table
   the count flag picks, is looked up after the loop) */
static fo_xla_error *fo_xla_attributes(const fo_xla_call_frame *call, const fo_xla_kernel **k,
                                       int64_t *n_tensors, int64_t *n_threads, int64_t *delta,
                                       int64_t *into_grad, int64_t *count, int64_t *masked,
                                       int64_t *formats, int64_t *stochastic, int64_t *shadow,
                                       int64_t *q8_unsigned, int64_t *sums, int64_t *discard,
                                       int64_t *guarded)
{
    int64_t i;
    fo_xla_error *err;
    const fo_xla_bytespan *v = NULL;
    const fo_xla_kernel *e;
    *k = NULL;
    *n_tensors = *n_threads = -1;
    *delta = *into_grad = *count = *masked = *formats = *stochastic = *shadow = 0;
    *q8_unsigned = *sums = *discard = *guarded = 0;
    for (i = 0; i < call->attrs.size; i++) {
        const fo_xla_bytespan *name = call->attrs.names[i];
        if (fo_xla_name_is(name, "kernel")) {
            if (call->attrs.types[i] != FO_XLA_ATTR_STRING)
                return FO_XLA_INVALID(call->api, "attribute kernel: expected a string");
            v = (const fo_xla_bytespan *)call->attrs.attrs[i];
        } else if (fo_xla_name_is(name, "n_tensors")) {
            if ((err = FO_EW_INT_ATTR(call, i, n_tensors)) != NULL) return err;
        } else if (fo_xla_name_is(name, "n_threads")) {
            if ((err = FO_EW_INT_ATTR(call, i, n_threads)) != NULL) return err;
        } else if (fo_xla_name_is(name, "delta")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, delta)) != NULL) return err;
        } else if (fo_xla_name_is(name, "into_grad")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, into_grad)) != NULL) return err;
        } else if (fo_xla_name_is(name, "count")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, count)) != NULL) return err;
        } else if (fo_xla_name_is(name, "masked")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, masked)) != NULL) return err;
        } else if (fo_xla_name_is(name, "formats")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, formats)) != NULL) return err;
        } else if (fo_xla_name_is(name, "stochastic")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, stochastic)) != NULL) return err;
        } else if (fo_xla_name_is(name, "shadow")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, shadow)) != NULL) return err;
        } else if (fo_xla_name_is(name, "q8_unsigned")) {
            if ((err = FO_EW_INT_ATTR(call, i, q8_unsigned)) != NULL) return err;
        } else if (fo_xla_name_is(name, "sums")) {
            if ((err = FO_EW_INT_ATTR(call, i, sums)) != NULL) return err;
        } else if (fo_xla_name_is(name, "discard")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, discard)) != NULL) return err;
        } else if (fo_xla_name_is(name, "guarded")) {
            if ((err = FO_EW_FLAG_ATTR(call, i, guarded)) != NULL) return err;
        } else {
            return FO_XLA_INVALID(call->api, "unexpected attribute '%.*s' (it takes kernel, "
                                  "n_tensors, n_threads, delta, into_grad, count, masked, "
                                  "formats, stochastic, shadow, q8_unsigned, sums, discard "
                                  "and guarded)", (int)(name->len < 64 ? name->len : 64),
                                  name->ptr);
        }
    }
    if (v != NULL) {
        for (e = *count ? fo_xla_counts : fo_xla_kernels; e->name != NULL; e++)
            if (fo_xla_name_is(v, e->name)) break;
        if (e->name == NULL)
            return FO_XLA_INVALID(call->api, "no %s kernel named '%.*s'",
                                  *count ? "cautious count" : "elementwise",
                                  (int)(v->len < 64 ? v->len : 64), v->ptr);
        *k = e;
    }
    if (*count && (*delta || *into_grad || *shadow))
        return FO_XLA_INVALID(call->api, "attribute count: not with delta, into_grad or shadow");
    if (*into_grad && (*delta || *formats))
        return FO_XLA_INVALID(call->api, "attribute into_grad: not with delta or formats");
    if (*formats && *k != NULL && 3 + (*k)->n_state + (*k)->n_aux > FO_FORMAT_OPS)
        return FO_XLA_INVALID(call->api, "attribute formats: kernel %s has more than %d "
                              "operands", (*k)->name, FO_FORMAT_OPS);
    if (*shadow && (!*formats || *delta))
        return FO_XLA_INVALID(call->api, "attribute shadow: only with formats, not with delta");
    if (*k != NULL && (*q8_unsigned < 0 || *q8_unsigned >= (int64_t)1 << (*k)->n_state))
        return FO_XLA_INVALID(call->api, "attribute q8_unsigned: expected a bit mask of the "
                              "%d state arrays, got %lld", (*k)->n_state,
                              (long long)*q8_unsigned);
    if (*k == NULL || *n_tensors < 0 || *n_threads < 1 || *n_threads > INT_MAX)
        return FO_XLA_INVALID(call->api, "expected the attributes kernel (a kernel name), "
                              "n_tensors >= 0 and n_threads in [1, %d]", INT_MAX);
    if (*sums && (*delta || *count || *formats))
        return FO_XLA_INVALID(call->api, "attribute sums: not with delta, count or formats");
    if (*discard && (!*sums || (*k)->n_aux))
        return FO_XLA_INVALID(call->api, "attribute discard: only with sums, and a kernel "
                              "without factors");
    return NULL;
}

/* the sums attribute's pairs into ops and kinds; their count, or -1 when it is malformed */
#define FO_XLA_SUMS 4
static int fo_xla_sum_pairs(int64_t sums, int n_ops, int *ops, int *kinds)
{
    int j;
    if (sums < 0 || sums >= (int64_t)1 << (8 * FO_XLA_SUMS)) return -1;
    for (j = 0; j < FO_XLA_SUMS && sums >> (8 * j) != 0; j++) {
        const int code = (int)(sums >> (8 * j) & 0xff) - 1;
        if (code < 0) return -1; /* a gap */
        ops[j] = code / 4;
        kinds[j] = code % 4;
        if (ops[j] >= n_ops || kinds[j] == 0) return -1;
    }
    return j;
}

/* per tensor: param in, param out, grad, the S state results, the A one-element operands
   (the kernel's operands), the shadow result (NULL: none; the format chunk's operand after
   the kernel's and its factors), the S state inputs, the Q block scale results
   and the Q block scale inputs of the 8-bit state arrays, then the mask (NULL: none) */
static int fo_xla_width(const fo_xla_kernel *k, int n_q)
{
    return 5 + 2 * k->n_state + k->n_aux + 2 * n_q;
}

/* out[i] = new[i] - old[i] over m elements stored as `code` (FO_FMT_F32, _BF16, _F16), the
   delta attribute's result: in bfloat16 or float16 the difference is computed in float32 and
   rounded to nearest even, as XLA's subtraction of them. `out` may be `new` or `old` (the
   loops read an element before they write it, and nothing here is restrict). */
static void fo_xla_subtract(char *out, const char *new_, const char *old, ptrdiff_t m,
                            int code)
{
    ptrdiff_t i;
    if (code == FO_FMT_F32) {
        float *o = (float *)out;
        const float *x = (const float *)new_, *y = (const float *)old;
        for (i = 0; i < m; i++) o[i] = x[i] - y[i];
    } else { /* `old` may be a float array's bytes (fo_xla_delta_formats): read as may_alias */
        fo_u16 *o = (fo_u16 *)out;
        const fo_u16_view *x = (const fo_u16_view *)new_, *y = (const fo_u16_view *)old;
        if (code == FO_FMT_BF16)
            for (i = 0; i < m; i++) o[i] = fo_bf16_rne(fo_bf16_load(x[i]) - fo_bf16_load(y[i]));
        else
            for (i = 0; i < m; i++)
                o[i] = fo_f16_round(fo_f16_load(x[i]) - fo_f16_load(y[i]), 0, 0);
    }
}

/* one call's pass: what every chunk needs */
typedef struct {
    const fo_xla_kernel *k;
    int f64, delta;             /* delta: 1 the attribute delta, 2 into_grad */
    const void *args;           /* the struct */
    char **ptr;                 /* width pointers per tensor */
    int width, n_q;             /* fo_xla_width; the 8-bit state arrays */
    int q_state[FO_FORMAT_OPS]; /* the state index of each 8-bit state array */
    const ptrdiff_t *chunk;     /* (tensor, lo, n) per chunk */
    fo_count_fn cfn;            /* counting: the count kernel's function, else NULL */
    int *counted;               /* counting: per chunk */
    const fo_format_args *fa;   /* formats: their arguments (fa->mask 0), else NULL */
    size_t itemsize[FO_FORMAT_OPS]; /* bytes per element of each kernel operand */
    int n_sums, sum_op[FO_XLA_SUMS], sum_kind[FO_XLA_SUMS]; /* the sums attribute's pairs */
    double *partials;           /* sums: per chunk, n_sums */
    char *scratch;              /* discard: a chunk of the new param per thread, else NULL */
} fo_xla_pass;

/*
 * With delta, elements lo .. lo + n - 1 of a tensor in blocks: the kernel writes a block's
 * new params into a scratch block (masked there), whose differences from the params are
 * then stored as the result (with into_grad, the new params themselves). The new params
 * reach memory only there, and the result may share the gradient's buffer (XLA's updates
 * written over a dead gradient; Lamb's update direction), which the kernels' restrict
 * operands could not.
 */
#define FO_XLA_BLOCK 1024
static void fo_xla_delta_chunk(const fo_xla_pass *pass, char **p, ptrdiff_t lo, ptrdiff_t n,
                               const unsigned char *mask)
{
    const fo_xla_kernel *k = pass->k;
    const int f64 = pass->f64, n_ops = 3 + k->n_state, n_aux = k->n_aux;
    const ptrdiff_t size = f64 ? 8 : 4;
    union {
        double f64[FO_XLA_BLOCK];
        float f32[FO_XLA_BLOCK];
    } scratch;
    char *q[FO_XLA_OPS_MAX];
    ptrdiff_t off, at, m, i;
    int j;
    for (j = 0; j < n_aux; j++) q[n_ops + j] = p[n_ops + j]; /* one element each */
    for (off = 0; off < n; off += FO_XLA_BLOCK) {
        m = n - off < FO_XLA_BLOCK ? n - off : FO_XLA_BLOCK;
        at = lo + off;
        for (j = 0; j < n_ops; j++) q[j] = p[j] + at * size;
        q[1] = f64 ? (char *)scratch.f64 : (char *)scratch.f32;
        k->fn[f64](q, 0, m, pass->args);
        if (mask != NULL) fo_cpu_mask_chunk(q, 0, m, size, k->n_state, mask + at);
        if (pass->delta == 2) {
            memcpy(p[1] + at * size, q[1], (size_t)(m * size));
        } else if (f64) {
            const double *x = (const double *)q[0];
            double *out = (double *)(p[1] + at * size);
            for (i = 0; i < m; i++) out[i] = scratch.f64[i] - x[i];
        } else {
            const float *x = (const float *)q[0];
            float *out = (float *)(p[1] + at * size);
            for (i = 0; i < m; i++) out[i] = scratch.f32[i] - x[i];
        }
    }
}

/* With delta and formats, elements lo .. lo + n - 1 of tensor t in the format chunk's blocks:
   each block's params are kept, the block is updated (its new params stored, rounded, as
   the result), and the result becomes its difference from the kept params; so the result
   may share the param's buffer or the gradient's (format_loops.h writes a float32 result
   over the gradient from scratch). */
static void fo_xla_delta_formats(char **p, ptrdiff_t t, ptrdiff_t lo, ptrdiff_t n,
                                 const fo_format_args *fa)
{
    const int code = fa->code[1];
    const ptrdiff_t size = code == FO_FMT_F32 ? 4 : 2;
    float old[FO_FORMAT_BLOCK]; /* the block's params, in their own format */
    ptrdiff_t off, at, m;
    for (off = 0; off < n; off += FO_FORMAT_BLOCK) {
        m = n - off < FO_FORMAT_BLOCK ? n - off : FO_FORMAT_BLOCK;
        at = lo + off;
        memcpy(old, p[0] + at * size, (size_t)(m * size));
        fo_cpu_format_chunk(p, t, at, m, fa);
        fo_xla_subtract(p[1] + at * size, p[1] + at * size, (const char *)old, m, code);
    }
}

/* A cautious count over elements lo .. lo + n - 1 of a tensor in storage formats (the
   operand pointers ptr[0 ..], ptr[1] NULL): `cfn`, the float32 count kernel, on each block
   loaded as fo_cpu_format_chunk loads it; the agreeing elements that `mask` (at element 0;
   NULL: none) does not prune summed. */
FO_MULTIVERSION static int fo_xla_format_count(char **ptr, ptrdiff_t lo, ptrdiff_t n,
                                               const fo_format_args *fa, fo_count_fn cfn,
                                               const unsigned char *mask)
{
    float scratch[FO_FORMAT_OPS][FO_FORMAT_BLOCK];
    char *local[FO_FORMAT_OPS];
    ptrdiff_t off;
    int total = 0;
    for (off = 0; off < n; off += FO_FORMAT_BLOCK) {
        const ptrdiff_t m = n - off < FO_FORMAT_BLOCK ? n - off : FO_FORMAT_BLOCK;
        fo_format_load_ops(local, scratch, ptr, (fo_u64)(lo + off), m, fa, 0, 0);
        total += cfn(local, 0, m, fa->args, mask != NULL ? mask + lo + off : NULL);
    }
    return total;
}

/* the partials of chunk c, its elements at..at + n - 1 of operands q, one per pair */
static void fo_xla_partials(const fo_xla_pass *pass, ptrdiff_t c, char **q, ptrdiff_t at,
                            ptrdiff_t n)
{
    int j;
    for (j = 0; j < pass->n_sums; j++)
        pass->partials[c * pass->n_sums + j] =
            pass->f64 ? fo_norm_chunk_f64((const double *)q[pass->sum_op[j]] + at, n,
                                          pass->sum_kind[j])
                      : fo_norm_chunk_f32((const float *)q[pass->sum_op[j]] + at, n,
                                          pass->sum_kind[j]);
}

/* Chunk c with sums and discard: the kernel's pass into this thread's scratch chunk (the
   pointers shifted to the chunk), pruned entries zeroed, then the partials */
static void fo_xla_discard_chunk(const fo_xla_pass *pass, ptrdiff_t c, char *scratch,
                                 const unsigned char *mask)
{
    const fo_xla_kernel *k = pass->k;
    const int n_state = k->n_state, in = 4 + n_state + k->n_aux, f64 = pass->f64;
    const ptrdiff_t t = pass->chunk[3 * c], lo = pass->chunk[3 * c + 1],
                    n = pass->chunk[3 * c + 2], size = f64 ? 8 : 4;
    char **p = pass->ptr + t * pass->width, *local[FO_XLA_OPS_MAX];
    int j, s;
    for (s = 0; s < n_state; s++)
        if (p[3 + s] != p[in + s])
            memcpy(p[3 + s] + lo * size, p[in + s] + lo * size, n * size);
    for (j = 0; j < 3 + n_state; j++) local[j] = p[j] + lo * size;
    local[1] = scratch;
    k->fn[f64](local, 0, n, pass->args);
    if (mask != NULL) fo_cpu_mask_chunk(local, 0, n, size, n_state, mask + lo);
    fo_xla_partials(pass, c, local, 0, n);
}

/*
 * Chunk c of the plan: `chunk` holds (tensor, lo, n) triples, `ptr` per tensor the
 * fo_xla_width pointers. The state inputs (block scales too) are copied into the results
 * first where XLA gave
 * separate buffers; the kernel runs; a mask zeroes the pruned entries of the param and state
 * results; with `delta` the param result is its difference from the param, block by block
 * (fo_xla_delta_chunk, fo_xla_delta_formats; into_grad: the new param, block by block, so
 * that it may be stored over the grad). With a
 * counting function `cfn` the chunk's agreeing elements are counted into `counted[c]` and
 * nothing is written.
 */
static void fo_xla_run_chunk(const fo_xla_pass *pass, ptrdiff_t c, int thread)
{
    const fo_xla_kernel *k = pass->k;
    const int n_state = k->n_state, in = 4 + n_state + k->n_aux, width = pass->width,
              q_out = in + n_state;
    const ptrdiff_t t = pass->chunk[3 * c], lo = pass->chunk[3 * c + 1],
                    n = pass->chunk[3 * c + 2];
    char **p = pass->ptr + t * width;
    const unsigned char *mask = (const unsigned char *)p[width - 1];
    int s;
    if (pass->cfn != NULL) {
        pass->counted[c] = pass->fa != NULL
                               ? fo_xla_format_count(p, lo, n, pass->fa, pass->cfn, mask)
                               : pass->cfn(p, lo, n, pass->args,
                                           mask != NULL ? mask + lo : NULL);
        return;
    }
    if (pass->scratch != NULL) {
        fo_xla_discard_chunk(pass, c, pass->scratch + (ptrdiff_t)thread * FO_CHUNK * 8, mask);
        return;
    }
    for (s = 0; s < n_state; s++) {
        const size_t size = pass->itemsize[3 + s];
        if (p[3 + s] != p[in + s])
            memcpy(p[3 + s] + lo * size, p[in + s] + lo * size, n * size);
    }
    for (s = 0; s < pass->n_q; s++) { /* a chunk starts a block: its blocks are its own */
        const ptrdiff_t b0 = lo / FO_Q8_BLOCK, nb = (n + FO_Q8_BLOCK - 1) / FO_Q8_BLOCK;
        char *out = p[q_out + s], *from = p[q_out + pass->n_q + s];
        if (out != from)
            memcpy(out + b0 * sizeof(float), from + b0 * sizeof(float), nb * sizeof(float));
    }
    if (pass->fa != NULL) { /* masks inside, before the rounding */
        fo_format_args fa = *pass->fa;
        fa.mask = mask != NULL ? width - 1 : 0;
        if (pass->delta) fo_xla_delta_formats(p, t, lo, n, &fa);
        else fo_cpu_format_chunk(p, t, lo, n, &fa);
        return;
    }
    if (pass->delta) fo_xla_delta_chunk(pass, p, lo, n, mask);
    else {
        k->fn[pass->f64](p, lo, n, pass->args);
        if (mask != NULL) fo_cpu_mask_chunk(p, lo, n, pass->f64 ? 8 : 4, n_state, mask + lo);
    }
    if (pass->n_sums) fo_xla_partials(pass, c, p, lo, n); /* while the chunk is in cache */
}

/* the storage format of an operand's XLA dtype, or -1 */
static int fo_xla_format(fo_xla_dtype dtype)
{
    switch (dtype) {
    case FO_XLA_F32: return FO_FMT_F32;
    case FO_XLA_BF16: return FO_FMT_BF16;
    case FO_XLA_F16: return FO_FMT_F16;
    default: return -1;
    }
}

/* The guard of a guarded call of `target`: argument `at`, a 0-d int32; *go 0 where it is 0
   (the step skipped), else 1 */
static fo_xla_error *fo_xla_guard(const char *target, const fo_xla_call_frame *call,
                                  int64_t at, int *go)
{
    const fo_xla_buffer *g = (const fo_xla_buffer *)call->args.args[at];
    if (g->dtype != FO_XLA_S32 || g->rank != 0 || g->data == NULL)
        return FO_XLA_INVALID_AT(target, call->api, "argument %lld (the guard): expected a 0-d "
                                 "int32, got %s of rank %lld", (long long)at,
                                 fo_xla_dtype_name(g->dtype), (long long)g->rank);
    *go = *(const int32_t *)g->data != 0;
    return NULL;
}

/* a buffer's bytes (its dtype one the handler takes) */
static size_t fo_xla_nbytes(const fo_xla_buffer *b)
{
    size_t bytes = b->dtype == FO_XLA_F64 ? 8 : b->dtype == FO_XLA_F32 || b->dtype == FO_XLA_S32
                                                   ? 4 : b->dtype == FO_XLA_U8 ? 1 : 2;
    int64_t d;
    for (d = 0; d < b->rank; d++) bytes *= (size_t)b->dims[d];
    return bytes;
}

/* A skipped step (the guard 0), its call checked: every result its input's bytes (none
   copied where they share a buffer), with delta +0, the counts or the sums 0. `per` and
   `ret_per` are the arguments and results per tensor, `o` a tensor's first state result,
   `n_copied` the inputs after its param and grad with a result each (state, shadow, block
   scales) */
static void fo_xla_skip(const fo_xla_call_frame *call, int64_t n_tensors, int per, int ret_per,
                        int o, int n_state, int n_aux, int n_copied, int64_t delta,
                        int counting, int n_sums)
{
    int64_t t;
    int s;
    if (counting) {
        memset(((fo_xla_buffer *)call->rets.rets[0])->data, 0, (size_t)n_tensors * 4);
        return;
    }
    for (t = 0; t < n_tensors; t++) {
        fo_xla_buffer *const *a = (fo_xla_buffer *const *)call->args.args + 1 + t * per;
        fo_xla_buffer *const *r = (fo_xla_buffer *const *)call->rets.rets + t * ret_per;
        const size_t bytes = fo_xla_nbytes(a[0]); /* the param's, as its result's */
        if (o == 1 && delta && bytes > 0) memset(r[0]->data, 0, bytes);
        else if (o == 1 && !delta && bytes > 0 && r[0]->data != a[0]->data)
            memcpy(r[0]->data, a[0]->data, bytes);
        for (s = 0; s < n_copied; s++) {
            /* the state arrays, then (past the factors) the shadow and the block scales */
            const fo_xla_buffer *in = a[2 + s + (s < n_state ? 0 : n_aux)];
            if (r[o + s]->data != in->data && fo_xla_nbytes(in) > 0)
                memcpy(r[o + s]->data, in->data, fo_xla_nbytes(in));
        }
    }
    if (n_sums) {
        const fo_xla_buffer *summed = (const fo_xla_buffer *)call->rets.rets[call->rets.size - 1];
        memset(summed->data, 0, fo_xla_nbytes(summed));
    }
}

/* the FFI handler of target FO_XLA_ELEMENTWISE_TARGET */
static fo_xla_error *fo_xla_elementwise(fo_xla_call_frame *call)
{
    const fo_xla_kernel *k;
    const fo_xla_buffer *rec, *out = NULL;
    double args[FO_XLA_ARGS_MAX / 8]; /* the struct, copied to aligned storage */
    fo_xla_error *err;
    fo_xla_dtype dtype;
    int64_t i, t, n_tensors, n_threads, delta, into_grad, counting, masked, formats, stochastic,
        shadow, q8_unsigned, sums, discard, guarded, n_args, n_rets, n_chunks = 0, total = 0;
    int n_state, n_aux, n_q = 0, per, width, f64, s, nt, *counted = NULL, n_sums, o, ret_per;
    int go = 1; /* the guard's verdict: run the step */
    const fo_xla_buffer *summed = NULL; /* the sums' result */
    /* each kernel operand's dtype (param out: the param's), then the shadow's */
    fo_xla_dtype dt[FO_FORMAT_OPS + 1];
    fo_xla_pass pass;
    fo_format_args fa;
    ptrdiff_t size, n, c, lo, *count, *chunk;
    char **ptr;

    if (fo_xla_preamble(call, FO_XLA_EW, &err))
        return err;
    if ((err = fo_xla_attributes(call, &k, &n_tensors, &n_threads, &delta, &into_grad,
                                 &counting, &masked, &formats, &stochastic, &shadow,
                                 &q8_unsigned, &sums, &discard, &guarded)) != NULL)
        return err;

    /* operand counts and kinds: with formats, tensor 0's uint8 state arrays are 8-bit */
    n_state = k->n_state;
    n_aux = k->n_aux;
    memset(&pass, 0, sizeof pass);
    n_sums = fo_xla_sum_pairs(sums, 3 + n_state, pass.sum_op, pass.sum_kind);
    if (n_sums < 0)
        return FO_XLA_INVALID(call->api, "attribute sums: expected up to %d bytes 1 + 4 "
                              "operand + kind, the operand below %d (kernel %s's element "
                              "operands), the kind 1, 2 or 3, got %lld", FO_XLA_SUMS,
                              3 + n_state, k->name, (long long)sums);
    for (s = 0; s < n_sums; s++)
        if (into_grad && pass.sum_op[s] == 2)
            return FO_XLA_INVALID(call->api, "attribute sums: not the grad (operand 2) with "
                                  "into_grad, whose new param may share its buffer");
    pass.n_sums = n_sums;
    o = discard ? 0 : 1; /* a tensor's first state result */
    if (n_tensors > call->args.size)
        return FO_XLA_INVALID(call->api, "n_tensors is %lld, but the call has %lld arguments",
                              (long long)n_tensors, (long long)call->args.size);
    if (formats && n_tensors > 0 && call->args.size >= 3 + n_state)
        for (s = 0; s < n_state; s++)
            if (call->args.types[3 + s] == FO_XLA_ARG_BUFFER
                && ((const fo_xla_buffer *)call->args.args[3 + s])->dtype == FO_XLA_U8)
                pass.q_state[n_q++] = s;
    per = 2 + n_state + n_aux + (int)shadow + n_q + (int)masked; /* arguments per tensor */
    width = fo_xla_width(k, n_q);
    n_args = 1 + n_tensors * per + (formats ? 2 : 0) + (n_q ? 2 : 0) + guarded;
    ret_per = o + n_state + (int)shadow + n_q;
    n_rets = counting ? 1 : n_tensors * ret_per + (n_sums > 0);
    if (call->args.size != n_args || call->rets.size != n_rets)
        return FO_XLA_INVALID(call->api, "kernel %s over %lld tensors takes %lld arguments (the "
                              "struct, then per tensor param, grad, %d state, %d factor, %d "
                              "shadow, %d block scales and %d mask, then %d keys and step, "
                              "%d maps and tables and %d guard) and gives %lld results (%d per "
                              "tensor%s), got %lld and %lld",
                              k->name, (long long)n_tensors, (long long)n_args, n_state, n_aux,
                              (int)shadow, n_q, (int)masked, formats ? 2 : 0, n_q ? 2 : 0,
                              (int)guarded,
                              (long long)n_rets, counting ? 0 : ret_per,
                              n_sums ? ", then the sums" : "", (long long)call->args.size,
                              (long long)call->rets.size);
    for (i = 0; i < n_args; i++)
        if (call->args.types[i] != FO_XLA_ARG_BUFFER)
            return FO_XLA_INVALID(call->api, "argument %lld: expected a buffer", (long long)i);
    for (i = 0; i < n_rets; i++)
        if (call->rets.types[i] != FO_XLA_RET_BUFFER)
            return FO_XLA_INVALID(call->api, "result %lld: expected a buffer", (long long)i);
    if (counting) { /* one int32 count per tensor */
        out = (const fo_xla_buffer *)call->rets.rets[0];
        if (out->dtype != FO_XLA_S32 || out->rank != 1 || out->dims == NULL
            || out->dims[0] != n_tensors || (n_tensors > 0 && out->data == NULL))
            return FO_XLA_INVALID(call->api, "result 0 (the counts): expected int32 of shape "
                                  "(%lld,)", (long long)n_tensors);
    }
    if (n_sums) { /* per tensor, each pair's sum */
        summed = (const fo_xla_buffer *)call->rets.rets[n_rets - 1];
        if ((summed->dtype != FO_XLA_F32 && summed->dtype != FO_XLA_F64) || summed->rank != 2
            || summed->dims == NULL || summed->dims[0] != n_tensors
            || summed->dims[1] != n_sums || (n_tensors > 0 && summed->data == NULL))
            return FO_XLA_INVALID(call->api, "result %lld (the sums): expected float32 or "
                                  "float64 of shape (%lld, %d)", (long long)(n_rets - 1),
                                  (long long)n_tensors, n_sums);
    }

    /* the struct: bytes of the first param's dtype's struct */
    rec = (const fo_xla_buffer *)call->args.args[0];
    if (rec->dtype != FO_XLA_U8 || rec->rank != 1)
        return FO_XLA_INVALID(call->api, "argument 0 (kernel %s's packed struct): expected a "
                              "1-D uint8 array, got %s of rank %lld", k->name,
                              fo_xla_dtype_name(rec->dtype), (long long)rec->rank);
    if (guarded && (err = fo_xla_guard(FO_XLA_EW, call, n_args - 1, &go)) != NULL)
        return err;
    if (n_tensors == 0)
        return NULL;
    dtype = ((const fo_xla_buffer *)call->args.args[1])->dtype;
    if (formats) { /* tensor 0's dtypes, which every tensor must have */
        fo_xla_dtype low = dtype; /* the parameter's own: the shadow's with a shadow */
        if (shadow) {
            low = ((const fo_xla_buffer *)call->args.args[3 + n_state + n_aux])->dtype;
            if (dtype != FO_XLA_F32 || (low != FO_XLA_BF16 && low != FO_XLA_F16))
                return FO_XLA_INVALID(call->api, "tensor 0: with shadow, expected a float32 "
                                      "param (the master copy) and a bfloat16 or float16 "
                                      "shadow, got %s and %s", fo_xla_dtype_name(dtype),
                                      fo_xla_dtype_name(low));
            dt[3 + n_state] = low;
        }
        if (fo_xla_format(dtype) < 0)
            return FO_XLA_INVALID(call->api, "tensor 0, param: expected float32, bfloat16 or "
                                  "float16 with formats, got %s", fo_xla_dtype_name(dtype));
        for (s = 0; s < 3 + n_state; s++) {
            dt[s] = s < 2 ? dtype : ((const fo_xla_buffer *)call->args.args[s])->dtype;
            if ((fo_xla_format(dt[s]) < 0 && !(s > 2 && dt[s] == FO_XLA_U8))
                /* a count (which reads the grad only) may have master weights' grads */
                || (s == 2 && dt[2] != low && dt[2] != FO_XLA_F32
                    && !(counting && dt[2] != FO_XLA_U8)))
                return FO_XLA_INVALID(call->api, "tensor 0, %s: expected %s, got %s",
                                      s == 2 ? "grad" : "state", s == 2
                                      ? "the parameter's dtype or float32"
                                      : "float32, bfloat16, float16 or uint8 (8-bit)",
                                      fo_xla_dtype_name(dt[s]));
            pass.itemsize[s] = dt[s] == FO_XLA_F32 ? 4 : dt[s] == FO_XLA_U8 ? 1 : 2;
        }
        f64 = 0;
    } else {
        if (dtype != FO_XLA_F32 && dtype != FO_XLA_F64)
            return FO_XLA_INVALID(call->api, "tensor 0, param: expected float32 or float64, "
                                  "got %s", fo_xla_dtype_name(dtype));
        for (s = 0; s < 3 + n_state; s++) {
            dt[s] = dtype;
            pass.itemsize[s] = dtype == FO_XLA_F64 ? 8 : 4;
        }
        f64 = dtype == FO_XLA_F64;
    }
    size = (ptrdiff_t)fo_xla_packed_size(k->args_size[f64]);
    n = rec->dims != NULL ? (ptrdiff_t)rec->dims[0] : -1;
    if (n != size || rec->data == NULL)
        return FO_XLA_INVALID(call->api, "argument 0: expected the %lld bytes of kernel %s's "
                              "packed %s struct, got %lld bytes", (long long)size, k->name,
                              f64 ? "float64" : "float32", (long long)n);
    memcpy(args, rec->data, (size_t)size);

    /* every tensor's operands: dtype and element count, then their pointers (counting, the
       state results are the state inputs: nothing is written) */
    count = (ptrdiff_t *)malloc((size_t)n_tensors
                                * (sizeof(ptrdiff_t) + (size_t)width * sizeof(char *)));
    if (count == NULL)
        return fo_xla_fail(call->api, FO_XLA_ERROR_RESOURCE_EXHAUSTED, FO_XLA_EW,
                              "out of memory");
    ptr = (char **)(count + n_tensors);
    for (t = 0; t < n_tensors; t++) {
        fo_xla_buffer *const *a = (fo_xla_buffer *const *)call->args.args + 1 + t * per;
        /* r[o + s]: new state s (o 0 with discard, where the new param has no result) */
        fo_xla_buffer *const *r = (fo_xla_buffer *const *)call->rets.rets + t * ret_per;
        char **p = ptr + t * width;
        if ((err = FO_EW_CHECK(call, a[0], dt[0], -1, t, "param", -1, &n)) != NULL
            || (err = FO_EW_CHECK(call, a[1], dt[2], n, t, "grad", -1, &n)) != NULL
            || (!counting && !discard
                && (err = FO_EW_CHECK(call, r[0], dt[0], n, t, "new param", -1, &n))
                       != NULL))
            goto fail;
        for (s = 0; s < n_state; s++)
            if ((err = FO_EW_CHECK(call, a[2 + s], dt[3 + s], n, t, "state", s, &n)) != NULL
                || (!counting && (err = FO_EW_CHECK(call, r[o + s], dt[3 + s], n, t,
                                                     "new state", s, &n)) != NULL))
                goto fail;
        for (s = 0; s < n_aux; s++) {
            ptrdiff_t one;
            /* in the dtype the kernel computes in: float32 with formats */
            if ((err = FO_EW_CHECK(call, a[2 + n_state + s], formats ? FO_XLA_F32 : dtype, 1,
                                    t, "factor", -1, &one)) != NULL)
                goto fail;
        }
        p[3 + n_state + n_aux] = NULL;
        if (shadow) {
            if ((err = FO_EW_CHECK(call, a[2 + n_state + n_aux], dt[3 + n_state], n, t,
                                    "shadow", -1, &n)) != NULL
                || (err = FO_EW_CHECK(call, r[o + n_state], dt[3 + n_state], n, t,
                                       "new shadow", -1, &n)) != NULL)
                goto fail;
            p[3 + n_state + n_aux] = (char *)r[o + n_state]->data;
        }
        for (s = 0; s < n_q; s++) { /* the block scales of the 8-bit state arrays */
            const fo_xla_buffer *in = a[2 + n_state + n_aux + shadow + s];
            /* counting: no results, nothing written */
            const fo_xla_buffer *res = counting ? in : r[o + n_state + shadow + s];
            const ptrdiff_t blocks = (n + FO_Q8_BLOCK - 1) / FO_Q8_BLOCK;
            ptrdiff_t m;
            if ((err = FO_EW_CHECK(call, in, FO_XLA_F32, blocks, t, "block scales of state",
                                    pass.q_state[s], &m)) != NULL
                || (err = FO_EW_CHECK(call, res, FO_XLA_F32, blocks, t,
                                       "new block scales of state", pass.q_state[s], &m))
                       != NULL)
                goto fail;
            p[4 + 2 * n_state + n_aux + s] = (char *)res->data;
            p[4 + 2 * n_state + n_aux + n_q + s] = (char *)in->data;
        }
        p[width - 1] = NULL;
        if (masked) {
            ptrdiff_t m;
            const fo_xla_buffer *b = a[2 + n_state + n_aux + shadow + n_q];
            if ((err = FO_EW_CHECK(call, b, FO_XLA_U8, -1, t, "mask", -1, &m)) != NULL)
                goto fail;
            if (m != 0 && m != n) {
                err = FO_XLA_INVALID(call->api, "tensor %lld, mask: expected %lld elements, "
                                     "as the param, or none, got %lld", (long long)t,
                                     (long long)n, (long long)m);
                goto fail;
            }
            if (m > 0) p[width - 1] = (char *)b->data;
        }
        if (counting && n > INT_MAX) {
            err = FO_XLA_INVALID(call->api, "tensor %lld: %lld elements, more than an int32 "
                                 "count holds", (long long)t, (long long)n);
            goto fail;
        }
        p[0] = (char *)a[0]->data;
        p[1] = counting || discard ? NULL : (char *)r[0]->data;
        p[2] = (char *)a[1]->data;
        for (s = 0; s < n_state; s++) {
            p[3 + s] = (char *)(counting ? a[2 + s] : r[o + s])->data;
            p[4 + n_state + n_aux + s] = (char *)a[2 + s]->data;
        }
        for (s = 0; s < n_aux; s++)
            p[3 + n_state + s] = (char *)a[2 + n_state + s]->data;
        count[t] = n;
        n_chunks += (n + FO_CHUNK - 1) / FO_CHUNK;
        total += n;
    }
    if (formats) { /* the keys and the step of the random bits, then the formats' arguments */
        const int64_t at = 1 + n_tensors * per; /* the keys */
        const fo_xla_buffer *keys = (const fo_xla_buffer *)call->args.args[at];
        const fo_xla_buffer *step = (const fo_xla_buffer *)call->args.args[at + 1];
        if (keys->dtype != FO_XLA_S32 || keys->rank != 2 || keys->dims == NULL
            || keys->dims[0] != n_tensors || keys->dims[1] != 2 || keys->data == NULL
            || step->dtype != FO_XLA_S32 || step->rank != 0 || step->data == NULL) {
            err = FO_XLA_INVALID(call->api, "with formats, the last two arguments: the keys, "
                                 "int32 of shape (%lld, 2), and the step, a 0-d int32",
                                 (long long)n_tensors);
            goto fail;
        }
        memset(&fa, 0, sizeof fa);
        fa.fn = k->fn[0];
        fa.args = args;
        fa.keys = (const fo_u32 *)keys->data;
        fa.step = (fo_u64)*(const fo_u32 *)step->data;
        fa.n_ops = 3 + n_state;
        fa.n_aux = n_aux;
        fa.stochastic = (int)stochastic;
        fa.shadow = (int)shadow;
        for (s = 0; s < 3 + n_state + shadow; s++) fa.code[s] = fo_xla_format(dt[s]);
        if (n_q) { /* the maps and their tables */
            const fo_xla_buffer *maps = (const fo_xla_buffer *)call->args.args[at + 2];
            const fo_xla_buffer *tables = (const fo_xla_buffer *)call->args.args[at + 3];
            if (maps->dtype != FO_XLA_F32 || maps->rank != 2 || maps->dims == NULL
                || maps->dims[0] != 2 || maps->dims[1] != 256 || maps->data == NULL
                || tables->dtype != FO_XLA_S32 || tables->rank != 2 || tables->dims == NULL
                || tables->dims[0] != 2 || tables->dims[1] != FO_Q8_TABLE
                || tables->data == NULL) {
                err = FO_XLA_INVALID(call->api, "with 8-bit state, the last two arguments: "
                                     "the maps, float32 of shape (2, 256), and their tables, "
                                     "int32 of shape (2, %d) (the uint32 bits)",
                                     (int)FO_Q8_TABLE);
                goto fail;
            }
            fa.qmaps = (const float *)maps->data;
            fa.qtables = (const fo_u32 *)tables->data;
            fa.vbmi = fo_q8_vbmi();
            fo_q8_planes(&fa);
            for (s = 0; s < n_q; s++) {
                const int op = 3 + pass.q_state[s];
                fa.code[op] = (q8_unsigned >> pass.q_state[s] & 1) ? FO_FMT_Q8U : FO_FMT_Q8S;
                fa.scales[op] = 4 + 2 * n_state + n_aux + s;
            }
        }
        pass.fa = &fa;
    }
    if (!go) {
        fo_xla_skip(call, n_tensors, per, ret_per, o, n_state, n_aux,
                    n_state + (int)shadow + n_q, delta, (int)counting, n_sums);
        free(count);
        return NULL;
    }

    /* the plan, (tensor, lo, n) per chunk, run in one parallel loop; small steps take fewer
       threads, as in the Cython driver */
    nt = total / FO_XLA_MIN_PER_THREAD < n_threads ? (int)(total / FO_XLA_MIN_PER_THREAD)
                                                   : (int)n_threads;
    chunk = (ptrdiff_t *)malloc((size_t)(n_chunks > 0 ? n_chunks : 1) * 3 * sizeof(ptrdiff_t));
    if (counting && chunk != NULL)
        counted = (int *)malloc((size_t)(n_chunks > 0 ? n_chunks : 1) * sizeof(int));
    if (n_sums && chunk != NULL)
        pass.partials = (double *)malloc((size_t)(n_chunks > 0 ? n_chunks : 1) * n_sums
                                         * sizeof(double));
    if (discard && pass.partials != NULL) /* a float64 chunk per thread */
        pass.scratch = (char *)malloc((size_t)(nt > 1 ? nt : 1) * FO_CHUNK * 8);
    if (chunk == NULL || (counting && counted == NULL) || (n_sums && pass.partials == NULL)
        || (discard && pass.scratch == NULL)) {
        free(chunk);
        free(pass.partials);
        err = fo_xla_fail(call->api, FO_XLA_ERROR_RESOURCE_EXHAUSTED, FO_XLA_EW,
                              "out of memory");
        goto fail;
    }
    for (t = 0, c = 0; t < n_tensors; t++)
        for (lo = 0; lo < count[t]; lo += FO_CHUNK, c++) {
            chunk[3 * c] = (ptrdiff_t)t;
            chunk[3 * c + 1] = lo;
            chunk[3 * c + 2] = count[t] - lo < FO_CHUNK ? count[t] - lo : FO_CHUNK;
        }
    pass.k = k;
    pass.f64 = f64;
    pass.delta = delta ? 1 : into_grad ? 2 : 0;
    pass.args = args;
    pass.ptr = ptr;
    pass.width = width;
    pass.n_q = n_q;
    pass.chunk = chunk;
    pass.cfn = counting ? k->count[f64] : NULL;
    pass.counted = counted;
    {
        const ptrdiff_t nc = (ptrdiff_t)n_chunks;
#pragma omp parallel num_threads(nt > 1 ? nt : 1) if (nt > 1 && nc > 1)
        {
            FO_XLA_IEEE_BEGIN
#pragma omp for schedule(static)
            for (c = 0; c < nc; c++)
                fo_xla_run_chunk(&pass, c, FO_XLA_THREAD);
            FO_XLA_IEEE_END
        }
    }
    if (counting) { /* each tensor's chunks, summed in order (integers: any order would do) */
        int32_t *sums = (int32_t *)out->data;
        for (t = 0; t < n_tensors; t++) sums[t] = 0;
        for (c = 0; c < (ptrdiff_t)n_chunks; c++) sums[chunk[3 * c]] += counted[c];
        free(counted);
    }
    if (n_sums) { /* each tensor's chunks in order, from its first (as tensor_sums) */
        for (t = 0, c = 0; t < n_tensors; t++) {
            const ptrdiff_t chunks = (count[t] + FO_CHUNK - 1) / FO_CHUNK;
            for (s = 0; s < n_sums; s++) {
                double x = 0;
                for (lo = 0; lo < chunks; lo++) {
                    const double part = pass.partials[(c + lo) * n_sums + s];
                    x = lo == 0 ? part : x + part;
                }
                if (summed->dtype == FO_XLA_F64) ((double *)summed->data)[t * n_sums + s] = x;
                else ((float *)summed->data)[t * n_sums + s] = (float)x;
            }
            c += chunks;
        }
        free(pass.partials);
        free(pass.scratch);
    }
    free(chunk);
    free(count);
    return NULL;

fail:
    free(count);
    return err;
}

#endif /* FASTOPT_CPU_XLA_LOOPS_H */

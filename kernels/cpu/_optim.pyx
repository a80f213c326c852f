# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Optimizer update rules on the CPU: C loops from optim_loops.h, driven over many tensors.

Low-level entry points for fastopt._backends._cython: arguments are already validated, the
scalars already computed on the host (fastopt.optim._scalars). `f64` selects float64.
"""

include "_plan.pxi"

cdef extern from "reduce_loops.h" nogil:
    double fo_norm_chunk_f32(const float *g, Py_ssize_t n, int kind)
    double fo_norm_chunk_f64(const double *g, Py_ssize_t n, int kind)

cdef extern from "optim_loops.h" nogil:
    ctypedef struct fo_sgd_args_f32:
        float clip, gscale, weight_decay, momentum, one_minus_dampening, neg_lr
        int first, nesterov
    ctypedef struct fo_sgd_args_f64:
        double clip, gscale, weight_decay, momentum, one_minus_dampening, neg_lr
        int first, nesterov
    ctypedef struct fo_adam_args_f32:
        float clip, gscale, weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2
        float bias_correction2_sqrt, eps, neg_step_size
        int lerp_hi
    ctypedef struct fo_adam_args_f64:
        double clip, gscale, weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2
        double bias_correction2_sqrt, eps, neg_step_size
        int lerp_hi
    void fo_cpu_sgd_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_sgd_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_sgd_momentum_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_sgd_momentum_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_adam_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_adam_f64(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_adam_amsgrad_f32(char **, Py_ssize_t, Py_ssize_t, const void *)
    void fo_cpu_adam_amsgrad_f64(char **, Py_ssize_t, Py_ssize_t, const void *)


def sgd(list params, list out, list grads, list momentum_buffers, bint f64, *,
        double clip, double gscale, double weight_decay, double momentum, double one_minus_dampening,
        double neg_lr, bint first, bint nesterov, int n_threads):
    """One SGD step; `momentum_buffers` is None without momentum."""
    cdef fo_sgd_args_f32 a32
    cdef fo_sgd_args_f64 a64
    cdef tuple ops = (params, out, grads) if momentum_buffers is None else (
        params, out, grads, momentum_buffers)
    cdef bint mom = momentum_buffers is not None
    if f64:
        a64.clip, a64.gscale = clip, gscale
        a64.weight_decay, a64.momentum = weight_decay, momentum
        a64.one_minus_dampening, a64.neg_lr = one_minus_dampening, neg_lr
        a64.first, a64.nesterov = first, nesterov
        run(fo_cpu_sgd_momentum_f64 if mom else fo_cpu_sgd_f64, ops, 8, &a64, n_threads)
    else:
        a32.clip, a32.gscale = clip, gscale
        a32.weight_decay, a32.momentum = weight_decay, momentum
        a32.one_minus_dampening, a32.neg_lr = one_minus_dampening, neg_lr
        a32.first, a32.nesterov = first, nesterov
        run(fo_cpu_sgd_momentum_f32 if mom else fo_cpu_sgd_f32, ops, 4, &a32, n_threads)


def adam(list params, list out, list grads, list exp_avgs, list exp_avg_sqs,
         list max_exp_avg_sqs, bint f64, *, double clip, double gscale, double weight_decay,
         double decay,
         double one_minus_beta1, double beta2, double one_minus_beta2,
         double bias_correction2_sqrt, double eps, double neg_step_size, bint lerp_hi,
         int n_threads):
    """One Adam/AdamW step; `max_exp_avg_sqs` is None without amsgrad."""
    cdef fo_adam_args_f32 a32
    cdef fo_adam_args_f64 a64
    cdef bint ams = max_exp_avg_sqs is not None
    cdef tuple ops = (params, out, grads, exp_avgs, exp_avg_sqs)
    if ams:
        ops = ops + (max_exp_avg_sqs,)
    if f64:
        a64.clip, a64.gscale = clip, gscale
        a64.weight_decay, a64.decay = weight_decay, decay
        a64.one_minus_beta1, a64.beta2, a64.one_minus_beta2 = one_minus_beta1, beta2, one_minus_beta2
        a64.bias_correction2_sqrt, a64.eps, a64.neg_step_size = bias_correction2_sqrt, eps, neg_step_size
        a64.lerp_hi = lerp_hi
        run(fo_cpu_adam_amsgrad_f64 if ams else fo_cpu_adam_f64, ops, 8, &a64, n_threads)
    else:
        a32.clip, a32.gscale = clip, gscale
        a32.weight_decay, a32.decay = weight_decay, decay
        a32.one_minus_beta1, a32.beta2, a32.one_minus_beta2 = one_minus_beta1, beta2, one_minus_beta2
        a32.bias_correction2_sqrt, a32.eps, a32.neg_step_size = bias_correction2_sqrt, eps, neg_step_size
        a32.lerp_hi = lerp_hi
        run(fo_cpu_adam_amsgrad_f32 if ams else fo_cpu_adam_f32, ops, 4, &a32, n_threads)


def norm_partials(list grads, bint f64, int kind, int n_threads):
    """Each chunk's partial of the gradient norm (fastopt/reduce.h), as float64 array."""
    import numpy as np
    cdef Plan pl
    cdef cnp.ndarray out
    cdef double *o
    cdef Py_ssize_t c, t, lo
    plan_init(&pl, (grads,), 8 if f64 else 4)
    try:
        out = np.empty(pl.n_chunks, np.float64)
        o = <double *>cnp.PyArray_DATA(out)
        n_threads = min(n_threads, pl.n_elements // MIN_PER_THREAD)
        with nogil:
            for c in prange(pl.n_chunks, num_threads=max(n_threads, 1), schedule='static'):
                t = pl.chunk[3 * c]
                lo = pl.chunk[3 * c + 1]
                if f64:
                    o[c] = fo_norm_chunk_f64(<double *>pl.ptr[t] + lo, pl.chunk[3 * c + 2], kind)
                else:
                    o[c] = fo_norm_chunk_f32(<float *>pl.ptr[t] + lo, pl.chunk[3 * c + 2], kind)
    finally:
        plan_free(&pl)
    return out

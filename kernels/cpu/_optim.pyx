# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Optimizer update rules on the CPU: C loops from optim_loops.h, driven over many tensors.

Low-level entry points for fastopt._backends._cython: arguments are already validated, the
scalars already computed on the host (fastopt.optim._scalars). `f64` selects float64.
"""

include "_plan.pxi"

cdef extern from "optim_loops.h" nogil:
    ctypedef struct fo_sgd_args_f32:
        float gsign, weight_decay, momentum, one_minus_dampening, neg_lr
        int first, nesterov
    ctypedef struct fo_sgd_args_f64:
        double gsign, weight_decay, momentum, one_minus_dampening, neg_lr
        int first, nesterov
    ctypedef struct fo_adam_args_f32:
        float gsign, weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2
        float bias_correction2_sqrt, eps, neg_step_size
        int lerp_hi
    ctypedef struct fo_adam_args_f64:
        double gsign, weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2
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
        double gsign, double weight_decay, double momentum, double one_minus_dampening,
        double neg_lr, bint first, bint nesterov, int n_threads):
    """One SGD step; `momentum_buffers` is None without momentum."""
    cdef fo_sgd_args_f32 a32
    cdef fo_sgd_args_f64 a64
    cdef tuple ops = (params, out, grads) if momentum_buffers is None else (
        params, out, grads, momentum_buffers)
    cdef bint mom = momentum_buffers is not None
    if f64:
        a64.gsign, a64.weight_decay, a64.momentum = gsign, weight_decay, momentum
        a64.one_minus_dampening, a64.neg_lr = one_minus_dampening, neg_lr
        a64.first, a64.nesterov = first, nesterov
        run(fo_cpu_sgd_momentum_f64 if mom else fo_cpu_sgd_f64, ops, 8, &a64, n_threads)
    else:
        a32.gsign, a32.weight_decay, a32.momentum = gsign, weight_decay, momentum
        a32.one_minus_dampening, a32.neg_lr = one_minus_dampening, neg_lr
        a32.first, a32.nesterov = first, nesterov
        run(fo_cpu_sgd_momentum_f32 if mom else fo_cpu_sgd_f32, ops, 4, &a32, n_threads)


def adam(list params, list out, list grads, list exp_avgs, list exp_avg_sqs,
         list max_exp_avg_sqs, bint f64, *, double gsign, double weight_decay, double decay,
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
        a64.gsign, a64.weight_decay, a64.decay = gsign, weight_decay, decay
        a64.one_minus_beta1, a64.beta2, a64.one_minus_beta2 = one_minus_beta1, beta2, one_minus_beta2
        a64.bias_correction2_sqrt, a64.eps, a64.neg_step_size = bias_correction2_sqrt, eps, neg_step_size
        a64.lerp_hi = lerp_hi
        run(fo_cpu_adam_amsgrad_f64 if ams else fo_cpu_adam_f64, ops, 8, &a64, n_threads)
    else:
        a32.gsign, a32.weight_decay, a32.decay = gsign, weight_decay, decay
        a32.one_minus_beta1, a32.beta2, a32.one_minus_beta2 = one_minus_beta1, beta2, one_minus_beta2
        a32.bias_correction2_sqrt, a32.eps, a32.neg_step_size = bias_correction2_sqrt, eps, neg_step_size
        a32.lerp_hi = lerp_hi
        run(fo_cpu_adam_amsgrad_f32 if ams else fo_cpu_adam_f32, ops, 4, &a32, n_threads)

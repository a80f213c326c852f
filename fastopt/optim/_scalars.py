"""Host-side scalars of each rule: computed once per step in float64 (Python floats).

The compiled backends (Cython, Numba, CuPy) pass these to their kernels, which cast them to
the parameter's dtype; kernels never compute powers such as beta**t. The NumPy reference
derives the same quantities itself, written as the textbook update.
"""

import numpy as np


def grad_scalars(grad_scale, grad_clip, maximize):
    """The gradient prologue shared by every rule: clamp bound and signed scale factor."""
    return dict(clip=float(grad_clip), gscale=-grad_scale if maximize else grad_scale)


def sgd_scalars(dtype, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first,
                grad_scale, grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=float(weight_decay),
                momentum=float(momentum), one_minus_dampening=1.0 - dampening,
                neg_lr=-float(lr), first=bool(first), nesterov=bool(nesterov))


def adam_scalars(dtype, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                 grad_scale, grad_clip):
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    one_minus_beta1 = 1 - beta1
    return dict(
        **grad_scalars(grad_scale, grad_clip, maximize),
        weight_decay=0.0 if decoupled else float(weight_decay),
        decay=1 - lr * weight_decay if decoupled else 1.0,
        one_minus_beta1=one_minus_beta1,
        beta2=float(beta2),
        one_minus_beta2=1 - beta2,
        bias_correction2_sqrt=bias_correction2 ** 0.5,
        eps=float(eps),
        neg_step_size=-(lr / bias_correction1),
        # torch picks its lerp formula on the weight as cast to the tensor's dtype
        lerp_hi=bool(abs(np.dtype(dtype).type(one_minus_beta1)) >= 0.5),
    )

"""Host-side scalars of each rule: computed once per step in float64 (Python floats).

The compiled backends (Cython, Numba, CuPy) pass these to their kernels, which cast them to
the parameter's dtype; kernels never compute powers such as beta**t. The NumPy reference
derives the same quantities itself, written as the textbook update.

Each function returns the fields of the rule's fo_<rule>_args struct (fastopt/optim.h): the
real-valued fields as floats, the flags as bools. The learning rate, the step count and the
numeric hyperparameters enter through arithmetic only, so that they may also be traced JAX
values (a schedule's learning rate inside jax.jit, optax.inject_hyperparams' values): then
the fields are traced values too. Their order is the struct's, as the rule
table lists it (fastopt._rules.Args); tests/test_kernels.py checks that the table, these
functions and the C header agree.
"""

import math

import numpy as np


def _real(x):
    """A hyperparameter as a Python float; a JAX value as it is (fastopt.jax traces the
    hyperparameters that optax.inject_hyperparams injects)."""
    return x if hasattr(x, "aval") else float(x)


def _sqrt(x):
    """math.sqrt of a number; of a JAX value (fastopt.jax's traced step count enters here),
    which math.sqrt refuses, its power 0.5."""
    return x ** 0.5 if hasattr(x, "aval") else math.sqrt(x)


def grad_scalars(grad_scale, grad_clip, maximize):
    """The gradient prologue shared by every rule: clamp bound and signed scale factor."""
    return dict(clip=_real(grad_clip), gscale=-grad_scale if maximize else grad_scale)


def sgd_scalars(dtype, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first,
                grad_scale, grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay),
                momentum=_real(momentum), one_minus_dampening=1.0 - dampening,
                neg_lr=-lr, first=bool(first), nesterov=bool(nesterov))


def adam_scalars(dtype, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                 grad_scale, grad_clip):
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    one_minus_beta1 = 1 - beta1
    return dict(
        **grad_scalars(grad_scale, grad_clip, maximize),
        weight_decay=0.0 if decoupled else _real(weight_decay),
        decay=1 - lr * weight_decay if decoupled else 1.0,
        one_minus_beta1=one_minus_beta1,
        beta2=_real(beta2),
        one_minus_beta2=1 - beta2,
        bias_correction2_sqrt=bias_correction2 ** 0.5,
        eps=_real(eps),
        neg_step_size=-(lr / bias_correction1),
        lerp_hi=_lerp_hi(dtype, one_minus_beta1),
    )


def _lerp_hi(dtype, weight):
    """torch picks its lerp formula on the weight as cast to the tensor's dtype (a traced
    JAX weight gives a traced flag)."""
    if hasattr(weight, "aval"):
        return abs(weight.astype(dtype)) >= 0.5
    return bool(abs(np.dtype(dtype).type(weight)) >= 0.5)


def _decoupled(lr, weight_decay, decoupled):
    """(L2 coefficient added to the gradient, factor applied to the parameter)."""
    if decoupled:
        return 0.0, 1 - lr * weight_decay
    return _real(weight_decay), 1.0


def adagrad_scalars(dtype, *, step, lr, lr_decay, weight_decay, eps, maximize, grad_scale,
                    grad_clip, eps_root=0.0):
    """`eps_root`: added under the square root (optax's eps; torch's Adagrad has none)."""
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay),
                neg_clr=-(lr / (1 + (step - 1) * lr_decay)), eps=_real(eps),
                eps_root=_real(eps_root))


def rmsprop_scalars(dtype, *, lr, alpha, eps, weight_decay, momentum, centered, maximize,
                    grad_scale, grad_clip, eps_root=0.0, lr_in_trace=False):
    """`eps_root`: added under the square root (optax's eps by default; torch's RMSprop has
    none); `lr_in_trace`: the momentum buffer accumulates the updates scaled by -lr and is
    added to the parameter (optax's trace after its learning rate), rather than the buffer
    of the unscaled updates times -lr (torch's). Only the momentum kernels take it."""
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay), alpha=_real(alpha),
                one_minus_alpha=1 - alpha, eps=_real(eps), momentum=_real(momentum),
                neg_lr=1.0 if lr_in_trace else -lr, eps_root=_real(eps_root),
                trace_scale=-lr if lr_in_trace else 1.0, lerp_hi=_lerp_hi(dtype, 1 - alpha))


def adadelta_scalars(dtype, *, lr, rho, eps, weight_decay, maximize, grad_scale, grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay), rho=_real(rho), one_minus_rho=1 - rho,
                eps=_real(eps), neg_lr=-lr)


def adamax_scalars(dtype, *, step, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                   grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay), one_minus_beta1=1 - beta1,
                beta2=_real(beta2), eps=_real(eps), neg_clr=-(lr / (1 - beta1 ** step)),
                lerp_hi=_lerp_hi(dtype, 1 - beta1))


def nadam_coefficients(step, mu_product, *, beta1, momentum_decay):
    """(mu_t, mu_{t+1}, mu_product after step t) as torch computes them; torch keeps the
    running product as a float32 tensor, so it is rounded to float32 here too."""
    f32 = np.float32
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    return mu, mu_next, float(f32(mu_product) * f32(mu))


def nadam_scalars(dtype, *, step, mu_product, lr, beta1, beta2, eps, weight_decay,
                  momentum_decay, decoupled, maximize, grad_scale, grad_clip):
    """`mu_product` is the state's running product after this step's update."""
    mu, mu_next, _ = nadam_coefficients(step, 1.0, beta1=beta1, momentum_decay=momentum_decay)
    wd, decay = _decoupled(lr, weight_decay, decoupled)
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=wd, decay=decay, one_minus_beta1=1 - beta1, beta2=_real(beta2),
                one_minus_beta2=1 - beta2, bias_correction2=1 - beta2 ** step, eps=_real(eps),
                grad_coef=-lr * (1.0 - mu) / (1.0 - mu_product),
                avg_coef=(-lr * mu_next) / (1.0 - mu_product * mu_next),
                lerp_hi=_lerp_hi(dtype, 1 - beta1))


def radam_rectification(step, beta2):
    """(rectify?, r_t) of RAdam at step t, as torch computes them."""
    bias_correction2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    if rho_t > 5.0:
        return True, ((rho_t - 4) * (rho_t - 2) * rho_inf
                      / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    return False, 1.0


def radam_scalars(dtype, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                  grad_scale, grad_clip):
    wd, decay = _decoupled(lr, weight_decay, decoupled)
    rectify, rect = radam_rectification(step, beta2)
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=wd, decay=decay, one_minus_beta1=1 - beta1, beta2=_real(beta2),
                one_minus_beta2=1 - beta2, bias_correction1=1 - beta1 ** step, lr=lr,
                bias_correction2_sqrt=(1 - beta2 ** step) ** 0.5, eps=_real(eps), rect=rect,
                lerp_hi=_lerp_hi(dtype, 1 - beta1), rectify=rectify)


def adopt_scalars(dtype, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, clip_value,
                  maximize, grad_scale, grad_clip):
    """ADOPT's fields; `clip_value` is clip_lambda(step - 1), None for no clipping."""
    decoupled = bool(decoupled) and weight_decay != 0
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=0.0 if decoupled else _real(weight_decay),
                neg_lr_wd=-lr * weight_decay if decoupled else 0.0, eps=_real(eps),
                clamp=math.inf if clip_value is None else clip_value,
                one_minus_beta1=1 - beta1, neg_lr=-lr, beta2=_real(beta2),
                one_minus_beta2=1 - beta2, lerp_hi=_lerp_hi(dtype, 1 - beta1),
                first=step == 1, decoupled=decoupled)


def lion_scalars(dtype, *, lr, beta1, beta2, weight_decay, maximize, grad_scale, grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                beta1=_real(beta1), one_minus_beta1=1 - beta1, beta2=_real(beta2),
                one_minus_beta2=1 - beta2, weight_decay=_real(weight_decay), neg_lr=-lr)


def rprop_scalars(dtype, *, etaminus, etaplus, step_size_min, step_size_max, maximize,
                  grad_scale, grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                etaminus=_real(etaminus), etaplus=_real(etaplus),
                step_size_min=_real(step_size_min), step_size_max=_real(step_size_max))


def asgd_scalars(dtype, *, eta, mu, lambd, weight_decay, maximize, grad_scale, grad_clip):
    """eta and mu: the values torch keeps in float32 tensors, as Python floats (or as
    traced values: fastopt.jax computes them from the step count)."""
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay), decay=1 - lambd * eta, neg_eta=-eta,
                mu=mu, average=mu != 1)


def asgd_next(lr, lambd, alpha, t0, step):
    """(eta, mu) after step `step`, rounded to float32 as torch's state tensors hold them."""
    f32 = np.float32
    return (float(f32(lr / ((1 + lambd * lr * step) ** alpha))),
            float(f32(1 / max(1, step - t0))))


def ademamix_scalars(dtype, *, step, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                     maximize, grad_scale, grad_clip):
    """`beta3` and `alpha`: this step's (after warmup, ademamix_warmup), Python floats or
    traced values (fastopt.jax's schedules)."""
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                beta1=_real(beta1), one_minus_beta1=1 - beta1, beta3=beta3,
                one_minus_beta3=1 - beta3, beta2=_real(beta2), one_minus_beta2=1 - beta2,
                bias_correction1=1 - beta1 ** step,
                bias_correction2_sqrt=_sqrt(1 - beta2 ** step),
                alpha=alpha, eps=_real(eps), weight_decay=_real(weight_decay), neg_lr=-lr)


def ademamix_warmup(step, beta1, beta3, alpha, t_alpha_beta3):
    """(beta3, alpha) at `step` (from 1): the reference's linear warmup of alpha from 0 and
    of beta3's half-life from beta1's, over `t_alpha_beta3` steps (None: none)."""
    if t_alpha_beta3 is None or step >= t_alpha_beta3:
        return beta3, alpha

    def half_life(beta, eps=1e-8):
        return math.log(0.5) / math.log(beta + eps) - 1

    a = step / float(t_alpha_beta3)
    return (math.pow(0.5, 1 / ((1.0 - a) * half_life(beta1) + a * half_life(beta3) + 1)),
            a * alpha)


def adan_scalars(dtype, *, step, lr, beta1, beta2, beta3, eps, weight_decay, no_prox,
                 maximize, grad_scale, grad_clip):
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                beta1=_real(beta1), one_minus_beta1=1 - beta1, beta2=_real(beta2),
                one_minus_beta2=1 - beta2, beta3=_real(beta3), one_minus_beta3=1 - beta3,
                bias_correction3_sqrt=_sqrt(1.0 - beta3 ** step), eps=_real(eps),
                neg_step_size=-(lr / (1.0 - beta1 ** step)),
                neg_step_size_diff=-(lr * beta2 / (1.0 - beta2 ** step)),
                decay=1 - lr * weight_decay if no_prox else 1.0,
                prox=1.0 if no_prox else 1 + lr * weight_decay, first=step == 1)


def schedulefree_weights(step, lr, warmup_steps, r, weight_lr_power, lr_max, weight_sum):
    """Schedule-Free's host state at step `step` (from 1), as the reference advances it:
    (lr_k, lr_max, weight_sum, ckp1): the warmed-up learning rate, the largest so far, the
    sum of the averaging weights and this step's share of it (0 while the sum is 0)."""
    sched = step / warmup_steps if step - 1 < warmup_steps else 1.0
    lr_k = lr * sched
    lr_max = max(lr_k, lr_max)
    weight = (step ** r) * (lr_max ** weight_lr_power)
    weight_sum = weight_sum + weight
    return lr_k, lr_max, weight_sum, weight / weight_sum if weight_sum != 0 else 0.0


def sgd_schedulefree_scalars(dtype, *, lr, ckp1, momentum, weight_decay, maximize, grad_scale,
                             grad_clip):
    """`lr`: this step's warmed-up learning rate; `ckp1`: its averaging weight
    (schedulefree_weights)."""
    return dict(**grad_scalars(grad_scale, grad_clip, maximize),
                weight_decay=_real(weight_decay), ckp1=_real(ckp1),
                y_coef=lr * (momentum * (1 - ckp1) - 1), neg_lr=-lr,
                lerp_hi=_lerp_hi(dtype, ckp1))


def adamw_schedulefree_scalars(dtype, *, step, lr, ckp1, beta1, beta2, eps, weight_decay,
                               maximize, grad_scale, grad_clip):
    return dict(**sgd_schedulefree_scalars(dtype, lr=lr, ckp1=ckp1, momentum=beta1,
                                           weight_decay=weight_decay, maximize=maximize,
                                           grad_scale=grad_scale, grad_clip=grad_clip),
                beta2=_real(beta2), one_minus_beta2=1 - beta2,
                bias_correction2=1 - beta2 ** step, eps=_real(eps))


def muon_scalars(dtype, *, lr, weight_decay, momentum, nesterov, maximize, grad_scale,
                 grad_clip, **newton_schulz):
    """(momentum pass, apply pass) struct fields of Muon; the apply pass's per-tensor factor
    is -lr times muon_lr_ratio. `newton_schulz`: the iteration's arguments, which no struct
    holds."""
    update = dict(**grad_scalars(grad_scale, grad_clip, maximize),
                  one_minus_momentum=1 - momentum, momentum=_real(momentum),
                  lerp_hi=_lerp_hi(dtype, 1 - momentum), nesterov_hi=_lerp_hi(dtype, momentum),
                  nesterov=bool(nesterov))
    return update, dict(decay=1 - lr * weight_decay, scale=1.0)


def muon_lr_ratio(shape, adjust_lr_fn):
    """torch.optim.Muon's learning-rate factor for an (A, B) matrix: sqrt(max(1, A / B))
    ("original", the default) or 0.2 sqrt(max(A, B)) ("match_rms_adamw")."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols)) if cols else 1.0  # no columns: no update
    return 0.2 * math.sqrt(max(rows, cols))


def ema_scalars(dtype, *, decay):
    """The weight EMA's struct fields: torch's lerp toward the parameter by 1 - decay."""
    return dict(weight=1 - decay, lerp_hi=_lerp_hi(dtype, 1 - decay))


def prodigy_scalars(dtype, *, d, dlr, d_next, beta1, beta2, beta3, eps, weight_decay,
                    decouple, d0, safeguard_warmup, maximize, grad_scale, grad_clip, moves=True):
    """(update pass, apply pass) struct fields of Prodigy: the step's estimate `d`, `dlr` =
    d lr bc of it, and `d_next`, the estimate the update pass led to (which only the apply
    pass reads), each product as the reference computes it; `moves` False makes the apply pass
    leave the parameters as they are (a step without progress)."""
    fields = dict(**grad_scalars(grad_scale, grad_clip, maximize),
                  weight_decay=0.0 if decouple else _real(weight_decay), beta1=_real(beta1),
                  m_coef=d * (1 - beta1), beta2=_real(beta2), v_coef=d * d * (1 - beta2),
                  beta3=_real(beta3), s_coef=(d / d0) * (d if safeguard_warmup else dlr),
                  neg_decay=-weight_decay * dlr if decouple else 0.0, d_eps=d_next * eps,
                  neg_dlr=-dlr, neg_dlr_d=-dlr * d_next, moves=moves)
    return fields, fields


def tensor_sums(partials, sizes, chunk):
    """Per-tensor sums from norm_partials' per-chunk partials (of the kinds that sum: 1, 2,
    3; tensors in order, ceil(size / chunk) chunks each), each added left to right: the
    same on every backend."""
    partials = np.asarray(partials, np.float64)
    counts = -(-np.asarray(sizes, np.int64) // chunk)
    starts = np.cumsum(counts) - counts
    totals = np.zeros(len(counts))
    # the tensors of each chunk count at once: a row each, added left to right (cumsum)
    for count in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == count)
        totals[rows] = np.cumsum(partials[starts[rows, None] + np.arange(count)], axis=1)[:, -1]
    return totals.tolist()


def caution_factors(counts, sizes, dtype):
    """A cautious step's factor for each tensor of `sizes` elements where `counts` agree
    (the count pass's K): 1 / max(mean K, 1e-3) in `dtype`, the compute dtype, as timm
    computes it in the parameter's (the mean rounded to it once, then the clamp and the
    division in it), as an array of `dtype`; 1 for an empty tensor."""
    real = np.dtype(dtype).type
    counts, sizes = np.asarray(counts, np.float64), np.asarray(sizes, np.float64)
    mean = np.divide(counts, sizes, out=np.ones_like(counts), where=sizes > 0).astype(real)
    return real(1) / np.maximum(mean, real(1e-3))


def lamb_scalars(dtype, *, step, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                 grad_clip):
    """(update pass, apply pass) struct fields of Lamb."""
    update = dict(**grad_scalars(grad_scale, grad_clip, maximize),
                  beta1=_real(beta1), one_minus_beta1=1 - beta1, beta2=_real(beta2),
                  one_minus_beta2=1 - beta2, bias_correction1=1 - beta1 ** step,
                  bias_correction2=1 - beta2 ** step, eps=_real(eps),
                  weight_decay=_real(weight_decay))
    return update, dict(decay=1.0, scale=-_real(lr))


def tensor_norms(partials, sizes, chunk):
    """Per-tensor 2-norms from norm_partials' per-chunk sums of squares (tensors in order,
    ceil(size / chunk) chunks each), each added left to right: the same on every backend."""
    return [total ** 0.5 for total in tensor_sums(partials, sizes, chunk)]


def lamb_trust_ratios(param_norms, update_norms, dtype):
    """optax's trust ratio ||p|| / ||u|| per tensor, in the parameters' dtype; 1 where
    either norm is 0."""
    s = np.dtype(dtype).type
    return np.array([s(1) if s(pn) == 0 or s(un) == 0 else s(pn) / s(un)
                     for pn, un in zip(param_norms, update_norms)], dtype)


def adafactor_scalars(dtype, *, step, lr, beta2_decay, eps1, weight_decay, maximize,
                      grad_scale, grad_clip):
    """(factors and update passes, apply pass) struct fields of Adafactor. eps1 None means
    the dtype's machine epsilon, as torch."""
    eps1 = float(np.finfo(dtype).eps if eps1 is None else eps1)
    w = float(step) ** beta2_decay
    update = dict(**grad_scalars(grad_scale, grad_clip, maximize), w=w, eps1=eps1,
                  eps1_sq=eps1 * eps1, lerp_hi=_lerp_hi(dtype, w))
    decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    return update, dict(decay=decay, scale=1.0)


def adafactor_coefficients(param_norms, update_norms, sizes, dtype, *, step, lr, eps2, d):
    """Per tensor, the factor -alpha / denom that scales Adafactor's update u (torch):
    alpha = max(eps2, ||p|| / sqrt(n)) min(lr, 1 / sqrt(t)), denom = max(1, ||u|| / (sqrt(n) d))
    with ||p|| taken before weight decay. 0 for empty tensors."""
    rho = min(lr, 1 / step ** 0.5)
    coefficients = []
    for pn, un, n in zip(param_norms, update_norms, sizes):
        if n == 0:
            coefficients.append(0.0)
            continue
        alpha = max(eps2, pn / n ** 0.5) * rho
        coefficients.append(-alpha / max(1.0, un / (n ** 0.5 * d)))
    return np.array(coefficients, dtype)

"""The reference of the optimizer rules: each as plain NumPy, the spec every backend is
tested against.

Written for reading, not speed: one tensor at a time, the update exactly as torch.optim's
single-tensor (for-loop) implementation orders it, with every scalar cast to the
parameter's dtype as torch casts it (float32 math stays float32).

Operands, shared with every backend: `params` are read, the results written to `out`
(the same arrays for in-place updates); the state lists are updated in place.
"""

import math

import numpy as np

from fastopt import _scalars
from fastopt._backends import _orthogonalize
from fastopt._backends._formats import formatted
from fastopt._backends._layout import BAND, CHUNK, COLS, LANES
from fastopt._backends._masked import wrap_steps, zero_pruned


def _clip_and_scale(g, grad_clip, grad_scale):
    """clip_grad_value_ then clip_grad_norm_'s coefficient, as torch applies them to .grad"""
    s = g.dtype.type
    if grad_clip != float("inf"):
        g = np.clip(g, s(-grad_clip), s(grad_clip))
    if grad_scale != 1:
        g = g * s(grad_scale)
    return g


def norm_partials(grads, kind, *, n_threads=1):
    """Per chunk of FO_CHUNK elements (per tensor): element i goes to lane i % 16, each lane
    sums (or maxes) in index order in float64, starting from +0, then the lanes in lane
    order. (The sums in order are np.add.accumulate's last rows, over the whole chunks at
    once: it adds strictly left to right, where np.sum would add pairwise; it starts from
    the first row, so + 0.0 turns a lane of zeros' -0 into the +0 a start from +0 gives.)"""
    partials = []
    for g in grads:
        flat = g.reshape(-1).astype(np.float64)
        terms = flat * flat if kind == 2 else (flat if kind == 3 else np.abs(flat))
        whole = terms.size - terms.size % CHUNK
        pieces = [terms[:whole].reshape(-1, CHUNK // LANES, LANES)] if whole else []
        if terms.size > whole:  # the last chunk, its last row padded with zeros
            last = np.zeros(-(-(terms.size - whole) // LANES) * LANES)
            last[:terms.size - whole] = terms[whole:]
            pieces.append(last.reshape(1, -1, LANES))
        for lanes in pieces:
            if kind == 0:  # max, with NaN propagating like the kernels
                partials.append(np.max(np.max(lanes, axis=1), axis=1))
            else:
                lane = np.add.accumulate(lanes, axis=1)[:, -1] + 0.0  # each lane in order
                partials.append(np.add.accumulate(lane, axis=1)[:, -1])  # the lanes in order
    return np.concatenate(partials) if partials else np.zeros(0)


def _lerp(start, end, weight):
    # torch's lerp: the formula depends on whether |weight| < 0.5
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (weight.dtype.type(1) - weight)


def sgd_step(params, out, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, first, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    for i, (p, g) in enumerate(zip(params, grads)):
        s = p.dtype.type
        g = _clip_and_scale(g, grad_clip, grad_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + s(weight_decay) * p
        if momentum != 0:
            buf = momentum_buffers[i]
            if first:
                buf[...] = g
            else:
                buf[...] = buf * s(momentum) + s(1 - dampening) * g
            g = g + s(momentum) * buf if nesterov else buf
        out[i][...] = p + s(-lr) * g


def _adam_moments(p, g, exp_avg, exp_avg_sq, *, lr, beta1, beta2, weight_decay, decoupled,
                  maximize, grad_clip, grad_scale):
    """Adam's, NAdam's and RAdam's common start: the gradient prologue, weight decay, and
    the moments updated in place. Returns the (decayed) parameter and the gradient."""
    s = p.dtype.type
    g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
    p, g = _decay(p, g, lr, weight_decay, decoupled)
    exp_avg[...] = _lerp(exp_avg, g, s(1 - beta1))
    exp_avg_sq[...] = exp_avg_sq * s(beta2) + s(1 - beta2) * g * g
    return p, g


def _cautious(u, g, caution, masks, i):
    """The step direction u of tensor i with the cautious option (when `caution` is not
    None): u K / max(mean K, 1e-3), K = 1[u g > 0] (timm's caution=True), 0 where `masks`
    (None, or one per tensor) prunes the entry; else u."""
    if caution is None:
        return u
    agree = u * g > 0
    if masks is not None:
        agree &= masks[i].reshape(agree.shape) != 0
    k = _scalars.caution_factors([np.count_nonzero(agree)], [u.size], u.dtype)[0]
    return u * np.where(agree, k, u.dtype.type(0))


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step, lr, beta1,
              beta2, eps, weight_decay, decoupled, maximize, grad_scale=1.0,
              grad_clip=float("inf"), n_threads=1, caution=None, masks=None):
    """With `caution` (not None: the compiled backends' scratch arrays), the cautious
    step."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        s = p.dtype.type
        p, g = _adam_moments(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2,
                             weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                             grad_clip=grad_clip, grad_scale=grad_scale)
        if max_exp_avg_sqs is not None:
            np.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = np.sqrt(v) / s(bias_correction2_sqrt) + s(eps)
        out[i][...] = p + s(-step_size) * _cautious(m, g, caution, masks, i) / denom
    _zero_pruned(masks, out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)


def _sign(x):
    # -1, 1, or x itself for zeros and NaN (jnp.sign's values, zero signs kept as the kernels)
    return np.where(x > 0, x.dtype.type(1), np.where(x < 0, x.dtype.type(-1), x))


def _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay):
    """The gradient as torch's single-tensor loop sees it: clipped, negated if maximizing,
    plus L2 weight decay."""
    g = _clip_and_scale(g, grad_clip, grad_scale)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + p.dtype.type(weight_decay) * p
    return g


def adagrad_step(params, out, grads, state_sums, *, step, lr, lr_decay, weight_decay, eps,
                 maximize, eps_root=0.0, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    clr = lr / (1 + (step - 1) * lr_decay)
    for i, (p, g, state_sum) in enumerate(zip(params, grads, state_sums)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        state_sum[...] = state_sum + g * g
        std = np.sqrt(state_sum + s(eps_root)) + s(eps)
        out[i][...] = p + s(-clr) * g / std


def rmsprop_step(params, out, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha,
                 eps, weight_decay, momentum, centered, maximize, eps_root=0.0, lr_in_trace=False,
                 grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    for i, (p, g, square_avg) in enumerate(zip(params, grads, square_avgs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        square_avg[...] = square_avg * s(alpha) + s(1 - alpha) * g * g
        if centered:
            grad_avgs[i][...] = _lerp(grad_avgs[i], g, s(1 - alpha))
            avg = np.sqrt(square_avg + s(-1) * grad_avgs[i] * grad_avgs[i] + s(eps_root))
        else:
            avg = np.sqrt(square_avg + s(eps_root))
        avg = avg + s(eps)
        if momentum > 0:
            buf = momentum_buffers[i]
            buf[...] = buf * s(momentum) + g / avg * s(-lr if lr_in_trace else 1.0)
            out[i][...] = p + s(1.0 if lr_in_trace else -lr) * buf
        else:
            out[i][...] = p + s(-lr) * g / avg


def adadelta_step(params, out, grads, square_avgs, acc_deltas, *, lr, rho, eps, weight_decay,
                  maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    for i, (p, g, square_avg, acc_delta) in enumerate(zip(params, grads, square_avgs, acc_deltas)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        square_avg[...] = square_avg * s(rho) + s(1 - rho) * g * g
        std = np.sqrt(square_avg + s(eps))
        delta = np.sqrt(acc_delta + s(eps)) / std * g
        acc_delta[...] = acc_delta * s(rho) + s(1 - rho) * delta * delta
        out[i][...] = p + s(-lr) * delta


def adamax_step(params, out, grads, exp_avgs, exp_infs, *, step, lr, beta1, beta2, eps,
                weight_decay, maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    clr = lr / (1 - beta1 ** step)
    for i, (p, g, exp_avg, exp_inf) in enumerate(zip(params, grads, exp_avgs, exp_infs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        exp_avg[...] = _lerp(exp_avg, g, s(1 - beta1))
        np.maximum(exp_inf * s(beta2), np.abs(g) + s(eps), out=exp_inf)
        out[i][...] = p + s(-clr) * exp_avg / exp_inf


def _decay(p, g, lr, weight_decay, decoupled):
    """Decoupled (p shrinks by 1 - lr wd) or L2 (wd p joins the gradient) weight decay."""
    if weight_decay != 0:
        if decoupled:
            p = p * p.dtype.type(1 - lr * weight_decay)
        else:
            g = g + p.dtype.type(weight_decay) * p
    return p, g


def nadam_step(params, out, grads, exp_avgs, exp_avg_sqs, *, step, mu_product, lr, beta1,
               beta2, eps, weight_decay, momentum_decay, decoupled, maximize, grad_scale=1.0,
               grad_clip=float("inf"), n_threads=1):
    """`mu_product` is the running product of mu_1..mu_t, after this step's factor."""
    bias_correction2 = 1 - beta2 ** step
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    for i, (p, g, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        s = p.dtype.type
        p, g = _adam_moments(p, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                             weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                             grad_clip=grad_clip, grad_scale=grad_scale)
        denom = np.sqrt(exp_avg_sq / s(bias_correction2)) + s(eps)
        p = p + s(-lr * (1.0 - mu) / (1.0 - mu_product)) * g / denom
        out[i][...] = p + s((-lr * mu_next) / (1.0 - mu_product * mu_next)) * exp_avg / denom


def radam_step(params, out, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
               weight_decay, decoupled, maximize, grad_scale=1.0, grad_clip=float("inf"),
               n_threads=1):
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    for i, (p, g, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        s = p.dtype.type
        p, g = _adam_moments(p, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                             weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                             grad_clip=grad_clip, grad_scale=grad_scale)
        update = exp_avg / s(bias_correction1) * s(lr)
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            adaptive_lr = s(bias_correction2 ** 0.5) / (np.sqrt(exp_avg_sq) + s(eps))
            update = update * adaptive_lr * s(rect)
        out[i][...] = p + s(-1) * update


def adopt_step(params, out, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
               weight_decay, decoupled, clip_value, maximize, grad_scale=1.0,
               grad_clip=float("inf"), n_threads=1, caution=None, masks=None):
    """ADOPT as torch-adopt's single-tensor loop; `clip_value` is clip_lambda(step - 1)
    (None: no clipping); `caution` as adam_step's."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0 if decoupled else weight_decay)
        if step == 1:  # the first step only initializes v
            v[...] = v + g * g
            out[i][...] = p
            continue
        if decoupled and weight_decay != 0:
            p = p + s(-lr * weight_decay) * p
        normed = g / np.maximum(np.sqrt(v), s(eps))  # NaN propagates, as torch.clamp
        if clip_value is not None:
            normed = np.clip(normed, s(-clip_value), s(clip_value))
        m[...] = _lerp(m, normed, s(1 - beta1))
        out[i][...] = p + s(-lr) * _cautious(m, g, caution, masks, i)
        v[...] = v * s(beta2) + s(1 - beta2) * g * g
    _zero_pruned(masks, out, exp_avgs, exp_avg_sqs)


def lion_step(params, out, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize,
              grad_scale=1.0, grad_clip=float("inf"), n_threads=1, caution=None, masks=None):
    """`caution` as adam_step's: the sign is the step direction it masks."""
    for i, (p, g, exp_avg) in enumerate(zip(params, grads, exp_avgs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        update = _cautious(_sign(s(1 - beta1) * g + s(beta1) * exp_avg), g, caution, masks, i)
        exp_avg[...] = s(1 - beta2) * g + s(beta2) * exp_avg
        out[i][...] = p + s(-lr) * (update + s(weight_decay) * p)
    _zero_pruned(masks, out, exp_avgs)


def _torch_sign(x):
    """torch.sign: -1, 1, or 0 for zeros and NaN."""
    one = x.dtype.type(1)
    return np.where(x > 0, one, np.where(x < 0, -one, x.dtype.type(0)))


def rprop_step(params, out, grads, prevs, step_sizes, *, etaminus, etaplus, step_size_min,
               step_size_max, maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    for i, (p, g, prev, step_size) in enumerate(zip(params, grads, prevs, step_sizes)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        sign = _torch_sign(g * prev)
        factor = np.where(sign > 0, s(etaplus), np.where(sign < 0, s(etaminus), s(1)))
        # torch.clamp_: NaN passes
        step_size[...] = np.minimum(np.maximum(step_size * factor, s(step_size_min)),
                                    s(step_size_max))
        g = np.where(factor == s(etaminus), s(0), g)
        prev[...] = g
        out[i][...] = p + (s(-1) * _torch_sign(g)) * step_size


def asgd_step(params, out, grads, axs, *, eta, mu, lambd, weight_decay, maximize,
              grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    """`eta`, `mu`: this step's values (torch's per-parameter float32 tensors, before it
    writes the next ones)."""
    for i, (p, g, ax) in enumerate(zip(params, grads, axs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        p = p * s(1 - lambd * eta)
        p = p + s(-eta) * g
        ax[...] = ax + (p - ax) * s(mu) if mu != 1 else p
        out[i][...] = p


def ademamix_step(params, out, grads, fasts, slows, sqs, *, step, lr, beta1, beta2, beta3,
                  alpha, eps, weight_decay, maximize, grad_scale=1.0, grad_clip=float("inf"),
                  n_threads=1, caution=None, masks=None):
    """`fasts` None when beta1 is 0 (the first moment is then the gradient itself);
    `beta3`, `alpha`: this step's; `caution` as adam_step's, on the update's numerator."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    for i, (p, g, slow, sq) in enumerate(zip(params, grads, slows, sqs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        if fasts is None:
            fast = g
        else:
            fast = fasts[i]
            fast[...] = fast * s(beta1) + s(1 - beta1) * g
        slow[...] = slow * s(beta3) + s(1 - beta3) * g
        sq[...] = sq * s(beta2) + s(1 - beta2) * g * g
        denom = np.sqrt(sq) / s(math.sqrt(bias_correction2)) + s(eps)
        update = _cautious(fast / s(bias_correction1) + s(alpha) * slow, g, caution, masks,
                           i) / denom
        update = update + s(weight_decay) * p
        out[i][...] = p + s(-lr) * update
    _zero_pruned(masks, out, fasts, slows, sqs)


def adan_step(params, out, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, *,
              step, lr, beta1, beta2, beta3, eps, weight_decay, no_prox, maximize,
              grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    """`neg_pre_grads` hold minus the previous gradient (at the first step the difference
    of the gradients is 0)."""
    step_size = lr / (1.0 - beta1 ** step)
    step_size_diff = lr * beta2 / (1.0 - beta2 ** step)
    bias_correction3_sqrt = math.sqrt(1.0 - beta3 ** step)
    for i, (p, g, m, n, diff, neg_pre) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs,
                                                        exp_avg_diffs, neg_pre_grads)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        d = (-g if step == 1 else neg_pre) + g
        m[...] = m * s(beta1) + s(1 - beta1) * g
        diff[...] = diff * s(beta2) + s(1 - beta2) * d
        d = d * s(beta2) + g
        n[...] = n * s(beta3) + s(1 - beta3) * d * d
        denom = np.sqrt(n) / s(bias_correction3_sqrt) + s(eps)
        if no_prox:
            p = p * s(1 - lr * weight_decay)
        p = p + s(-step_size) * m / denom
        p = p + s(-step_size_diff) * diff / denom
        if not no_prox:
            p = p / s(1 + lr * weight_decay)
        neg_pre[...] = s(0) + s(-1) * g
        out[i][...] = p


def lamb_step(params, out, grads, exp_avgs, exp_avg_sqs, updates, *, step, lr, beta1, beta2, eps,
              weight_decay, maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1,
              masks=None):
    """`updates` are scratch buffers shaped like the parameters (their contents are
    overwritten with the Adam-style update before it is scaled by the trust ratio).
    Pruned entries (`masks`) of the update and the state are zeroed before the norms."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    for p, g, m, v, u in zip(params, grads, exp_avgs, exp_avg_sqs, updates):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        m[...] = s(1 - beta1) * g + s(beta1) * m
        v[...] = s(1 - beta2) * (g * g) + s(beta2) * v
        u[...] = m / s(bias_correction1) / (np.sqrt(v / s(bias_correction2)) + s(eps))
        u[...] = u + s(weight_decay) * p
    _zero_pruned(masks, updates, exp_avgs, exp_avg_sqs)
    # per-tensor norms in the fixed summation order that every backend shares
    sizes = [p.size for p in params]
    ratios = _scalars.lamb_trust_ratios(
        _scalars.tensor_norms(norm_partials(params, 2), sizes, CHUNK),
        _scalars.tensor_norms(norm_partials(updates, 2), sizes, CHUNK), params[0].dtype)
    for i, (p, u) in enumerate(zip(params, updates)):
        s = p.dtype.type
        out[i][...] = p + s(-lr) * (u * ratios[i])
    _zero_pruned(masks, out)


def muon_step(params, out, grads, bufs, updates, *, lr, weight_decay, momentum, nesterov,
              ns_coefficients, ns_steps, eps, adjust_lr_fn, ns_dtype, maximize,
              grad_scale=1.0, grad_clip=float("inf"), n_threads=1, masks=None):
    """torch.optim.Muon's single-tensor loop; `updates` are scratch buffers shaped like the
    parameters (the momentum pass writes the update to orthogonalize there). The
    Newton-Schulz iteration is fastopt._backends._orthogonalize's, in `ns_dtype`."""
    for p, g, b, u in zip(params, grads, bufs, updates):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        b[...] = _lerp(b, g, s(1 - momentum))
        u[...] = _lerp(g, b, s(momentum)) if nesterov else b
    _zero_pruned(masks, updates, bufs)
    orthogonal = _orthogonalize.orthogonalized(updates, lambda arrays: norm_partials(arrays, 2),
                                               ns_coefficients, ns_steps, eps, ns_dtype)
    for i, (p, o) in enumerate(zip(params, orthogonal)):
        s = p.dtype.type
        p = p * s(1 - lr * weight_decay)
        out[i][...] = p + o * s(-lr * _scalars.muon_lr_ratio(p.shape, adjust_lr_fn))
    _zero_pruned(masks, out)


def prodigy_step(params, out, grads, s_list, p0_list, m_list, v_list, terms, *, phase, d, dlr,
                 d_next, beta1, beta2, beta3, eps, weight_decay, decouple, d0,
                 safeguard_warmup, maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1,
                 masks=None):
    """One pass of prodigyopt 1.1.2's step (its two loops over the parameters), with `d`
    and `dlr` the step's estimate and d lr bc; phase "update" writes g (p0 - p) to `terms`
    and returns the per-tensor sums (of g . (p0 - p), of |s|); "apply" takes `d_next`.
    `m_list` None when beta1 is 0."""
    coupled = 0.0 if decouple else weight_decay
    sizes = [p.size for p in params]
    for i, (p, g) in enumerate(zip(params, grads)):
        t = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, coupled)
        v = v_list[i]
        if phase == "update":
            terms[i][...] = g * (p0_list[i] - p)
            if m_list is not None:
                m_list[i][...] = m_list[i] * t(beta1) + t(d * (1 - beta1)) * g
            v[...] = v * t(beta2) + t(d * d * (1 - beta2)) * g * g
            s = s_list[i]
            s[...] = s * t(beta3) + t((d / d0) * (d if safeguard_warmup else dlr)) * g
            continue
        denom = np.sqrt(v) + t(d_next * eps)
        neg_decay = -weight_decay * dlr if decouple else 0.0
        if neg_decay != 0:
            p = p + t(neg_decay) * p
        if m_list is not None:
            out[i][...] = p + t(-dlr) * (m_list[i] / denom)
        else:
            out[i][...] = p + t(-dlr * d_next) * (g / denom)
    if phase == "update":
        _zero_pruned(masks, terms, s_list, p0_list, v_list, *([m_list] if m_list else []))
        return (_scalars.tensor_sums(norm_partials(terms, 3), sizes, CHUNK),
                _scalars.tensor_sums(norm_partials(s_list, 1), sizes, CHUNK))
    _zero_pruned(masks, out)
    return None


def _zero_pruned(masks, *lists):
    """Pruned entries (mask byte 0) of tensor t set to +0 in each list's array t (a list
    None: an optional state that is off)."""
    for t, mask in enumerate(masks or ()):
        zero_pruned(mask, [arrays[t] for arrays in lists if arrays is not None])


def factored_sums(g2):
    """Row and column sums of a (B, R, C) float64 array of squares, in fastopt/reduce.h's
    fixed order: a row is cut into blocks of FO_COLS columns, each summed in 16 lanes like a
    norm chunk, and the blocks are added in order; a column adds the rows of each band of
    FO_BAND rows in order, and the bands in order."""
    B, R, C = g2.shape
    n_bands = -(-R // BAND)
    rows = np.zeros((B, n_bands * BAND, C))
    rows[:, :R] = g2  # zeros added to a band's sum change nothing
    bands = np.add.accumulate(rows.reshape(B, n_bands, BAND, C), axis=2)[:, :, -1]
    col = np.add.accumulate(bands, axis=1)[:, -1]
    n_blocks = -(-C // COLS)
    padded = np.zeros((B, R, n_blocks * COLS))
    padded[..., :C] = g2  # zeros added to a lane change nothing
    groups = padded.reshape((B, R, n_blocks, COLS // LANES, LANES))
    lanes = np.zeros((B, R, n_blocks, LANES))
    for k in range(COLS // LANES):  # each lane in index order
        lanes += groups[..., k, :]
    blocks = lanes[..., 0]
    for lane in range(1, LANES):
        blocks = blocks + lanes[..., lane]
    row = blocks[..., 0]
    for k in range(1, n_blocks):
        row = row + blocks[..., k]
    return row, col


def adafactor_step(params, out, grads, row_vars, col_vars, variances, updates, *, step, lr,
                   beta2_decay, eps1, eps2, d, weight_decay, maximize, grad_scale=1.0,
                   grad_clip=float("inf"), n_threads=1, masks=None):
    """Tensors of 2+ dims use (row_vars[i], col_vars[i]), shaped (..., R, 1) and (..., 1, C);
    the others variances[i]. `updates` are scratch buffers shaped like the parameters.
    Pruned entries (`masks`) of the update (before its norm), of the variance of a vector
    and of the parameter are zeroed; the row and column factors see the gradient as given."""
    rho = min(lr, 1 / step ** 0.5)
    w = step ** beta2_decay
    for i, (p, g, u) in enumerate(zip(params, grads, updates)):
        s = p.dtype.type
        e1 = np.finfo(p.dtype).eps if eps1 is None else eps1
        if p.size == 0:
            continue
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        alpha = max(eps2, _tensor_norm(p) / p.size ** 0.5) * rho
        if p.ndim > 1:
            rows, cols = p.shape[-2:]
            g3 = g.reshape(-1, rows, cols)
            g2 = g3.astype(np.float64)
            row_sum, col_sum = factored_sums(g2 * g2)
            row_var = row_vars[i].reshape(-1, rows)
            col_var = col_vars[i].reshape(-1, cols)
            row_var[...] = _lerp(row_var, (row_sum / cols).astype(p.dtype), s(w))
            col_var[...] = _lerp(col_var, (col_sum / rows).astype(p.dtype), s(w))
            row_mean = np.add.accumulate(row_var.astype(np.float64), axis=1)[:, -1] / rows
            row_mean = np.maximum(row_mean.astype(p.dtype), s(e1))
            var = row_var[:, :, None] * col_var[:, None, :] / row_mean[:, None, None]
            var = var.reshape(p.shape)
        else:
            variances[i][...] = _lerp(variances[i], g * g, s(w))
            var = variances[i]
        u[...] = s(1) / np.sqrt(np.maximum(var, s(e1 * e1))) * g
        if masks is not None:
            zero_pruned(masks[i], [u, variances[i]])
        denom = max(1.0, _tensor_norm(u) / (p.size ** 0.5 * d))
        p = p * s(1 - lr * weight_decay) if weight_decay != 0 else p
        out[i][...] = p + s(-alpha / denom) * u
    _zero_pruned(masks, out)


def sgd_schedulefree_step(params, out, grads, zs, *, lr, ckp1, momentum, weight_decay,
                          maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    """`lr`: this step's warmed-up learning rate; `ckp1`: its weight in the average
    (fastopt._scalars.schedulefree_weights). The parameters hold y."""
    for i, (p, g, z) in enumerate(zip(params, grads, zs)):
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        out[i][...] = _schedulefree_tail(p, g, z, lr, ckp1, momentum, weight_decay)


def adamw_schedulefree_step(params, out, grads, zs, exp_avg_sqs, *, step, lr, ckp1, beta1,
                            beta2, eps, weight_decay, maximize, grad_scale=1.0,
                            grad_clip=float("inf"), n_threads=1):
    """As sgd_schedulefree_step, the gradient first normalized as Adam's."""
    bias_correction2 = 1 - beta2 ** step
    for i, (p, g, z, v) in enumerate(zip(params, grads, zs, exp_avg_sqs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        v[...] = v * s(beta2) + s(1 - beta2) * g * g
        g = g / (np.sqrt(v / s(bias_correction2)) + s(eps))
        out[i][...] = _schedulefree_tail(p, g, z, lr, ckp1, beta1, weight_decay)


def _schedulefree_tail(y, g, z, lr, ckp1, beta1, weight_decay):
    """Schedule-Free's step from the (normalized) gradient: z updated, the new y returned."""
    s = y.dtype.type
    if weight_decay != 0:
        g = g + s(weight_decay) * y
    y = _lerp(y, z, s(ckp1))
    y = y + s(lr * (beta1 * (1 - ckp1) - 1)) * g
    z[...] = z + s(-lr) * g
    return y


def ema_update(averages, params, *, decay, n_threads=1, masks=None):
    """The weight EMA, as torch.optim.swa_utils.get_ema_multi_avg_fn: each average lerped
    toward its parameter by 1 - decay, in place."""
    for e, p in zip(averages, params):
        e[...] = _lerp(e, p, e.dtype.type(1 - decay))
    _zero_pruned(masks, averages)


def _tensor_norm(x):
    """The 2-norm of one tensor, from its chunk partials added in order (as every backend)."""
    return _scalars.tensor_norms(norm_partials([x], 2), [x.size], CHUNK)[0]


wrap_steps(globals())  # pruning masks: the pruned entries zeroed after each elementwise step
for _name in [name for name in globals() if name.endswith("_step")]:
    globals()[_name] = formatted(globals()[_name])  # storage formats: around whole arrays

# what the package exports: every rule's step (named after its registry operation) and the norm
__all__ = ["norm_partials", "ema_update"] + [name for name in list(globals())
                                           if name.endswith("_step")]

"""The reference backend: each rule as plain NumPy, the spec every backend is tested against.

Written for reading, not speed: one tensor at a time, the update exactly as torch.optim's
single-tensor (for-loop) implementation orders it, with every scalar cast to the
parameter's dtype as torch casts it (float32 math stays float32).

Operands, shared with every backend: `params` are read, the results written to `out`
(the same arrays for in-place updates); the state lists are updated in place.
"""

import numpy as np

from fastopt import _scalars
from fastopt._backends import _numpy_compress
from fastopt._backends._layout import CHUNK, COLS, LANES, TILE
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
    sums (or maxes) in index order in float64, then the lanes in lane order."""
    partials = []
    for g in grads:
        flat = g.reshape(-1).astype(np.float64)
        terms = flat * flat if kind == 2 else np.abs(flat)
        for lo in range(0, terms.size, CHUNK):
            chunk = terms[lo:lo + CHUNK]
            lanes = np.zeros((-(-chunk.size // LANES), LANES))
            lanes.reshape(-1)[:chunk.size] = chunk
            if kind == 0:  # max, with NaN propagating like the kernels
                lane = np.max(lanes, axis=0)
                partials.append(np.max(lane))
            else:
                lane = np.zeros(LANES)
                for row in lanes:  # index order within each lane
                    lane += row
                total = lane[0]
                for value in lane[1:]:
                    total += value
                partials.append(total)
    return np.array(partials, np.float64)


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


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step, lr, beta1,
              beta2, eps, weight_decay, decoupled, maximize, grad_scale=1.0,
              grad_clip=float("inf"), n_threads=1):
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
        out[i][...] = p + s(-step_size) * m / denom


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
                 maximize, grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    clr = lr / (1 + (step - 1) * lr_decay)
    for i, (p, g, state_sum) in enumerate(zip(params, grads, state_sums)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        state_sum[...] = state_sum + g * g
        std = np.sqrt(state_sum) + s(eps)
        out[i][...] = p + s(-clr) * g / std


def rmsprop_step(params, out, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha,
                 eps, weight_decay, momentum, centered, maximize, grad_scale=1.0,
                 grad_clip=float("inf"), n_threads=1):
    for i, (p, g, square_avg) in enumerate(zip(params, grads, square_avgs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, weight_decay)
        square_avg[...] = square_avg * s(alpha) + s(1 - alpha) * g * g
        if centered:
            grad_avgs[i][...] = _lerp(grad_avgs[i], g, s(1 - alpha))
            avg = np.sqrt(square_avg + s(-1) * grad_avgs[i] * grad_avgs[i])
        else:
            avg = np.sqrt(square_avg)
        avg = avg + s(eps)
        if momentum > 0:
            buf = momentum_buffers[i]
            buf[...] = buf * s(momentum) + g / avg
            out[i][...] = p + s(-lr) * buf
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
               grad_clip=float("inf"), n_threads=1):
    """ADOPT as torch-adopt's single-tensor loop; `clip_value` is clip_lambda(step - 1)
    (None: no clipping)."""
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
        out[i][...] = p + s(-lr) * m
        v[...] = v * s(beta2) + s(1 - beta2) * g * g


def lion_step(params, out, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize,
              grad_scale=1.0, grad_clip=float("inf"), n_threads=1):
    for i, (p, g, exp_avg) in enumerate(zip(params, grads, exp_avgs)):
        s = p.dtype.type
        g = _prologue(p, g, grad_clip, grad_scale, maximize, 0.0)
        update = _sign(s(1 - beta1) * g + s(beta1) * exp_avg)
        exp_avg[...] = s(1 - beta2) * g + s(beta2) * exp_avg
        out[i][...] = p + s(-lr) * (update + s(weight_decay) * p)


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


def _zero_pruned(masks, *lists):
    """Pruned entries (mask byte 0) of tensor t set to +0 in each list's array t."""
    for t, mask in enumerate(masks or ()):
        zero_pruned(mask, [arrays[t] for arrays in lists])


def factored_sums(g2):
    """Row and column sums of a (B, R, C) float64 array of squares, in fastopt/reduce.h's
    fixed order: a column adds its rows in index order; a row is cut into blocks of FO_COLS
    columns, each summed in 16 lanes like a norm chunk, and the blocks are added in order."""
    col = np.add.accumulate(g2, axis=1)[:, -1, :]
    n_blocks = -(-g2.shape[2] // COLS)
    padded = np.zeros(g2.shape[:2] + (n_blocks * COLS,))
    padded[..., :g2.shape[2]] = g2  # zeros added to a lane change nothing
    groups = padded.reshape(g2.shape[:2] + (n_blocks, COLS // LANES, LANES))
    lanes = np.zeros(g2.shape[:2] + (n_blocks, LANES))
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


def _tensor_norm(x):
    """The 2-norm of one tensor, from its chunk partials added in order (as every backend)."""
    return _scalars.tensor_norms(norm_partials([x], 2), [x.size], CHUNK)[0]


# -- Philox-4x32-10 and the fills of fastopt.init (kernels/include/fastopt/random.h)

UNIFORM, NORMAL, TRUNC_NORMAL, BITS = 0, 1, 2, 3  # FO_RANDOM_* of fastopt/random.h
PER_GROUP = {(UNIFORM, "float32"): 4, (UNIFORM, "float64"): 2, (NORMAL, "float32"): 4,
             (NORMAL, "float64"): 2, (TRUNC_NORMAL, "float32"): 4, (TRUNC_NORMAL, "float64"): 2,
             (BITS, "uint32"): 4}
_U32 = np.uint64(0xFFFFFFFF)


def philox_rounds(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of counter (c0, c1, c2, c3) (uint64 arrays holding 32-bit words) and
    key (k0, k1) (ints): the four output words."""
    for _ in range(10):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _U32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _U32)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox(groups, stream, seed):
    """The words of counter (group, 0, stream) under key `seed` (fastopt/random.h)."""
    return philox_rounds(groups & _U32, groups >> np.uint64(32), np.zeros_like(groups),
                         np.full_like(groups, stream), seed & 0xFFFFFFFF, seed >> 32)


def _unit53(hi, lo, plus=0.0):
    return ((hi >> np.uint64(5)).astype(np.float64) * 67108864.0
            + (lo >> np.uint64(6)).astype(np.float64) + plus) * 1.1102230246251565e-16


def _horner(z, coefficients):
    acc = coefficients[-1]
    for c in coefficients[-2::-1]:
        acc = c + z * acc
    return acc


def _log(x):
    """fo_log: ln of positive normal doubles from +, -, *, / only."""
    bits = x.view(np.uint64)
    e = ((bits >> np.uint64(52)).astype(np.int64) - 1022).astype(np.float64)
    m = ((bits & np.uint64(0x000FFFFFFFFFFFFF)) | np.uint64(0x3FE0000000000000)).view(np.float64)
    low = m < 0.7071067811865476
    m = np.where(low, m + m, m)
    e = np.where(low, e - 1.0, e)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    poly = _horner(z, [1 / (2 * k + 1) for k in range(1, 11)])
    t = s + s
    return e * 0.6931471803691238 + ((t + t * (z * poly)) + e * 1.9082149292705877e-10)


_SIN = (-0.16666666666666666, 0.008333333333333333, -0.0001984126984126984,
        2.7557319223985893e-06, -2.505210838544172e-08, 1.6059043836821613e-10,
        -7.647163731819816e-13, 2.8114572543455206e-15)
_COS = (-0.5, 0.041666666666666664, -0.001388888888888889, 2.48015873015873e-05,
        -2.755731922398589e-07, 2.08767569878681e-09, -1.1470745597729725e-11,
        4.779477332387385e-14)


def _cos_sin_2pi(u):
    t = 4.0 * u
    k = (t + 0.5).astype(np.int64)
    a = (t - k) * 1.5707963267948966
    z = a * a
    sa = a + a * (z * _horner(z, _SIN))
    ca = 1.0 + z * _horner(z, _COS)
    q = k & 3
    return (np.select([q == 0, q == 1, q == 2], [ca, -sa, -ca], sa),
            np.select([q == 0, q == 1, q == 2], [sa, ca, -sa], -ca))


def _ndtri_tail(p):
    t = np.sqrt(-2.0 * _log(p + 1e-300))
    return ((((((-7.784894002430293e-03 * t - 3.223964580411365e-01) * t - 2.400758277161838e+00)
               * t - 2.549732539343734e+00) * t + 4.374664141464968e+00) * t + 2.938163982698783e+00)
            / ((((7.784695709041462e-03 * t + 3.224671290700398e-01) * t + 2.445134137142996e+00)
                * t + 3.754408661907416e+00) * t + 1.0))


def _ndtri(p, q):
    """Acklam's inverse normal CDF, given p and q = 1 - p (as fo_ndtri)."""
    r = p - 0.5
    z = r * r
    central = ((((((-3.969683028665376e+01 * z + 2.209460984245205e+02) * z - 2.759285104469687e+02)
                  * z + 1.383577518672690e+02) * z - 3.066479806614716e+01) * z
                + 2.506628277459239e+00) * r
               / (((((-5.447609879822406e+01 * z + 1.615858368580409e+02) * z
                     - 1.556989798598866e+02) * z + 6.680131188771972e+01) * z
                   - 1.328068155288572e+01) * z + 1.0))
    with np.errstate(invalid="ignore"):  # the tails are evaluated everywhere, used where due
        return np.where(p < 0.02425, _ndtri_tail(p), np.where(q < 0.02425, -_ndtri_tail(q), central))


def random_fill(out, kind, reals, seed, stream, *, n_threads=1):
    """Fill the flat array `out` with Philox values (fastopt/random.h): `reals` are the
    seven r0..r6 of fo_random_args, `seed` a uint64, `stream` a uint32. Output l of group
    TILE * tile + j is element TILE * (per * tile + l) + j."""
    per = PER_GROUP[kind, out.dtype.name]
    groups = np.arange(-(-out.size // (per * TILE)) * TILE, dtype=np.uint64)
    w = philox(groups, stream, seed)
    r0, r1, r2, r3, r4, r5, r6 = reals
    if kind == BITS:
        values = np.stack(w, axis=1)
    elif kind == UNIFORM and per == 4:
        values = r0 + r1 * ((np.stack(w, axis=1) >> np.uint64(8)).astype(np.float64)
                            * 5.9604644775390625e-08)
    elif kind == UNIFORM:
        values = r0 + r1 * np.stack([_unit53(w[0], w[1]), _unit53(w[2], w[3])], axis=1)
    elif kind == NORMAL:
        if per == 4:  # float32: two pairs from 32-bit uniforms
            pairs = [((w[0] + 1.0) * 2.3283064365386963e-10, w[1] * 2.3283064365386963e-10),
                     ((w[2] + 1.0) * 2.3283064365386963e-10, w[3] * 2.3283064365386963e-10)]
        else:
            pairs = [(_unit53(w[0], w[1], 1.0), _unit53(w[2], w[3]))]
        z = []
        for u1, u2 in pairs:
            r = np.sqrt(-2.0 * _log(u1))
            c, s = _cos_sin_2pi(u2)
            z += [r * c, r * s]
        values = r0 + r1 * np.stack(z, axis=1)
    else:
        u = ([x * 2.3283064365386963e-10 for x in w] if per == 4
             else [_unit53(w[0], w[1]), _unit53(w[2], w[3])])
        t = r6 * np.stack(u, axis=1)
        x = r0 + r1 * _ndtri(r4 + t, r5 - t)
        values = np.where(x < r2, r2, np.where(x > r3, r3, x))
    tiles = values.reshape(-1, TILE, per).transpose(0, 2, 1)
    out.reshape(-1)[...] = tiles.reshape(-1)[:out.size].astype(out.dtype)


# -- weight normalization (kernels/include/fastopt/wnorm.h)

def weight_norm_sums(x, y, shape, *, n_threads=1):
    """Slice sums of x * y over the (A, B, C) view `shape`, float64, in wnorm.h's order:
    partials P[k, b] (chunk k of every row (a, b), 16 lanes, rows added in a order from
    0.0), then the partials added in k order."""
    A, B, C = shape
    prod = x.reshape(A, B, C).astype(np.float64) * y.reshape(A, B, C).astype(np.float64)
    partials = np.zeros((max(-(-C // CHUNK), 1), B))
    for k, lo in enumerate(range(0, C, CHUNK)):
        seg = prod[:, :, lo:lo + CHUNK]
        padded = np.zeros((A, B, -(-seg.shape[2] // LANES) * LANES))
        padded[..., :seg.shape[2]] = seg
        lanes = np.add.accumulate(padded.reshape(A, B, -1, LANES), axis=2)[:, :, -1, :]
        row = lanes[..., 0]
        for j in range(1, LANES):
            row = row + lanes[..., j]
        acc = np.zeros(B)
        for a in range(A):
            acc = acc + row[a]
        partials[k] = acc
    return np.add.accumulate(partials, axis=0)[-1]


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads=1):
    """out = k1[b] * v, or k1[b] * (grad_w - v * k3[b]) if grad_w is given (dtype math)."""
    A, B, C = shape
    v = v.reshape(A, B, C)
    k1 = k1[None, :, None]
    if grad_w is None:
        out.reshape(A, B, C)[...] = k1 * v
    else:
        out.reshape(A, B, C)[...] = k1 * (grad_w.reshape(A, B, C) - v * k3[None, :, None])


# the compression operations' reference lives in its own module
magnitude_masks = _numpy_compress.magnitude_masks
quant_loop = _numpy_compress.quant_loop
kd_rows = _numpy_compress.kd_rows

wrap_steps(globals())  # pruning masks: the pruned entries zeroed after each elementwise step

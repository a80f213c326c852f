"""The reference backend: each rule as plain NumPy, the spec every backend is tested against.

Written for reading, not speed: one tensor at a time, the update exactly as torch.optim's
single-tensor (for-loop) implementation orders it, with every scalar cast to the
parameter's dtype as torch casts it (float32 math stays float32).

Operands, shared with every backend: `params` are read, the results written to `out`
(the same arrays for in-place updates); the state lists are updated in place.
"""

import numpy as np


CHUNK, LANES = 16384, 16  # FO_CHUNK, FO_NORM_LANES of fastopt/reduce.h


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


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step, lr, beta1,
              beta2, eps, weight_decay, decoupled, maximize, grad_scale=1.0,
              grad_clip=float("inf"), n_threads=1):
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        s = p.dtype.type
        g = _clip_and_scale(g, grad_clip, grad_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                p = p * s(1 - lr * weight_decay)
            else:
                g = g + s(weight_decay) * p
        m[...] = _lerp(m, g, s(1 - beta1))
        v[...] = v * s(beta2) + s(1 - beta2) * g * g
        if max_exp_avg_sqs is not None:
            np.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = np.sqrt(v) / s(bias_correction2_sqrt) + s(eps)
        out[i][...] = p + s(-step_size) * m / denom

"""The Cython backend's kernels for fastopt.prune (the select's passes, which
fastopt._backends._select drives), fastopt.quant and fastopt.distill."""

from fastopt._backends._select import magnitude
from fastopt._cpu import _distill, _prune, _quant


def prune_hist(arrays, shift, pmask, prefix, n_threads):
    return _prune.hist(arrays, shift, pmask, prefix, n_threads)


def prune_ties(arrays, thr, n_threads):
    return _prune.ties(arrays, thr, n_threads)


def prune_mask(arrays, masks, thr, tie_modes, n_threads):
    _prune.mask(arrays, masks, thr, tie_modes, n_threads)


def prune_sample(arrays, s, n_threads):
    return _prune.sample(arrays, s, n_threads)


def prune_split(arrays, masks, lo, hi, n_threads):
    return _prune.split(arrays, masks, lo, hi, n_threads)


def prune_settle(masks, keys, pos, thr, ties, n_threads):
    _prune.settle(masks, keys, pos, thr, ties, n_threads)


def nm_masks(x, keep, n, m, C, *, n_threads):
    return magnitude(_prune.nm(x, keep, n, m, C, n_threads), x.dtype)


def quant_loop(op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed, *,
               n_threads):
    return _quant.loop(op, x.reshape(-1), out.reshape(-1), None if gy is None else gy.reshape(-1),
                       B, C, inv, zp, scale, qmin, qmax, fused, is_signed, n_threads)


def kd_rows(s, t, g, labels, temperature, wk, wc, *, n_threads):
    return _distill.kd_rows(s, t, g, labels, temperature, wk, wc, n_threads)

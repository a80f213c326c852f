r"""Knowledge distillation: the loss of a student against a teacher and its gradient, in one
fused, numerically stable pass over the logits (Hinton et al., 2015).

.. math::
    L = \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)
      + (1 - \alpha)\, \mathrm{CE}(s, y)

per row of the (batch, classes) logits, reduced over the batch. The gradient with respect
to the student logits is
:math:`\alpha T (\mathrm{softmax}(s/T) - \mathrm{softmax}(t/T)) +
(1 - \alpha)(\mathrm{softmax}(s) - \mathrm{onehot}(y))`,
times the reduction's factor. Every softmax is taken from its row's maximum (log-sum-exp),
so logits of any size (1e4 and beyond) neither overflow nor lose the loss. The
exponentials run in the logits' dtype, and so do the sums over each block of 512 classes,
which are then added in float64, in a fixed order (the same on every backend and thread
count). It equals torch's
``alpha * T**2 * F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), reduction=...,
log_target=True) + (1 - alpha) * F.cross_entropy(s, y, reduction=...)`` and its autograd
gradient.

>>> import numpy as np, fastopt
>>> s = np.array([[2.0, 0.5, -1.0]], np.float32)
>>> loss, grad = fastopt.distill.kd_loss(s, s, labels=np.array([0]), alpha=1.0)
>>> loss, bool(np.abs(grad).max() < 1e-6)
(0.0, True)
"""

import math

import numpy as np

from fastopt import _backends, _check, _interop
from fastopt._config import get_num_threads

__all__ = ["kd_loss", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _labels(labels, B, C):
    view = _interop.import_input(labels, "labels", ("int8", "int16", "int32", "int64", "uint8",
                                                     "uint16", "uint32", "uint64"))
    host = np.asarray(_interop._host(view.array))
    if host.shape != (B,):
        raise ValueError(f"labels: expected shape ({B},), one class index per row, got "
                         f"{host.shape}")
    bad = (host < 0) | (host >= C)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"labels[{b}]={int(host[b])} is outside the class range [0, {C})")
    return host.astype(np.int64)


def kd_loss(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9,
            reduction="batchmean", *, backend="auto"):
    """``(loss, grad)``: the distillation loss (module docstring) and its gradient with
    respect to ``student_logits``.

    Args:
        student_logits, teacher_logits: (batch, classes) float32 or float64 arrays of one
            framework and device, finite.
        labels: (batch,) integer class indices in [0, classes), or None for no
            cross-entropy term (the loss is then ``alpha * T**2 * KL``; pass ``alpha=1.0``
            for plain distillation).
        temperature: T > 0 (default 4.0).
        alpha: the KL term's weight, in [0, 1] (default 0.9).
        reduction: over the batch: ``"batchmean"`` (default; both terms summed over rows
            and divided by the batch size), ``"sum"``, ``"mean"`` (torch's: the KL sum
            divided by batch x classes, the cross entropy's mean over rows) or ``"none"``
            (one loss per row).

    Returns the loss (a float; for ``"none"`` a (batch,) float64 array of the logits'
    framework) and the gradient of the (summed) loss, a new array like the logits. A large
    gradient's buffer on the host is recycled once nothing refers to it any more
    (``fastopt.empty_cache`` releases the ones kept). An empty batch (0 rows) gives torch's
    results: a loss of 0.0 for ``"sum"``, NaN for ``"batchmean"`` and ``"mean"`` (a mean
    over no rows), an empty array for ``"none"``; the gradient is (0, classes).
    """
    _backends.check_name(backend)
    T = _check.real("temperature", temperature, lo=0.0, lo_open=True)
    alpha = _check.real("alpha", alpha, lo=0.0, hi=1.0)
    reduction = _check.choice("reduction", reduction, REDUCTIONS)
    s = _interop.import_input(student_logits, "student_logits")
    t = _interop.import_input(teacher_logits, "teacher_logits")
    if s.array.ndim != 2 or s.array.shape[1] < 1:
        raise ValueError(f"student_logits: expected a (batch, classes) array with at least "
                         f"one class, got shape {s.array.shape}")
    if t.array.shape != s.array.shape or t.array.dtype != s.array.dtype or t.device != s.device:
        raise ValueError(f"teacher_logits: expected the student's shape {s.array.shape} and "
                         f"dtype {s.array.dtype} on its device, got {t.array.shape}, "
                         f"{t.array.dtype}")
    B, C = s.array.shape
    y = None if labels is None else _labels(labels, B, C)
    grad, finish = _interop.new_array((B, C), s.array.dtype, student_logits, reuse=True)
    if B == 0:  # as torch: a sum over no rows is 0, a mean over them NaN (0 / 0)
        if reduction == "none":
            _, done = _interop.new_array((0,), np.float64, student_logits)
            return done(), finish()
        return (0.0 if reduction == "sum" else math.nan), finish()
    xp = _interop.array_module(s.array)
    kl_weight = alpha * T * T
    ce_weight = 0.0 if y is None else 1.0 - alpha
    scale_kl, scale_ce = {"batchmean": (1 / B, 1 / B), "sum": (1.0, 1.0),
                          "mean": (1 / (B * C), 1 / B), "none": (1.0, 1.0)}[reduction]
    device = "cpu" if isinstance(s.array, np.ndarray) else "cuda"
    rows = _backends.resolve("kd_rows", backend, device, s.array.dtype)(
        s.array, t.array, grad, y, T, kl_weight * scale_kl / T, ce_weight * scale_ce,
        n_threads=get_num_threads())
    if not np.isfinite(rows).all():
        # a NaN or inf logit makes its row non-finite, so the inputs are scanned only then
        # (finite logits too far apart for float64 overflow the loss, as in torch)
        for name, view in (("student_logits", s), ("teacher_logits", t)):
            if not bool(xp.isfinite(view.array).all()):
                raise ValueError(f"{name}: holds NaN or inf; the loss needs finite logits")
    per_row = kl_weight * scale_kl * rows[:, 0] + ce_weight * scale_ce * rows[:, 1]
    if reduction == "none":
        out, done = _interop.new_array((B,), np.float64, student_logits)
        out[...] = xp.asarray(per_row)
        return done(), finish()
    return float(np.sum(per_row)), finish()

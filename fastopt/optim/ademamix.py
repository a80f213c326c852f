"""AdEMAMix (Pagliardini, Ablin & Grangier 2024), as the authors' reference."""

from fastopt import _scalars
from fastopt._check import integer
from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    cautious_doc,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)

# what the cautious option masks
_DIRECTION = r"the numerator :math:`m^{(1)}_t / (1 - \beta_1^t) + \alpha m^{(2)}_t`"

class AdEMAMix(Optimizer):
    __doc__ = r"""AdEMAMix: Adam with a second, slow exponential moving average of the
    gradients mixed into the numerator, which keeps old gradients relevant for much longer.

    Follows the authors' PyTorch reference (``apple/ml-ademamix``, ``pytorch/ademamix.py``,
    commit c3d73c0), whose alpha and beta3 warmups ``t_alpha_beta3`` sets together. With
    gradient :math:`g_t` (negated if maximize) at step :math:`t`:

    .. math::

        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1 - \beta_1) g_t
            \quad (m^{(1)}_t = g_t \text{ when } \beta_1 = 0) \\
        m^{(2)}_t &= \beta_3 m^{(2)}_{t-1} + (1 - \beta_3) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        p_{t+1} &= p_t - \gamma \left(\frac{m^{(1)}_t / (1 - \beta_1^t) + \alpha m^{(2)}_t}
            {\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon} + \lambda p_t\right)

    With ``t_alpha_beta3`` = :math:`T`, for :math:`t < T`: :math:`\alpha` grows linearly
    from 0 and :math:`\beta_3` moves from :math:`\beta_1` so that its half-life grows
    linearly, as the reference schedules them. Other libraries (bitsandbytes, transformers)
    default :math:`\alpha` to 5.0; the authors' reference and fastopt to 2.0.

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2, \beta_3)`, each in [0, 1).
            Default (0.9, 0.999, 0.9999).
        alpha (float): :math:`\alpha \ge 0`, the slow average's weight. Default 2.0.
        t_alpha_beta3 (int or None): warmup steps of alpha and beta3; None for none.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): decoupled :math:`\lambda \ge 0` (added to the update, as
            the reference). Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + cautious_doc(_DIRECTION) + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg_fast`` (:math:`m^{(1)}`; none when
    :math:`\beta_1 = 0`), ``exp_avg_slow`` (:math:`m^{(2)}`), ``exp_avg_sq`` (:math:`v`).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> _ = fastopt.AdEMAMix([w], lr=0.1, alpha=0.0).step([np.array([1.0, -1.0])])
        >>> w.round(6)  # alpha 0: Adam's first step
        array([-0.1,  0.1])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0,
                 t_alpha_beta3=None, eps=1e-8, weight_decay=0.0, maximize=False,
                 cautious=False, **options):
        defaults = dict(lr=lr, betas=betas, alpha=alpha, t_alpha_beta3=t_alpha_beta3, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, cautious=cautious)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where, count=3)
        check_real(group, "alpha", where, lo=0.0)
        if group["t_alpha_beta3"] is not None:
            group["t_alpha_beta3"] = integer(f"{where}: t_alpha_beta3", group["t_alpha_beta3"],
                                             lo=1)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)
        check_bool(group, "cautious", where)

    def _state_names(self, group, first):
        return self._state_keys if group["betas"][0] != 0 else self._state_keys[1:]

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        step = advance_step(states)
        beta1, beta2, beta3 = group["betas"]
        beta3, alpha = _scalars.ademamix_warmup(step, beta1, beta3, group["alpha"],
                                                group["t_alpha_beta3"])
        kernel(params, out, grads,
               ensure_state(states, "exp_avg_fast", params) if beta1 != 0 else None,
               ensure_state(states, "exp_avg_slow", params),
               ensure_state(states, "exp_avg_sq", params),
               step=step, lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
               eps=group["eps"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], caution=self._caution(group, states, params),
               n_threads=n_threads, **grad)

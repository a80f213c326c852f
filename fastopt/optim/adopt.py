"""ADOPT (Taniguchi et al. 2024), with the semantics of the authors' torch-adopt package."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    cautious_doc,
    check_adam_group,
    check_bool,
    ensure_state,
)


def quarter_power(step):
    """ADOPT's default clipping bound, ``step ** 0.25``."""
    return step ** 0.25


# what the cautious option masks
_DIRECTION = r"the first moment :math:`m_t` (:math:`g_t` with its L2 decay)"

class ADOPT(Optimizer):
    __doc__ = r"""ADOPT (Taniguchi et al. 2024: adaptive gradient method with the optimal
    convergence rate), following ``adopt.ADOPT`` of the authors' package ``torch-adopt``
    (0.1.0, its single-tensor path).

    With gradient :math:`g_t` (negated if maximize; plus :math:`\lambda p_t` unless the
    weight decay is decoupled) at step :math:`t` (from 1), :math:`v_0 = 0`:

    .. math::

        t = 1:&\quad v_1 = g_1^2 \quad\text{(the parameter and } m \text{ stay)} \\
        t > 1:&\quad p_t \leftarrow p_t - \gamma\lambda p_t \text{ if decoupled} \\
        &\quad n_t = \mathrm{clip}\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},
            c(t - 1)\right), \quad c(s) = s^{1/4} \text{ by default} \\
        &\quad m_t = \beta_1 m_{t-1} + (1 - \beta_1) n_t, \qquad
            p_{t+1} = p_t - \gamma m_t \\
        &\quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2

    where :math:`\mathrm{clip}(x, c)` clamps to :math:`[-c, c]`. Unlike Adam, the second
    moment enters the step before it sees the current gradient, and the first moment
    averages the normalized gradient.

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.9999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-6.
        clip_lambda: the clipping bound :math:`c`, a function of the
            step count before this step (a Python float in, a number out), computed once
            per step on the host; None turns clipping off. Default ``step ** 0.25``. Like
            torch-adopt, it is an attribute of the optimizer, not of the param groups, and
            is not saved in ``state_dict``.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        decouple (bool): decoupled (AdamW-style) weight decay. Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + cautious_doc(_DIRECTION) + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> opt = fastopt.ADOPT([w], lr=0.1)
        >>> _ = opt.step([np.array([1.0, -2.0])])  # the first step only sets v
        >>> w
        array([0., 0.])
        >>> _ = opt.step([np.array([1.0, -2.0])])
        >>> w.round(6)
        array([-0.01,  0.01])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6,
                 clip_lambda=quarter_power, weight_decay=0.0, decouple=False, maximize=False,
                 cautious=False, **options):
        if clip_lambda is not None and not callable(clip_lambda):
            raise TypeError(f"clip_lambda must be a function of the step count or None, got "
                            f"{clip_lambda!r}")
        self.clip_lambda = clip_lambda
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decouple=decouple, maximize=maximize, cautious=cautious)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_adam_group(group, where)
        check_bool(group, "decouple", where)
        check_bool(group, "cautious", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        # the user's clip_lambda runs before the step count moves, so that a clip_lambda
        # that raises leaves the optimizer as it was
        done = states[0].get("step", 0)  # steps before this one: clip_lambda's argument
        clip_value = None
        if self.clip_lambda is not None and done > 0:
            clip_value = float(self.clip_lambda(float(done)))
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params), step=advance_step(states),
               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], decoupled=group["decouple"],
               clip_value=clip_value, maximize=group["maximize"],
               caution=self._caution(group, states, params), n_threads=n_threads, **grad)

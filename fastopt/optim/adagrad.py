"""Adagrad (torch.optim.Adagrad's semantics)."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_bool,
    check_real,
    ensure_state,
)


class Adagrad(Optimizer):
    __doc__ = r"""Adagrad (Duchi et al.), following ``torch.optim.Adagrad``.

    With gradient :math:`g_t` (negated if maximize, plus :math:`\lambda p_t`) at step t:

    .. math::

        s_t = s_{t-1} + g_t^2, \qquad
        p_{t+1} = p_t - \frac{\gamma}{1 + (t - 1)\eta} \frac{g_t}{\sqrt{s_t} + \epsilon}

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-2.
        lr_decay (float): :math:`\eta \ge 0`. Default 0.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`. Default 0.
        initial_accumulator_value (float): :math:`s_0 \ge 0`. Default 0.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-10.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``sum``.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> _ = fastopt.Adagrad([w], lr=0.1).step([np.array([2.0, -2.0])])
        >>> w.round(6)
        array([-0.1,  0.1])
    """

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False, **options):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        for key in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            check_real(group, key, where, lo=0.0)
        check_bool(group, "maximize", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        kernel(params, out, grads,
               ensure_state(states, "sum", params, group["initial_accumulator_value"]),
               step=advance_step(states),
               lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
               eps=group["eps"], maximize=group["maximize"], n_threads=n_threads, **grad)

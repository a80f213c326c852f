"""Adafactor: a second moment factored into row and column statistics (torch's semantics)."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_bool,
    check_real,
    ensure_state,
)


def _row_shape(p):
    return tuple(p.shape[:-1]) + (1,)


def _col_shape(p):
    return tuple(p.shape[:-2]) + (1, p.shape[-1])


class Adafactor(Optimizer):
    __doc__ = r"""Adafactor (Shazeer & Stern 2018) with torch.optim.Adafactor's semantics.

    A parameter of 2 or more dimensions is treated as a stack of :math:`R \times C`
    matrices (its last two dimensions), and its second moment is kept as one row and one
    column vector per matrix instead of a full array. With gradient :math:`g_t` (negated if
    maximize) at step t, :math:`\hat\beta_t = t^{\text{beta2\_decay}}`, n elements:

    .. math::

        \rho_t &= \min(\gamma, 1/\sqrt{t}), \qquad
        \alpha_t = \max(\epsilon_2, \|p_{t-1}\|_2 / \sqrt{n}) \, \rho_t \\
        r_t &= \operatorname{lerp}(r_{t-1}, \operatorname{mean}_{cols}(g_t^2), \hat\beta_t),
        \qquad
        c_t = \operatorname{lerp}(c_{t-1}, \operatorname{mean}_{rows}(g_t^2), \hat\beta_t) \\
        \hat v_t &= r_t c_t / \max(\operatorname{mean}(r_t), \epsilon_1)
            \quad\text{(vectors and scalars: }
            \hat v_t = v_t = \operatorname{lerp}(v_{t-1}, g_t^2, \hat\beta_t)\text{)} \\
        u_t &= g_t / \sqrt{\max(\hat v_t, \epsilon_1^2)}, \qquad
        \delta_t = \max(1, \|u_t\|_2 / (\sqrt{n}\, d)) \\
        p_t &= p_{t-1} (1 - \gamma\lambda) - (\alpha_t / \delta_t)\, u_t

    Three passes over each parameter: the factor statistics (one read of the gradient,
    summed in a fixed order shared by every backend), the update written to a scratch
    buffer, and the scaled apply; the two norms are the shared fixed-order reduction.

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`, the cap of the relative step size. Default 1e-2.
        beta2_decay (float): :math:`\le 0`; the second-moment weight of step t is
            :math:`t^{\text{beta2\_decay}}`. Default -0.8.
        eps (tuple): :math:`(\epsilon_1, \epsilon_2)`: :math:`\epsilon_1 \ge 0` or None
            (the dtype's machine epsilon) bounds the variance estimate,
            :math:`\epsilon_2 \ge 0` the parameter scale. Default (None, 1e-3).
        d (float): :math:`d \ge 1`, the update-clipping threshold. Default 1.0.
        weight_decay (float): decoupled :math:`\lambda \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``; ``row_var`` (shape ``(..., R, 1)``) and ``col_var``
    (``(..., 1, C)``) for 2+ dimensions, else ``variance`` (the parameter's shape), as torch.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.ones((2, 2))
        >>> _ = fastopt.Adafactor([w], lr=0.1).step([np.ones((2, 2))])
        >>> w  # alpha = max(1e-3, ||w|| / 2) * min(0.1, 1) = 0.1, u = g
        array([[0.9, 0.9],
               [0.9, 0.9]])
    """

    _sums_gradients = True  # the row and column factors sum squared gradients
    _op = "adafactor_step"
    _state_keys = ("row_var", "col_var", "variance")

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, maximize=False, **options):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_real(group, "beta2_decay", where, hi=0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"{where}: eps must be a pair (eps1, eps2), eps1 may be None; "
                             f"got {eps!r}")
        eps1 = None if eps[0] is None else check_real({"eps[0]": eps[0]}, "eps[0]", where,
                                                       lo=0.0)
        group["eps"] = (eps1, check_real({"eps[1]": eps[1]}, "eps[1]", where, lo=0.0))
        check_real(group, "d", where, lo=1.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)

    def _state_shapes(self, param):
        if param.ndim > 1:
            return {"row_var": _row_shape(param), "col_var": _col_shape(param)}
        return {"variance": tuple(param.shape)}

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        row, col, var = (ensure_state(states, name, params, 0.0,
                                      lambda p, name=name: self._state_shapes(p).get(name))
                         for name in self._state_keys)
        eps1, eps2 = group["eps"]
        kernel(params, out, grads, row, col, var, self._scratch_like(states, params),
               step=advance_step(states), lr=group["lr"], beta2_decay=group["beta2_decay"],
               eps1=eps1, eps2=eps2, d=group["d"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)

"""Rprop (torch.optim.Rprop semantics, its single-tensor path)."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_bool,
    check_real,
    ensure_state,
)


def check_pair(group, key, where, names, **bounds):
    """group[key] as a tuple of two floats (called `names` in messages) within `bounds`."""
    pair = group[key]
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{where}: {key} must be a pair {names}, got {pair!r}")
    group[key] = tuple(check_real({f"{key}[{k}]": v}, f"{key}[{k}]", where, **bounds)
                       for k, v in enumerate(pair))
    return group[key]


class Rprop(Optimizer):
    __doc__ = r"""Rprop (Riedmiller & Braun 1993): per-element step sizes grown while the
    gradient keeps its sign and shrunk when it flips, each step moving by the step size
    along the gradient's sign.

    Follows ``torch.optim.Rprop``'s single-tensor implementation (torch's CPU default),
    including ``torch.sign``'s 0 for NaN. With gradient :math:`g_t` (negated if maximize),
    previous gradient :math:`g^-` and step sizes :math:`\delta`:

    .. math::

        f &= \eta_+, \eta_- \text{ or } 1 \text{ as } \operatorname{sign}(g_t g^-)
            = 1, -1 \text{ or } 0 \\
        \delta &\leftarrow \operatorname{clamp}(\delta f, \delta_{\min}, \delta_{\max}) \\
        g_t &\leftarrow 0 \text{ where } f = \eta_- \\
        p_{t+1} &= p_t - \operatorname{sign}(g_t) \delta, \qquad g^- \leftarrow g_t

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): the initial step size :math:`\delta_0 \ge 0` (read when a parameter's
            state is created, as torch). Default 1e-2.
        etas (tuple): :math:`(\eta_-, \eta_+)` with :math:`0 < \eta_- < 1 < \eta_+`.
            Default (0.5, 1.2).
        step_sizes (tuple): :math:`(\delta_{\min}, \delta_{\max})`,
            :math:`0 \le \delta_{\min} \le \delta_{\max}`. Default (1e-6, 50).
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``prev`` (:math:`g^-`), ``step_size`` (:math:`\delta`).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(3)
        >>> opt = fastopt.Rprop([w], lr=0.1)
        >>> _ = opt.step([np.array([1.0, -1.0, 0.0])])
        >>> _ = opt.step([np.array([1.0, 1.0, 0.0])])  # same sign: 1.2x; flipped: 0.5x, held
        >>> w.round(6)
        array([-0.22,  0.1 ,  0.  ])
    """

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0),
                 maximize=False, **options):
        defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        etaminus, etaplus = check_pair(group, "etas", where, "(etaminus, etaplus)", lo=0.0)
        if not 0.0 < etaminus < 1.0 < etaplus:
            raise ValueError(f"{where}: etas must satisfy 0 < etaminus < 1 < etaplus, got "
                             f"{group['etas']}")
        low, high = check_pair(group, "step_sizes", where, "(min, max)", lo=0.0)
        if low > high:
            raise ValueError(f"{where}: step_sizes must be (min, max) with min <= max, got "
                             f"{group['step_sizes']}")
        check_bool(group, "maximize", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        advance_step(states)
        etaminus, etaplus = group["etas"]
        low, high = group["step_sizes"]
        kernel(params, out, grads, ensure_state(states, "prev", params),
               ensure_state(states, "step_size", params, fill=group["lr"]),
               etaminus=etaminus, etaplus=etaplus, step_size_min=low, step_size_max=high,
               maximize=group["maximize"], n_threads=n_threads, **grad)

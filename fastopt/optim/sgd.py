"""Stochastic gradient descent with momentum (torch.optim.SGD's semantics)."""

from fastopt.optim._base import OPTIONS_DOC, Optimizer, check_bool, check_real, ensure_state


class SGD(Optimizer):
    __doc__ = r"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    Follows ``torch.optim.SGD``. With gradient :math:`g_t` of parameter :math:`p_t`:

    .. math::

        g_t &\leftarrow -g_t \text{ if maximize};\quad g_t \leftarrow g_t + \lambda p_t \\
        b_t &= g_t \text{ at the first step},\quad
            b_t = \mu b_{t-1} + (1 - \tau) g_t \text{ afterwards} \\
        d_t &= g_t + \mu b_t \text{ (nesterov)},\quad b_t \text{ (momentum)},\quad
            g_t \text{ (}\mu = 0\text{)} \\
        p_{t+1} &= p_t - \gamma d_t

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): learning rate :math:`\gamma \ge 0`. Default 1e-3, as torch.
        momentum (float): :math:`\mu \ge 0`. Default 0.
        dampening (float): :math:`\tau \in [0, 1]`. Default 0.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`. Default 0.
        nesterov (bool): Nesterov momentum; needs momentum > 0 and dampening 0. Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``momentum_buffer`` (with momentum).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.ones(3, np.float32)
        >>> opt = fastopt.SGD([w], lr=0.1, momentum=0.9)
        >>> _ = opt.step([np.full(3, 2, np.float32)])
        >>> w
        array([0.8, 0.8, 0.8], dtype=float32)
    """

    _op = "sgd_step"
    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, **options):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        momentum = check_real(group, "momentum", where, lo=0.0)
        dampening = check_real(group, "dampening", where, lo=0.0, hi=1.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)
        if check_bool(group, "nesterov", where) and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{where}: nesterov=True needs momentum > 0 and dampening = 0, "
                             f"got momentum={momentum!r}, dampening={dampening!r}")

    def _bucket_key(self, group, state):
        return "momentum_buffer" in state

    def _state_names(self, group, first):
        return self._state_keys if group["momentum"] != 0 else ()

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        momentum = group["momentum"]
        first = momentum != 0 and "momentum_buffer" not in states[0]  # same in the bucket
        # created on the first step with momentum; the kernel then copies g into it
        kernel(params, out, grads,
               ensure_state(states, "momentum_buffer", params) if momentum != 0 else None,
               lr=group["lr"], momentum=momentum, dampening=group["dampening"],
               weight_decay=group["weight_decay"], nesterov=group["nesterov"],
               maximize=group["maximize"], first=first, n_threads=n_threads, **grad)

"""Adam and AdamW (torch.optim.Adam / torch.optim.AdamW semantics)."""

from fastopt.optim import _scalars
from fastopt.optim._base import (OPTIONS_DOC, Optimizer, advance_step, check_betas, check_bool,
                                 check_real,
                                 ensure_state)

_MATH = r"""
    With gradient :math:`g_t` of parameter :math:`p_t` at step :math:`t` (from 1):

    .. math::

        g_t &\leftarrow -g_t \text{ if maximize} \\
        DECAY
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
        p_{t+1} &= p_t - \frac{\gamma}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
"""


class Adam(Optimizer):
    __doc__ = r"""Adam (Kingma & Ba), with optional AMSGrad and L2 weight decay.

    Follows ``torch.optim.Adam`` (its for-loop implementation's operation order).
    """ + _MATH.replace("DECAY", r"g_t &\leftarrow g_t + \lambda p_t \\") + r"""
    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): learning rate :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`, added to the gradient. Default 0.
        amsgrad (bool): keep the running maximum of :math:`v_t`. Default False.
        maximize (bool): ascend instead of descend. Default False.
        backend, n_threads, max_grad_norm, grad_norm_type, max_grad_value, skip_nonfinite:
            keyword-only; see :class:`fastopt.optim.Optimizer`.

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), and
    ``max_exp_avg_sq`` with amsgrad.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> opt = fastopt.Adam([w], lr=0.1)
        >>> _ = opt.step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([-0.1,  0.1])
    """

    _op = "adam_step"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "amsgrad", where)
        check_bool(group, "maximize", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        step = advance_step(states)
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params),
               ensure_state(states, "max_exp_avg_sq", params) if group["amsgrad"] else None,
               step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], decoupled=self._decoupled,
               maximize=group["maximize"], n_threads=n_threads, **grad)


class AdamW(Adam):
    __doc__ = r"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay.

    Follows ``torch.optim.AdamW``: the parameter is shrunk by :math:`1 - \gamma\lambda`
    before the Adam update instead of adding :math:`\lambda p` to the gradient.
    """ + _MATH.replace("DECAY", r"p_t &\leftarrow p_t (1 - \gamma \lambda) \\") + r"""
    Args:
        Same as :class:`Adam`, except ``weight_decay`` (decoupled :math:`\lambda \ge 0`),
        default 1e-2.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.ones(2)
        >>> opt = fastopt.AdamW([w], lr=0.1, weight_decay=0.5)
        >>> _ = opt.step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([0.85, 1.05])
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, **options)


class _AdamFamily(Optimizer):
    """Shared by Adamax, NAdam, RAdam: betas, eps, weight decay, a step count."""

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)
        if "decoupled_weight_decay" in group:
            check_bool(group, "decoupled_weight_decay", where)


class Adamax(_AdamFamily):
    __doc__ = r"""Adamax (Kingma & Ba: Adam with the infinity norm), following ``torch.optim.Adamax``.

    With gradient :math:`g_t` (negated if maximize, plus :math:`\lambda p_t`) at step t:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \qquad
        p_{t+1} = p_t - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{u_t}

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 2e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_inf`` (u).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> _ = fastopt.Adamax([w], lr=0.1).step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([-0.1,  0.1])
    """

    _op = "adamax_step"
    _state_keys = ("exp_avg", "exp_inf")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_inf", params), step=advance_step(states), lr=group["lr"],
               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)


class NAdam(_AdamFamily):
    __doc__ = r"""NAdam (Dozat: Adam with Nesterov momentum), following ``torch.optim.NAdam``.

    With gradient :math:`g_t` (negated if maximize; plus :math:`\lambda p_t`, or
    :math:`p_t \leftarrow p_t (1 - \gamma\lambda)` with decoupled weight decay) at step t,
    :math:`\mu_t = \beta_1 (1 - \frac12 0.96^{t\psi})`:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
        p_{t+1} &= p_t - \gamma \frac{1 - \mu_t}{1 - \prod_{i \le t} \mu_i} \frac{g_t}{d_t}
            - \gamma \frac{\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i} \frac{m_t}{d_t}

    As in torch, the running product of :math:`\mu` is kept in float32.

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 2e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        momentum_decay (float): :math:`\psi \ge 0`. Default 4e-3.
        decoupled_weight_decay (bool): AdamW-style decay (NAdamW). Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(1)
        >>> _ = fastopt.NAdam([w], lr=0.1).step([np.array([1.0])])
        >>> w.round(4)  # torch.optim.NAdam gives the same
        array([-0.1056])
    """

    _op = "nadam_step"
    _state_keys = ("exp_avg", "exp_avg_sq")
    _state_scalars = {"step": int, "mu_product": float}

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        super()._check_group(group, where)
        check_real(group, "momentum_decay", where, lo=0.0)

    def _bucket_key(self, group, state):
        return state.get("step", 0), state.get("mu_product", 1.0)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        step = advance_step(states)
        _, _, mu_product = _scalars.nadam_coefficients(
            step, states[0].get("mu_product", 1.0), beta1=beta1,
            momentum_decay=group["momentum_decay"])
        for state in states:
            state["mu_product"] = mu_product
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params), step=step, mu_product=mu_product,
               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], momentum_decay=group["momentum_decay"],
               decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
               n_threads=n_threads, **grad)


class RAdam(_AdamFamily):
    __doc__ = r"""RAdam (Liu et al.: rectified Adam), following ``torch.optim.RAdam``.

    With gradient :math:`g_t` (negated if maximize; plus :math:`\lambda p_t`, or
    :math:`p_t \leftarrow p_t (1 - \gamma\lambda)` with decoupled weight decay), m and v as
    in Adam, :math:`\hat m_t = m_t / (1 - \beta_1^t)`,
    :math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`:

    .. math::

        p_{t+1} = p_t - \gamma \hat m_t \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}
            \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
        \text{ if } \rho_t > 5, \text{ else } p_{t+1} = p_t - \gamma \hat m_t

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        decoupled_weight_decay (bool): AdamW-style decay. Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(1)
        >>> _ = fastopt.RAdam([w], lr=0.1).step([np.array([1.0])])
        >>> w.round(4)
        array([-0.1])
    """

    _op = "radam_step"
    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params), step=advance_step(states),
               lr=group["lr"],
               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
               decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
               n_threads=n_threads, **grad)

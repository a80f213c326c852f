"""Muon (Jordan et al. 2024), as torch.optim.Muon."""

from fastopt._check import integer
from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = (None, "float32", "bfloat16")


class Muon(Optimizer):
    __doc__ = r"""Muon: momentum, orthogonalized by a Newton-Schulz iteration, for the 2-D
    weight matrices of hidden layers.

    Follows ``torch.optim.Muon`` (torch 2.13). With gradient :math:`g_t` (negated if
    maximize) of an :math:`A \times B` matrix at step :math:`t`:

    .. math::

        B_t &= \mathrm{lerp}(B_{t-1}, g_t, 1 - \mu) \\
        U_t &= \mathrm{lerp}(g_t, B_t, \mu) \text{ (nesterov) or } B_t \\
        O_t &= \mathrm{NS}_k^{(a,b,c)}\big(U_t / \max(\lVert U_t \rVert_F, \epsilon)\big) \\
        p_t &= p_{t-1} (1 - \gamma \lambda) - \gamma\, r(A, B)\, O_t

    where :math:`\mathrm{NS}` is :math:`k` iterations of :math:`X \leftarrow a X + (b M + c
    M^2) X`, :math:`M = X X^\top` (on :math:`U^\top` when :math:`A > B`), and :math:`r(A, B)
    = \sqrt{\max(1, A / B)}` ("original", the default) or :math:`0.2 \sqrt{\max(A, B)}`
    ("match_rms_adamw"). The elementwise passes are fastopt kernels (bit-identical on every
    backend); the matrix products are the array library's own BLAS (NumPy's on the CPU,
    CuPy's on the GPU), in ``ns_dtype``. torch runs the iteration in bfloat16:
    ``ns_dtype="bfloat16"`` follows it (every product and sum rounded to bfloat16; the
    update agrees with torch's to about 2e-2 of its largest entry, since GEMM summation
    orders differ), while fastopt's default runs it in the parameters' dtype (float32 for
    float32, bfloat16 and float16 parameters). The share of a step spent in the GEMMs
    grows with the matrices' size: see the benchmarks.

    Every parameter of a group must be a matrix, as torch requires. For biases, norms and
    embeddings, optax's convention: a param group with ``use_muon=False`` is updated by
    AdamW (``torch.optim.AdamW``) with the group's ``lr`` and ``weight_decay`` and
    ``adam_betas``, ``adam_eps``. fastopt counts steps (``state["step"]``) in both kinds of
    group; torch's Muon keeps no count.

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        weight_decay (float): decoupled :math:`\lambda \ge 0`. Default 0.1.
        momentum (float): :math:`\mu` in [0, 1]. Default 0.95.
        nesterov (bool): the Nesterov form of the update. Default True.
        ns_coefficients (tuple): :math:`(a, b, c)`. Default (3.4445, -4.7750, 2.0315).
        eps (float): :math:`\epsilon \ge 0`, the least norm divided by. Default 1e-7.
        ns_steps (int): :math:`k`, in [0, 100). Default 5.
        adjust_lr_fn (str or None): :math:`r`: None or "original", or "match_rms_adamw".
        ns_dtype (str or None): the dtype of the Newton-Schulz iteration: None (the
            parameters' compute dtype, the default), "float32" or "bfloat16" (as torch).
        adam_betas (tuple): AdamW's :math:`(\beta_1, \beta_2)` in groups with
            ``use_muon=False``. Default (0.9, 0.999).
        adam_eps (float): AdamW's :math:`\epsilon` there. Default 1e-8.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    Param-group key ``use_muon`` (default True): False updates the group with AdamW.

    State per parameter: ``step``, ``momentum_buffer`` (:math:`B`); in AdamW groups
    ``exp_avg`` and ``exp_avg_sq``.

    Example:
        >>> import numpy as np, fastopt
        >>> w, b = np.zeros((2, 2)), np.zeros(2)
        >>> opt = fastopt.Muon([{"params": [w]}, {"params": [b], "use_muon": False}],
        ...                    lr=0.1, weight_decay=0.0)
        >>> _ = opt.step([np.diag([4.0, 1.0]), np.ones(2)])
        >>> w.round(3)  # singular values 4 and 1 both sent near 1 (here 0.74)
        array([[-0.074,  0.   ],
               [ 0.   , -0.074]])
        >>> b  # AdamW's first step
        array([-0.1, -0.1])
    """

    _checks_shapes = True  # the Muon groups' parameters must be matrices

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, ns_dtype=None, adam_betas=(0.9, 0.999), adam_eps=1e-8,
                 maximize=False, **options):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype,
                        adam_betas=adam_betas, adam_eps=adam_eps, maximize=maximize,
                        use_muon=True)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_real(group, "momentum", where, lo=0.0, hi=1.0)
        check_bool(group, "nesterov", where)
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"{where}: ns_coefficients must be a triple (a, b, c), got "
                             f"{coefficients!r}")
        group["ns_coefficients"] = tuple(
            check_real({f"ns_coefficients[{k}]": c}, f"ns_coefficients[{k}]", where)
            for k, c in enumerate(coefficients))
        check_real(group, "eps", where, lo=0.0)
        group["ns_steps"] = integer(f"{where}: ns_steps", group["ns_steps"], lo=0, hi=99)
        for key, choices in (("adjust_lr_fn", ADJUST_LR_FNS), ("ns_dtype", NS_DTYPES)):
            if group[key] not in choices:
                raise ValueError(f"{where}: {key} must be one of {choices}, got "
                                 f"{group[key]!r}")
        check_betas(group, where, key="adam_betas")
        check_real(group, "adam_eps", where, lo=0.0)
        check_bool(group, "maximize", where)
        check_bool(group, "use_muon", where)
        if group["use_muon"]:
            for j, p in enumerate(group["params"]):
                if len(p.shape) != 2:
                    raise ValueError(
                        f"{where}['params'][{j}]: Muon updates matrices (2-D parameters), "
                        f"got shape {tuple(p.shape)}; put biases, norms and other tensors "
                        f"in a param group with use_muon=False (AdamW)")

    def _op_of(self, group):
        return self._op if group["use_muon"] else "adam_step"

    def _state_names(self, group, first):
        return self._state_keys[:1] if group["use_muon"] else self._state_keys[1:]

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        step = advance_step(states)
        if not group["use_muon"]:
            beta1, beta2 = group["adam_betas"]
            kernel(params, out, grads, ensure_state(states, "exp_avg", params),
                   ensure_state(states, "exp_avg_sq", params), None, step=step,
                   lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["adam_eps"],
                   weight_decay=group["weight_decay"], decoupled=True,
                   maximize=group["maximize"], n_threads=n_threads, **grad)
            return
        kernel(params, out, grads, ensure_state(states, "momentum_buffer", params),
               self._scratch_like(states, params), lr=group["lr"],
               weight_decay=group["weight_decay"], momentum=group["momentum"],
               nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
               ns_steps=group["ns_steps"], eps=group["eps"],
               adjust_lr_fn=group["adjust_lr_fn"], ns_dtype=group["ns_dtype"],
               maximize=group["maximize"], n_threads=n_threads, **grad)


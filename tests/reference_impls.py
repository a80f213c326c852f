"""Reference implementations for the conformance tests, for rules whose authors' code is not
on PyPI: each follows the authors' code path operation by operation (source and commit
named in its docstring), as plain torch, with fastopt's argument names (the conformance
test builds them like torch.optim classes, ``cls(params, foreach=False, **config)``).
Where the authors' code is on PyPI (schedulefree), a thin subclass only adapts how it is
built.

The cautious variants (C-Optim, Liang et al. 2024, "Cautious Optimizers",
arXiv 2411.16085) follow timm's ``caution=True`` (huggingface/pytorch-image-models, commit
aa4b585): after the moment update, the update's numerator ``u`` is multiplied by
``mask / max(mean(mask), 1e-3)`` with ``mask = (u * grad > 0)`` in the parameter's dtype and
the mean over the whole tensor; the stored moments stay unmasked. For Adam, AdamW and ADOPT
the reference is the real optimizer (torch.optim, torch-adopt) unless ``cautious=True``."""

import contextlib
import io
import math

import adopt
import prodigyopt
import schedulefree
import torch


def caution(update, grad):
    """timm's caution: `update` (a new tensor) with the entries whose sign disagrees with
    `grad`'s zeroed and the rest scaled by 1 / max(fraction kept, 1e-3), as
    timm/optim/adamw.py (commit aa4b585) computes it."""
    mask = (update * grad > 0).to(grad.dtype)
    mask.div_(mask.mean().clamp_(min=1e-3))
    return update * mask


class CautiousAdam(torch.optim.Optimizer):
    """Cautious Adam / AdamW: ``torch.optim.Adam``'s for-loop path (torch 2.13,
    ``_single_tensor_adam``, non-capturable branch), operation by operation, with the caution
    of timm's ``AdamWLegacy(caution=True)`` (timm/optim/adamw.py, ``_single_tensor_adamw``,
    commit aa4b585) on ``exp_avg`` before ``param.addcdiv_``. The mask's gradient is the one
    the moments see: after maximize and (not decoupled) after adding the weight decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"]
                if wd != 0:
                    if group["decoupled_weight_decay"]:
                        p.mul_(1 - lr * wd)
                    else:
                        grad = grad.add(p, alpha=wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq,
                                  out=state["max_exp_avg_sq"])
                    denom = (state["max_exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(
                        group["eps"])
                else:
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                p.addcdiv_(caution(exp_avg, grad), denom, value=-step_size)


class CautiousAdamW(CautiousAdam):
    """:class:`CautiousAdam` with ``torch.optim.AdamW``'s decoupled weight decay (default
    1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)


def _quarter_power(step):
    return step ** 0.25


class CautiousADOPT(torch.optim.Optimizer):
    """Cautious ADOPT: ``adopt.ADOPT``'s single-tensor path (torch-adopt 0.1.0, its
    arguments ``clip_lambda`` and ``decouple``), operation by operation, with the caution of
    timm's ``Adopt(caution=True)`` (timm/optim/adopt.py, ``_single_tensor_adopt``, commit
    aa4b585) on ``exp_avg`` after its ``lerp_`` and before ``param.add_``; the mask's
    gradient is the one after maximize and the (not decoupled) weight decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6,
                 clip_lambda=_quarter_power, weight_decay=0.0, decouple=False, *,
                 maximize=False, foreach=None):
        self.clip_lambda = clip_lambda
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                step = state["step"]  # torch-adopt's count before this step
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if wd != 0 and not group["decouple"]:
                    grad = grad.add(p, alpha=wd)
                state["step"] += 1
                if step == 0:
                    exp_avg_sq.addcmul_(grad, grad)
                    continue
                if wd != 0 and group["decouple"]:
                    p.add_(p, alpha=-lr * wd)
                normed_grad = grad.div(torch.clamp(exp_avg_sq.sqrt(), group["eps"]))
                if self.clip_lambda is not None:
                    clip = self.clip_lambda(float(step))
                    normed_grad.clamp_(-clip, clip)
                exp_avg.lerp_(normed_grad, 1 - beta1)
                p.add_(caution(exp_avg, grad), alpha=-lr)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _unless_cautious(real, cautious_cls):
    """The reference builder: `real` (the framework's or the authors' optimizer) for the
    configs without ``cautious=True``, `cautious_cls` for those with it."""
    def build(params, cautious=False, **kwargs):
        return (cautious_cls if cautious else real)(params, **kwargs)
    build.__name__ = build.__qualname__ = real.__name__
    build.__doc__ = (f"{real.__module__}.{real.__qualname__}, or with cautious=True "
                     f"{cautious_cls.__name__}.")
    return build


Adam = _unless_cautious(torch.optim.Adam, CautiousAdam)
AdamW = _unless_cautious(torch.optim.AdamW, CautiousAdamW)
ADOPT = _unless_cautious(adopt.ADOPT, CautiousADOPT)


def lion(learning_rate, b1, b2, weight_decay, cautious=False):
    """``optax.lion``, or with cautious=True its chain with timm's caution
    (timm/optim/lion.py, ``_single_tensor_lion``, commit aa4b585) on the sign term: the
    mask compares ``sign((1 - b1) g + b1 m)`` with the gradient, and the weight decay is
    added after it, unmasked (optax's order; timm decays the parameter first)."""
    import jax
    import jax.numpy as jnp
    import optax

    if not cautious:
        return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    inner = optax.scale_by_lion(b1=b1, b2=b2)

    def mask(u, g):
        kept = (u * g > 0).astype(g.dtype)
        # the count over the size, as torch's mean: jnp.mean is not correctly rounded (XLA
        # gives 0.99999994 for 100003 float32 ones)
        return u * (kept / jnp.maximum(jnp.sum(kept) / max(kept.size, 1), 1e-3))

    def update(updates, state, params=None):
        signs, state = inner.update(updates, state, params)
        return jax.tree.map(mask, signs, updates), state

    return optax.chain(optax.GradientTransformation(inner.init, update),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix as apple/ml-ademamix's ``pytorch/ademamix.py`` (commit c3d73c0) computes it,
    with ``t_alpha_beta3`` for both of its warmups and ``maximize`` as a negated gradient.
    ``cautious``: timm's caution (see :func:`caution`) on the update's numerator
    ``fast / bias_correction1 + alpha * exp_avg_slow``, before the division by the
    denominator and the weight decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0,
                 t_alpha_beta3=None, eps=1e-8, weight_decay=0.0, maximize=False,
                 cautious=False, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha,
                                      t_alpha_beta3=t_alpha_beta3, eps=eps,
                                      weight_decay=weight_decay, maximize=maximize,
                                      cautious=cautious))

    @staticmethod
    def _warmup(step, beta1, beta3, alpha, warmup):
        if warmup is None or step >= warmup:
            return beta3, alpha
        frac = step / float(warmup)

        def half_life(beta):
            return math.log(0.5) / math.log(beta + 1e-8) - 1

        t = (1.0 - frac) * half_life(beta1) + frac * half_life(beta3)
        return math.pow(0.5, 1 / (t + 1)), (1.0 - frac) * 0 + frac * alpha

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2, beta3_final = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if beta1 != 0.0:
                        state["exp_avg_fast"] = torch.zeros_like(p)
                    state["exp_avg_slow"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"]
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                beta3, alpha = self._warmup(step, beta1, beta3_final, group["alpha"],
                                            group["t_alpha_beta3"])
                if beta1 != 0.0:
                    fast = state["exp_avg_fast"]
                    fast.mul_(beta1).add_(grad, alpha=1 - beta1)
                else:
                    fast = grad
                state["exp_avg_slow"].mul_(beta3).add_(grad, alpha=1 - beta3)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(
                    group["eps"])
                numerator = fast.div(bias_correction1) + alpha * state["exp_avg_slow"]
                if group["cautious"]:
                    numerator = caution(numerator, grad)
                update = numerator / denom
                update.add_(p, alpha=group["weight_decay"])
                p.add_(-group["lr"] * update)


class Adan(torch.optim.Optimizer):
    """Adan as sail-sg/Adan's ``adan.py`` (commit 2c65bea) computes it on its single-tensor
    path (foreach=False, no fused kernel, max_grad_norm 0), with ``maximize`` as a negated
    gradient. Its step count is the param group's, as the reference keeps it."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 no_prox=False, maximize=False, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      no_prox=no_prox, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            step, lr, wd = group["step"], group["lr"], group["weight_decay"]
            bias_correction3_sqrt = math.sqrt(1.0 - beta3 ** step)
            step_size_diff = lr * beta2 / (1.0 - beta2 ** step)
            step_size = lr / (1.0 - beta1 ** step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = (-p.grad if group["maximize"] else p.grad).clone()
                state = self.state[p]
                if not state:
                    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                        state[key] = torch.zeros_like(p)
                state["step"] = step  # the group's count, mirrored for the state comparison
                if "neg_pre_grad" not in state or step == 1:
                    state["neg_pre_grad"] = grad.clone().mul_(-1.0)
                diff_now = state["neg_pre_grad"]
                diff_now.add_(grad)
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_diff"].mul_(beta2).add_(diff_now, alpha=1 - beta2)
                diff_now.mul_(beta2).add_(grad)
                state["exp_avg_sq"].mul_(beta3).addcmul_(diff_now, diff_now, value=1 - beta3)
                denom = (state["exp_avg_sq"].sqrt() / bias_correction3_sqrt).add_(group["eps"])
                if group["no_prox"]:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                p.addcdiv_(state["exp_avg_diff"], denom, value=-step_size_diff)
                if not group["no_prox"]:
                    p.div_(1 + lr * wd)
                diff_now.zero_().add_(grad, alpha=-1.0)



def _train_mode(cls):
    """The authors' Schedule-Free class, put in train mode once built (the reference
    starts in eval mode and refuses a step there; fastopt's classes start in train mode)."""
    class Reference(cls):
        def __init__(self, params, foreach=False, **kwargs):
            super().__init__(params, foreach=foreach, **kwargs)
            self.train()

    Reference.__name__ = Reference.__qualname__ = cls.__name__
    Reference.__doc__ = f"schedulefree.{cls.__name__} (schedulefree 1.4.1), in train mode."
    return Reference


AdamWScheduleFree = _train_mode(schedulefree.AdamWScheduleFree)
SGDScheduleFree = _train_mode(schedulefree.SGDScheduleFree)


class Muon(torch.optim.Muon):
    """torch.optim.Muon with fastopt's extra arguments: ``ns_dtype`` None (fastopt's
    default) runs the Newton-Schulz iteration in the parameter's dtype, as the same
    operations as torch's bfloat16 run, ``"bfloat16"`` is torch's own; ``maximize``
    negates the gradients. ``foreach`` is accepted and ignored (torch's Muon has only its
    single-tensor path)."""

    def __init__(self, params, foreach=False, ns_dtype=None, maximize=False, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype, self.maximize = ns_dtype, maximize

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim import _muon
        own = _muon._zeropower_via_newtonschulz
        if self.ns_dtype != "bfloat16":
            _muon._zeropower_via_newtonschulz = _newton_schulz_in_dtype
        if self.maximize:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.neg_()
        try:
            return super().step(closure)
        finally:
            _muon._zeropower_via_newtonschulz = own


def _newton_schulz_in_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton-Schulz iteration, its operations in the gradient's dtype."""
    a, b, c = ns_coefficients
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


class Prodigy(prodigyopt.Prodigy):
    """prodigyopt.Prodigy (prodigyopt 1.1.2, the authors' package) with fastopt's extra
    arguments: ``maximize`` negates the gradients, ``foreach`` is accepted and ignored (it
    has one loop); its note on decoupled decay is not printed."""

    def __init__(self, params, foreach=False, maximize=False, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(params, **kwargs)
        self.maximize = maximize

    @torch.no_grad()
    def step(self, closure=None):
        if self.maximize:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.neg_()
        return super().step(closure)

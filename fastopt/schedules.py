"""Learning-rate schedules: scheduler classes bound to an optimizer (torch.optim.lr_scheduler's
API, for fastopt's optimizers of the array API or of fastopt.torch, and torch.optim's own),
and closed-form schedules of the step (``linear``, ``cosine_decay``, ``join``, ...; see
fastopt._closed_form) with ``plot``.

Each scheduler writes ``group["lr"]`` (and, for CyclicLR / OneCycleLR with momentum cycling,
``group["momentum"]`` or ``group["betas"][0]``) of the optimizer's param groups when it is
created and at each ``step()``; call ``opt.step(grads)`` first, then ``sched.step()``, as
with torch. The values follow torch's formulas, including its chainable (recursive) forms,
so that schedulers compose the way torch's do (ChainedScheduler, SequentialLR, or two
schedulers on one optimizer) and agree with torch to rounding.

Every scheduler checks its arguments when it is created and raises ``ValueError`` or
``TypeError`` naming the argument, rather than producing NaN learning rates later.
"""

import math
import sys
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping

from fastopt._check import choice, count, flag, number, real
from fastopt._closed_form import (
    Schedule,
    constant,
    cosine_decay,
    cyclic_triangular,
    exponential_decay,
    join,
    linear,
    one_cycle,
    plot,
    polynomial,
    sgdr,
    step_decay,
    warmup_cosine_decay,
    warmup_linear,
)
from fastopt.optim._base import Optimizer

__all__ = ["LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR",
           "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
           "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "SequentialLR",
           "ChainedScheduler", "ReduceLROnPlateau",
           "Schedule", "constant", "linear", "polynomial", "step_decay", "exponential_decay",
           "cosine_decay", "warmup_linear", "warmup_cosine_decay", "cyclic_triangular",
           "one_cycle", "sgdr", "join", "plot"]

def _per_group(name, optimizer, value, **limits):
    """One value per param group: a list of them, or one value for every group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} values (one per param group), got {len(value)}")
        return [real(f"{name}[{i}]", v, **limits) for i, v in enumerate(value)]
    return [real(name, value, **limits)] * n


def _check_optimizer(optimizer):
    torch = sys.modules.get("torch")
    if not isinstance(optimizer, Optimizer) and not (
            torch is not None and isinstance(optimizer, torch.optim.Optimizer)):
        raise TypeError(f"optimizer must be a fastopt optimizer (fastopt.AdamW, "
                        f"fastopt.torch.AdamW, ...) or a torch.optim optimizer, got "
                        f"{type(optimizer).__name__}")


class LRScheduler:
    """Base class: ``step()``, ``get_last_lr()``, ``state_dict()``, ``load_state_dict()``.

    Args:
        optimizer: a fastopt optimizer (``fastopt.AdamW``, ``fastopt.torch.AdamW``, ...) or a
            torch.optim one.
        last_epoch (int): the index of the last step taken; -1 (default) starts a schedule
            (and records each group's ``initial_lr``); >= 0 resumes one whose param groups
            already hold ``initial_lr``.

    Subclasses give ``_next_lrs()``: the learning rates at ``self.last_epoch`` (already
    advanced), usually from the groups' current ``lr`` (torch's chainable form).
    """

    def __init__(self, optimizer, last_epoch=-1):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        last_epoch = count("last_epoch", last_epoch, lo=-1)
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise ValueError(f"param_groups[{i}] has no 'initial_lr': resuming a schedule "
                               f"(last_epoch={last_epoch}) needs the optimizer's state as it "
                               f"was saved with the scheduler")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self):
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self):
        """Advance the schedule by one step and write the new learning rates."""
        self._step_count += 1
        self.last_epoch += 1
        self._write(self._next_lrs())

    def _write(self, lrs):
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = self._lrs()

    def _lrs(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def _next_lrs(self):
        raise NotImplementedError

    def _closed_form(self):
        """The learning rates at last_epoch from base_lrs alone, where the rule has such a
        form (None otherwise)."""
        return None

    def _restart(self):
        """Jump to step 0 (SequentialLR, at a milestone): the closed form if there is one."""
        self.last_epoch = 0
        lrs = self._closed_form()
        self._write(self._next_lrs() if lrs is None else lrs)

    def get_last_lr(self):
        """The learning rates the last step wrote, one per param group."""
        return self._last_lr

    def state_dict(self):
        """The scheduler's counters and settings (not the optimizer, not functions)."""
        return {k: v for k, v in vars(self).items()
                if k != "optimizer" and not callable(v) and k not in self._unsaved}

    def load_state_dict(self, state_dict):
        """Load what ``state_dict()`` gave; each value is checked against the kind of the
        current one first, and nothing changes if any is refused."""
        self._apply_state(self._checked_state(state_dict))

    def _checked_state(self, state_dict):
        current = _state_mapping(state_dict, self.state_dict(), type(self).__name__)
        return {key: _state_value(f"state_dict[{key!r}]", current[key], value,
                                  self._count_low(key))
                for key, value in state_dict.items()}

    def _apply_state(self, checked):
        vars(self).update(checked)

    def _count_low(self, key):
        """The least value an int entry of the state may take."""
        if key in ("last_epoch", "T_cur"):
            return -1
        if key in _POSITIVE_COUNTS or (key == "total_iters" and not isinstance(self, ConstantLR)):
            return 1
        return 0

    _unsaved = ("lr_lambdas",)


# state entries that the schedules divide by
_POSITIVE_COUNTS = ("step_size", "T_max", "T_0", "T_i", "T_mult", "total_steps")


def _state_mapping(state_dict, current, owner):
    """The current state, once `state_dict` is known to be a dict of its keys."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict (from {owner}.state_dict()), got "
                        f"{type(state_dict).__name__}")
    bad = [key for key in state_dict if not isinstance(key, str)]
    unknown = sorted(map(repr, bad)) + sorted(set(state_dict) - set(current) - set(bad))
    if unknown:
        raise ValueError(f"state_dict: unknown keys {unknown} for {owner}")
    return current


def _state_count(name, value, lo):
    """A loaded count: an integer (or an integral float, as JSON gives) in [lo, 2**53]."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        value = int(value)
    return count(name, value, lo=lo)


def _state_value(name, like, value, lo):
    """`value` checked to be of the kind of `like`, the current value of that entry."""
    if isinstance(like, bool):
        return flag(name, value)
    if isinstance(like, int):
        return _state_count(name, value, lo)
    if isinstance(like, float):
        number_ = number(name, value)
        if not math.isfinite(number_) and math.isfinite(like) and name != "state_dict['best']":
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return number_
    if isinstance(like, str):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        return value
    if isinstance(like, Mapping):  # MultiStepLR's milestones: {step: count}
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
        return Counter({_state_count(f"{name} key", int(k) if isinstance(k, str)
                                     and k.isdigit() else k, 0):
                        _state_count(f"{name}[{k!r}]", v, 1) for k, v in value.items()})
    if isinstance(like, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        if len(value) != len(like):
            raise ValueError(f"{name}: expected {len(like)} entries, got {len(value)}")
        items = [_state_value(f"{name}[{i}]", a, b, lo)
                 for i, (a, b) in enumerate(zip(like, value))]
        return type(like)(items)
    if like is None:
        if value is not None:
            raise TypeError(f"{name} must be None, got {type(value).__name__}")
        return None
    if type(value) is not type(like):
        raise TypeError(f"{name} must be a {type(like).__name__}, got {type(value).__name__}")
    return value


class LambdaLR(LRScheduler):
    r"""``lr = initial_lr * lr_lambda(step)`` per group (torch.optim.lr_scheduler.LambdaLR).

    Args:
        lr_lambda: a function of the step count, or a list with one per param group.
    The functions are not part of ``state_dict()``.
    """

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        _check_optimizer(optimizer)
        self.lr_lambdas = _lambdas(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]


def _lambdas(optimizer, lr_lambda):
    fns = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else (
        [lr_lambda] * len(optimizer.param_groups))
    if len(fns) != len(optimizer.param_groups):
        raise ValueError(f"lr_lambda: expected {len(optimizer.param_groups)} functions (one "
                         f"per param group), got {len(fns)}")
    for i, fn in enumerate(fns):
        if not callable(fn):
            raise TypeError(f"lr_lambda[{i}] must be a function, got {type(fn).__name__}")
    return fns


class MultiplicativeLR(LRScheduler):
    r"""``lr <- lr * lr_lambda(step)`` at each step after the first (torch's
    MultiplicativeLR)."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        _check_optimizer(optimizer)
        self.lr_lambdas = _lambdas(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        if self._is_initial:
            return self._lrs()
        return [lr * fn(self.last_epoch) for fn, lr in zip(self.lr_lambdas, self._lrs())]


class StepLR(LRScheduler):
    r"""``lr = initial_lr * gamma ** (step // step_size)``: decay by gamma every step_size
    steps.

    Args:
        step_size (int): >= 1.
        gamma (float): > 0. Default 0.1.
    """

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = count("step_size", step_size, lo=1)
        self.gamma = real("gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form(self):
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    r"""``lr = initial_lr * gamma ** (number of milestones <= step)``.

    Args:
        milestones: step counts (integers >= 0; a repeated one decays that many times).
        gamma (float): > 0. Default 0.1.
    """

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        self.milestones = Counter(count(f"milestones[{i}]", m, lo=0)
                                  for i, m in enumerate(milestones))
        self.gamma = real("gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        hits = self.milestones.get(self.last_epoch, 0)
        if not hits:
            return self._lrs()
        return [lr * self.gamma ** hits for lr in self._lrs()]


    def _closed_form(self):
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base * self.gamma ** passed for base in self.base_lrs]


class ConstantLR(LRScheduler):
    r"""``lr = initial_lr * factor`` for the first total_iters steps, then initial_lr.

    Args:
        factor (float): in [0, 1]. Default 1/3.
        total_iters (int): >= 0. Default 5.
    """

    def __init__(self, optimizer, factor=1.0 / 3, total_iters=5, last_epoch=-1):
        self.factor = real("factor", factor, lo=0.0, hi=1.0)
        self.total_iters = count("total_iters", total_iters, lo=0)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        if self.last_epoch == 0:
            return [lr * self.factor for lr in self._lrs()]
        if self.last_epoch != self.total_iters:
            return self._lrs()
        return [lr * (1.0 / self.factor) for lr in self._lrs()]

    def _closed_form(self):
        done = self.last_epoch >= self.total_iters
        return [base * (self.factor + done * (1 - self.factor)) for base in self.base_lrs]


class LinearLR(LRScheduler):
    r"""``lr = initial_lr * f(step)`` with f linear from start_factor (step 0) to end_factor
    (step total_iters), constant after.

    Args:
        start_factor (float): in (0, 1]. Default 1/3.
        end_factor (float): in [0, 1]. Default 1.
        total_iters (int): >= 1. Default 5.
    """

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        self.start_factor = real("start_factor", start_factor, lo=0.0, hi=1.0, lo_open=True)
        self.end_factor = real("end_factor", end_factor, lo=0.0, hi=1.0)
        self.total_iters = count("total_iters", total_iters, lo=1)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        if self.last_epoch == 0:
            return [lr * self.start_factor for lr in self._lrs()]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._lrs()
        span = self.end_factor - self.start_factor
        ratio = 1.0 + span / (self.total_iters * self.start_factor + (self.last_epoch - 1) * span)
        return [lr * ratio for lr in self._lrs()]

    def _closed_form(self):
        span = self.end_factor - self.start_factor
        return [base * (self.start_factor + span * min(self.total_iters, self.last_epoch)
                        / self.total_iters) for base in self.base_lrs]


class ExponentialLR(LRScheduler):
    r"""``lr = initial_lr * gamma ** step``.

    Args:
        gamma (float): > 0.
    """

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = real("gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        if self._is_initial:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form(self):
        return [base * self.gamma ** self.last_epoch for base in self.base_lrs]


class PolynomialLR(LRScheduler):
    r"""``lr = initial_lr * (1 - min(step, total_iters) / total_iters) ** power``.

    Args:
        total_iters (int): >= 1. Default 5.
        power (float): >= 0. Default 1.
    """

    def __init__(self, optimizer, total_iters=5, power=1.0, last_epoch=-1):
        self.total_iters = count("total_iters", total_iters, lo=1)
        self.power = real("power", power, lo=0.0)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._lrs()
        t, n = self.last_epoch, self.total_iters
        ratio = ((1.0 - t / n) / (1.0 - (t - 1) / n)) ** self.power
        return [lr * ratio for lr in self._lrs()]

    def _closed_form(self):
        left = 1.0 - min(self.total_iters, self.last_epoch) / self.total_iters
        return [base * left ** self.power for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing from initial_lr to eta_min over T_max steps (torch's recursive
    form, which keeps following the cosine past T_max):

    .. math::

        \eta_t = \eta_{min} + (\eta_{t-1} - \eta_{min})
            \frac{1 + \cos(\pi t / T_{max})}{1 + \cos(\pi (t - 1) / T_{max})}

    Args:
        T_max (int): >= 1, the half period in steps.
        eta_min (float): >= 0. Default 0.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = count("T_max", T_max, lo=1)
        self.eta_min = real("eta_min", eta_min, lo=0.0)
        super().__init__(optimizer, last_epoch)

    def _next_lrs(self):
        t, n, low = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._lrs()
        if self._step_count == 1 and t > 0:  # resumed: the closed form
            return [low + (base - low) * (1 + math.cos(t * math.pi / n)) / 2
                    for base in self.base_lrs]
        if (t - 1 - n) % (2 * n) == 0:  # leaving the minimum, where the ratio is 0 / 0
            return [lr + (base - low) * (1 - math.cos(math.pi / n)) / 2
                    for lr, base in zip(self._lrs(), self.base_lrs)]
        ratio = (1 + math.cos(math.pi * t / n)) / (1 + math.cos(math.pi * (t - 1) / n))
        return [ratio * (lr - low) + low for lr in self._lrs()]

    def _closed_form(self):
        cos = math.cos(math.pi * self.last_epoch / self.T_max)
        return [self.eta_min + (base - self.eta_min) * (1 + cos) / 2 for base in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    r"""SGDR: cosine annealing from initial_lr to eta_min over T_i steps, then a restart;
    T_0 for the first cycle, each next one T_mult times longer.

    Args:
        T_0 (int): >= 1.
        T_mult (int): >= 1. Default 1.
        eta_min (float): >= 0. Default 0.
    """

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1):
        self.T_0 = self.T_i = count("T_0", T_0, lo=1)
        self.T_mult = count("T_mult", T_mult, lo=1)
        self.eta_min = real("eta_min", eta_min, lo=0.0)
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def step(self):
        self._step_count += 1
        self.last_epoch += 1
        self.T_cur += 1
        if self.T_cur >= self.T_i:
            self.T_cur -= self.T_i
            self.T_i *= self.T_mult
        self._write(self._next_lrs())

    def _next_lrs(self):
        cos = math.cos(math.pi * self.T_cur / self.T_i)
        return [self.eta_min + (base - self.eta_min) * (1 + cos) / 2 for base in self.base_lrs]


def _momentum_key(optimizer):
    if "betas" in optimizer.defaults:
        return "betas"
    if "momentum" in optimizer.defaults:
        return "momentum"
    raise ValueError(f"cycle_momentum: {type(optimizer).__name__} has neither momentum nor "
                     f"betas; pass cycle_momentum=False")


def _set_momentum(group, key, value):
    if key == "betas":
        group["betas"] = (value,) + tuple(group["betas"][1:])
    else:
        group["momentum"] = value


class CyclicLR(LRScheduler):
    r"""Cyclical learning rates (Smith 2017) between base_lr and max_lr, with the momentum
    cycled inversely between max_momentum and base_momentum (torch's CyclicLR).

    A cycle is step_size_up steps up and step_size_down steps down. Amplitude per mode:
    ``triangular`` constant, ``triangular2`` halved each cycle, ``exp_range``
    ``gamma ** step``; or a custom ``scale_fn`` of the cycle (``scale_mode="cycle"``) or the
    step (``"iterations"``).

    Args:
        base_lr, max_lr: float or one per param group, >= 0.
        step_size_up (int): >= 1. Default 2000. step_size_down (int or None): >= 1; default
            step_size_up.
        mode: "triangular" (default), "triangular2", "exp_range". gamma (float): > 0.
        cycle_momentum (bool): default True (needs momentum or betas).
        base_momentum, max_momentum: float or one per group. Defaults 0.8, 0.9.
    """

    _unsaved = ("lr_lambdas", "scale_fn")

    def __init__(self, optimizer, base_lr, max_lr, step_size_up=2000, step_size_down=None,
                 mode="triangular", gamma=1.0, scale_fn=None, scale_mode="cycle",
                 cycle_momentum=True, base_momentum=0.8, max_momentum=0.9, last_epoch=-1):
        _check_optimizer(optimizer)
        base_lrs = _per_group("base_lr", optimizer, base_lr, lo=0.0)
        self.max_lrs = _per_group("max_lr", optimizer, max_lr, lo=0.0)
        up = float(count("step_size_up", step_size_up, lo=1))
        down = up if step_size_down is None else float(
            count("step_size_down", step_size_down, lo=1))
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.gamma = real("gamma", gamma, lo=0.0, lo_open=True)
        if scale_fn is None:
            self.mode = choice("mode", mode, ("triangular", "triangular2", "exp_range"))
            self.scale_mode = "iterations" if mode == "exp_range" else "cycle"
        else:
            if not callable(scale_fn):
                raise TypeError(f"scale_fn must be a function, got {type(scale_fn).__name__}")
            self.mode = mode
            self.scale_mode = choice("scale_mode", scale_mode, ("cycle", "iterations"))
        self.scale_fn = scale_fn
        self.cycle_momentum = bool(cycle_momentum)
        last_epoch = count("last_epoch", last_epoch, lo=-1)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups):
                group["lr"] = lr
        if self.cycle_momentum:
            self._momentum_key = _momentum_key(optimizer)
            self.base_momentums = _per_group("base_momentum", optimizer, base_momentum,
                                             lo=0.0, hi=1.0)
            self.max_momentums = _per_group("max_momentum", optimizer, max_momentum,
                                            lo=0.0, hi=1.0)
            if last_epoch == -1:
                for high, low, group in zip(self.max_momentums, self.base_momentums,
                                            optimizer.param_groups):
                    _set_momentum(group, self._momentum_key, high)
                    group["max_momentum"], group["base_momentum"] = high, low
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _scale(self, x):
        if self.scale_fn is not None:
            return self.scale_fn(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / 2.0 ** (x - 1)
        return self.gamma ** x

    def _next_lrs(self):
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            height = x / self.step_ratio
        else:
            height = (x - 1) / (self.step_ratio - 1)
        scale = self._scale(cycle if self.scale_mode == "cycle" else self.last_epoch)
        lrs = [base + (high - base) * height * scale
               for base, high in zip(self.base_lrs, self.max_lrs)]
        if self.cycle_momentum:
            for low, high, group in zip(self.base_momentums, self.max_momentums,
                                        self.optimizer.param_groups):
                _set_momentum(group, self._momentum_key, high - (high - low) * height * scale)
        return lrs


class OneCycleLR(LRScheduler):
    r"""The 1cycle policy (Smith & Topin 2017), as torch's OneCycleLR: the learning rate
    anneals from max_lr / div_factor up to max_lr over the first pct_start of total_steps,
    then down to max_lr / (div_factor * final_div_factor) (three_phase: back to the start
    first, then down); the momentum moves inversely between max_momentum and base_momentum.

    Args:
        max_lr: float or one per param group, > 0.
        total_steps (int): >= 1; or epochs and steps_per_epoch (its product).
        pct_start (float): in [0, 1]. Default 0.3.
        anneal_strategy: "cos" (default) or "linear".
        cycle_momentum (bool): default True. base_momentum, max_momentum: defaults 0.85, 0.95.
        div_factor (float): > 0. Default 25. final_div_factor (float): > 0. Default 1e4.
        three_phase (bool): default False.
    Stepping past total_steps raises ValueError (and writes nothing).
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85,
                 max_momentum=0.95, div_factor=25.0, final_div_factor=1e4, three_phase=False,
                 last_epoch=-1):
        _check_optimizer(optimizer)
        if total_steps is not None:
            self.total_steps = count("total_steps", total_steps, lo=1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = count(
                "epochs * steps_per_epoch",
                count("epochs", epochs, lo=1) * count("steps_per_epoch", steps_per_epoch, lo=1),
                lo=1)
        else:
            raise ValueError("OneCycleLR needs total_steps, or epochs and steps_per_epoch")
        last_epoch = count("last_epoch", last_epoch, lo=-1)
        if last_epoch >= self.total_steps:
            raise ValueError(f"last_epoch {last_epoch} is past total_steps {self.total_steps}")
        pct_start = real("pct_start", pct_start, lo=0.0, hi=1.0)
        self.anneal_strategy = choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        div_factor = real("div_factor", div_factor, lo=0.0, lo_open=True)
        final_div_factor = real("final_div_factor", final_div_factor, lo=0.0, lo_open=True)
        up_end = float(pct_start * self.total_steps) - 1
        last = self.total_steps - 1
        # (end step, lr from, lr to, momentum from, momentum to), by param-group key
        if flag("three_phase", three_phase):
            self.phases = [(up_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                           (float(2 * pct_start * self.total_steps) - 2, "max_lr",
                            "initial_lr", "base_momentum", "max_momentum"),
                           (last, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            self.phases = [(up_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                           (last, "max_lr", "min_lr", "base_momentum", "max_momentum")]
        max_lrs = _per_group("max_lr", optimizer, max_lr, lo=0.0, lo_open=True)
        if last_epoch == -1:
            for high, group in zip(max_lrs, optimizer.param_groups):
                group["initial_lr"] = high / div_factor
                group["max_lr"] = high
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            self._momentum_key = _momentum_key(optimizer)
            highs = _per_group("max_momentum", optimizer, max_momentum, lo=0.0, hi=1.0)
            lows = _per_group("base_momentum", optimizer, base_momentum, lo=0.0, hi=1.0)
            if last_epoch == -1:
                for high, low, group in zip(highs, lows, optimizer.param_groups):
                    _set_momentum(group, self._momentum_key, high)
                    group["max_momentum"], group["base_momentum"] = high, low
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def step(self):
        if self.last_epoch + 1 > self.total_steps:
            raise ValueError(f"OneCycleLR: step {self.last_epoch + 1} is past total_steps "
                             f"{self.total_steps}")
        super().step()

    def _next_lrs(self):
        t = self.last_epoch
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
                if t <= end or i == len(self.phases) - 1:
                    pct = (t - start) / (end - start)
                    lrs.append(self._anneal(group[lr0], group[lr1], pct))
                    if self.cycle_momentum:
                        _set_momentum(group, self._momentum_key,
                                      self._anneal(group[m0], group[m1], pct))
                    break
                start = end
        return lrs


class SequentialLR(LRScheduler):
    """Runs ``schedulers[i]`` from ``milestones[i - 1]`` on (torch's SequentialLR); each
    scheduler restarts (from its initial lr) at its milestone.

    Args:
        schedulers: schedulers of this optimizer (not ReduceLROnPlateau).
        milestones: one fewer than the schedulers, increasing step counts.
    """

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        _check_optimizer(optimizer)
        schedulers = _check_schedulers(optimizer, schedulers)
        milestones = [count(f"milestones[{i}]", m, lo=1) for i, m in enumerate(milestones)]
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"milestones: expected {len(schedulers) - 1} (one fewer than the "
                             f"schedulers), got {len(milestones)}")
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must increase, got {milestones}")
        self.optimizer = optimizer
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = count("last_epoch", last_epoch, lo=-1) + 1
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for scheduler in schedulers:  # undo the step each took when it was created
            _rewind(scheduler)
        first = self._schedulers[bisect_right(milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self):
        self.last_epoch += 1
        i = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[i]
        if i > 0 and self._milestones[i - 1] == self.last_epoch:
            scheduler._restart()
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self):
        state = {k: v for k, v in vars(self).items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        """Load what ``state_dict()`` gave (the inner schedulers' states included); nothing
        changes if any value is refused."""
        self._apply_state(self._checked_state(state_dict))

    def _checked_state(self, state_dict):
        current = _state_mapping(state_dict, self.state_dict(), type(self).__name__)
        state = {key: _state_value(f"state_dict[{key!r}]", current[key], value,
                                   -1 if key == "last_epoch" else 1)
                 for key, value in state_dict.items() if key != "_schedulers"}
        inner = state_dict.get("_schedulers", [{}] * len(self._schedulers))
        if not isinstance(inner, (list, tuple)) or len(inner) != len(self._schedulers):
            raise ValueError(f"state_dict['_schedulers'] must be a list of "
                             f"{len(self._schedulers)} scheduler states, got {inner!r:.80}")
        checked = []
        for i, (scheduler, saved) in enumerate(zip(self._schedulers, inner)):
            try:
                checked.append(scheduler._checked_state(saved))
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict['_schedulers'][{i}]: {e}") from None
        state["_schedulers"] = checked
        return state

    def _apply_state(self, checked):
        checked = dict(checked)
        for scheduler, saved in zip(self._schedulers, checked.pop("_schedulers")):
            scheduler._apply_state(saved)
        vars(self).update(checked)


def _rewind(scheduler):
    if isinstance(scheduler, (SequentialLR, ChainedScheduler)):
        for inner in scheduler._schedulers:
            _rewind(inner)
    else:
        scheduler.last_epoch -= 1


def _check_schedulers(optimizer, schedulers):
    schedulers = list(schedulers)
    if not schedulers:
        raise ValueError("schedulers: expected at least one scheduler")
    for i, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"schedulers[{i}] is not a fastopt scheduler")
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(f"schedulers[{i}]: ReduceLROnPlateau needs a metric at each step "
                             f"and cannot be sequenced")
        if scheduler.optimizer is not optimizer:
            raise ValueError(f"schedulers[{i}] belongs to another optimizer")
    return schedulers


class ChainedScheduler(LRScheduler):
    """Steps every scheduler in order at each ``step()``, so their effects multiply
    (torch's ChainedScheduler).

    Args:
        schedulers: schedulers of one optimizer.
        optimizer: that optimizer (default: the first scheduler's).
    """

    def __init__(self, schedulers, optimizer=None):
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("schedulers: expected at least one scheduler")
        for i, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, LRScheduler):
                raise TypeError(f"schedulers[{i}] is not a fastopt scheduler, got "
                                f"{type(scheduler).__name__}")
        optimizer = schedulers[0].optimizer if optimizer is None else optimizer
        _check_optimizer(optimizer)
        for i, scheduler in enumerate(schedulers):
            if scheduler.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] belongs to another optimizer")
        self.optimizer = optimizer
        self._schedulers = schedulers
        self._last_lr = self._lrs()

    def step(self):
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = self._lrs()

    state_dict = SequentialLR.state_dict
    load_state_dict = SequentialLR.load_state_dict
    _checked_state = SequentialLR._checked_state
    _apply_state = SequentialLR._apply_state


class ReduceLROnPlateau(LRScheduler):
    """Multiply the learning rate by ``factor`` when a metric has stopped improving for
    ``patience`` steps (torch's ReduceLROnPlateau): ``step(metric)``.

    Args:
        mode: "min" (default; lower is better) or "max".
        factor (float): in [0, 1). Default 0.1.
        patience (int): >= 0. Default 10.
        threshold (float): >= 0. Default 1e-4. threshold_mode: "rel" (default) or "abs".
        cooldown (int): >= 0 steps after a reduction before counting again. Default 0.
        min_lr: float or one per param group, >= 0. Default 0.
        eps (float): >= 0; smaller reductions are skipped. Default 1e-8.
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.mode = choice("mode", mode, ("min", "max"))
        self.factor = real("factor", factor, lo=0.0, hi=1.0, hi_open=True)
        self.patience = count("patience", patience, lo=0)
        self.threshold = real("threshold", threshold, lo=0.0)
        self.threshold_mode = choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.cooldown = count("cooldown", cooldown, lo=0)
        self.min_lrs = _per_group("min_lr", optimizer, min_lr, lo=0.0)
        self.eps = real("eps", eps, lo=0.0)
        self.last_epoch = 0
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self._last_lr = self._lrs()

    def _is_better(self, value):
        if self.mode == "min":
            bound = (self.best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                     else self.best - self.threshold)
            return value < bound
        bound = (self.best * (self.threshold + 1.0) if self.threshold_mode == "rel"
                 else self.best + self.threshold)
        return value > bound

    def step(self, metrics):
        """Record this step's metric (a real number); reduce the lr if it has plateaued."""
        current = number("metrics", metrics)  # or a 0-d array of any framework
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            for group, floor in zip(self.optimizer.param_groups, self.min_lrs):
                old = float(group["lr"])
                new = max(old * self.factor, floor)
                if old - new > self.eps:
                    group["lr"] = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._lrs()

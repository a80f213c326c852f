"""The optimizer case table: one :class:`Case` per update rule (in the spirit of torch's
``optim_db`` and optax's ``_OPTIMIZERS_UNDER_TEST``).

A case holds everything the per-rule tests need:

- ``configs``: hyperparameter dicts. Every test that runs a rule runs each of them (the
  parity, torch/optax conformance, resume and bad-gradient tests), in the fast tier or the
  ``slow`` one (see :func:`spread`);
- ``reference``: the implementation it must agree with (:class:`Reference`: a
  torch.optim-style class, or an optax transformation with its argument adapter);
- ``bad``: hyperparameters it must refuse (:class:`Bad`: kwargs, exception type, message);
- ``state``: its per-parameter state keys, each with the condition under which it appears
  (:func:`keys`);
- ``shapes``: the parameter shapes of the backend parity test, where the rule needs others
  than :data:`SIZES` (Adafactor factors tensors of 2+ dims);
- ``unchecked``: (config, dtype, reason) too ill-conditioned in that dtype for the reference
  comparison's tolerance: the test holds fastopt there to be at least as close to the
  float64 trajectory as the reference is to its own (see test_optim_torch.py).

Read by tests/test_optim_parity.py (backend parity, and the check that every rule of
``fastopt.optim`` has a case), test_optim_torch.py and test_optim_optax.py (conformance),
test_bad_input.py and test_state.py. A new rule's tests are one entry in :data:`CASES`.
"""

import inspect
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest

from fastopt import _rules

# the parity test's parameter sizes: empty, one element, a SIMD remainder, several vectors,
# and a large one that the threads split into chunks
SIZES = (0, 1, 7, 1023, 100003)
SMALL = 5000  # the fast tier's parity runs leave out tensors of more elements than this


# --- the record ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    """Hyperparameters `kwargs` make the rule raise `exc`, with a message matching `match`
    (a regular expression; the test prefixes the group's name, ``param_groups[i]: ``)."""
    kwargs: dict
    exc: type
    match: str


@dataclass(frozen=True)
class Reference:
    """The implementation a rule follows, at `target` (a dotted path).

    kind "torch": a torch.optim-style class, built as ``cls(params, foreach=False, **kw)``
    with the fastopt config unchanged (so the defaults must agree too), e.g.
    "torch.optim.Adam" or "adopt.ADOPT". kind "optax": a function returning an optax
    transformation, called with ``adapt(kw)`` (fastopt's names and defaults turned into its
    arguments; optax has no maximize, the test negates the gradients instead).
    `seed` seeds the conformance test's parameters and gradients."""
    kind: str
    target: str
    adapt: Optional[Callable[[dict], dict]] = None
    seed: int = 2024

    def load(self):
        """The class or function, or pytest.skip when its framework is not installed."""
        for framework in {"torch": ("torch",), "optax": ("jax", "optax")}[self.kind]:
            pytest.importorskip(framework)
        module, _, attr = self.target.rpartition(".")
        return getattr(pytest.importorskip(module), attr)

    def build(self, params, kw):
        """The reference optimizer (torch: over `params`) or transformation (optax)."""
        if self.kind == "torch":
            return self.load()(params, foreach=False, **kw)
        return self.load()(**self.adapt(kw))


def keys(*always, **optional):
    """State keys: `always` present; each of `optional` where its condition, called with the
    config and the parameter's shape, holds."""
    return {**{k: None for k in always}, **optional}


def flag(name):
    """The key appears when the boolean hyperparameter `name` (default False) is set."""
    def when(kw, shape):
        return bool(kw.get(name, False))
    when.__qualname__ = f"flag({name!r})"
    return when


def positive(name):
    """The key appears when the hyperparameter `name` (default 0) is > 0."""
    def when(kw, shape):
        return kw.get(name, 0.0) > 0
    when.__qualname__ = f"positive({name!r})"
    return when


def ndim_at_least(n, appears=True):
    """The key appears for parameters of at least `n` dimensions (or, appears=False, fewer)."""
    def when(kw, shape):
        return (len(shape) >= n) == appears
    when.__qualname__ = f"ndim_at_least({n}, appears={appears})"
    return when


@dataclass(frozen=True, eq=False)
class Case:
    name: str  # the class name: fastopt.<name>
    configs: tuple  # hyperparameter dicts
    reference: Reference
    bad: tuple  # Bad
    state: dict  # state key -> None (always there) or when(kw, shape) -> bool; see keys()
    shapes: Optional[tuple] = None  # parity test shapes, if not SIZES
    unchecked: tuple = ()  # (config, dtype, reason): compared through float64, not directly
    matrices: bool = False  # the rule updates matrices only (Muon): see shaped()
    # the hyperparameter a second param group halves in the tests of groups (Prodigy's
    # groups share one lr)
    group_key: str = "lr"

    def second_group(self, kw):
        """The hyperparameters of a second param group beside one of config `kw`: its
        group_key halved (from the class's default where `kw` does not set it)."""
        import fastopt
        default = inspect.signature(getattr(fastopt, self.name)).parameters[self.group_key]
        return {self.group_key: 0.5 * kw.get(self.group_key, default.default)}

    def shaped(self, shapes):
        """`shapes` as this rule's parameters take them: unchanged, or for a rule of
        matrices each made 2-D (its elements kept: () -> (1, 1), (n,) -> (1, n), more
        dimensions folded into the rows)."""
        if not self.matrices:
            return shapes
        return [(1, 1) if s in ((), 1) else (1, s) if isinstance(s, int) else
                (1, s[0]) if len(s) == 1 else (math.prod(s[:-1]), s[-1]) for s in shapes]

    def state_keys(self, kw, shape):
        """The state keys of a parameter of `shape` after a step under config `kw`."""
        return {k for k, when in self.state.items() if when is None or when(kw, tuple(shape))}

    @property
    def richest(self):
        """The config with the most state (the first of those): for tests that need one
        config per rule, such as the bad-input tests that check nothing was written."""
        return max(self.configs, key=lambda kw: len(self.state_keys(kw, (4, 2))))

    def parity_shapes(self, large):
        """The parity test's shapes: all, or (large=False) those of at most SMALL elements."""
        shapes = SIZES if self.shapes is None else self.shapes
        return tuple(self.shaped([s for s in shapes
                                  if large or math.prod(np.atleast_1d(s)) <= SMALL]))


def shaped(name, shapes):
    """`shapes` as rule `name`'s parameters take them (Case.shaped; unchanged for a name
    the table does not list)."""
    return CASES[name].shaped(shapes) if name in CASES else list(shapes)


def config_id(name, kw):
    return name + "(" + ",".join(f"{k}={v}" for k, v in kw.items()) + ")"


# --- optax argument adapters ----------------------------------------------------------------

def _lion_args(kw):
    b1, b2 = kw.get("betas", (0.9, 0.99))
    return dict(learning_rate=kw.get("lr", 1e-4), b1=b1, b2=b2,
                weight_decay=kw.get("weight_decay", 0.0), cautious=kw.get("cautious", False))


def _lamb_args(kw):
    b1, b2 = kw.get("betas", (0.9, 0.999))
    return dict(learning_rate=kw.get("lr", 1e-3), b1=b1, b2=b2, eps=kw.get("eps", 1e-6),
                weight_decay=kw.get("weight_decay", 0.0))


def torch_optim(name):
    return Reference("torch", f"torch.optim.{name}")


# --- kernel-level examples ----------------------------------------------------------------

# each elementwise kernel's rule (Lamb's update pass included)
RULE_OF = {k.name: rule for rule in _rules.RULES for k in rule.kernels
           if k.name in _rules.KERNELS}


def kernel_hyper(kernel, step, rule=None):
    """Example hyperparameters of `kernel`'s rule (of the table, or a pass kernel), as its
    scalars function and NumPy reference take them, at `step`: with the features that change
    its arithmetic on (the kernel's state decides momentum, centering, amsgrad) and the
    gradient prologue's clip and scale. `rule`: the kernel's rule where it is a pass kernel
    (Adafactor's). The one table the kernel-level tests share: a new rule adds its entry
    here."""
    state = _rules.ALL_KERNELS[kernel].state
    common = dict(grad_scale=0.9, grad_clip=2.5)
    adam = dict(step=step, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    by_op = {
        "sgd_step": dict(lr=0.05, momentum=0.9 if state else 0.0, dampening=0.1,
                         weight_decay=0.01, nesterov=bool(state), maximize=False,
                         first=step == 1),
        "adam_step": dict(adam, decoupled=kernel == "adam", maximize=False),
        # every other step optax's forms: eps under the square root, the trace after lr
        "adagrad_step": dict(step=step, lr=0.05, lr_decay=0.01, weight_decay=0.01, eps=1e-10,
                             eps_root=1e-7 if step % 2 else 0.0, maximize=True),
        "rmsprop_step": dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.01,
                             momentum=0.9 if "momentum_buffer" in state else 0.0,
                             centered="grad_avg" in state, eps_root=1e-6 if step % 2 else 0.0,
                             lr_in_trace="momentum_buffer" in state and step % 2 == 1,
                             maximize=False),
        "adadelta_step": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01, maximize=False),
        "adamax_step": dict(adam, maximize=False),
        "nadam_step": dict(adam, mu_product=0.5, momentum_decay=4e-3, decoupled=False,
                           maximize=True),
        "radam_step": dict(adam, decoupled=True, maximize=False),
        "adopt_step": dict(adam, eps=1e-6, decoupled=True, clip_value=1.5, maximize=False),
        "lion_step": dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=False),
        "lamb_step": dict(adam, eps=1e-6, maximize=False),
        "adafactor_step": dict(step=step, lr=0.01, beta2_decay=-0.8, eps1=None,
                               weight_decay=0.01, maximize=False),
        "rprop_step": dict(etaminus=0.5, etaplus=1.2, step_size_min=1e-3, step_size_max=2.0,
                           maximize=True),
        "asgd_step": dict(eta=0.01, mu=0.5 if step > 1 else 1.0, lambd=1e-3, weight_decay=0.01,
                          maximize=False),
        "ademamix_step": dict(adam, beta3=0.999, alpha=5.0, maximize=True),
        "adan_step": dict(adam, beta3=0.99, no_prox=step % 2 == 0, maximize=False),
        # ckp1 >= 0.5 at the first step, below it after: both of torch's lerp formulas
        "sgd_schedulefree_step": dict(lr=0.05, ckp1=1.0 / step, momentum=0.9,
                                      weight_decay=0.01, maximize=True),
        "adamw_schedulefree_step": dict(adam, ckp1=1.0 / step, maximize=False),
        "prodigy_step": dict(d=2e-3, dlr=2e-3, beta1=0.9, beta2=0.999, beta3=0.95, eps=1e-8,
                             weight_decay=0.01, decouple=step % 2 == 0, d0=1e-3,
                             safeguard_warmup=step % 3 == 0, d_next=3e-3, maximize=False),
        "muon_step": dict(lr=0.02, weight_decay=0.1, momentum=0.95 if step % 2 else 0.3,
                          nesterov=step % 3 != 0, ns_coefficients=(3.4445, -4.7750, 2.0315),
                          ns_steps=5, eps=1e-7, adjust_lr_fn="match_rms_adamw",
                          ns_dtype=None, maximize=False),
    }
    return dict(by_op[(rule or RULE_OF[kernel]).op], **common)



# --- the table ------------------------------------------------------------------------------

_ADAM_STATE = keys("step", "exp_avg", "exp_avg_sq", max_exp_avg_sq=flag("amsgrad"))

CASES = {case.name: case for case in [
    Case(
        "SGD",
        configs=(
            dict(lr=0.05),
            dict(lr=0.05, weight_decay=0.01, maximize=True),
            dict(lr=0.05, momentum=0.9),
            dict(lr=0.02, momentum=0.8, dampening=0.3, weight_decay=1e-3),
            dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-2),
            dict(lr=0.01),
            dict(lr=0.01, maximize=True, weight_decay=0.05),
            dict(lr=0.01, momentum=0.9),
            dict(lr=0.005, momentum=0.5, dampening=0.5, weight_decay=1e-3),
            dict(lr=0.005, momentum=0.99, nesterov=True),
            dict(lr=0.003, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
            dict(lr=0.05, momentum=0.9, nesterov=True),
            dict(lr=0.1, momentum=0.9),
        ),
        reference=torch_optim("SGD"),
        bad=(
            Bad(dict(lr=-0.1), ValueError, r"lr must be a finite number in \[0, inf\], got -0.1"),
            Bad(dict(lr=math.nan), ValueError, r"lr must be a finite number .* got nan"),
            Bad(dict(lr=math.inf), ValueError, r"lr must be a finite number .* got inf"),
            Bad(dict(lr="0.1"), TypeError, r"lr must be a real number"),
            Bad(dict(momentum=-0.5), ValueError, r"momentum must be"),
            Bad(dict(dampening=1.5, momentum=0.9), ValueError, r"dampening must be .* \[0, 1\]"),
            Bad(dict(weight_decay=-1e-4), ValueError, r"weight_decay must be"),
            Bad(dict(nesterov=True, momentum=0.0), ValueError,
                r"nesterov=True needs momentum > 0 and dampening = 0"),
            Bad(dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
                r"nesterov=True needs"),
            Bad(dict(maximize=1), TypeError, r"maximize must be True or False"),
        ),
        state=keys(momentum_buffer=positive("momentum")),
    ),
    Case(
        "Adam",
        configs=(
            # cautious: the mask's gradient is the one after maximize and the L2 decay
            dict(lr=1e-2, weight_decay=0.1, maximize=True, cautious=True),
            dict(lr=1e-2),
            dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.1),
            dict(lr=1e-2, amsgrad=True, maximize=True),
            dict(),
            dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
            dict(lr=1e-2, betas=(0.2, 0.5)),
            dict(lr=5e-3, weight_decay=0.1),
            dict(lr=5e-3, amsgrad=True),
            dict(lr=5e-3, amsgrad=True, weight_decay=0.01, maximize=True),
            dict(lr=1e-3, betas=(0.0, 0.0), eps=0.0),
            dict(lr=1e-2, amsgrad=True, weight_decay=0.1),
            dict(lr=0.1, amsgrad=True),
        ),
        reference=Reference("torch", "reference_impls.Adam"),  # torch's, unless cautious
        bad=(
            Bad(dict(lr=-1.0), ValueError, r"lr must be"),
            Bad(dict(eps=-1e-8), ValueError, r"eps must be"),
            Bad(dict(eps=math.nan), ValueError, r"eps must be"),
            Bad(dict(betas=(1.0, 0.999)), ValueError,
                r"betas\[0\] must be a finite number in \[0, 1\), got 1.0"),
            Bad(dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be"),
            Bad(dict(betas=(0.9, math.nan)), ValueError, r"betas\[1\] must be"),
            Bad(dict(betas=0.9), ValueError, r"betas must be a pair"),
            Bad(dict(amsgrad="yes"), TypeError, r"amsgrad must be True or False"),
            Bad(dict(cautious="yes"), TypeError, r"cautious must be True or False"),
        ),
        state=_ADAM_STATE,
    ),
    Case(
        "AdamW",
        configs=(
            dict(lr=1e-2, weight_decay=0.1, cautious=True),
            dict(lr=1e-2),
            dict(lr=3e-3, betas=(0.5, 0.99), weight_decay=0.2, amsgrad=True),
            dict(),
            dict(lr=1e-2, weight_decay=0.3),
            dict(lr=1e-2, betas=(0.5, 0.9), amsgrad=True, maximize=True),
            dict(lr=2e-3, weight_decay=0.0, eps=1e-4),
            dict(lr=0.1),
            dict(lr=1e-2, betas=(0.5, 0.9), amsgrad=True, maximize=True, cautious=True),
        ),
        reference=Reference("torch", "reference_impls.AdamW"),  # torch's, unless cautious
        bad=(
            Bad(dict(weight_decay=-0.01), ValueError, r"weight_decay must be"),
            Bad(dict(cautious="yes"), TypeError, r"cautious must be True or False"),
        ),
        state=_ADAM_STATE,
    ),
    Case(
        "Adagrad",
        configs=(
            dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
            dict(),
            dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1,
                 eps=1e-6, maximize=True),
            dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
            dict(lr=0.1),
        ),
        reference=torch_optim("Adagrad"),
        bad=(
            Bad(dict(lr_decay=-0.1), ValueError, r"lr_decay must be"),
            Bad(dict(initial_accumulator_value=-1.0), ValueError,
                r"initial_accumulator_value must be"),
            Bad(dict(eps=math.inf), ValueError, r"eps must be"),
        ),
        state=keys("step", "sum"),
    ),
    Case(
        "RMSprop",
        configs=(
            dict(lr=0.01, maximize=True),
            dict(lr=0.01, alpha=0.3, centered=True, momentum=0.9, weight_decay=0.01),
            dict(lr=0.01, momentum=0.5),
            dict(),
            dict(lr=3e-3, alpha=0.9, momentum=0.9, weight_decay=1e-2),
            dict(lr=1e-3, alpha=0.99, centered=True, maximize=True),
            dict(lr=1e-3, alpha=0.5, centered=True, momentum=0.5, eps=1e-6),
            dict(lr=0.01, centered=True, momentum=0.9),
            dict(lr=0.1, centered=True, momentum=0.9),
        ),
        reference=torch_optim("RMSprop"),
        bad=(
            Bad(dict(alpha=1.5), ValueError, r"alpha must be a finite number in \[0, 1\]"),
            Bad(dict(momentum=-0.9), ValueError, r"momentum must be"),
            Bad(dict(centered=None), TypeError, r"centered must be True or False"),
        ),
        state=keys("step", "square_avg", grad_avg=flag("centered"),
                   momentum_buffer=positive("momentum")),
        unchecked=(
            (dict(lr=0.01, alpha=0.3, centered=True, momentum=0.9, weight_decay=0.01),
             np.float32,
             "ill-conditioned in float32: centered with alpha=0.3, v - gbar^2 cancels; over "
             "200 steps torch's float32 run ends 3.8e-5 from float64, fastopt's 1.0e-5, "
             "beyond the 4e-6 tolerance"),
        ),
    ),
    Case(
        "Adadelta",
        configs=(
            dict(lr=1.0, rho=0.8, weight_decay=0.01),
            dict(),
            dict(lr=0.5, rho=0.7, eps=1e-4, weight_decay=0.05, maximize=True),
            dict(lr=1.0),
        ),
        reference=torch_optim("Adadelta"),
        bad=(
            Bad(dict(rho=-0.1), ValueError, r"rho must be"),
            Bad(dict(lr=math.nan), ValueError, r"lr must be"),
        ),
        state=keys("step", "square_avg", "acc_delta"),
    ),
    Case(
        "Adamax",
        configs=(
            dict(lr=0.01, betas=(0.3, 0.9), weight_decay=0.1),
            dict(),
            dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-5, weight_decay=0.1),
            dict(lr=0.01),
        ),
        reference=torch_optim("Adamax"),
        bad=(
            Bad(dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be"),
        ),
        state=keys("step", "exp_avg", "exp_inf"),
    ),
    Case(
        "NAdam",
        configs=(
            dict(lr=0.01, momentum_decay=0.01),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
            dict(),
            dict(lr=1e-2, betas=(0.8, 0.99), momentum_decay=1e-2, weight_decay=0.1),
            dict(lr=0.01),
        ),
        reference=torch_optim("NAdam"),
        bad=(
            Bad(dict(momentum_decay=-4e-3), ValueError, r"momentum_decay must be"),
            Bad(dict(decoupled_weight_decay="no"), TypeError,
                r"decoupled_weight_decay must be True or False"),
        ),
        state=keys("step", "mu_product", "exp_avg", "exp_avg_sq"),
    ),
    Case(
        "RAdam",
        configs=(
            dict(lr=0.01, betas=(0.8, 0.95)),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
            dict(),
            dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1),
            dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
            dict(lr=0.01),
        ),
        reference=torch_optim("RAdam"),
        bad=(
            Bad(dict(eps=-1.0), ValueError, r"eps must be"),
        ),
        state=keys("step", "exp_avg", "exp_avg_sq"),
    ),
    Case(
        "ADOPT",
        configs=(
            dict(),
            # cautious: the mask's gradient includes the (not decoupled) weight decay
            dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, maximize=True, cautious=True),
            dict(lr=1e-2, betas=(0.5, 0.99), eps=1e-8),
            dict(lr=1e-2, weight_decay=0.1),
            dict(lr=1e-2, weight_decay=0.1, decouple=True, maximize=True),
            dict(lr=1e-2, clip_lambda=None),
            dict(lr=3e-3, betas=(0.8, 0.95), maximize=True),
        ),
        reference=Reference("torch", "reference_impls.ADOPT"),  # adopt.ADOPT, unless cautious
        bad=(
            Bad(dict(lr=-1e-3), ValueError, r"lr must be a finite number in \[0, inf\]"),
            Bad(dict(betas=(0.9, 1.0)), ValueError,
                r"betas\[1\] must be a finite number in \[0, 1\)"),
            Bad(dict(eps=-1e-6), ValueError, r"eps must be"),
            Bad(dict(weight_decay=-0.1), ValueError, r"weight_decay must be"),
            Bad(dict(decouple=1), TypeError, r"decouple must be True or False"),
            Bad(dict(cautious="yes"), TypeError, r"cautious must be True or False"),
        ),
        state=keys("step", "exp_avg", "exp_avg_sq"),
    ),
    Case(
        "Lion",
        configs=(
            dict(lr=1e-3, weight_decay=0.1),
            dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, maximize=True, cautious=True),
            dict(lr=1e-3, betas=(0.5, 0.2), maximize=True),
            dict(),
            dict(lr=3e-4, betas=(0.5, 0.9), maximize=True),
            dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=1.0),
        ),
        # optax.lion, unless cautious
        reference=Reference("optax", "reference_impls.lion", _lion_args, seed=11),
        bad=(
            Bad(dict(betas=(1.1, 0.99)), ValueError,
                r"betas\[0\] must be a finite number in \[0, 1\]"),
            Bad(dict(weight_decay=-1.0), ValueError, r"weight_decay must be"),
            Bad(dict(cautious="yes"), TypeError, r"cautious must be True or False"),
        ),
        state=keys("exp_avg"),  # no step count
    ),
    Case(
        "Lamb",
        configs=(
            dict(lr=1e-2),
            dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1, maximize=True),
            dict(),
            dict(lr=1e-2, weight_decay=0.1),
            dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-4, maximize=True),
            dict(lr=1e-2, weight_decay=0.01),
        ),
        reference=Reference("optax", "optax.lamb", _lamb_args, seed=12),
        bad=(
            Bad(dict(eps=-1e-6), ValueError, r"eps must be"),
            Bad(dict(betas=(0.9,)), ValueError, r"betas must be a pair"),
        ),
        state=keys("step", "exp_avg", "exp_avg_sq"),
    ),
    Case(
        "Adafactor",
        configs=(
            dict(lr=1e-2),
            dict(lr=0.05, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=2.0, weight_decay=0.1,
                 maximize=True),
            dict(),
            dict(lr=1e-3, beta2_decay=0.0, eps=(1e-3, 0.0), weight_decay=0.5),
            dict(lr=1e-2, weight_decay=0.01),
        ),
        reference=torch_optim("Adafactor"),
        bad=(
            Bad(dict(beta2_decay=0.5), ValueError, r"beta2_decay must be"),
            Bad(dict(eps=(None, -1.0)), ValueError, r"eps\[1\] must be"),
            Bad(dict(eps=(-1e-3, 1e-3)), ValueError, r"eps\[0\] must be"),
            Bad(dict(eps=1e-3), ValueError, r"eps must be a pair"),
            Bad(dict(d=0.5), ValueError, r"d must be"),
            Bad(dict(lr=float("nan")), ValueError, r"lr must be"),
        ),
        # row and column factors for 2+ dims (the last two), as torch
        state=keys("step", variance=ndim_at_least(2, appears=False),
                   row_var=ndim_at_least(2), col_var=ndim_at_least(2)),
        # 0-d and 1-d tensors, one column block, several blocks and slices, a matrix large
        # enough for both threads, a conv weight (many 3 x 3 slices), a column, empty ones
        shapes=((), 7, (33, 5), (2, 3, 700), (300, 1100), (64, 32, 3, 3), (9, 1), (0, 3),
                (4, 0, 2)),
    ),
    Case(
        "Rprop",
        configs=(
            dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2), maximize=True),
            dict(),
            dict(lr=0.05),
            dict(lr=0.01, etas=(0.5, 1.1), step_sizes=(0.0, 1.0)),
            dict(lr=0.2, step_sizes=(0.05, 0.1)),
        ),
        reference=torch_optim("Rprop"),
        bad=(
            Bad(dict(lr=-0.1), ValueError, r"lr must be"),
            Bad(dict(etas=(1.2, 0.5)), ValueError, r"etas must satisfy 0 < etaminus < 1 < etaplus"),
            Bad(dict(etas=(0.5, 1.0)), ValueError, r"etas must satisfy"),
            Bad(dict(etas=0.5), ValueError, r"etas must be a pair"),
            Bad(dict(step_sizes=(1.0, 0.1)), ValueError,
                r"step_sizes must be \(min, max\) with min <= max"),
            Bad(dict(step_sizes=(-1.0, 0.1)), ValueError, r"step_sizes\[0\] must be"),
            Bad(dict(step_sizes=(0.0, math.nan)), ValueError, r"step_sizes\[1\] must be"),
            Bad(dict(maximize=0), TypeError, r"maximize must be True or False"),
        ),
        state=keys("step", "prev", "step_size"),
    ),
    Case(
        "ASGD",
        configs=(
            dict(lr=0.05, lambd=1e-2, alpha=0.5, t0=20, weight_decay=0.1, maximize=True),
            dict(),
            dict(lr=0.05, t0=3),
            dict(lr=0.01, lambd=0.1, alpha=1.0, t0=0.0),
            dict(lr=0.02, weight_decay=0.01, t0=50),
        ),
        reference=torch_optim("ASGD"),
        bad=(
            Bad(dict(lr=math.inf), ValueError, r"lr must be"),
            Bad(dict(lambd=-1e-4), ValueError, r"lambd must be"),
            Bad(dict(alpha=math.nan), ValueError, r"alpha must be"),
            Bad(dict(t0="10"), TypeError, r"t0 must be a real number"),
            Bad(dict(weight_decay=-0.1), ValueError, r"weight_decay must be"),
        ),
        state=keys("step", "eta", "mu", "ax"),
    ),
    Case(
        "AdEMAMix",
        configs=(
            dict(lr=0.01, betas=(0.8, 0.99, 0.999), alpha=5.0, weight_decay=0.1, maximize=True),
            dict(lr=0.01, t_alpha_beta3=50, weight_decay=0.1, maximize=True, cautious=True),
            dict(),
            dict(lr=0.01, t_alpha_beta3=50),
            dict(lr=0.01, betas=(0.0, 0.99, 0.999), alpha=1.0, eps=1e-6),
            dict(lr=0.005, t_alpha_beta3=500, weight_decay=0.01),
        ),
        reference=Reference("torch", "reference_impls.AdEMAMix"),
        bad=(
            Bad(dict(betas=(0.9, 0.999)), ValueError, r"betas must be a triple"),
            Bad(dict(betas=(0.9, 0.999, 1.0)), ValueError, r"betas\[2\] must be"),
            Bad(dict(alpha=-1.0), ValueError, r"alpha must be"),
            Bad(dict(t_alpha_beta3=0), ValueError, r"t_alpha_beta3 must be >= 1"),
            Bad(dict(t_alpha_beta3=2.5), TypeError, r"t_alpha_beta3 must be an integer"),
            Bad(dict(eps=-1.0), ValueError, r"eps must be"),
            Bad(dict(cautious="yes"), TypeError, r"cautious must be True or False"),
        ),
        state=keys("step", "exp_avg_slow", "exp_avg_sq",
                   exp_avg_fast=lambda kw, shape: kw.get("betas", (0.9,))[0] != 0),
    ),
    Case(
        "Adan",
        configs=(
            dict(lr=0.01, betas=(0.9, 0.8, 0.95), weight_decay=0.1, no_prox=True,
                 maximize=True),
            dict(),
            dict(lr=0.01, weight_decay=0.05),
            dict(lr=0.005, betas=(0.98, 0.92, 0.999), eps=1e-6),
            dict(lr=0.02),
        ),
        reference=Reference("torch", "reference_impls.Adan"),
        bad=(
            Bad(dict(betas=(0.9, 0.9)), ValueError, r"betas must be a triple"),
            Bad(dict(betas=(0.98, 1.0, 0.99)), ValueError, r"betas\[1\] must be"),
            Bad(dict(weight_decay=-0.1), ValueError, r"weight_decay must be"),
            Bad(dict(no_prox="yes"), TypeError, r"no_prox must be True or False"),
        ),
        state=keys("step", "exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"),
    ),
    Case(
        "SGDScheduleFree",
        configs=(
            dict(lr=0.05, momentum=0.8, weight_decay=0.01, warmup_steps=20, r=0.5),
            dict(),
            dict(lr=0.1, warmup_steps=5),
            dict(lr=0.02, momentum=0.95, weight_lr_power=0.0),
            dict(lr=0.05, warmup_steps=300, weight_decay=0.1),
        ),
        reference=Reference("torch", "reference_impls.SGDScheduleFree"),
        bad=(
            Bad(dict(momentum=0.0), ValueError, r"momentum must be"),
            Bad(dict(momentum=1.0), ValueError, r"momentum must be"),
            Bad(dict(warmup_steps=-1), ValueError, r"warmup_steps must be >= 0"),
            Bad(dict(warmup_steps=2.5), TypeError, r"warmup_steps must be an integer"),
            Bad(dict(r=math.nan), ValueError, r"r must be"),
            Bad(dict(weight_lr_power="2"), TypeError, r"weight_lr_power must be a real"),
        ),
        state=keys("step", "lr_max", "weight_sum", "z"),
    ),
    Case(
        "AdamWScheduleFree",
        configs=(
            dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, warmup_steps=20, r=0.5),
            dict(),
            dict(lr=0.02, warmup_steps=10, eps=1e-6),
            dict(lr=0.005, betas=(0.95, 0.9), weight_lr_power=1.0),
            dict(lr=0.01, warmup_steps=500, weight_decay=0.01),
        ),
        reference=Reference("torch", "reference_impls.AdamWScheduleFree"),
        bad=(
            Bad(dict(betas=(0.0, 0.999)), ValueError, r"betas\[0\] must be in \(0, 1\)"),
            Bad(dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be"),
            Bad(dict(eps=-1.0), ValueError, r"eps must be"),
            Bad(dict(warmup_steps=-3), ValueError, r"warmup_steps must be >= 0"),
            Bad(dict(lr=-0.1), ValueError, r"lr must be"),
        ),
        state=keys("step", "lr_max", "weight_sum", "z", "exp_avg_sq"),
    ),
    Case(
        "Muon",
        configs=(
            dict(lr=0.02, weight_decay=0.05, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
            dict(),
            dict(lr=0.01, nesterov=False, ns_steps=3),
            dict(lr=0.02, momentum=0.3, eps=1e-3, ns_coefficients=(2.0, -1.5, 0.5)),
            dict(lr=0.005, weight_decay=0.0, adjust_lr_fn="original", maximize=True),
        ),
        reference=Reference("torch", "reference_impls.Muon"),
        bad=(
            Bad(dict(momentum=-0.1), ValueError, r"momentum must be"),
            Bad(dict(ns_steps=100), ValueError, r"ns_steps must be"),
            Bad(dict(ns_steps=2.0), TypeError, r"ns_steps must be an integer"),
            Bad(dict(ns_coefficients=(1.0, 2.0)), ValueError, r"ns_coefficients must be a "
                                                              r"triple"),
            Bad(dict(ns_coefficients=(1.0, math.nan, 2.0)), ValueError,
                r"ns_coefficients\[1\] must be"),
            Bad(dict(adjust_lr_fn="rms"), ValueError, r"adjust_lr_fn must be one of"),
            Bad(dict(ns_dtype="float16"), ValueError, r"ns_dtype must be one of"),
            Bad(dict(adam_betas=(0.9,)), ValueError, r"adam_betas must be a pair"),
            Bad(dict(adam_eps=-1.0), ValueError, r"adam_eps must be"),
            Bad(dict(nesterov=1), TypeError, r"nesterov must be True or False"),
        ),
        state=keys("step", "momentum_buffer"),
        matrices=True,
    ),
    Case(
        "Prodigy",
        configs=(
            dict(lr=1.0, weight_decay=0.1, use_bias_correction=True, d0=1e-4),
            dict(),
            dict(betas=(0.0, 0.99), decouple=False, weight_decay=0.01, safeguard_warmup=True),
            dict(beta3=0.9, d_coef=0.5, growth_rate=1.1, eps=1e-6),
            dict(lr=0.5, betas=(0.95, 0.98), maximize=True),
        ),
        reference=Reference("torch", "reference_impls.Prodigy"),
        bad=(
            Bad(dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be"),
            Bad(dict(beta3=1.0), ValueError, r"beta3 must be"),
            Bad(dict(d0=0.0), ValueError, r"d0 must be"),
            Bad(dict(d_coef=-1.0), ValueError, r"d_coef must be"),
            Bad(dict(growth_rate=0.0), ValueError, r"growth_rate must be"),
            Bad(dict(decouple="yes"), TypeError, r"decouple must be True or False"),
        ),
        state=keys("step", "s", "p0", "exp_avg_sq",
                   exp_avg=lambda kw, shape: kw.get("betas", (0.9,))[0] != 0),
        group_key="d0",
    ),
]}


def configs(kind=None, richest_first=False):
    """(case, config) of every case (of reference kind `kind`), in table order (with
    richest_first, each rule's richest config first)."""
    out = []
    for case in CASES.values():
        if kind is None or case.reference.kind == kind:
            first = [case.richest] if richest_first else []
            out += [(case, kw) for kw in first + [kw for kw in case.configs if kw not in first]]
    return out


# --- tiers ----------------------------------------------------------------------------------

def _key(value):
    return repr(value)


def spread(rows, name, values, against):
    """Give every row (a dict) a value of factor `name`, so that each value meets each value
    of every factor in `against` at least once: a pairwise covering of those factors
    instead of their full product. Greedy, in row order: a row takes the value that covers
    the most pairs not yet covered, among those the one whose pairs occurred least, then
    the one used least (the first such), which keeps the values balanced. Where the rows
    do not suffice, copies of them are appended with the missing values. Returns the new
    rows."""
    seen, used, out = Counter(), Counter(), []

    def pairs(row, value):
        return [(f, _key(row[f]), _key(value)) for f in against]

    for row in rows:
        value = max(values, key=lambda v: (sum(p not in seen for p in pairs(row, v)),
                                           -sum(seen[p] for p in pairs(row, v)),
                                           -used[_key(v)]))
        seen.update(pairs(row, value))
        used[_key(value)] += 1
        out.append({**row, name: value})
    for row in list(out):
        for value in values:
            if any(p not in seen for p in pairs(row, value)):
                seen.update(pairs(row, value))
                out.append({**row, name: value})
    return out


def firsts(rows, *factors):
    """The first row of each combination of `factors` that occurs in `rows`."""
    out = {}
    for row in rows:
        out.setdefault(tuple(_key(row[f]) for f in factors), row)
    return list(out.values())


def tiered(rows, fast, args, ident, marks=lambda row: []):
    """pytest params for `rows` (dicts): those equal to one of `fast` as they are, the others
    marked slow. Each param holds the row's `args` in this order; `ident(row)` is its id,
    `marks(row)` a list of further marks."""
    fast = {_key(sorted(r.items())) for r in fast}
    return [pytest.param(*(row[a] for a in args), id=ident(row),
                         marks=marks(row) + ([] if _key(sorted(row.items())) in fast
                                             else [pytest.mark.slow]))
            for row in rows]


def _unchecked(row):
    for kw, dtype, reason in row["case"].unchecked:
        if kw == row["kw"] and dtype is row["dtype"]:
            return reason
    return None


def reference_grid(kind, dtypes):
    """(case, kw, dtype) params of the conformance test against references of `kind`: every
    config in every dtype; fast: two configs of each rule (its richest and another, one in
    each dtype). Combinations in a case's `unchecked` stay out of the fast tier."""
    rows = [dict(case=case, kw=kw, config=config_id(case.name, kw), rule=case.name)
            for case, kw in configs(kind, richest_first=True)]
    full = [dict(row, dtype=dtype) for row in rows for dtype in dtypes]
    spread_rows = spread(rows, "dtype", dtypes, against=["rule"])
    fast = firsts([r for r in spread_rows + full if not _unchecked(r)], "rule", "dtype")
    return tiered(full, fast, ["case", "kw", "dtype"],
                  lambda r: f"{r['config']}-{np.dtype(r['dtype']).name}")


def count(rows, *factors):
    """How often each combination of `factors` occurs in `rows` (for checking coverage)."""
    return Counter(tuple(_key(row[f]) for f in factors) for row in rows)

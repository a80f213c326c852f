"""The rule table: one row per optimizer, read by everything that is the same for every rule.

A row (:class:`Rule`) names the optimizer class and where it lives, the registry operation
its class calls, its state arrays, the elementwise kernels that implement it (one per set
of state arrays present: Adam with and without AMSGrad), the function computing its host
scalars, the reference it follows, and what the benchmark harness needs. From the table:

- ``fastopt.optim`` and ``fastopt`` export the classes;
- the optimizer base class takes each class's state keys and registry operation;
- the compiled backends run any rule through one generic entry point (a kernel of the table,
  its operands, the packed scalars); the registry derives which backend implements what;
- the harness (``fastopt.bench``) and the asv suite build their rule lists;
- ``tests/test_kernels.py`` checks every :class:`Args` against the C struct of
  ``kernels/include/fastopt/optim.h`` and every :class:`Kernel` against its X-macro list.

An :class:`Args` is the one ordered definition of a kernel's host scalars: the C struct
``fo_<name>_args_<f32|f64>`` has these fields in this order, the packer lays the bytes out
from it, Numba reads the fields by name from a record of this layout, and the CUDA kernels
read the same bytes as the C loops.
"""

import functools
import struct
from typing import Callable, NamedTuple, Optional

import numpy as np

from fastopt import _scalars


class Args(NamedTuple):
    """The scalar struct ``fo_<name>_args_<sfx>`` of fastopt/optim.h: `reals` in the
    parameter's dtype, then `flags` as C ints, in this order."""
    name: str
    reals: tuple
    flags: tuple = ()

    @property
    def fields(self):
        return self.reals + self.flags

    def record(self, dtype, scalars):
        """The struct as a one-element NumPy record array (C layout, read-only), from the
        host scalars (a dict with exactly these fields)."""
        if scalars.keys() != set(self.fields):
            raise ValueError(f"fo_{self.name}_args: expected the fields {self.fields}, got "
                             f"{tuple(scalars)}")
        layout, packer = _record_layout(self, dtype)
        values = [scalars[f] for f in self.fields]
        try:  # packed by the struct module: a third of NumPy's record assignment's time
            return np.frombuffer(packer.pack(*values), layout)
        except (struct.error, OverflowError):  # a finite real beyond float32: NumPy's inf
            record = np.zeros(1, layout)  # padding bytes 0: the same bytes for the same
            record[0] = tuple(values)  # scalars, always
            record.flags.writeable = False  # as the packed ones (Numba types them apart)
            return record


@functools.lru_cache(maxsize=None)
def _record_layout(args, dtype):
    """(the struct's NumPy dtype, a struct.Struct packing its fields with zero padding)."""
    real = np.dtype(dtype)
    layout = np.dtype([(f, real) for f in args.reals] + [(f, np.int32) for f in args.flags],
                      align=True)
    fmt, end = "=", 0  # native byte order, no alignment of its own: the layout's padding
    for name in args.fields:
        field, offset = layout.fields[name][:2]
        fmt += "x" * (offset - end) + {"f4": "f", "f8": "d", "i4": "i"}[field.str[1:]]
        end = offset + field.itemsize
    return layout, struct.Struct(fmt + "x" * (layout.itemsize - end))


def _record_dtype(args, dtype):
    return _record_layout(args, dtype)[0]


def pack(record):
    """A record's bytes, zero-padded to a multiple of 8 (the CUDA kernels read the struct
    from an int64 table)."""
    raw = record.view(np.uint8)
    return np.concatenate([raw, np.zeros(-raw.size % 8, np.uint8)]) if raw.size % 8 else raw


class Kernel(NamedTuple):
    """An elementwise kernel: the C loop ``fo_cpu_<name>_<sfx>``, the CUDA kernel
    ``fo_cuda_<name>_<sfx>`` and the Numba driver all call the element function
    ``fo_<name>_<sfx>(p, g, state..., args)`` over operands (param in, param out, grad,
    `state`...). The last `aux` of `state` are per-tensor operands of any size (a cautious
    step's factor, which its element function gets by value; Adafactor's factors), not
    arrays updated element by element."""
    name: str
    args: Args
    state: tuple = ()
    aux: int = 0


class Caution(NamedTuple):
    """The cautious variant of elementwise kernel `base` (the ``cautious=`` option): the
    `count` pass writes the agreement mask K to the "param out" slot (a scratch buffer)
    without writing the state, the `step` kernel updates like `base`, with each tensor's
    factor 1 / max(mean K, 1e-3) as its last operand."""
    base: str
    count: Kernel
    step: Kernel


class Rule(NamedTuple):
    """One optimizer. `kernels` are its elementwise variants, picked by which of `state`
    are present at a step (for example AMSGrad's buffer); a rule with a `driver` runs
    several passes with reductions between them (fastopt._backends._twopass) and lists
    the kernels of its passes. `scalars(dtype, **hyper)` gives the kernel's struct fields
    (for a driver: the update pass's and the apply pass's)."""
    name: str                  # the class, as users know it
    module: str                # where the class lives
    op: str                    # registry operation; rules sharing a kernel share it
    state: tuple               # state arrays, in operand order (the state_dict keys)
    kernels: tuple             # Kernel variants
    scalars: Callable
    reference: str             # the implementation it follows (conformance tests)
    bench: dict                # the harness's hyperparameters
    state_scalars: tuple = (("step", int),)
    driver: Optional[str] = None
    traffic: Optional[int] = None  # element transfers of a step, when not one pass
    matrix: bool = False       # benchmark the tensors as matrices (Adafactor factors them)
    cautious: tuple = ()       # Caution variants of its kernels (the cautious= option)

    def kernel(self, present):
        """The variant whose state operands are exactly `present` (names, in order)."""
        for k in self.kernels:
            if k.state == present:
                return k
        raise ValueError(f"{self.name}: no kernel takes the state {present}")

    def caution(self, kernel):
        """The Caution of elementwise kernel `kernel` (a name)."""
        for c in self.cautious:
            if c.base == kernel:
                return c
        raise ValueError(f"{self.name}: kernel {kernel!r} has no cautious variant")


# -- the scalar structs (fastopt/optim.h); every rule's starts with the gradient prologue

_GRAD = ("clip", "gscale")
SGD_ARGS = Args("sgd", _GRAD + ("weight_decay", "momentum", "one_minus_dampening", "neg_lr"),
                ("first", "nesterov"))
ADAM_ARGS = Args("adam", _GRAD + ("weight_decay", "decay", "one_minus_beta1", "beta2",
                                  "one_minus_beta2", "bias_correction2_sqrt", "eps",
                                  "neg_step_size"), ("lerp_hi",))
ADAGRAD_ARGS = Args("adagrad", _GRAD + ("weight_decay", "neg_clr", "eps", "eps_root"))
RMSPROP_ARGS = Args("rmsprop", _GRAD + ("weight_decay", "alpha", "one_minus_alpha", "eps",
                                        "momentum", "neg_lr", "eps_root", "trace_scale"),
                    ("lerp_hi",))
ADADELTA_ARGS = Args("adadelta", _GRAD + ("weight_decay", "rho", "one_minus_rho", "eps",
                                          "neg_lr"))
ADAMAX_ARGS = Args("adamax", _GRAD + ("weight_decay", "one_minus_beta1", "beta2", "eps",
                                      "neg_clr"), ("lerp_hi",))
NADAM_ARGS = Args("nadam", _GRAD + ("weight_decay", "decay", "one_minus_beta1", "beta2",
                                    "one_minus_beta2", "bias_correction2", "eps", "grad_coef",
                                    "avg_coef"), ("lerp_hi",))
RADAM_ARGS = Args("radam", _GRAD + ("weight_decay", "decay", "one_minus_beta1", "beta2",
                                    "one_minus_beta2", "bias_correction1", "lr",
                                    "bias_correction2_sqrt", "eps", "rect"),
                  ("lerp_hi", "rectify"))
ADOPT_ARGS = Args("adopt", _GRAD + ("weight_decay", "neg_lr_wd", "eps", "clamp",
                                    "one_minus_beta1", "neg_lr", "beta2", "one_minus_beta2"),
                  ("lerp_hi", "first", "decoupled"))
LION_ARGS = Args("lion", _GRAD + ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                                  "weight_decay", "neg_lr"))
LAMB_ARGS = Args("lamb", _GRAD + ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                                  "bias_correction1", "bias_correction2", "eps",
                                  "weight_decay"))
ADAFACTOR_ARGS = Args("adafactor", _GRAD + ("w", "eps1", "eps1_sq"), ("lerp_hi",))
RPROP_ARGS = Args("rprop", _GRAD + ("etaminus", "etaplus", "step_size_min", "step_size_max"))
ASGD_ARGS = Args("asgd", _GRAD + ("weight_decay", "decay", "neg_eta", "mu"), ("average",))
ADEMAMIX_ARGS = Args("ademamix", _GRAD + ("beta1", "one_minus_beta1", "beta3", "one_minus_beta3",
                                          "beta2", "one_minus_beta2", "bias_correction1",
                                          "bias_correction2_sqrt", "alpha", "eps",
                                          "weight_decay", "neg_lr"))
ADAN_ARGS = Args("adan", _GRAD + ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                                  "beta3", "one_minus_beta3", "bias_correction3_sqrt", "eps",
                                  "neg_step_size", "neg_step_size_diff", "decay", "prox"),
                 ("first",))
SGD_SCHEDULEFREE_ARGS = Args("sgd_schedulefree", _GRAD + ("weight_decay", "ckp1", "y_coef",
                                                          "neg_lr"), ("lerp_hi",))
ADAMW_SCHEDULEFREE_ARGS = Args("adamw_schedulefree",
                               SGD_SCHEDULEFREE_ARGS.reals + ("beta2", "one_minus_beta2",
                                                              "bias_correction2", "eps"),
                               ("lerp_hi",))
MUON_ARGS = Args("muon", _GRAD + ("one_minus_momentum", "momentum"),
                 ("lerp_hi", "nesterov_hi", "nesterov"))
EMA_ARGS = Args("ema", ("weight",), ("lerp_hi",))
PRODIGY_ARGS = Args("prodigy", _GRAD + ("weight_decay", "beta1", "m_coef", "beta2", "v_coef",
                                        "beta3", "s_coef", "neg_decay", "d_eps", "neg_dlr",
                                        "neg_dlr_d"), ("moves",))
SCALED_APPLY_ARGS = Args("scaled_apply", ("decay", "scale"))

# the kernels of the multi-pass rules' passes that are not elementwise in the table's sense
# (they read per-tensor factors): their loops are written out in optim_loops.h / optim.cu
PASS_KERNELS = (
    Kernel("adafactor_vector", ADAFACTOR_ARGS, ("variance",)),
    Kernel("adafactor_factored", ADAFACTOR_ARGS, ("row_var", "col_var", "rmean", "shape"),
           aux=4),
    Kernel("scaled_apply", SCALED_APPLY_ARGS, ("factor",), aux=1),
)

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
CAUTION = "caution"  # the per-tensor operand of a cautious step: 1 / max(mean K, 1e-3)


def _caution(base, args, state, count_state):
    """The Caution of kernel `base` (with `state`); its count pass reads `count_state`."""
    return Caution(base, Kernel(base + "_caution", args, count_state),
                   Kernel(base + "_cautious", args, state + (CAUTION,), aux=1))


_ADAM_CAUTIOUS = (_caution("adam", ADAM_ARGS, _ADAM_MOMENTS, ("exp_avg",)),
                  Caution("adam_amsgrad", Kernel("adam_caution", ADAM_ARGS, ("exp_avg",)),
                          Kernel("adam_amsgrad_cautious", ADAM_ARGS,
                                 _ADAM_MOMENTS + ("max_exp_avg_sq", CAUTION), aux=1)))
# Schedule-Free's numbers: the step count, the largest warmed-up learning rate so far and
# the sum of the averaging weights (the reference keeps them per param group)
_SCHEDULEFREE_NUMBERS = (("step", int), ("lr_max", float), ("weight_sum", float))

RULES = (
    Rule("SGD", "fastopt.optim.sgd", "sgd_step", ("momentum_buffer",),
         (Kernel("sgd", SGD_ARGS), Kernel("sgd_momentum", SGD_ARGS, ("momentum_buffer",))),
         _scalars.sgd_scalars, "torch.optim.SGD", dict(lr=1e-3, momentum=0.9),
         state_scalars=()),
    Rule("Adam", "fastopt.optim.adam", "adam_step", _ADAM_MOMENTS + ("max_exp_avg_sq",),
         (Kernel("adam", ADAM_ARGS, _ADAM_MOMENTS),
          Kernel("adam_amsgrad", ADAM_ARGS, _ADAM_MOMENTS + ("max_exp_avg_sq",))),
         _scalars.adam_scalars, "torch.optim.Adam", dict(lr=1e-3), cautious=_ADAM_CAUTIOUS),
    Rule("AdamW", "fastopt.optim.adam", "adam_step", _ADAM_MOMENTS + ("max_exp_avg_sq",),
         (Kernel("adam", ADAM_ARGS, _ADAM_MOMENTS),
          Kernel("adam_amsgrad", ADAM_ARGS, _ADAM_MOMENTS + ("max_exp_avg_sq",))),
         _scalars.adam_scalars, "torch.optim.AdamW", dict(lr=1e-3, weight_decay=1e-2),
         cautious=_ADAM_CAUTIOUS),
    Rule("Adagrad", "fastopt.optim.adagrad", "adagrad_step", ("sum",),
         (Kernel("adagrad", ADAGRAD_ARGS, ("sum",)),),
         _scalars.adagrad_scalars, "torch.optim.Adagrad", dict(lr=1e-2)),
    Rule("RMSprop", "fastopt.optim.rmsprop", "rmsprop_step",
         ("square_avg", "grad_avg", "momentum_buffer"),
         (Kernel("rmsprop", RMSPROP_ARGS, ("square_avg",)),
          Kernel("rmsprop_centered", RMSPROP_ARGS, ("square_avg", "grad_avg")),
          Kernel("rmsprop_momentum", RMSPROP_ARGS, ("square_avg", "momentum_buffer")),
          Kernel("rmsprop_centered_momentum", RMSPROP_ARGS,
                 ("square_avg", "grad_avg", "momentum_buffer"))),
         _scalars.rmsprop_scalars, "torch.optim.RMSprop", dict(lr=1e-2)),
    Rule("Adadelta", "fastopt.optim.adadelta", "adadelta_step", ("square_avg", "acc_delta"),
         (Kernel("adadelta", ADADELTA_ARGS, ("square_avg", "acc_delta")),),
         _scalars.adadelta_scalars, "torch.optim.Adadelta", dict(lr=1.0)),
    Rule("Adamax", "fastopt.optim.adamax", "adamax_step", ("exp_avg", "exp_inf"),
         (Kernel("adamax", ADAMAX_ARGS, ("exp_avg", "exp_inf")),),
         _scalars.adamax_scalars, "torch.optim.Adamax", dict(lr=2e-3)),
    Rule("NAdam", "fastopt.optim.nadam", "nadam_step", _ADAM_MOMENTS,
         (Kernel("nadam", NADAM_ARGS, _ADAM_MOMENTS),),
         _scalars.nadam_scalars, "torch.optim.NAdam", dict(lr=2e-3),
         state_scalars=(("step", int), ("mu_product", float))),
    Rule("RAdam", "fastopt.optim.radam", "radam_step", _ADAM_MOMENTS,
         (Kernel("radam", RADAM_ARGS, _ADAM_MOMENTS),),
         _scalars.radam_scalars, "torch.optim.RAdam", dict(lr=1e-3)),
    Rule("ADOPT", "fastopt.optim.adopt", "adopt_step", _ADAM_MOMENTS,
         (Kernel("adopt", ADOPT_ARGS, _ADAM_MOMENTS),),
         _scalars.adopt_scalars, "adopt.ADOPT", dict(lr=1e-3),
         cautious=(_caution("adopt", ADOPT_ARGS, _ADAM_MOMENTS, _ADAM_MOMENTS),)),
    Rule("Lion", "fastopt.optim.lion", "lion_step", ("exp_avg",),
         (Kernel("lion", LION_ARGS, ("exp_avg",)),),
         _scalars.lion_scalars, "optax.lion", dict(lr=1e-4), state_scalars=(),
         cautious=(_caution("lion", LION_ARGS, ("exp_avg",), ("exp_avg",)),)),
    # update pass (p, g, m, v read; m, v, u written; the norms of p and u summed in it),
    # apply (p, u read; p written)
    Rule("Lamb", "fastopt.optim.lamb", "lamb_step", _ADAM_MOMENTS,
         (Kernel("lamb_update", LAMB_ARGS, _ADAM_MOMENTS), PASS_KERNELS[2]),
         _scalars.lamb_scalars, "optax.lamb", dict(lr=1e-3), driver="lamb", traffic=10),
    # factor sums (g), update pass (p, g read, u written; the norms of p and u summed in
    # it), apply (p, u read; p written)
    Rule("Adafactor", "fastopt.optim.adafactor", "adafactor_step",
         ("row_var", "col_var", "variance"), PASS_KERNELS,
         _scalars.adafactor_scalars, "torch.optim.Adafactor", dict(lr=1e-2),
         driver="adafactor", traffic=7, matrix=True),
    Rule("Rprop", "fastopt.optim.rprop", "rprop_step", ("prev", "step_size"),
         (Kernel("rprop", RPROP_ARGS, ("prev", "step_size")),),
         _scalars.rprop_scalars, "torch.optim.Rprop", dict(lr=1e-2)),
    Rule("ASGD", "fastopt.optim.asgd", "asgd_step", ("ax",),
         (Kernel("asgd", ASGD_ARGS, ("ax",)),),
         _scalars.asgd_scalars, "torch.optim.ASGD", dict(lr=1e-2),
         state_scalars=(("step", int), ("eta", float), ("mu", float))),
    Rule("AdEMAMix", "fastopt.optim.ademamix", "ademamix_step",
         ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"),
         (Kernel("ademamix", ADEMAMIX_ARGS, ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")),
          Kernel("ademamix_nofast", ADEMAMIX_ARGS, ("exp_avg_slow", "exp_avg_sq"))),
         _scalars.ademamix_scalars, "reference_impls.AdEMAMix", dict(lr=1e-3),
         cautious=(_caution("ademamix", ADEMAMIX_ARGS,
                            ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"),
                            ("exp_avg_fast", "exp_avg_slow")),
                   _caution("ademamix_nofast", ADEMAMIX_ARGS, ("exp_avg_slow", "exp_avg_sq"),
                            ("exp_avg_slow",)))),
    Rule("Adan", "fastopt.optim.adan", "adan_step",
         ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"),
         (Kernel("adan", ADAN_ARGS, ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")),),
         _scalars.adan_scalars, "reference_impls.Adan", dict(lr=1e-3)),
    Rule("SGDScheduleFree", "fastopt.optim.schedulefree", "sgd_schedulefree_step", ("z",),
         (Kernel("sgd_schedulefree", SGD_SCHEDULEFREE_ARGS, ("z",)),),
         _scalars.sgd_schedulefree_scalars, "reference_impls.SGDScheduleFree", dict(lr=1e-2),
         state_scalars=_SCHEDULEFREE_NUMBERS),
    Rule("AdamWScheduleFree", "fastopt.optim.schedulefree", "adamw_schedulefree_step",
         ("z", "exp_avg_sq"),
         (Kernel("adamw_schedulefree", ADAMW_SCHEDULEFREE_ARGS, ("z", "exp_avg_sq")),),
         _scalars.adamw_schedulefree_scalars, "reference_impls.AdamWScheduleFree",
         dict(lr=2.5e-3), state_scalars=_SCHEDULEFREE_NUMBERS),
    # momentum pass (g, B read; B, O written), norm of O, Newton-Schulz (GEMMs), apply (p,
    # O read; p written); param groups with use_muon=False run AdamW's kernels
    Rule("Muon", "fastopt.optim.muon", "muon_step", ("momentum_buffer",) + _ADAM_MOMENTS,
         (Kernel("muon_momentum", MUON_ARGS, ("momentum_buffer",)), PASS_KERNELS[2]),
         _scalars.muon_scalars, "reference_impls.Muon", dict(lr=1e-3), driver="muon",
         traffic=8, matrix=True),
    # update pass (p, g, s, p0, m, v read; s, m, v written; the dot's terms and |s| summed
    # in it, the terms not stored), apply pass (p, m, v read; p written)
    Rule("Prodigy", "fastopt.optim.prodigy", "prodigy_step",
         ("s", "p0") + _ADAM_MOMENTS,
         (Kernel("prodigy_update", PRODIGY_ARGS, ("s", "p0") + _ADAM_MOMENTS),
          Kernel("prodigy_update_nom", PRODIGY_ARGS, ("s", "p0", "exp_avg_sq")),
          Kernel("prodigy_apply", PRODIGY_ARGS, _ADAM_MOMENTS),
          Kernel("prodigy_apply_nom", PRODIGY_ARGS, ("exp_avg_sq",))),
         _scalars.prodigy_scalars, "prodigyopt.Prodigy", dict(lr=1.0), driver="prodigy",
         traffic=13),
)

# the state arrays that can be negative: 8-bit state (state_dtype="int8") keeps them with the
# signed dynamic map, the others (second moments, sums, maxima) with the unsigned one
SIGNED_STATE = frozenset({"exp_avg", "momentum_buffer", "grad_avg", "prev", "ax",
                          "exp_avg_fast", "exp_avg_slow", "exp_avg_diff", "neg_pre_grad", "z",
                          "s", "p0"})
# the state arrays kept in 8 bits with state_dtype="int8": those shaped like their parameter
# (Adafactor's factored state, which is not, stays float32)
QUANTIZABLE_STATE = frozenset(name for rule in RULES if not rule.matrix for name in rule.state)

BY_NAME = {rule.name: rule for rule in RULES}
BY_OP = {rule.op: rule for rule in RULES}  # rules sharing an op share their kernels

# elementwise kernels that belong to no rule: operation -> its kernel (the weight EMA of
# fastopt.ema_update_ and the optimizers' ema_decay, the average in the parameter slots)
UTILITY_OPS = {"ema_update": (Kernel("ema", EMA_ARGS), _scalars.ema_scalars)}

# by name: the elementwise kernels (fastopt/optim.h's FO_ELEMENTWISE_KERNELS list), the
# cautious steps (its FO_CAUTIOUS_KERNELS), and all of them with the passes' kernels
KERNELS = {**{k.name: k for rule in RULES for k in rule.kernels if k not in PASS_KERNELS},
           **{k.name: k for k, _ in UTILITY_OPS.values()},
           **{c.count.name: c.count for rule in RULES for c in rule.cautious}}
CAUTIOUS_KERNELS = {c.step.name: c.step for rule in RULES for c in rule.cautious}
ALL_KERNELS = {**KERNELS, **CAUTIOUS_KERNELS, **{k.name: k for k in PASS_KERNELS}}

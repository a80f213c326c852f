"""The harness's rules: one row per rule of fastopt's rule table, plus Adam with
max_grad_norm and the cautious variants (fastopt.bench and its JAX rows' process read it)."""

from typing import NamedTuple

import numpy as np

import fastopt
from fastopt import _rules


class Rule(NamedTuple):
    """A benchmarked rule: the optimizer class name in fastopt, its hyperparameters, its
    state buffers per element, fastopt's max_grad_norm (torch: its clip_grad_norm_ before
    the step), the element transfers of one fastopt step when it is not one pass (reads +
    writes per element, every pass counted), whether the tensors are shaped as matrices
    (Adafactor factors them; 1-D tensors it does not), torch.optim's class of the same
    rule (None: torch has none), and whether the gradients alternate in sign from one step
    to the next (see ALTERNATING)."""
    cls: str
    hyper: dict
    n_state: int
    clip: float = None
    passes_traffic: int = None
    matrix: bool = False
    torch: str = None
    alternate: bool = False

    @property
    def traffic(self):
        # one pass: g read (twice with clipping: norm pass, update pass), p and state
        # read and written
        if self.passes_traffic is not None:
            return self.passes_traffic
        return 2 * (self.n_state + 1) + 1 + (self.clip is not None)


# Rules timed on gradients g, -g, g, ...: under one fixed gradient Prodigy's d estimate grows
# without bound (to 1e16 within 100 steps on the harness's data), the parameters overflow
# float32, and the timed steps would run on inf and NaN. With alternating signs d and the
# parameters stay at their starting scale.
ALTERNATING = frozenset({"Prodigy"})


def _state_arrays(row):
    """How many state arrays the rule keeps per parameter with the harness's
    hyperparameters, counted after one step of the reference."""
    p = np.zeros((2, 2) if row.matrix else 2, np.float32)
    opt = getattr(fastopt, row.name)([p], backend="numpy", **row.bench)
    opt.step([np.ones_like(p)])
    return sum(isinstance(v, np.ndarray) for v in opt.state[0].values())


def _table_rules():
    """The harness's rules, from the rule table (fastopt._rules), plus Adam with
    max_grad_norm ('adam+clip') and the cautious variants ('adamw+cautious', ...; torch has
    none)."""
    rules = {}
    for row in _rules.RULES:
        torch_cls = row.reference.rsplit(".", 1)[1] \
            if row.reference.startswith("torch.optim.") else None
        rules[row.name.lower()] = Rule(row.name, row.bench, _state_arrays(row),
                                       passes_traffic=row.traffic, matrix=row.matrix,
                                       torch=torch_cls, alternate=row.name in ALTERNATING)
    rules["adam+clip"] = rules["adam"]._replace(clip=1.0)
    for row in _rules.RULES:
        if row.cautious and row.name != "Adam":  # Adam's is AdamW's
            plain = rules[row.name.lower()]
            # the count pass (g and the first moments read; Adam's and ADOPT's also read p,
            # for an L2 decay, which this does not count), then the step. The backends
            # without caution_counts (Numba, CuPy) also write K and read it back.
            rules[f"{row.name.lower()}+cautious"] = plain._replace(
                hyper={**plain.hyper, "cautious": True},
                passes_traffic=1 + len(row.cautious[0].count.state) + plain.traffic,
                torch=None)
    return rules


RULES = _table_rules()

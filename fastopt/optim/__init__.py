"""Optimizer update rules: one module per rule, the classes listed by the rule table
(fastopt._rules), kernels in every backend."""

import importlib

from fastopt import _rules
from fastopt.optim._base import Optimizer
from fastopt.optim._convert import convert_state

for _rule in _rules.RULES:
    globals()[_rule.name] = getattr(importlib.import_module(_rule.module), _rule.name)
del _rule

__all__ = ["Optimizer", "convert_state"] + [rule.name for rule in _rules.RULES]

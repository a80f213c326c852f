"""Optimizer update rules: one module per family, kernels in every backend."""

from fastopt.optim._base import Optimizer
from fastopt.optim.adam import Adam, AdamW
from fastopt.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]

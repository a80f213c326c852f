"""Optimizer update rules: one module per family, kernels in every backend."""

from fastopt.optim._base import Optimizer
from fastopt.optim.adafactor import Adafactor
from fastopt.optim.adagrad import Adadelta, Adagrad, RMSprop
from fastopt.optim.adam import Adam, Adamax, AdamW, NAdam, RAdam
from fastopt.optim.lion import Lamb, Lion
from fastopt.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax",
           "NAdam", "RAdam", "Lion", "Lamb", "Adafactor"]

"""The contract between host and kernels: each rule's host scalars are its args struct."""

import re

import numpy as np
import pytest

from fastopt._backends import _cupy
from fastopt._backends._pack import pack
from fastopt.optim import _scalars

HEADER = (_cupy.kernel_dir() / "include" / "fastopt" / "optim.h").read_text()

EXAMPLES = {
    "sgd": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, first=True),
    "adam": dict(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                 decoupled=False, maximize=False),
    "adagrad": dict(step=3, lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False),
    "rmsprop": dict(lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False),
    "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    "adamax": dict(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                   maximize=False),
    "nadam": dict(step=3, mu_product=0.5, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.0, momentum_decay=4e-3, decoupled=False, maximize=False),
    "radam": dict(step=9, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                  decoupled=False, maximize=False),
    "lion": dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
    "lamb": dict(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0,
                 maximize=False),
    "adafactor": dict(step=3, lr=0.1, beta2_decay=-0.8, eps1=None, weight_decay=0.1,
                      maximize=False),
}
TWO_PASS = ("lamb", "adafactor")  # (update struct, fo_scaled_apply's struct)


def struct_fields(rule):
    structs = dict((name, body) for body, name in
                   re.findall(r"typedef struct \{([^}]*)\} fo_(\w+)_args_##SFX;", HEADER))
    body = structs[rule]
    body = re.sub(r"/\*.*?\*/", "", body).replace("\\", "")
    fields = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:
            kind, names = decl.split(None, 1)
            fields += [(kind, n.strip()) for n in names.split(",")]
    return fields


@pytest.mark.parametrize("rule", EXAMPLES)
def test_host_scalars_follow_the_struct(rule):
    scalars = getattr(_scalars, f"{rule}_scalars")(np.float32, grad_scale=1.0,
                                                    grad_clip=float("inf"), **EXAMPLES[rule])
    if rule in TWO_PASS:
        scalars, apply = scalars
        assert [name for _, name in struct_fields("scaled_apply")] == list(apply)
    fields = struct_fields(rule)
    assert [name for _, name in fields] == list(scalars)
    for kind, name in fields:
        assert isinstance(scalars[name], bool) == (kind == "int"), name
    kinds = [kind for kind, _ in fields]
    assert kinds == sorted(kinds, key=lambda k: k == "int")  # reals first, then ints


def test_pack_layout():
    buf = pack(np.float64, {"a": 1.5, "b": -2.0, "flag": True})
    assert buf.size == 24 and buf.size % 8 == 0
    assert buf[:16].view(np.float64).tolist() == [1.5, -2.0]
    assert buf[16:20].view(np.int32).tolist() == [1]

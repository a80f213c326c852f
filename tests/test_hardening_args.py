"""Bad arguments are refused with a TypeError or ValueError naming the argument (class 8)."""

import numpy as np
import pytest

import fastopt
from fastopt import init, prune, quant, schedules

torch = pytest.importorskip("torch")


def sgd():
    return fastopt.SGD([np.zeros(3)], lr=0.1)


def x32():
    return np.ones(3, np.float32)


BIG = 10**400

CASES = [
    # clip
    ("norm_type bool", lambda: fastopt.clip_grad_norm_([x32()], 1.0, norm_type=True),
     TypeError, "norm_type"),
    ("norm_type complex", lambda: fastopt.clip_grad_norm_([x32()], 1.0,
                                                          norm_type=np.complex128(2)),
     TypeError, "norm_type"),
    ("norm_type huge", lambda: fastopt.clip_grad_norm_([x32()], 1.0, norm_type=BIG),
     ValueError, "norm_type"),
    ("n_threads huge", lambda: fastopt.clip_grad_norm_([x32()], 1.0, n_threads=BIG),
     ValueError, "n_threads"),
    ("n_threads bool", lambda: fastopt.clip_grad_norm_([x32()], 1.0, n_threads=True),
     TypeError, "n_threads"),
    ("error_if_nonfinite tensor",
     lambda: fastopt.clip_grad_norm_([x32()], 1.0, error_if_nonfinite=torch.ones(2)),
     TypeError, "error_if_nonfinite"),
    ("nested grads", lambda: fastopt.clip_grad_norm_(
        torch.nested.nested_tensor([torch.zeros(3), torch.zeros(2)]), 1.0), TypeError, "grads"),
    ("clip_value grads nested", lambda: fastopt.clip_grad_value_(
        torch.nested.nested_tensor([torch.zeros(3), torch.zeros(2)]), 1.0), TypeError, "grads"),
    ("backend list", lambda: fastopt.clip_grad_norm_([x32()], 1.0, backend=[]),
     TypeError, "backend"),
    # schedules
    ("resume without initial_lr", lambda: schedules.StepLR(sgd(), 2, last_epoch=3),
     ValueError, "initial_lr"),
    ("chained non-scheduler", lambda: schedules.ChainedScheduler(["x"]),
     TypeError, r"schedulers\[0\]"),
    ("state_dict int", lambda: schedules.StepLR(sgd(), 2).load_state_dict(5),
     TypeError, "state_dict"),
    ("state_dict tensor count", lambda: schedules.StepLR(sgd(), 2).load_state_dict(
        {"last_epoch": torch.tensor(3)}), TypeError, "last_epoch"),
    ("state_dict huge count", lambda: schedules.StepLR(sgd(), 2).load_state_dict(
        {"last_epoch": BIG}), ValueError, "last_epoch"),
    ("state_dict zero divisor", lambda: schedules.StepLR(sgd(), 2).load_state_dict(
        {"step_size": 0}), ValueError, "step_size"),
    ("state_dict tensor float", lambda: schedules.StepLR(sgd(), 2).load_state_dict(
        {"gamma": torch.ones(2)}), TypeError, "gamma"),
    ("sequential state_dict", lambda: schedules.SequentialLR(
        (o := sgd()), [schedules.StepLR(o, 2), schedules.StepLR(o, 3)], [2]).load_state_dict(
        {"_schedulers": [{"last_epoch": "x"}, {}]}), TypeError, "last_epoch"),
    ("linear huge", lambda: schedules.linear(0.1, 0.0, BIG)(5), ValueError, "transition_steps"),
    ("LinearLR huge", lambda: schedules.LinearLR(sgd(), total_iters=BIG).step(),
     ValueError, "total_iters"),
    ("OneCycleLR huge", lambda: schedules.OneCycleLR(sgd(), 0.1, total_steps=BIG),
     ValueError, "total_steps"),
    ("OneCycleLR product", lambda: schedules.OneCycleLR(sgd(), 0.1, epochs=2**30,
                                                        steps_per_epoch=2**30),
     ValueError, "epochs"),
    ("CosineAnnealingLR huge", lambda: schedules.CosineAnnealingLR(sgd(), BIG),
     ValueError, "T_max"),
    ("CosineAnnealingWarmRestarts huge",
     lambda: schedules.CosineAnnealingWarmRestarts(sgd(), 2, T_mult=BIG), ValueError, "T_mult"),
    ("CyclicLR huge", lambda: schedules.CyclicLR(sgd(), 0.01, 0.1, step_size_up=BIG),
     ValueError, "step_size_up"),
    ("step_decay huge", lambda: schedules.step_decay(0.1, BIG), ValueError, "step_size"),
    ("sgdr huge", lambda: schedules.sgdr(0.1, BIG), ValueError, "T_0"),
    ("cosine_decay huge", lambda: schedules.cosine_decay(0.1, BIG), ValueError, "decay_steps"),
    ("warmup_linear huge", lambda: schedules.warmup_linear(0.0, 0.1, BIG, BIG + 1),
     ValueError, "warmup_steps"),
    ("warmup_cosine huge", lambda: schedules.warmup_cosine_decay(0.0, 0.1, 2, BIG),
     ValueError, "decay_steps"),
    ("plateau huge", lambda: schedules.ReduceLROnPlateau(sgd()).step(BIG),
     ValueError, "metrics"),
    ("plateau bool", lambda: schedules.ReduceLROnPlateau(sgd()).step(True),
     TypeError, "metrics"),
    ("three_phase", lambda: schedules.OneCycleLR(sgd(), 0.1, total_steps=10, three_phase="no"),
     TypeError, "three_phase"),
    ("one_cycle three_phase", lambda: schedules.one_cycle(10, 0.1, three_phase=1),
     TypeError, "three_phase"),
    ("staircase", lambda: schedules.exponential_decay(0.1, 2, 0.5, staircase="yes"),
     TypeError, "staircase"),
    # quant
    ("complex scale", lambda: quant.quantize(x32(), 0.1 + 0j, 0), TypeError, "scale"),
    ("bool zero_point", lambda: quant.quantize(x32(), 0.1, np.array(True)),
     TypeError, "zero_point"),
    ("meta scale", lambda: quant.quantize(x32(), torch.tensor(0.1, device="meta"), 0),
     TypeError, "scale"),
    ("quantize dtype object", lambda: quant.quantize(x32(), 0.1, 0, dtype=object()),
     TypeError, "dtype"),
    ("dequantize dtype object", lambda: quant.dequantize(np.zeros(3, np.int8), 0.1, 0,
                                                         dtype=object()), TypeError, "dtype"),
    ("fake_quantize qmax huge", lambda: quant.fake_quantize(x32(), 0.1, 0, -128, BIG),
     ValueError, "qmax"),
    ("qparams grid huge", lambda: quant.qparams(x32(), "int8", method="mse", grid=2**64),
     ValueError, "grid"),
    ("unpack_int4 signed tensor", lambda: quant.unpack_int4(np.zeros(2, np.uint8), 3,
                                                            signed=torch.ones(1)),
     TypeError, "signed"),
    # prune
    ("ln_structured n huge", lambda: prune.ln_structured_mask(
        np.ones((2, 2), np.float32), 1, n=BIG, dim=0), ValueError, r"\bn\b"),
    # init
    ("calculate_gain list", lambda: init.calculate_gain([]), TypeError, "nonlinearity"),
    ("zeros huge", lambda: init.zeros((BIG,)), ValueError, "shape"),
    ("zeros float", lambda: init.zeros(1.5), TypeError, "shape"),
    ("zeros product", lambda: init.zeros((2**40, 2**40)), ValueError, "shape"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_argument_is_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_save_meta_tensor_names_entry(tmp_path):
    with pytest.raises(TypeError, match=r"save: obj\['a'\]"):
        fastopt.save({"a": torch.empty(2, device="meta")}, tmp_path / "s.npz")


def test_clip_refusals_leave_grads_unchanged():
    g = [np.array([3.0, 4.0])]
    for kwargs in (dict(norm_type=True), dict(n_threads=BIG), dict(error_if_nonfinite="yes")):
        with pytest.raises((TypeError, ValueError)):
            fastopt.clip_grad_norm_(g, 1.0, **kwargs)
        np.testing.assert_array_equal(g[0], [3.0, 4.0])


def test_refused_state_dict_leaves_scheduler_unchanged():
    opt = sgd()
    a, b = schedules.StepLR(opt, 2), schedules.StepLR(opt, 3)
    seq = schedules.SequentialLR(opt, [a, b], [2])
    before = seq.state_dict()
    with pytest.raises(TypeError, match=r"_schedulers'\]\[1\]"):
        seq.load_state_dict({"last_epoch": 7, "_schedulers": [{"last_epoch": 5},
                                                               {"gamma": "x"}]})
    assert seq.state_dict() == before


def test_good_values_still_accepted(tmp_path):
    assert fastopt.clip_grad_norm_([np.array([3.0, 4.0])], 10.0, norm_type="inf") == 4.0
    assert fastopt.clip_grad_norm_([np.array([3.0, 4.0])], 10.0, norm_type=np.float32(1)) == 7.0
    opt = sgd()
    s = schedules.MultiStepLR(opt, [1, 1, 3])
    state = s.state_dict()
    state["milestones"] = {str(k): v for k, v in state["milestones"].items()}  # as from JSON
    s.load_state_dict(state)
    assert s.milestones == {1: 2, 3: 1}
    p = schedules.ReduceLROnPlateau(opt)
    p.step(np.float32(1.0))
    p.step(torch.tensor(0.5))
    p.load_state_dict(p.state_dict())
    assert quant.unpack_int4(np.zeros(2, np.uint8), 3, signed=np.bool_(False)).dtype == np.uint8

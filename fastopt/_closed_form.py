"""Closed-form schedules: pure functions of the step (fastopt.schedules re-exports them).

Each constructor checks its arguments and returns a Schedule: call it with a step (int ->
float) or an array of steps (-> float64 array). Names and arguments follow optax where
optax has the schedule, torch's closed forms otherwise; ``join`` chains any of them.
"""

import numbers

import numpy as np

from fastopt._check import choice, count, flag, real


class Schedule:
    """A learning-rate schedule as a function of the step; ``momentum`` is the schedule of
    the cycled momentum (or None)."""

    def __init__(self, fn, name, momentum=None):
        self._fn = fn
        self.name = name
        self.momentum = momentum

    def __call__(self, step):
        steps = np.asarray(step)
        if steps.dtype.kind not in "iuf":
            raise TypeError(f"step must be a number or an array of numbers, got {step!r}")
        values = np.asarray(self._fn(steps.astype(np.float64)), np.float64)
        values = np.broadcast_to(values, steps.shape)
        return float(values) if values.ndim == 0 else values.copy()

    def __repr__(self):
        return f"<fastopt schedule {self.name}>"


def constant(value):
    """``value`` at every step."""
    value = real("value", value)
    return Schedule(lambda t: np.full_like(t, value), "constant")


def linear(init_value, end_value, transition_steps, transition_begin=0):
    """From init_value to end_value linearly over transition_steps, starting at
    transition_begin; constant outside (optax.linear_schedule)."""
    init_value, end_value = real("init_value", init_value), real("end_value", end_value)
    n = count("transition_steps", transition_steps, lo=1)
    begin = count("transition_begin", transition_begin, lo=0)

    def fn(t):
        frac = 1 - np.clip(t - begin, 0, n) / n
        return (init_value - end_value) * frac + end_value
    return Schedule(fn, "linear")


def polynomial(init_value, end_value, power, transition_steps, transition_begin=0):
    """``(init - end) (1 - k / n) ** power + end`` with k the steps since transition_begin,
    clipped to [0, n] (optax.polynomial_schedule)."""
    init_value, end_value = real("init_value", init_value), real("end_value", end_value)
    power = real("power", power, lo=0.0)
    n = count("transition_steps", transition_steps, lo=1)
    begin = count("transition_begin", transition_begin, lo=0)

    def fn(t):
        frac = 1 - np.clip(t - begin, 0, n) / n
        return (init_value - end_value) * frac ** power + end_value
    return Schedule(fn, "polynomial")


def step_decay(init_value, step_size, gamma=0.1):
    """``init_value * gamma ** (step // step_size)`` (torch's StepLR)."""
    init_value = real("init_value", init_value)
    step_size = count("step_size", step_size, lo=1)
    gamma = real("gamma", gamma, lo=0.0, lo_open=True)
    return Schedule(lambda t: init_value * gamma ** np.floor(t / step_size), "step_decay")


def exponential_decay(init_value, transition_steps, decay_rate, transition_begin=0,
                      staircase=False, end_value=None):
    """``init_value * decay_rate ** ((step - transition_begin) / transition_steps)`` from
    transition_begin on (floored with staircase), bounded by end_value
    (optax.exponential_decay)."""
    init_value = real("init_value", init_value)
    n = count("transition_steps", transition_steps, lo=1)
    rate = real("decay_rate", decay_rate, lo=0.0, lo_open=True)
    begin = count("transition_begin", transition_begin, lo=0)
    end = None if end_value is None else real("end_value", end_value)
    staircase = flag("staircase", staircase)

    def fn(t):
        p = (t - begin) / n
        if staircase:
            p = np.floor(p)
        value = np.where(t <= begin, init_value, init_value * rate ** p)
        if end is not None:
            value = np.maximum(value, end) if rate < 1 else np.minimum(value, end)
        return value
    return Schedule(fn, "exponential_decay")


def _cosine(t, n, alpha, exponent):
    cosine = 0.5 * (1 + np.cos(np.pi * np.minimum(t, n) / n))
    return (1 - alpha) * cosine ** exponent + alpha


def cosine_decay(init_value, decay_steps, alpha=0.0, exponent=1.0):
    """``init_value ((1 - alpha) c ** exponent + alpha)`` with
    ``c = (1 + cos(pi min(step, decay_steps) / decay_steps)) / 2`` (optax.cosine_decay_schedule)."""
    init_value = real("init_value", init_value)
    n = count("decay_steps", decay_steps, lo=1)
    alpha, exponent = real("alpha", alpha), real("exponent", exponent, lo=0.0)
    return Schedule(lambda t: init_value * _cosine(t, n, alpha, exponent), "cosine_decay")


def join(schedules, boundaries):
    """Schedule i from boundaries[i - 1] on, called with the steps since that boundary
    (optax.join_schedules): any warmup can precede any decay."""
    schedules, boundaries = list(schedules), [count(f"boundaries[{i}]", b, lo=0)
                                              for i, b in enumerate(boundaries)]
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"boundaries: expected {len(schedules) - 1} (one fewer than the "
                         f"schedules), got {len(boundaries)}")
    if boundaries != sorted(boundaries):
        raise ValueError(f"boundaries must not decrease, got {boundaries}")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] is not a schedule")

    def fn(t):
        out = schedules[0](t)
        for start, s in zip(boundaries, schedules[1:]):
            out = np.where(t >= start, s(t - start), out)
        return out
    return Schedule(fn, "join")


def warmup_linear(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0):
    """Linear warmup from init_value to peak_value over warmup_steps, then linear decay to
    end_value at decay_steps (counted from step 0, warmup included)."""
    warmup = count("warmup_steps", warmup_steps, lo=0)
    total = count("decay_steps", decay_steps, lo=warmup + 1)
    return join([linear(init_value, peak_value, max(warmup, 1)),
                 linear(peak_value, end_value, total - warmup)], [warmup])


def warmup_cosine_decay(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0,
                        exponent=1.0):
    """Linear warmup to peak_value, then cosine decay to end_value at decay_steps (warmup
    included), as optax.warmup_cosine_decay_schedule."""
    warmup = count("warmup_steps", warmup_steps, lo=0)
    total = count("decay_steps", decay_steps, lo=warmup + 1)
    peak = real("peak_value", peak_value, lo=0.0, lo_open=True)
    alpha = real("end_value", end_value) / peak
    return join([linear(init_value, peak, max(warmup, 1)),
                 cosine_decay(peak, total - warmup, alpha, exponent)], [warmup])


def cyclic_triangular(base_value, max_value, step_size_up, step_size_down=None,
                      mode="triangular", gamma=1.0, base_momentum=0.8, max_momentum=0.9):
    """torch's CyclicLR in closed form (modes triangular, triangular2, exp_range); its
    ``momentum`` schedule moves inversely between max_momentum and base_momentum."""
    base, high = real("base_value", base_value, lo=0.0), real("max_value", max_value, lo=0.0)
    up = float(count("step_size_up", step_size_up, lo=1))
    down = up if step_size_down is None else float(
        count("step_size_down", step_size_down, lo=1))
    choice("mode", mode, ("triangular", "triangular2", "exp_range"))
    gamma = real("gamma", gamma, lo=0.0, lo_open=True)
    m_low = real("base_momentum", base_momentum, lo=0.0, hi=1.0)
    m_high = real("max_momentum", max_momentum, lo=0.0, hi=1.0)
    total, ratio = up + down, up / (up + down)

    def height(t):
        cycle = np.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        h = np.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        if mode == "triangular":
            return h
        if mode == "triangular2":
            return h * (1 / 2.0 ** (cycle - 1))
        return h * gamma ** t
    return Schedule(lambda t: base + (high - base) * height(t), "cyclic_triangular",
                    Schedule(lambda t: m_high - (m_high - m_low) * height(t), "momentum"))


def one_cycle(total_steps, max_value, pct_start=0.3, anneal_strategy="cos", div_factor=25.0,
              final_div_factor=1e4, three_phase=False, base_momentum=0.85, max_momentum=0.95):
    """torch's OneCycleLR in closed form, with its ``momentum`` schedule."""
    total = count("total_steps", total_steps, lo=1)
    high = real("max_value", max_value, lo=0.0, lo_open=True)
    pct = real("pct_start", pct_start, lo=0.0, hi=1.0)
    choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    start = high / real("div_factor", div_factor, lo=0.0, lo_open=True)
    low = start / real("final_div_factor", final_div_factor, lo=0.0, lo_open=True)
    m_low = real("base_momentum", base_momentum, lo=0.0, hi=1.0)
    m_high = real("max_momentum", max_momentum, lo=0.0, hi=1.0)
    up_end = float(pct * total) - 1
    if flag("three_phase", three_phase):
        phases = [(up_end, start, high, m_high, m_low),
                  (float(2 * pct * total) - 2, high, start, m_low, m_high),
                  (total - 1, start, low, m_high, m_high)]
    else:
        phases = [(up_end, start, high, m_high, m_low), (total - 1, high, low, m_low, m_high)]

    def anneal(a, b, frac):
        if anneal_strategy == "cos":
            return b + (a - b) / 2.0 * (np.cos(np.pi * frac) + 1)
        return (b - a) * frac + a

    def value(t, which):
        out = np.zeros_like(t)
        done = np.zeros(t.shape, bool)
        begin = 0.0
        for i, phase in enumerate(phases):
            end = phase[0]
            here = ~done & ((t <= end) | (i == len(phases) - 1))
            frac = (t - begin) / (end - begin)
            out = np.where(here, anneal(phase[which], phase[which + 1], frac), out)
            done |= here
            begin = end
        return out
    return Schedule(lambda t: value(t, 1), "one_cycle",
                    Schedule(lambda t: value(t, 3), "momentum"))


def sgdr(init_value, T_0, T_mult=1, eta_min=0.0):
    """Cosine annealing with warm restarts (torch's CosineAnnealingWarmRestarts): cycles of
    T_0, T_0 T_mult, ... steps, each from init_value down toward eta_min."""
    init_value = real("init_value", init_value)
    T_0, T_mult = count("T_0", T_0, lo=1), count("T_mult", T_mult, lo=1)
    eta_min = real("eta_min", eta_min, lo=0.0)

    def fn(t):
        t = np.maximum(t, 0)
        if T_mult == 1:
            cur, length = np.mod(t, T_0), np.full_like(t, T_0)
        else:  # cycle k starts at T_0 (T_mult^k - 1) / (T_mult - 1)
            k = np.floor(np.log(t / T_0 * (T_mult - 1) + 1) / np.log(T_mult))
            first = T_0 * (T_mult ** k - 1) / (T_mult - 1)
            k = np.where(first > t, k - 1, k)  # guard the logarithm's rounding
            k = np.where(T_0 * (T_mult ** (k + 1) - 1) / (T_mult - 1) <= t, k + 1, k)
            cur = t - T_0 * (T_mult ** k - 1) / (T_mult - 1)
            length = T_0 * T_mult ** k
        return eta_min + (init_value - eta_min) * (1 + np.cos(np.pi * cur / length)) / 2
    return Schedule(fn, "sgdr")


def plot(schedule, steps, path):
    """Write a PNG of ``schedule`` over ``steps`` (an int: 0..steps-1, or an array) to
    `path`, with its momentum on a second axis when it cycles one. Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("fastopt.schedules.plot needs matplotlib: pip install "
                          "'fastopt[plot]'") from None
    if not callable(schedule):
        raise TypeError(f"schedule must be a schedule (a function of the step), got "
                        f"{type(schedule).__name__}")
    steps = np.arange(count("steps", steps, lo=1)) if isinstance(steps, numbers.Integral) \
        else np.asarray(steps)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, schedule(steps), color="tab:blue", label="learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    momentum = getattr(schedule, "momentum", None)
    if momentum is not None:
        ax2 = ax.twinx()
        ax2.plot(steps, momentum(steps), color="tab:orange", label="momentum")
        ax2.set_ylabel("momentum")
        fig.legend(loc="upper right")
    ax.set_title(getattr(schedule, "name", "schedule"))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path

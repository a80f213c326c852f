"""The harness's JAX rows: fastopt.jax's fused step beside optax's own rule, and
fastopt.jax's update through optax's interface beside optax's in a training step that makes
its gradients inside, each jitted with the parameters and the state donated, as a JAX
training loop runs them; for the rules fastopt.jax has, when jax and optax import.

They are timed in a process of their own (``python -m fastopt.bench.jaxrows CONFIG``, run by
run_isolated), with the streaming kernel beside them for their percent of the limit: the
kernel inside jax.jit starts an OpenMP team on one of XLA's threads, and from then on the
OpenMP runtime counts more threads than cores and stops spinning between parallel regions,
which made torch's for-loop Adam in the harness's process 2.4x slower (the harness's
fresh-process check caught it).
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np

from fastopt.bench import _timing
from fastopt.bench._table import RULES
from fastopt.bench._timing import (
    arrays,
    case_rows,
    draw,
    matrix_sizes,
    parse_case,
    row_line,
    stream_case,
    time_interleaved,
)

_STREAM = "stream limit (C kernel)"


# fastopt.jax's factory of an array API class whose name is not the class's lowercased
# (optax.contrib's names)
_FACTORIES = {"AdamWScheduleFree": "schedule_free_adamw", "SGDScheduleFree": "schedule_free_sgd"}


def _optax_rule(optax, name):
    """optax's rule `name` and its name for the table (adopt and ademamix are in
    optax.contrib)."""
    if hasattr(optax, name):
        return getattr(optax, name), f"optax.{name}"
    return getattr(optax.contrib, name), f"optax.contrib.{name}"


def _hyper(spec):
    """optax's arguments for the harness's (torch-style) hyperparameters of a rule."""
    hyper = {"learning_rate": spec.hyper["lr"]}
    hyper.update({k: spec.hyper[k] for k in ("weight_decay", "momentum") if k in spec.hyper})
    return hyper


def available():
    return all(importlib.util.find_spec(m) is not None for m in ("jax", "optax"))


def implementations(spec, sizes, n_threads):
    """(name, factory) pairs for the rule of `spec` (a fastopt.bench._table.Rule) on tensors of
    `sizes`: [] when fastopt.jax has no factory for the rule (or not its options)."""
    import jax
    import optax

    import fastopt.jax as fjax

    name = _FACTORIES.get(spec.cls, spec.cls.lower())
    if name not in fjax.__all__ or spec.hyper.keys() - {"lr", "weight_decay", "momentum",
                                                        "cautious"}:
        return []
    hyper = _hyper(spec)
    # fastopt.jax's options: clipping, the cautious variant (optax has none: no optax row)
    options = {} if spec.clip is None else {"max_grad_norm": spec.clip}
    cautious = spec.hyper.get("cautious", False)
    if cautious:
        options["cautious"] = True

    def data():
        params = [jax.numpy.asarray(a) for a in arrays(sizes, np.float32, 1, spec.matrix)]
        grads = [jax.numpy.asarray(a) for a in arrays(sizes, np.float32, 2, spec.matrix)]
        return params, grads

    def fused():
        tx = ours()
        params, grads = data()
        return _donated(jax, jax.jit(tx.step, donate_argnums=(0, 2)), params,
                        _inputs(jax, spec, grads, lambda g: jax.tree.map(jax.numpy.negative, g)),
                        tx.init(params))

    def through_update(tx, inside):
        """update, then apply_updates. `inside`: the gradients are made inside the step, as a
        training step's are (by the backward pass), dead after the update: here the negated
        arguments behind a lax.cond on a traced flag, so that they are materialized as a
        backward pass's are, for either transformation (XLA fuses nothing across the cond);
        else they are arguments (not donated), which XLA copies where the kernel writes
        the updates over them."""
        params, grads = data()

        def step(p, g, s):
            if inside:
                g = jax.lax.cond(g[1], lambda g: [-x for x in g], lambda g: g, g[0])
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        if inside:  # the alternate inputs flip the flag
            inputs = _inputs(jax, spec, (grads, jax.numpy.asarray(True)),
                             lambda g: (g[0], jax.numpy.asarray(False)))
        else:
            inputs = _inputs(jax, spec, grads, lambda g: jax.tree.map(jax.numpy.negative, g))
        return _donated(jax, jax.jit(step, donate_argnums=(0, 2)), params, inputs,
                        tx.init(params))

    rule, label = _optax_rule(optax, name)

    def optax_tx():
        tx = rule(**hyper)
        if spec.clip is not None:  # optax's recipe: its clip transformation in front
            tx = optax.chain(optax.clip_by_global_norm(spec.clip), tx)
        return tx

    def ours():
        return getattr(fjax, name)(**hyper, **options, n_threads=n_threads)

    rows = [("fastopt.jax step", fused),
            ("fastopt.jax update, grads inside", lambda: through_update(ours(), True))]
    if cautious:
        return rows
    return rows + [(label, lambda: through_update(optax_tx(), False)),
                   (f"{label}, grads inside", lambda: through_update(optax_tx(), True))]


def _inputs(jax, spec, grads, negated):
    """The gradient inputs of successive steps, in turn: `grads`, and for a rule timed on
    alternating signs (fastopt.bench._table.ALTERNATING) also `negated(grads)`."""
    return [grads, jax.block_until_ready(negated(grads))] if spec.alternate else [grads]


def _donated(jax, step, params, inputs, state):
    """A call that runs one jitted `step(params, grads, state)` with the donated buffers of
    the last call's results, and waits for it; grads: the first of `inputs`, which turn
    round after each call. Each leaf of the first call's parameters and state is copied
    into a buffer of its own: a state may hold one array twice (optax.contrib.prodigy's
    initial state does), which XLA refuses to donate."""
    box = list(jax.tree.map(lambda x: jax.numpy.array(x, copy=True), (params, state)))

    def run():
        box[0], box[1] = step(box[0], inputs[0], box[1])
        inputs.append(inputs.pop(0))
        jax.block_until_ready(box)
    return run


def time_rows(rules, cases, n_threads, budget):
    """The JAX rows of `rules` x `cases`, timed in this process, each case's interleaved
    with the streaming kernel: its row is left out (the harness has its own), its time is
    each row's 'limit_ms', of which the row's percent is."""
    rows = []
    for case in cases:
        for rule in rules:
            spec = RULES[rule]
            sizes = parse_case(case)
            sizes = matrix_sizes(sizes) if spec.matrix else sizes
            impls = implementations(spec, sizes, n_threads)
            if not impls:
                continue
            names = [_STREAM] + [name for name, _ in impls]
            steps = [stream_case(sizes, spec.n_state, n_threads)]
            steps += [factory() for _, factory in impls]
            medians = time_interleaved(steps, budget=budget)
            draw.cache_clear()
            limit, *timed = case_rows(rule, case, spec, sizes, names, medians)
            rows += [dict(row, limit_ms=limit["median_ms"]) for row in timed]
            del steps
    return rows


def run_isolated(rules, cases, n_threads, budget, out):
    """time_rows in a fresh process; its rows, printed to `out` as the harness prints its
    own. [] when jax or optax is missing (or none of `rules` is in fastopt.jax); a failed
    run prints a WARNING line and gives []."""
    if not available() or not rules or not cases:
        return []
    config = dict(rules=list(rules), cases=list(cases), n_threads=n_threads, budget=budget,
                  evict_bytes=_timing.EVICT_BYTES)
    proc = subprocess.run([sys.executable, "-m", "fastopt.bench.jaxrows", json.dumps(config)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"WARNING: the JAX rows' process failed (exit {proc.returncode}): "
              f"{proc.stderr.strip()[-500:]}", file=out, flush=True)
        return []
    rows = json.loads(proc.stdout)
    if rows:
        print("fastopt.jax's fused step beside optax's rule, and its update (optax's "
              "interface, then optax.apply_updates) beside optax's with the gradients made "
              "inside the step; each jitted with the parameters and the state donated, timed "
              "in a process of their own:", file=out)
        for row in rows:
            print(row_line(row), file=out, flush=True)
    return rows


def main(argv=None):
    config = json.loads((sys.argv[1:] if argv is None else argv)[0])
    _timing.EVICT_BYTES = config["evict_bytes"]
    json.dump(time_rows(config["rules"], config["cases"], config["n_threads"],
                        config["budget"]), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

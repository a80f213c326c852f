"""The harness's training-loop table (``python -m fastopt.bench --train 20x512,100x256``): a
stack of Linear layers trained with ``loss.backward(); opt.step()``, the forward+backward
pass and the optimizer step timed apart, for fastopt.torch, fastopt's array API on the same
tensors, and torch's for-loop, foreach and fused implementations, in interleaved rounds.

A model ``LxW`` has L Linear(W, W) layers with biases (2L parameter tensors, L*W*(W+1)
elements) and a tanh between them, on a batch of 64. The step's GB/s counts the rule's
nominal traffic, and its limit is the streaming kernel's time for the same tensors, as in
the optimizer table.
"""

import statistics
import time

import fastopt
from fastopt.bench import _timing

BATCH = 64
IMPLEMENTATIONS = ("fastopt.torch", "fastopt array API", "torch for-loop", "torch foreach",
                   "torch fused")


def parse_model(text):
    layers, width = text.lower().split("x")
    return int(layers), int(width)


def _model(torch, layers, width):
    torch.manual_seed(0)
    stack = []
    for _ in range(layers):
        stack += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*stack)


def _optimizer(torch, name, spec, params, n_threads):
    """The step function of implementation `name` of rule `spec` for `params`."""
    if name == "fastopt.torch":
        import fastopt.torch as ft
        return getattr(ft, spec.cls)(params, n_threads=n_threads, **spec.hyper).step
    if name == "fastopt array API":
        leaves = [p.detach() for p in params]
        opt = getattr(fastopt, spec.cls)(leaves, n_threads=n_threads, **spec.hyper)
        return lambda: opt.step([p.grad for p in params])
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True)}[name.removeprefix("torch ")]
    return getattr(torch.optim, spec.torch)(params, **flags, **spec.hyper).step


def run_training(models, rule_names, rules, n_threads, budget, out):
    """Time every implementation on each model and rule (`rules`: the harness's specs by
    name); print the table to `out`; return its rows."""
    import torch
    torch.set_num_threads(n_threads)
    print(f"\ntraining loop: forward+backward and one optimizer step, float32, batch {BATCH}, "
          f"{n_threads} threads", file=out)
    header = (f"{'model':<8} {'rule':<6} {'implementation':<20} {'fwd+bwd ms':>10} "
              f"{'step ms':>8} {'GB/s':>6} {'% limit':>8} {'vs foreach':>10}")
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for model_name in models:
        layers, width = parse_model(model_name)
        x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(1))
        for rule_name in rule_names:
            spec = rules[rule_name]
            if spec.clip is not None:
                print(f"{model_name:<8} {rule_name:<6} skipped: the training loop times rules "
                      f"without clipping", file=out)
                continue
            loops, names = [], []
            for name in IMPLEMENTATIONS:
                if name.startswith("torch") and spec.torch is None:
                    continue  # torch has no such rule
                model = _model(torch, layers, width)
                params = list(model.parameters())
                try:
                    step = _optimizer(torch, name, spec, params, n_threads)
                except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
                    print(f"{model_name:<8} {rule_name:<6} {name:<20} skipped: {exc}",
                          file=out)
                    continue
                loops.append((model, step))
                names.append(name)
            sizes = [p.numel() for p in loops[0][0].parameters()]
            stream = _timing.stream_case(sizes, spec.n_state, n_threads)
            passes, steps, limit = _time_loops(torch, loops, x, stream, budget)
            n = sum(sizes)
            nbytes = n * 4 * spec.traffic
            limit *= spec.traffic / (2 * (spec.n_state + 1) + 1)
            foreach = steps[names.index("torch foreach")] if "torch foreach" in names else None
            for name, fwd_bwd, seconds in zip(names, passes, steps):
                row = dict(rule=rule_name, case=f"train {model_name}", tensors=len(sizes),
                           elements=n, implementation=name, fwd_bwd_ms=fwd_bwd * 1e3,
                           median_ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                           pct_limit=100 * limit / seconds,
                           vs_foreach=None if foreach is None else foreach / seconds)
                rows.append(row)
                ratio = "" if foreach is None else f"{foreach / seconds:.2f}x"
                print(f"{model_name:<8} {rule_name:<6} {name:<20} {row['fwd_bwd_ms']:>10.2f} "
                      f"{row['median_ms']:>8.2f} {row['gbps']:>6.1f} {row['pct_limit']:>7.0f}% "
                      f"{ratio:>10}", file=out, flush=True)
    return rows


def _time_loops(torch, loops, x, stream, budget, min_rounds=5, max_rounds=200, pause=0.005):
    """Median seconds of each loop's forward+backward and of its step, and of the streaming
    kernel, in interleaved rounds (each starting one loop later than the last)."""
    def fwd_bwd(model):
        model.zero_grad()
        model(x).square().mean().backward()

    for model, step in loops:  # warm-up: state allocation, first touch
        for _ in range(2):
            fwd_bwd(model)
            step()
    passes, steps, streams = [[] for _ in loops], [[] for _ in loops], []
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget):
        for k in range(len(loops)):
            index = (rounds + k) % len(loops)
            model, step = loops[index]
            time.sleep(pause)
            t0 = time.perf_counter()
            fwd_bwd(model)
            t1 = time.perf_counter()
            step()
            t2 = time.perf_counter()
            passes[index].append(t1 - t0)
            steps[index].append(t2 - t1)
        time.sleep(pause)
        t0 = time.perf_counter()
        stream()
        streams.append(time.perf_counter() - t0)
        rounds += 1
    return ([statistics.median(t) for t in passes], [statistics.median(t) for t in steps],
            statistics.median(streams))

"""The weight EMA: an exponential moving average of the parameters, in place, as
``torch.optim.swa_utils.get_ema_multi_avg_fn`` updates an ``AveragedModel``."""

from fastopt import _backends, _interop
from fastopt._check import real
from fastopt._config import check_threads, get_num_threads


def check_decay(decay, name="decay"):
    """`decay` as a float in [0, 1] (torch's range)."""
    return real(name, decay, lo=0.0, hi=1.0)


def ema_update_(ema_params, params, decay=0.999, *, backend="auto", n_threads=None):
    r"""Move each average toward its parameter, in place, in one pass:

    .. math::

        e \leftarrow e + (1 - \delta)(p - e)

    as torch's ``lerp`` (``torch.optim.swa_utils.get_ema_multi_avg_fn``, which
    ``AveragedModel(model, multi_avg_fn=...)`` calls after each step); bit-identical on every
    backend. The optimizers' ``ema_decay=`` option keeps such an average in their state.

    Args:
        ema_params: list of mutable arrays (NumPy, PyTorch, CuPy): the averages, float32 or
            float64, changed in place.
        params: list of arrays of the same shapes, dtypes, framework and device.
        decay (float): :math:`\delta` in [0, 1]. Default 0.999.
        backend, n_threads: as for the optimizers.

    Returns:
        list: ``ema_params``.

    Example:
        >>> import numpy as np, fastopt
        >>> ema, w = [np.zeros(2)], [np.array([1.0, -2.0])]
        >>> _ = fastopt.ema_update_(ema, w, decay=0.9)
        >>> ema[0]
        array([ 0.1, -0.2])
    """
    decay = check_decay(decay)
    n_threads = get_num_threads() if n_threads is None else check_threads(n_threads, "n_threads")
    _backends.check_name(backend)
    averages, sources = _pairs(ema_params, params)
    if not averages:
        return ema_params
    by_dtype = {}
    for e, p in zip(averages, sources):
        pair = by_dtype.setdefault(e.array.dtype, ([], []))
        pair[0].append(e.array)
        pair[1].append(p.array)
    for dtype, (es, ps) in by_dtype.items():
        _backends.resolve("ema_update", backend, averages[0].device[0], dtype)(
            es, ps, decay=decay, n_threads=n_threads)
    return ema_params


def _pairs(ema_params, params):
    """The kernel views of the averages (writable) and the parameters (read), checked: one
    each, matching shapes and dtypes, one framework and device, no average sharing memory
    with another array."""
    for name, arrays in (("ema_params", ema_params), ("params", params)):
        if _interop.framework_of(arrays) is not None or isinstance(arrays, (dict, set)) \
                or not hasattr(arrays, "__iter__"):
            raise TypeError(f"{name}: expected a list of arrays, got {type(arrays).__name__}")
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"ema_params and params: expected one average per parameter, got "
                         f"{len(ema_params)} and {len(params)}")
    averages, sources = [], []
    for i, (e, p) in enumerate(zip(ema_params, params)):
        ev = _interop.import_param(e, "ema_params", i)
        if ev.framework not in _interop.MUTABLE:
            raise TypeError(f"ema_params[{i}]: {ev.framework} arrays are immutable; keep the "
                            f"averages in NumPy, PyTorch or CuPy arrays, or use an "
                            f"optimizer's ema_decay= option")
        pv = _interop.import_grad(p, "params", i)
        first = averages[0] if averages else ev
        for what, view in ((f"ema_params[{i}]", ev), (f"params[{i}]", pv)):
            if view.framework != first.framework or view.device != first.device:
                raise ValueError(f"{what}: a {view.framework} array on {view.device[0]}, but "
                                 f"ema_params[0] is a {first.framework} array on "
                                 f"{first.device[0]}; pass arrays of one framework and device")
        if ev.array.dtype.name not in ("float32", "float64"):
            raise TypeError(f"ema_params[{i}]: dtype {ev.array.dtype} is not supported; keep "
                            f"averages in float32 or float64 (an optimizer's ema_decay= "
                            f"keeps float32 averages of low-precision parameters)")
        if pv.array.shape != ev.array.shape or pv.array.dtype != ev.array.dtype:
            raise ValueError(f"params[{i}]: shape {tuple(pv.array.shape)} and dtype "
                             f"{pv.array.dtype} do not match ema_params[{i}]'s "
                             f"({tuple(ev.array.shape)}, {ev.array.dtype})")
        averages.append(ev)
        sources.append(pv)
    spans = _interop.WrittenSpans(
        [(_interop.extent(v.array), f"ema_params[{i}]") for i, v in enumerate(averages)],
        [None] * len(sources))
    if spans.clash is None:
        k = spans.first_bad_read([v.array for v in sources], averages[0].device[0] == "cpu")
        clash = None if k is None else (
            spans.overlapped(_interop.extent(sources[k].array), None), f"params[{k}]")
    else:
        clash = spans.clash
    if clash is not None:
        raise ValueError(f"{clash[0]} and {clash[1]} share memory; give each average its own "
                         f"memory (a copy)")
    return averages, sources

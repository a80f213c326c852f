"""The contracts between the shared drivers and the backends, as typed Protocols.

- :class:`Compiled`: what a compiled backend (Cython, Numba, CuPy) provides for the optimizer
  rules; fastopt._backends._steps (elementwise rules) and fastopt._backends._twopass
  (multi-pass rules) drive it.
- :class:`SelectPasses`: the counting passes of the magnitude select, which
  fastopt._backends._select drives (each compiled backend's ``compress`` module).

The NumPy reference implements each operation in full instead (one function per rule, named
after its registry operation), so it has no contract with the drivers.
"""

from typing import Protocol


class Compiled(Protocol):
    """A compiled backend, for the rules of the rule table (fastopt._rules)."""

    MASKS_IN_KERNELS: bool  # whether elementwise() zeroes pruned entries itself
    KERNELS: dict  # kernel name of the rule table -> number of state operands it takes
    # the storage codes (fastopt._backends._formats) elementwise() converts inside its
    # passes; optional (none: every low-precision call goes through _formats.around)
    FORMATS: frozenset
    # optional: whether elementwise() takes ema= (none: the weight EMA runs as a pass of
    # its own after the update, fastopt._backends._steps.run_pass)
    FUSES_EMA: bool

    def elementwise(self, kernel, operands, record, n_threads, masks=None, n_aux=0,
                    formats=None, ema=None):
        """One pass of `kernel` over operand lists (param in, param out, grad, state...,
        the last `n_aux` per-tensor auxiliaries of any size), its scalars in `record`
        (fastopt._rules.Args.record); `masks` (one uint8 array per tensor) only where
        MASKS_IN_KERNELS. With `formats` (a _formats.Formats of codes in FORMATS), the
        operands are stored in those formats (the shadow after the state), `record` is in
        the compute dtype, and the bits equal _formats.around's. With `ema` (where
        FUSES_EMA; not with `formats`): (averages, their fo_ema_args record), each
        parameter's weight EMA moved toward its written value in the same pass, the bits
        of a pass of the ``ema`` kernel after it."""

    # optional: caution_counts(kernel, operands, record, n_threads, masks=None) -> per-tensor
    # counts of a cautious count kernel's K at the entries `masks` does not prune, summed
    # in its pass (none: K is written to scratch arrays, pruned entries zeroed, and summed
    # with norm_partials, fastopt._backends._steps.cautious_step)

    # optional: pass_sums(kernel, operands, record, n_threads, sums, masks=None, n_aux=0,
    # discard=False) -> float64 (chunks, len(sums)): elementwise()'s pass (no formats or
    # EMA) that also returns, per (operand, kind) of `sums`, the norm_partials of that
    # element operand as the pass leaves it, summed while each chunk is in cache; with
    # `discard` (no auxiliaries), operand 1 is scratch whose sum is its one use, which the
    # backend need not store (its values after the pass are unspecified). None: a
    # norm_partials pass each (fastopt._backends._twopass.pass_sums)

    def norm_partials(self, arrays, kind, *, n_threads):
        """fastopt/reduce.h's partial norms, one float64 per FO_CHUNK chunk, on the host."""

    def factors(self, grads, rows, cols, rmeans, shape, bands, blocks, slices, record,
                n_threads):
        """Adafactor's factors pass over the work of _twopass.factor_work(shape), in
        fastopt/reduce.h's factored order (the work's split does not change the bits)."""

    def device(self, arrays, like):
        """Host arrays as arrays beside `like` (the CPU backends: themselves)."""


class SelectPasses(Protocol):
    """The counting passes of the magnitude select (see fastopt._backends._select)."""

    def prune_hist(self, arrays, shift, pmask, prefix, n_threads):
        """(FO_DIGIT_BINS counts, max key): the histogram of the digit at `shift` of the
        keys matching the prefix so far, and, in the first pass (pmask 0), the largest key."""

    def prune_ties(self, arrays, thr, n_threads):
        """How many keys equal `thr`, per FO_CHUNK chunk."""

    def prune_mask(self, arrays, masks, thr, tie_modes, n_threads):
        """Write the keep-masks."""

    # optional, together: prune_sample(arrays, n, n_threads) -> the magnitude keys of about
    # n elements spread over the arrays, one row per run of consecutive elements;
    # prune_split(arrays, masks, lo, hi, n_threads) -> (keys, positions, below, maxkey):
    # the masks of every key outside [lo, hi], the keys inside with their flat positions,
    # how many keys are below lo and the largest key; and prune_settle(masks, keys,
    # positions, thr, ties, n_threads): those keys' masks (left 0 by prune_split), given
    # the threshold and how many of its ties (first in order) are pruned

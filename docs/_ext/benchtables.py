"""Sphinx extension: benchmark tables generated from the harness's JSON output.

``python -m fastopt.bench`` writes ``bench-results.json`` (see fastopt/bench/__init__.py)::

    {"fastopt": "0.1.0", "dtype": "float32",
     "machine": {"platform": ..., "processor": ..., "threads": ..., "cpu_count": ...},
     "rows": [{"rule", "case", "tensors", "elements", "implementation",
               "median_ms", "gbps", "pct_limit"}, ...]}

Copies of it are committed as ``docs/_data/bench-YYYY-MM-DD[-label].json``. The file name
carries the date of the run (the harness's JSON has none; a top-level ``"date"`` key, if a
later harness writes one, takes precedence). The directive ::

    .. bench-results::
       :files: _data/bench-*.json
       :kind: all

renders, for each matching file (newest first), a line naming the machine and date, then a
table per kind of row: optimizer steps (rules of ``fastopt.bench.RULES``), other
operations (``--ops``), storage formats (``--formats``: rows with a
``bytes_per_element``, each against the limit of its own bytes) and training loops
(``--train``: rows with a ``fwd_bwd_ms``). Rows are (rule, case);
columns are the implementations in the order the harness ran them; each cell is the
percent of the streaming limit and the median time. Nothing in the tables is typed by
hand: rerun the harness and replace the JSON to update them.
"""

import glob
import json
import os
import re

from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

LIMIT = "stream limit (C kernel)"
_DATE = re.compile(r"bench-(\d{4}-\d{2}-\d{2})")
_RULE_LABELS = {"adam+clip": "adam + max_grad_norm"}


def _optimizer_rules():
    """The harness's optimizer rule names, to tell step rows from --ops rows."""
    try:
        from fastopt.bench import RULES
    except ImportError:  # fastopt not importable: every row counts as a step
        return None
    return set(RULES)


def _date_of(path, data):
    if data.get("date"):
        return str(data["date"])
    match = _DATE.search(os.path.basename(path))
    return match.group(1) if match else None


def _case_label(row):
    if row.get("tensors", 1) > 1:
        return f"{row['case']} ({row['tensors']} tensors)"
    return row["case"]


def _training_cell(row, name):
    if row is None:
        return "-"
    ratio = "" if row.get("vs_foreach") is None else f", {row['vs_foreach']:.2f}x foreach"
    return (f"step {row['median_ms']:.2f} ms ({row['pct_limit']:.0f}%{ratio}); "
            f"fwd+bwd {row['fwd_bwd_ms']:.1f} ms")


def _table(title, rows, cell=None):
    """reST list-table lines: one row per (rule, case), one column per implementation;
    `cell(row, implementation)` (default: % of the limit and the time) fills each."""
    impls, keys, cells = [], [], {}
    for row in rows:
        key = (row["rule"], _case_label(row))
        if key not in cells:
            keys.append(key)
            cells[key] = {}
        if row["implementation"] not in impls:
            impls.append(row["implementation"])
        cells[key][row["implementation"]] = row
    # the limit first (its time is the reference), then fastopt's implementations, then the
    # others (torch, the NumPy reference), each group in the order the harness ran them
    impls.sort(key=lambda name: (name != LIMIT, not name.startswith("fastopt")))

    def default_cell(row, name):
        if row is None:
            return "-"
        if name == LIMIT:
            return f"{row['median_ms']:.2f} ms, {row['gbps']:.1f} GB/s"
        return f"{row['pct_limit']:.0f}% ({row['median_ms']:.2f} ms)"
    cell = cell or default_cell

    lines = [f".. list-table:: {title}", "   :header-rows: 1", "   :stub-columns: 2", ""]
    header = ["operation", "case"] + impls
    lines.append("   * - " + header[0])
    lines += [f"     - {h}" for h in header[1:]]
    for rule, case in keys:
        lines.append(f"   * - {_RULE_LABELS.get(rule, rule)}")
        lines.append(f"     - {case}")
        lines += [f"     - {cell(cells[(rule, case)].get(name), name)}" for name in impls]
    return lines + [""]


def _kind(value):
    return directives.choice(value, ("all", "steps", "ops", "formats", "training"))


class BenchResults(SphinxDirective):
    """``.. bench-results::`` with options ``:files:`` (a glob relative to the source
    folder; default ``_data/bench-*.json``), ``:kind:`` (all, steps, ops, formats, training) and
    ``:latest:``
    (only the newest file)."""

    has_content = False
    option_spec = {"files": directives.unchanged, "kind": _kind, "latest": directives.flag}

    def run(self):
        pattern = self.options.get("files", "_data/bench-*.json")
        kind = self.options.get("kind", "all")
        srcdir = str(self.env.srcdir)
        paths = sorted(glob.glob(os.path.join(srcdir, pattern)))
        self.env.fastopt_bench_docs = getattr(self.env, "fastopt_bench_docs", set())
        self.env.fastopt_bench_docs.add(self.env.docname)
        if not paths:
            logger.warning(
                "bench-results: no file matches %s", pattern, location=self.get_location()
            )
            return []
        runs = []
        for path in paths:
            self.env.note_dependency(path)
            with open(path) as f:
                data = json.load(f)
            date = _date_of(path, data)
            if date is None:
                logger.warning(
                    "bench-results: %s has no date (name it bench-YYYY-MM-DD*.json)",
                    os.path.relpath(path, srcdir),
                    location=self.get_location(),
                )
                date = "unknown date"
            runs.append((date, path, data))
        runs.sort(key=lambda run: run[0], reverse=True)
        if "latest" in self.options:
            runs = runs[:1]
        rules = _optimizer_rules()
        text = []
        for date, path, data in runs:
            machine = data.get("machine", {})
            rel = os.path.relpath(path, srcdir)
            text += [
                f"**{date}**: {machine.get('processor', 'unknown CPU')}, "
                f"{machine.get('threads', '?')} threads of {machine.get('cpu_count', '?')} "
                f"CPUs, {machine.get('platform', 'unknown platform')}; fastopt "
                f"{data.get('fastopt', '?')}, {data.get('dtype', 'float32')} "
                f"(``docs/{rel}``).",
                "",
            ]
            formats = [r for r in data["rows"] if "bytes_per_element" in r]
            training = [r for r in data["rows"] if "fwd_bwd_ms" in r]
            rest = [r for r in data["rows"]
                    if "bytes_per_element" not in r and "fwd_bwd_ms" not in r]
            steps = [r for r in rest if rules is None or r["rule"] in rules]
            ops = [r for r in rest if rules is not None and r["rule"] not in rules]
            shown = 0
            if steps and kind in ("all", "steps"):
                text += _table(
                    f"One optimizer step, {date}: % of the streaming limit (median time)", steps
                )
                shown += 1
            if ops and kind in ("all", "ops"):
                text += _table(f"Operations, {date}: % of the streaming limit (median time)", ops)
                shown += 1
            if formats and kind in ("all", "formats"):
                text += _table(f"Storage formats, {date}: one AdamW step, % of the streaming "
                               f"limit of each format's bytes (median time)", formats)
                shown += 1
            if training and kind in ("all", "training"):
                text += _table(f"Training loop, {date}: the optimizer step's time (% of the "
                               f"streaming limit, speed-up over torch's foreach) and the "
                               f"forward+backward pass's", training, _training_cell)
                shown += 1
            if not shown:
                text += [f"*(this run has no rows of kind {kind!r})*", ""]
        return self.parse_text_to_nodes("\n".join(text))


def _purge(app, env, docname):
    getattr(env, "fastopt_bench_docs", set()).discard(docname)


def _merge(app, env, docnames, other):
    env.fastopt_bench_docs = getattr(env, "fastopt_bench_docs", set())
    env.fastopt_bench_docs |= getattr(other, "fastopt_bench_docs", set()) & set(docnames)


def _outdated(app, env, added, changed, removed):
    # a new or removed JSON file changes the glob's matches: always re-read those pages
    return sorted(getattr(env, "fastopt_bench_docs", set()) - set(removed))


def setup(app):
    app.add_directive("bench-results", BenchResults)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-get-outdated", _outdated)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

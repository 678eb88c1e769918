"""A report (or a gate's output) as one self-contained HTML page: no scripts, no external files,
the plots inline as SVG, so it can be attached to a CI run and opened anywhere."""

from __future__ import annotations

import re
from html import escape
from typing import Any

from ._sizes import memory_line
from .compare import flatten
from .gate import GATE_SCHEMA, format_value
from .plots import all_plots

STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } code { font-size: 0.95em; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 0; border: 1px solid #ddd; }
.pass { color: #1a7f37; } .warn { color: #9a6700; } .fail, .error { color: #cf222e; font-weight: bold; }
"""


def render_html(data: dict[str, Any], title: str = "curvscope report") -> str:
    """The page for a report dict, or for a gate --json output (verdicts, then its report)."""
    gate = data if data.get("schema") == GATE_SCHEMA else None
    report = gate["report"] if gate else data
    parts = [f"<h1>{escape(title)}</h1>"]
    if gate:
        parts.append(_verdicts(gate))
    parts.append(_summary(report))
    plots = all_plots(report)
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>")
        parts += [f"<figure id='plot-{name}'>{svg}</figure>" for name, svg in plots.items()]
        parts.append("</div>")
    parts.append("<h2>Results</h2>" + _values(report.get("results", {})))
    for block, results in (report.get("per_layer") or {}).items():
        parts.append(f"<h2>Layer <code>{escape(block)}</code></h2>" + _values(results))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def _summary(report: dict[str, Any]) -> str:
    rows = []
    model = report.get("model", {})
    rows.append(("model", f"{model.get('sha256', '')[:12]} ({model.get('format', '')}, "
                          f"{model.get('num_parameters', 0):,} parameters)"))
    if "data" in report:
        rows.append(("data", f"{report['data']['sha256'][:12]} ({report['data']['num_samples']:,} samples)"))
    if "loss" in report:
        rows.append(("loss", f"{report['loss']['name']} = {report['loss']['value']:.6g}"))
    rows.append(("run", f"{report.get('curvature', 'hessian')}, {report.get('precision', 'float32')}, "
                        f"seed {report.get('seed', 0)}, {report.get('device', '')}, {report.get('seconds', 0.0):.2f} s"))
    memory = memory_line(report.get("run"))
    if memory:
        rows.append(("memory", memory))
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _values(results: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td><code>{escape(path)}</code></td><td class='num'>{escape(format_value(value))}</td></tr>"
                   for path, value in flatten(results))
    return f"<table>{rows}</table>"


def _verdicts(gate: dict[str, Any]) -> str:
    status = gate.get("status", "")
    rows = "".join(
        f"<tr class='{escape(v['status'])}'><td>{escape(v['status'].upper())}</td><td>{escape(v['check'])}</td>"
        f"<td><code>{escape(v['path'])}</code></td><td class='num'>{escape(format_value(v.get('value')))}</td>"
        f"<td class='num'>{escape(format_value(v.get('baseline')))}</td>"
        f"<td>{escape('; '.join(v.get('reasons', [])) or v.get('bounds', ''))}</td></tr>"
        for v in gate.get("verdicts", []))
    failed = "".join(f"<li><code>{escape(name)}</code>: {escape(error)}</li>"
                     for name, error in gate.get("failed_analyses", {}).items())
    return (f"<h2>Gate: <span class='{escape(status)}'>{escape(status.upper())}</span></h2>"
            "<table><tr><th>verdict</th><th>check</th><th>path</th><th>value</th><th>baseline</th><th>detail</th></tr>"
            f"{rows}</table>" + (f"<p>Failed analyses:</p><ul>{failed}</ul>" if failed else ""))


# The page's rules, each scoped to the fragment's own element so that a notebook's page keeps its
# look; the page-level margins and width are dropped (a notebook cell sets them).
_PAGE_ONLY = ("margin", "max-width")


def render_fragment(data: dict[str, Any], title: str = "curvscope report") -> str:
    """The same page's content as one ``<div>`` (its style scoped to it), for Jupyter's
    ``_repr_html_``: what ``render_html`` writes between ``<body>`` and ``</body>``."""
    page = render_html(data, title)
    body = page[page.index("<body>") + len("<body>"):page.rindex("</body>")]
    return f"<div class='curvscope-report'><style>{_scoped_style(STYLE)}</style>{body}</div>"


def _scoped_style(style: str) -> str:
    rules = []
    for selectors, declarations in re.findall(r"([^{}]+)\{([^{}]*)\}", style):
        scoped = []
        for selector in (part.strip() for part in selectors.split(",")):
            scoped.append(".curvscope-report" if selector == "body" else f".curvscope-report {selector}")
        if selectors.strip() == "body":
            declarations = ";".join(d for d in declarations.split(";")
                                    if d.split(":")[0].strip() not in _PAGE_ONLY)
        rules.append(f"{', '.join(scoped)} {{{declarations.strip()}}}")
    return "\n".join(rules)

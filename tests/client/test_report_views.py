"""A report's notebook views: every value as a row (each row's path read back by the gate's own
path resolver), a pandas table, and the HTML report's page as one scoped block."""

from __future__ import annotations

import re

import pandas

from curvscope import Report
from curvscope.html_report import render_html
from curvscope.policy import parse_path, resolve
from tests.client.test_report import REPORT


def leaves(data):
    if isinstance(data, dict):
        return sum((leaves(value) for value in data.values()), [])
    if isinstance(data, list):
        return sum((leaves(value) for value in data), [])
    return [data]


def test_every_value_is_a_row_whose_path_the_gate_resolves_to_it():
    report = Report.from_dict(REPORT)
    document = report.to_dict()
    rows = report.to_rows()
    assert [row["value"] for row in rows] == leaves(document)  # every scalar, in order, none twice
    for row in rows:
        found = list(resolve(document, parse_path(row["path"])))
        assert len(found) == 1 and found[0][1] == row["value"], row["path"]
    layer_rows = [row for row in rows if row["section"] == "per_layer"]
    assert layer_rows and all(row["layer"] == "0" and row["analysis"] == "hessian_eigen" for row in layer_rows)
    assert {row["analysis"] for row in rows if row["section"] == "results"} == {"hessian_eigen"}


def test_to_pandas_holds_the_rows():
    report = Report.from_dict(REPORT)
    table = report.to_pandas()
    assert isinstance(table, pandas.DataFrame) and list(table.columns) == ["path", "section", "layer", "analysis", "value"]
    assert len(table) == len(report.to_rows())
    assert table.set_index("path").loc["results.hessian_eigen.largest[1]", "value"] == 2.0


def test_jupyter_shows_the_html_reports_page_as_one_scoped_block():
    report = Report.from_dict(REPORT)
    fragment = report._repr_html_()
    page = render_html(report.to_dict())
    body = page[page.index("<body>") + len("<body>"):page.rindex("</body>")]
    assert fragment.startswith("<div class='curvscope-report'><style>") and fragment.endswith(body + "</div>")
    style = re.search(r"<style>(.*?)</style>", fragment, re.S).group(1)
    rules = style.strip().splitlines()
    assert rules and all(rule.startswith(".curvscope-report") for rule in rules)  # the notebook's page keeps its look
    assert "max-width" not in style and "<html" not in fragment

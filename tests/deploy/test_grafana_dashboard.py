"""The Grafana dashboard and the metrics the server exports stay in step: every series a panel
queries exists, every curvscope metric is on some panel, and the layout is well formed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import prometheus_client
import pytest

import curvscope_service.metrics  # noqa: F401 - registers the service's metrics
import curvscope_service.server  # noqa: F401 - and whatever the server registers

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_series() -> dict[str, str]:
    """Series name -> metric family, for every curvscope_* family in the default registry."""
    series = {}
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("curvscope_"):
            for suffix in SUFFIXES.get(family.type, ("",)):
                series[family.name + suffix] = family.name
    return series


def queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_queried_series_is_exported(dashboard):
    exported = exported_series()
    for expression in queries(dashboard):
        used = set(re.findall(r"\bcurvscope_[a-z_]+", expression))
        assert used and used <= exported.keys(), (expression, used - exported.keys())


def test_every_exported_metric_is_on_a_panel(dashboard):
    exported = exported_series()
    shown = {exported[name] for e in queries(dashboard) for name in re.findall(r"\bcurvscope_[a-z_]+", e)}
    assert {"curvscope_rpc_seconds", "curvscope_queue_depth"} <= set(exported.values())
    assert set(exported.values()) - shown == set()


def test_layout_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pod"}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            for target in panel["targets"]:
                # Rates over Grafana's own interval; every query scoped to the chosen pods.
                assert 'pod=~"$pod"' in target["expr"], target["expr"]
                assert "[$__rate_interval]" in target["expr"] or "rate(" not in target["expr"]
    # No two panels overlap.
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, panel["title"]
        cells |= area

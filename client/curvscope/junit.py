"""Gate verdicts as JUnit XML (the Jenkins/Surefire dialect every CI system reads): one
testcase per checked value; a fail is a <failure>, an unmeasured value an <error>, and a warning
passes with its text in <system-out>."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from .gate import ERROR, FAIL, WARN, GateResult, format_change, format_value


def junit_xml(result: GateResult, seconds: float = 0.0, suite: str = "curvscope gate") -> str:
    counts = result.counts()
    root = ET.Element("testsuites", name=suite, tests=str(len(result.verdicts)), failures=str(counts[FAIL]),
                      errors=str(counts[ERROR]), time=f"{seconds:.3f}")
    testsuite = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(result.verdicts)), failures=str(counts[FAIL]),
        errors=str(counts[ERROR]), skipped="0", time=f"{seconds:.3f}",
        timestamp=datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None).isoformat(),
        hostname=socket.gethostname() or "localhost")
    properties = ET.SubElement(testsuite, "properties")
    report = result.report or {}
    for name, value in (("policy", result.policy),
                        ("model.sha256", report.get("model", {}).get("sha256", "")),
                        ("data.sha256", report.get("data", {}).get("sha256", "")),
                        ("baseline.model.sha256", (result.baseline or {}).get("model", {}).get("sha256", ""))):
        ET.SubElement(properties, "property", name=name, value=str(value))
    for analysis, error in result.failed_analyses.items():
        ET.SubElement(properties, "property", name=f"failed.{analysis}", value=error)
    for verdict in result.verdicts:
        case = ET.SubElement(testsuite, "testcase", name=f"{verdict.check} [{verdict.path}]",
                             classname=f"curvscope.gate.{verdict.analysis or 'report'}", time="0")
        text = (f"value {format_value(verdict.value)}, baseline {format_value(verdict.baseline)}, "
                f"change {format_change(verdict)}\nbounds: {verdict.bounds}\n{verdict.detail}")
        if verdict.status == FAIL:
            ET.SubElement(case, "failure", message=verdict.detail, type="threshold").text = text
        elif verdict.status == ERROR:
            ET.SubElement(case, "error", message=verdict.detail, type="not measured").text = text
        elif verdict.status == WARN:
            ET.SubElement(case, "system-out").text = f"WARNING: {verdict.detail}\n{text}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(result: GateResult, path: str | Path, seconds: float = 0.0) -> None:
    Path(path).write_text(junit_xml(result, seconds), encoding="utf-8")
